"""Train a GPT on FineWeb token shards with Muon + AdamW and write a record log.

    torchrun --standalone --nproc_per_node=8 train_gpt.py            # the speedrun preset
    python train_gpt.py --preset cpu-tiny --train-files ... --val-files ...

Read top to bottom: config, distributed setup, data, model, optimizers, training loop with
periodic validation, summary. Every hyperparameter lives in `Config` (config.py); presets
override it and every field is also a command-line flag (`--field-name value`).
"""
import contextlib
import copy
import dataclasses
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta

# On CPU, glibc returns every freed tensor over 32 MiB to the kernel, so each step page-faults the
# head's float32 logits back in 4 KiB at a time: a third to half of a small CPU run's time went to
# the kernel. With this set, torch asks for 2 MiB pages for its CPU buffers over 2 MiB (measured
# 1.3-1.6x faster steps on 2 cores, docs/PERFORMANCE.md). torch reads it when it loads, so it comes
# before `import torch`; 0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import checkpoint
from config import Config, ConfigError, lr_stages, parse_config
from data.loader import TrainLoader, count_tokens, load_validation_tokens, validation_batches
from data.shards import EOT_TOKEN, ShardError, find_shards, read_header, whole_steps_in_shard
from model.attention import resolve_backend
from model.gpt import GPT, check_model_config
from model.memory import choose_micro_batch_tokens, compiled_estimate, estimate_training_memory
from optim.dist_adam import DistAdam
from optim.muon import Muon
from optim.normuon import NorMuon
from optim.schedules import Stages, lr_multiplier_at, muon_momentum_at
from optim.setup import build_optimizers

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))


def resolve_device(config):
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available: use --device cpu")
    if config.device not in ("cuda", "cpu"):
        raise ConfigError(f"--device {config.device} is not one of auto, cuda, cpu")
    return torch.device(config.device)


def resolve_dtype(config, device):
    if config.dtype == "auto":
        # bf16 matmuls pay off on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX).
        cpu_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.bfloat16 if device.type == "cuda" or cpu_bf16 else torch.float32
    if config.dtype not in ("bfloat16", "float32"):
        raise ConfigError(f"--dtype {config.dtype} is not one of auto, bfloat16, float32")
    return getattr(torch, config.dtype)


def uses_compile(config, device):
    return config.compile == "on" or (config.compile == "auto" and device.type == "cuda")


def compile_model(raw_model, backend="inductor"):
    """The model compiled with static shapes, as record #46 compiles it: a graph for each stage's row
    length and attention scale, training and validation. Left to itself, dynamo recompiles the second
    row length it meets with symbolic sizes, for FlexAttention too. Raises dynamo's process-wide
    recompile limit to make room for those graphs."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(raw_model, dynamic=False, backend=backend)


def resolve_micro_batch_tokens(config, world_size, device, dtype, use_compile, largest_multiplier=1):
    """(tokens per forward pass, why): the flag's number, or for auto the largest that fits the device.

    Both count tokens of the first stage: later stages of a batch-size schedule have as many rows,
    each `largest_multiplier` times longer at most, so auto sizes rows for the largest stage.
    """
    per_rank = config.batch_tokens // world_size
    if config.micro_batch_tokens != "auto":
        try:
            micro = int(config.micro_batch_tokens)
        except ValueError:
            raise ConfigError(f"--micro-batch-tokens {config.micro_batch_tokens} is not a number or auto") from None
        micro = min(micro, per_rank)
        if micro <= 0 or micro % config.seq_len or per_rank % micro:
            raise ConfigError(
                f"--micro-batch-tokens {config.micro_batch_tokens} must be a multiple of --seq-len {config.seq_len} "
                f"that divides the {per_rank} tokens each of {world_size} rank(s) computes per step")
        return micro, f"micro-batch {micro:,} tokens ({per_rank // micro} accumulation steps): set by the flag"
    if device.type != "cuda":
        return per_rank, (f"micro-batch {per_rank:,} tokens (1 accumulation step): auto on {device.type} takes a "
                          "rank's whole batch in one pass")
    largest = dataclasses.replace(config, batch_tokens=config.batch_tokens * largest_multiplier,
                                  seq_len=config.seq_len * largest_multiplier, batch_stages="")
    estimate = estimate_training_memory(largest, dtype)
    if use_compile:
        estimate = compiled_estimate(estimate)
    try:
        micro, reason = choose_micro_batch_tokens(largest, world_size,
                                                  torch.cuda.get_device_properties(device).total_memory, estimate)
    except ValueError as e:
        raise ConfigError(f"--micro-batch-tokens auto: {e}") from None
    if largest_multiplier > 1:
        reason += f" (in the largest stage; {micro // largest_multiplier:,} tokens in the first)"
    return micro // largest_multiplier, reason


def validate(config, world_size, device, dtype, use_compile):
    """Everything checkable before any work starts; returns (train paths, val paths, micro-batch tokens, why, stages)."""
    positive = ["steps", "batch_tokens", "seq_len", "val_tokens", "num_layers",
                "num_heads", "model_dim", "train_log_every", "adam_every", "window_block"]
    for name in positive:
        if getattr(config, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    if config.val_every < 0:
        raise ConfigError(f"--val-every must be 0 (only at the end) or positive, got {config.val_every}")
    if config.optimizer not in ("muon", "adamw", "normuon"):
        raise ConfigError(f"--optimizer {config.optimizer} is not one of muon, adamw, normuon")
    if config.muon_orthogonalizer not in ("newton_schulz", "polar_express"):
        raise ConfigError(f"--muon-orthogonalizer {config.muon_orthogonalizer} is not one of newton_schulz, polar_express")
    if config.optimizer != "normuon" and (config.muon_orthogonalizer != "newton_schulz" or config.adam_every != 1):
        raise ConfigError("--muon-orthogonalizer polar_express and --adam-every above 1 need --optimizer normuon")
    if config.val_seq_len < 0:
        raise ConfigError(f"--val-seq-len must be 0 (the --seq-len) or positive, got {config.val_seq_len}")
    stages = Stages.from_config(config)
    lr_stages(config)
    check_model_config(config)
    for name in ("compile", "progress"):
        if getattr(config, name) not in ("auto", "on", "off"):
            raise ConfigError(f"--{name} {getattr(config, name)} is not one of auto, on, off")
    if config.model_dim % config.num_heads or (config.model_dim // config.num_heads) % 2:
        raise ConfigError(f"--model-dim {config.model_dim} must split into --num-heads {config.num_heads} heads of even size")
    if not 0 <= config.bos_token < config.vocab_size:
        gpt2_hint = " (GPT-2's shards need 50257 tokens)" if config.bos_token == EOT_TOKEN else ""
        raise ConfigError(f"--vocab-size {config.vocab_size} does not hold --bos-token {config.bos_token}{gpt2_hint}")
    if not 0 <= config.cooldown_frac <= 1:
        raise ConfigError(f"--cooldown-frac must be within [0, 1], got {config.cooldown_frac}")
    rows = world_size * config.seq_len
    if config.batch_tokens % rows:
        raise ConfigError(
            f"--batch-tokens {config.batch_tokens} is not divisible by world size {world_size} x --seq-len "
            f"{config.seq_len} = {rows}: use a multiple of {rows}")
    micro, micro_reason = resolve_micro_batch_tokens(config, world_size, device, dtype, use_compile,
                                                     max(stages.batch_multipliers))
    val_rows = world_size * (config.val_seq_len or config.seq_len)
    if config.val_tokens % val_rows:
        raise ConfigError(
            f"--val-tokens {config.val_tokens} is not divisible by world size {world_size} x the validation row "
            f"length {val_rows // world_size} (--val-seq-len, or --seq-len) = {val_rows}: use a multiple of {val_rows}")
    try:
        train_paths = find_shards(config.train_files, "--train-files")
        val_paths = find_shards(config.val_files, "--val-files")
        # Reading every header now catches a corrupt shard before the run, not hours into it.
        train_counts = [read_header(p) for p in train_paths]
        val_available = count_tokens(val_paths)
    except ShardError as e:
        raise ConfigError(str(e)) from None
    # Contiguous batches skip each shard's tail shorter than a batch; aligned ones also skip the
    # rest of each row's last document, so for them this bound is necessary, not sufficient.
    if stages.count == 1:
        available_steps = sum(whole_steps_in_shard(n, config.batch_tokens) for n in train_counts)
        needed_tokens = config.steps * config.batch_tokens
    else:
        available_steps = staged_steps_available(train_counts, config, stages)
        needed_tokens = sum(config.batch_tokens * stages.batch_multiplier(s) for s in range(config.steps))
    if available_steps == 0 or (config.steps > available_steps and not config.data_wrap):
        raise ConfigError(
            f"--steps {config.steps} needs {needed_tokens:,} train tokens ({config.steps} x {config.batch_tokens}"
            f"{' x the stage multipliers' if stages.count > 1 else ''}) but the {len(train_paths)} train file(s) hold "
            f"{sum(train_counts):,}, enough for {available_steps} steps: lower --steps, add shards or set --data-wrap true")
    for name in ("max_doc_len", "save_every", "keep_last"):
        if getattr(config, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be 0 or positive, got {getattr(config, name)}")
    if config.val_tokens + 1 > val_available:
        raise ConfigError(
            f"--val-tokens {config.val_tokens} needs {config.val_tokens + 1} tokens but the val files hold "
            f"{val_available}: lower --val-tokens")
    return train_paths, val_paths, micro, micro_reason, stages


def staged_steps_available(train_counts, config, stages):
    """How many steps, of growing batches, the shards serve read contiguously (a shard's tail too short
    for the step's batch is skipped, as the loader does)."""
    shard, position = 0, 0
    for step in range(config.steps):
        batch = config.batch_tokens * stages.batch_multiplier(step)
        while shard < len(train_counts) and position + batch + 1 > train_counts[shard]:
            shard, position = shard + 1, 0
        if shard == len(train_counts):
            return step
        position += batch
    return config.steps


# Settings that shape the model or its optimizer state, or what it reads: a checkpoint only resumes with the same ones.
CHECKPOINT_SHAPE_FIELDS = ("vocab_size", "bos_token", "num_layers", "num_heads", "model_dim", "logit_softcap",
                           "doc_masking", "optimizer", "attention_free_layers", "mlp_free_layers", "value_embed_layers",
                           "value_residual", "unet_skips", "backout_layer", "smear_gate", "attn_gate", "gate_dims")


def load_resume_state(config, sources):
    """The checkpoint --resume names, checked against this run's model settings and code."""
    try:
        path = checkpoint.resolve(config.resume, config.checkpoint_dir)
        state = checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        raise ConfigError(str(e)) from None
    saved = state["config"]
    # A checkpoint from before a field existed ran with its default.
    saved = {f: saved.get(f, getattr(Config(), f)) for f in CHECKPOINT_SHAPE_FIELDS}
    changed = [f"{f} {saved[f]!r} -> {getattr(config, f)!r}" for f in CHECKPOINT_SHAPE_FIELDS
               if saved[f] != getattr(config, f)]
    if changed:
        raise ConfigError(f"checkpoint {path} has a different model configuration ({', '.join(changed)}): "
                          "resume with the settings it was saved with")
    if state["code_hash"] != checkpoint.code_hash(sources) and not config.allow_code_change:
        raise ConfigError(f"checkpoint {path} was written by different code (hash {state['code_hash']}, this "
                          f"checkout {checkpoint.code_hash(sources)}): check out that code, or pass "
                          "--allow-code-change true to continue with this one on purpose")
    if state["step"] >= config.steps:
        raise ConfigError(f"checkpoint {path} is at step {state['step']}, not before --steps {config.steps}: "
                          "raise --steps to train further")
    state["path"] = path
    return state


class StopSignal:
    """SIGTERM or SIGINT asks the run to stop after the current step; a second Ctrl-C stops at once."""

    def __init__(self):
        self.signum = 0
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum


class TrainingDiverged(RuntimeError):
    pass


# ----------------------------------------------------------------------------- model, step, validation

def set_schedules(step, optimizers, config):
    """Sets every group's learning rate and Muon's momentum for the update at `step`; returns the LR multiplier."""
    multiplier = lr_multiplier_at(step, config.steps - config.extension_steps, config.cooldown_frac,
                                  config.warmup_steps, config.lr_floor, lr_stages(config))
    momentum = muon_momentum_at(step, config.muon_momentum_warmup_steps, config.muon_momentum_start,
                                config.muon_momentum_end, config.steps, config.muon_momentum_cooldown_steps)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
            if isinstance(opt, (Muon, NorMuon)):
                group["momentum"] = momentum
    return multiplier


def train_step(model, optimizers, micro_batches, autocast, step, config):
    """One update from this rank's micro-batches; returns the mean per-token loss as a tensor (no host sync).

    Under DDP (muon, adamw), gradients are averaged across ranks only on the last micro-batch.
    Under normuon there is no DDP: each optimizer averages its own gradients across ranks, Adam's
    from hooks during the last backward, and Adam steps every `adam_every` steps on the sum of
    those steps' gradients (the others leave them accumulating).
    """
    distributed = isinstance(model, DistributedDataParallel)
    adam = next((opt for opt in optimizers if isinstance(opt, DistAdam)), None)
    adam_steps = (step + 1) % config.adam_every == 0
    loss_sum = 0
    for i, (inputs, targets) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        if adam:
            adam.sync_grads = adam_steps and last
        # A mean loss is averaged over micro-batches; a summed one (record #46: over the tokens of
        # a rank's one row) is averaged over the rank's rows, so the update does not depend on
        # how many rows a micro-batch holds.
        share = len(micro_batches) * (inputs.size(0) if config.loss_reduction == "sum" else 1)
        with (model.no_sync() if distributed and not last else contextlib.nullcontext()), autocast:
            loss = model(inputs, targets)
            (loss / share).backward()
        loss_sum = loss_sum + loss.detach() / (targets.numel() if config.loss_reduction == "sum" else 1)
    for opt in optimizers:
        if opt is not adam or adam_steps:
            opt.step()
    if adam:  # each sharded optimizer cleared its own gradients; Adam's wait for its step
        adam.sync_grads = False
    else:
        model.zero_grad(set_to_none=True)
    return loss_sum / len(micro_batches)


@torch.no_grad()
def validation_loss(model, batches, autocast, device):
    """Mean per-token loss over every rank's validation batches."""
    model.eval()
    totals = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, token count
    for inputs, targets in batches:
        with autocast:
            totals[0] += model(inputs, targets, reduction="sum").double()
        totals[1] += targets.numel()
    if dist.is_initialized():
        dist.all_reduce(totals)
    model.train()
    return (totals[0] / totals[1]).item()


# ----------------------------------------------------------------------------- record log

def project_sources():
    """Source of every file of this project that the run imported, so the log alone reproduces the run."""
    paths = {os.path.abspath(__file__)}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and os.path.isabs(path) and path.endswith(".py") and path.startswith(REPO_ROOT + os.sep):
            paths.add(path)
    return {os.path.relpath(p, REPO_ROOT): open(p, encoding="utf-8").read() for p in sorted(paths)}


def hardware_description(device):
    if device.type == "cuda":
        try:
            return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(device)} (nvidia-smi unavailable)"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {model}, {os.cpu_count()} logical cores"


def software_versions():
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return f"python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}"


class ProgressLine:
    """A live status line on a terminal's stderr, overwritten in place and never written to the log."""

    def __init__(self, enabled):
        self.enabled, self.shown = enabled, False

    def show(self, text):
        if self.enabled:
            sys.stderr.write("\r\x1b[K" + text)
            sys.stderr.flush()
            self.shown = True

    def clear(self):
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False


class WandbRun:
    """Optional mirror of the run in Weights & Biases: a failure there is one warning, never a failed run."""

    def __init__(self, project, config):
        self.run = None
        if not project:
            return
        try:
            import wandb

            self.run = wandb.init(project=project, config=config)
        except Exception as e:  # noqa: BLE001 - missing package, no login, network: all just disable wandb
            self._disable(e)

    def _disable(self, error):
        print(f"warning: wandb disabled, the run goes on without it ({type(error).__name__}: {error})",
              file=sys.stderr)
        self.run = None

    def log(self, metrics, step):
        if self.run:
            try:
                self.run.log(metrics, step=step)
            except Exception as e:  # noqa: BLE001
                self._disable(e)

    def finish(self, log_path, status):
        if self.run:
            try:
                self.run.summary["status"] = status
                if log_path:
                    self.run.save(log_path, base_path=os.path.dirname(os.path.abspath(log_path)), policy="now")
                self.run.finish(exit_code=0 if status == "completed" else 1)
            except Exception as e:  # noqa: BLE001
                self._disable(e)


class RecordLog:
    """Rank 0's log file in records/: sources, environment, config, every step line, a final status."""

    def __init__(self, records_dir, enabled, progress=None):
        self.path = None
        self.progress = progress or ProgressLine(False)
        if not enabled:
            return
        os.makedirs(records_dir, exist_ok=True)
        name = f"{datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}_{uuid.uuid4().hex[:8]}.txt"
        self.path = os.path.join(records_dir, name)
        self.file = open(self.path, "w", encoding="utf-8")

    def section(self, title, text):
        self.write(f"==== {title} ====\n{text.rstrip()}\n")

    def write(self, text):
        if self.path:
            self.file.write(text)
            self.file.flush()

    def line(self, text):
        """A step or summary line: printed and logged."""
        if self.path:
            self.progress.clear()
            print(text, flush=True)
            self.write(text + "\n")

    def close(self, status):
        self.line(f"status: {status}")
        if self.path:
            self.file.close()


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    try:
        preset, config = parse_config(sys.argv[1:] if argv is None else argv)
        rank = int(os.environ.get("RANK", 0))
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        device = resolve_device(config)
        dtype = resolve_dtype(config, device)
        attention = resolve_backend(config.attention, device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if attention == "flex" and device.type == "cpu":
            raise ConfigError("--attention flex needs CUDA: FlexAttention has no backward on CPU; use sdpa")
        train_paths, val_paths, micro_batch_tokens, micro_batch_reason, stages = validate(
            config, world_size, device, dtype, uses_compile(config, device))
        sources = project_sources()
        checkpoint.check_folder(config.checkpoint_dir)  # a file there would otherwise fail only at the first save
        resume_state = load_resume_state(config, sources) if config.resume else None
    except (ConfigError, ValueError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2

    # distributed setup: torchrun sets RANK/WORLD_SIZE; a plain `python` run needs no process group
    distributed = "RANK" in os.environ
    if device.type == "cuda":  # already this rank's device (LOCAL_RANK), chosen with the checks above
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None,
                                timeout=timedelta(seconds=config.collective_timeout_s))
    stop = StopSignal()
    progress = ProgressLine(rank == 0 and (config.progress == "on" or (config.progress == "auto" and sys.stderr.isatty())))
    log = RecordLog(config.records_dir, enabled=rank == 0, progress=progress)
    metrics = WandbRun(config.wandb_project if rank == 0 else "", dataclasses.asdict(config))
    try:
        status = run(config, preset, log, metrics, stop, sources, resume_state, rank, world_size, device, dtype,
                     attention, train_paths, val_paths, micro_batch_tokens, micro_batch_reason, stages)
    except (TrainingDiverged, ShardError) as e:  # the data's errors name the file: one line, like the checks
        status = f"failed: {e}"
    except BaseException as e:
        status = f"failed: {type(e).__name__}: {e}".splitlines()[0]
        log.close(status)
        metrics.finish(log.path, status)
        raise
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
    log.close(status)
    metrics.finish(log.path, status)
    if log.path:
        print(f"record log: {log.path}")
    if status.startswith("failed: ") and rank == 0:
        print(f"error: {status[len('failed: '):]}", file=sys.stderr)
    if status == "completed":
        return 0
    return 128 + stop.signum if status.startswith("interrupted") else 1


def run(config, preset, log, metrics, stop, sources, resume_state, rank, world_size, device, dtype, attention,
        train_paths, val_paths, micro_batch_tokens, micro_batch_reason, stages):
    distributed = dist.is_initialized()
    use_compile = uses_compile(config, device)
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # data
    train_loader = TrainLoader(train_paths, config.batch_tokens, config.seq_len, micro_batch_tokens, rank,
                               world_size, device, bos_align=config.bos_align, bos_token=config.bos_token,
                               max_doc_len=config.max_doc_len, wrap=config.data_wrap, vocab_size=config.vocab_size,
                               total_steps=config.steps, stage_multiplier=stages.batch_multiplier)
    val_tokens = load_validation_tokens(val_paths, config.val_tokens, rank, world_size, config.vocab_size)

    # model
    raw_model = GPT.from_config(config, attention).to(device)
    model = compile_model(raw_model) if use_compile else raw_model
    if distributed and config.optimizer == "normuon":
        for p in raw_model.parameters():  # every rank starts from rank 0's weights, as DDP would make them
            dist.broadcast(p.data, src=0)
    elif distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    # optimizers
    optimizers = build_optimizers(raw_model, config, fused=device.type == "cuda", compile_muon=use_compile)
    muon = next((opt for opt in optimizers if isinstance(opt, (Muon, NorMuon))), None)
    # Stop requests travel on a CPU (gloo) group, so asking every step never waits for the GPU.
    control_group = dist.new_group(backend="gloo") if distributed and device.type == "cuda" else None

    log.section("command", " ".join([os.path.basename(sys.executable)] + sys.argv))
    for path, source in sources.items():
        log.section(f"source: {path}", source)
    log.section("environment", "\n".join([
        software_versions(), f"world size {world_size}, device {device.type}, autocast dtype {dtype}, "
        f"attention {attention}, compile {use_compile}, accumulation steps {train_loader.accumulation_steps}",
        micro_batch_reason]))
    log.section("hardware", hardware_description(device))
    log.section(f"config (preset {preset})", json.dumps(dataclasses.asdict(config), indent=2))
    num_params = sum(p.numel() for p in raw_model.parameters())
    log.section("run", f"parameters: {num_params:,}")
    if rank == 0:
        print(f"config (preset {preset}): {json.dumps(dataclasses.asdict(config))}", flush=True)
        print(f"preset {preset}: {num_params:,} parameters, world size {world_size}, {device.type}, {dtype}, "
              f"attention {attention}, compile {use_compile}, log {log.path}", flush=True)
        print(micro_batch_reason, flush=True)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Untimed warm-up: compile and touch every kernel, then restore the initial state so the
    # timed run is exactly the run without warm-up.
    # With stages, every stage's shapes and attention scale (each a compiled graph) are warmed up.
    if config.untimed_warmup_steps:
        initial_state = copy.deepcopy(dict(model=raw_model.state_dict(), loader=train_loader.state_dict(),
                                           optimizers=[opt.state_dict() for opt in optimizers]))
        for first in stages.first_steps():
            for step in range(first, first + config.untimed_warmup_steps):
                raw_model.set_windows(stages.windows_at(step))
                set_schedules(step, optimizers, config)
                train_loader.steps_served = step  # the stage's batch shape
                train_step(model, optimizers, train_loader.next_batch(), autocast, step, config)
        raw_model.zero_grad(set_to_none=True)
        raw_model.reset_windows()
        raw_model.load_state_dict(initial_state["model"])
        train_loader.load_state_dict(initial_state["loader"])
        for opt, state in zip(optimizers, initial_state["optimizers"]):
            opt.load_state_dict(state)
        del initial_state

    def tokens_per_s():
        return tokens_trained / max((train_time_ms - start_time_ms) / 1000, 1e-9)

    # A resumed run continues its checkpoint's run, so --keep-last prunes the checkpoints before it too.
    start_step, train_time_ms, last_checkpoint, run_id = 0, 0.0, None, uuid.uuid4().hex
    if resume_state:
        checkpoint.restore(resume_state, raw_model, optimizers, train_loader)
        start_step, train_time_ms = resume_state["step"], resume_state["train_time_ms"]
        run_id = resume_state.get("run_id", run_id)
        last_checkpoint = resume_state["path"]
        changed = [f"{k} {v!r} -> {getattr(config, k)!r}" for k, v in resume_state["config"].items()
                   if k in dataclasses.asdict(config) and k != "resume" and v != getattr(config, k)]
        log.line(f"resumed from {last_checkpoint} at step {start_step} (train_time {train_time_ms:.0f}ms, saved by "
                 f"{resume_state['world_size']} process(es)); changed settings: {', '.join(changed) or 'none'}")
        del resume_state
    start_time_ms, tokens_trained = train_time_ms, 0
    progress = log.progress
    last_train_loss = float("nan")
    # The step (1-based) of the first non-finite loss, kept on the device and read only where the
    # loop synchronises anyway: a per-step check would stall the GPU queue every step.
    first_bad_step = torch.zeros((), dtype=torch.int64, device=device)

    def check_finite():
        if distributed:
            dist.all_reduce(first_bad_step, op=dist.ReduceOp.MAX)
        if first_bad_step.item():
            raise TrainingDiverged(f"non-finite train loss at step {first_bad_step.item()}; last good checkpoint: "
                                   f"{last_checkpoint or 'none'}")

    def save_checkpoint(step):
        check_finite()  # never save a diverged model as a good checkpoint
        return checkpoint.save(config.checkpoint_dir, step, raw_model, optimizers, train_loader, train_time_ms,
                               dataclasses.asdict(config), sources, run_id, config.keep_last)

    # Timing as the leaderboard's: only training counts, measured between synchronisations, which
    # happen only at validation and at logged steps.
    # The stages up to the start, one after another: YaRN's stretch depends on the path of windows.
    for windows in stages.windows_path(start_step):
        raw_model.set_windows(windows)
    synchronize()
    segment_start = time.perf_counter()
    for step in range(start_step, config.steps + 1):
        last_step = step == config.steps
        if not last_step:
            raw_model.set_windows(stages.windows_at(step))
        if last_step or (config.val_every and step % config.val_every == 0):
            synchronize()
            train_time_ms += 1000 * (time.perf_counter() - segment_start)
            check_finite()
            if last_step:
                raw_model.set_windows(stages.final_windows(), yarn=False)
            val_loss = validation_loss(model, validation_batches(val_tokens, config.val_seq_len or config.seq_len,
                                                                 micro_batch_tokens,
                                                                 device), autocast, device)
            log.line(f"step:{step}/{config.steps} val_loss:{val_loss:.4f} train_time:{train_time_ms:.0f}ms "
                     f"step_avg:{train_time_ms / max(step, 1):.2f}ms")
            metrics.log({"val_loss": val_loss}, step)
            if last_step:
                break
            synchronize()
            segment_start = time.perf_counter()
        lr_multiplier = set_schedules(step, optimizers, config)
        train_loss = train_step(model, optimizers, train_loader.next_batch(), autocast, step, config)
        tokens_trained += config.batch_tokens * stages.batch_multiplier(step)
        if step + 1 < config.steps:  # the next batch is made while the device still computes this step
            train_loader.prefetch()
        first_bad_step = torch.where((first_bad_step == 0) & ~torch.isfinite(train_loss), step + 1, first_bad_step)
        # Every rank learns whether any rank was asked to stop (a CPU collective: no device sync).
        stop_flag = torch.tensor([stop.signum])
        if distributed:
            dist.all_reduce(stop_flag, op=dist.ReduceOp.MAX, group=control_group)
        if (step + 1) % config.train_log_every == 0 or step + 1 == config.steps:
            synchronize()
            train_time_ms += 1000 * (time.perf_counter() - segment_start)
            check_finite()
            if distributed:
                dist.all_reduce(train_loss, op=dist.ReduceOp.SUM)
                train_loss /= world_size
            last_train_loss = train_loss.item()
            log.line(f"step:{step + 1}/{config.steps} train_loss:{last_train_loss:.4f} "
                     f"train_time:{train_time_ms:.0f}ms step_avg:{train_time_ms / (step + 1):.2f}ms")
            metrics.log({"train_loss": last_train_loss, "tokens_per_s": tokens_per_s(),
                         "lr_multiplier": lr_multiplier,
                         "muon_momentum": muon.param_groups[0]["momentum"] if muon else None}, step + 1)
            remaining_s = (config.steps - step - 1) * (train_time_ms - start_time_ms) / (step + 1 - start_step) / 1000
            progress.show(f"step {step + 1}/{config.steps}  train_loss {last_train_loss:.4f}  "
                          f"{tokens_per_s():,.0f} tokens/s  {remaining_s // 60:.0f}m{remaining_s % 60:02.0f}s left")
            synchronize()
            segment_start = time.perf_counter()
        if stop_flag[0]:
            synchronize()
            train_time_ms += 1000 * (time.perf_counter() - segment_start)
            stop.signum = stop.signum or int(stop_flag[0])
            path = save_checkpoint(step + 1)
            command = (f"torchrun --standalone --nproc_per_node={world_size}" if distributed else "python")
            args = sys.argv[1:]
            if "--resume" in args:  # the new --resume replaces the old one
                i = args.index("--resume")
                args = args[:i] + args[i + 2:]
            args = " ".join(args)
            train_loader.close()
            return (f"interrupted: received {signal.Signals(int(stop_flag[0])).name} after step {step + 1}; "
                    f"checkpoint {path}; resume with: {command} train_gpt.py {args} --resume {path}")
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            synchronize()
            train_time_ms += 1000 * (time.perf_counter() - segment_start)
            last_checkpoint = save_checkpoint(step + 1)
            segment_start = time.perf_counter()

    train_loader.close()
    if config.save_final:
        log.line(f"checkpoint: {save_checkpoint(config.steps)}")
    if device.type == "cuda":
        log.line(f"peak memory: {torch.cuda.max_memory_allocated(device) // 2**20} MiB allocated, "
                 f"{torch.cuda.max_memory_reserved(device) // 2**20} MiB reserved")
    else:
        log.line(f"peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB resident (rank {rank})")
    if not torch.isfinite(torch.tensor(val_loss)):
        return f"failed: final val_loss is {val_loss}"
    return "completed"


if __name__ == "__main__":
    sys.exit(main())
