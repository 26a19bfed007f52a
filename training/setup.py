"""What a run resolves before it starts, shared by train_gpt.py and the tools (preflight, benchmarks):
the machine's settings (device, dtype, compile, attention, micro-batch) and the checks of the data
and of a checkpoint to resume, each failing with one line (ConfigError) before any work starts."""
import dataclasses
import os
import re
import sys

import numpy as np
import torch

from config import ConfigError, longest_document
from data.loader import count_tokens
from data.prefix_tokens import NO_PREFIX, gpt2_prefix_table
from data.shards import ShardError, find_shards, read_header, whole_steps_in_shard
from model.attention import resolve_backend
from model.gpt import check_model_config, kernel_choice
from model.triton_loss import triton_loss_available
from model.triton_mlp import triton_mlp_available
from optim.optimizer import check_optimizer_config
from training import checkpoint
from training.memory import (choose_micro_batch_tokens, choose_piece_tokens, compiled_estimate,
                             estimate_training_memory)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The machine-dependent half of a run's settings, resolved from a plan's 'auto' values."""
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    compile: bool
    attention: str
    micro_batch_tokens: int  # first-stage tokens per forward pass on one rank
    micro_batch_reason: str
    prefix_table: torch.Tensor = None  # the prefix-token loss's table (CPU), None without that loss
    mlp_kernel: str = "plain"  # the MLP's and the training loss's forms: plain (PyTorch) or triton
    loss_kernel: str = "plain"
    row_split_tokens: int = None  # rows split at document starts into pieces of at most this many tokens, or None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def resolve_device(config):
    """This process's device: for CUDA under torchrun, the GPU of its LOCAL_RANK."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available: use --device cpu")
    if config.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def resolve_dtype(config, device):
    if config.dtype == "auto":
        # bf16 matmuls pay off on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX).
        cpu_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.bfloat16 if device.type == "cuda" or cpu_bf16 else torch.float32
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


def compile_cache_file(folder, device):
    """One file per torch build and device model: compiled kernels of another are of no use to this one."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return os.path.join(folder, re.sub(r"[^A-Za-z0-9.+]+", "-", f"torch-{torch.__version__}-{name}") + ".bin")


def load_compile_cache(folder, device):
    """Loads the compiled artifacts a run on this kind of machine saved into inductor's caches, before
    anything compiles; returns what it did, for the log. Dynamo still traces the model (seconds), but
    kernels found there are not compiled or autotuned again (minutes)."""
    path = compile_cache_file(folder, device)
    if not os.path.exists(path):
        return "none to load"
    try:
        with open(path, "rb") as f:
            info = torch.compiler.load_cache_artifacts(f.read())
    except Exception as e:  # noqa: BLE001 - a stale or foreign file costs a compile, never the run
        return f"{path} not loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return f"loaded {_artifact_count(info)} artifacts from {path}"


def save_compile_cache(folder, device, rank):
    """Rank 0 writes every artifact this process compiled or loaded (all ranks compile the same graphs),
    written whole or not at all; returns what it did, for the log."""
    counters = torch._dynamo.utils.counters["inductor"]
    graphs = f"{counters['fxgraph_cache_hit']} graphs from the cache, {counters['fxgraph_cache_miss']} compiled"
    saved = torch.compiler.save_cache_artifacts() if rank == 0 else None
    if not saved:
        return graphs
    data, info = saved
    path = compile_cache_file(folder, device)
    os.makedirs(folder, exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)
    return f"{graphs}; saved {_artifact_count(info)} artifacts to {path}"


def _artifact_count(info):
    return sum(len(keys) for keys in info.artifacts.values()) if info else 0


def largest_stage_config(plan):
    """A one-stage config of the plan's stage with the longest rows, the memory peak: its rows, its loss weights
    as they end (the model computes its loss as the run does there: HEAD's in slices, the next token alone),
    its document length, an untied head and the LR plateau left to the schedule."""
    config = plan.config
    last = max(plan.stages, key=lambda stage: stage.seq_len)
    fields = dict(mtp_weight_stages="/".join(f"{w:g}" for w in last.mtp_weights_end),
                  prefix_weight_stages=f"{last.prefix_weight_end:g}", tied_head_stages=0, stage_lr="")
    if config.max_doc_len_stages:
        fields["max_doc_len_stages"] = str(last.max_doc_len)
    return dataclasses.replace(config, batch_tokens=config.batch_tokens * (last.seq_len // config.seq_len),
                               seq_len=last.seq_len, batch_stages="", window_stages="", final_window="",
                               extension_steps=0, **fields)


def resolve_micro_batch_tokens(plan, world_size, device, dtype, use_compile):
    """(first-stage tokens per forward pass, the most tokens of a row's piece or None, why): the flags'
    numbers, or for auto the largest micro-batch that fits, and where not one row fits, pieces that do.

    Later stages of a batch-size schedule have as many rows, each longer: auto sizes rows for the
    stage with the longest ones and returns the first stage's tokens for the same row count.
    Where the rows do not split evenly over the ranks, the ranks with one row more are sized.
    """
    config = plan.config
    rows = -(-(config.batch_tokens // config.seq_len) // world_size)  # the most rows a rank computes
    per_rank = rows * config.seq_len
    pieces = plan.row_split_tokens or None
    if pieces:
        return config.seq_len, pieces, (f"rows split at document starts into pieces of at most {pieces:,} tokens "
                                        f"(--row-split-tokens), one forward pass each; {PIECES_CHANGE}")
    if plan.micro_batch_tokens is not None:
        micro = min(plan.micro_batch_tokens, per_rank)
        if micro <= 0 or micro % config.seq_len:
            raise ConfigError(
                f"--micro-batch-tokens {config.micro_batch_tokens} must be a multiple of --seq-len {config.seq_len} "
                f"(whole rows; --row-split-tokens splits a row)")
        return micro, None, (f"micro-batch {micro:,} tokens ({-(-per_rank // micro)} accumulation steps): set by "
                             "the flag")
    if device.type != "cuda":
        return per_rank, None, (f"micro-batch {per_rank:,} tokens (1 accumulation step): auto on {device.type} "
                                "takes a rank's whole batch in one pass")
    largest = largest_stage_config(plan)
    multiplier = largest.seq_len // config.seq_len
    largest = dataclasses.replace(largest, batch_tokens=rows * world_size * largest.seq_len)
    estimate = estimate_training_memory(largest, dtype)
    if use_compile:
        estimate = compiled_estimate(estimate)
    device_bytes = torch.cuda.get_device_properties(device).total_memory
    try:
        micro, reason = choose_micro_batch_tokens(largest, world_size, device_bytes, estimate)
    except ValueError as e:
        if plan.row_split_tokens == 0 or not config.bos_align:
            raise ConfigError(f"--micro-batch-tokens auto: {e}") from None
        return config.seq_len, *_auto_pieces(plan, largest, device_bytes, estimate, e)
    if multiplier > 1:
        reason += f" (in the largest stage; {micro // multiplier:,} tokens in the first)"
    return micro // multiplier, None, reason


def _auto_pieces(plan, largest, device_bytes, estimate, too_long):
    """(piece tokens, why) where not one row fits a device: the longest pieces that do, if they hold a document."""
    pieces, reason = choose_piece_tokens(largest, device_bytes, estimate)
    longest = max(longest_document(stage) for stage in plan.stages)
    if pieces < longest:
        raise ConfigError(f"--micro-batch-tokens auto: {too_long}; split at document starts, a piece would hold "
                          f"{pieces:,} tokens, fewer than the longest document ({longest:,})")
    return pieces, f"{reason}; {PIECES_CHANGE}"


# What a row's pieces compute differently from the whole row (data/loader.py), said in every log that uses them.
PIECES_CHANGE = ("the same training except where a technique reads across a document start: the look-back gate, the "
                 "key offset and the bigram hash see no token before a piece, and the multi-token loss scores no "
                 "target past a piece's end")


def resolve_runtime(plan, rank=0, world_size=1):
    """The Runtime of a plan on this machine, after the checks that need the world size."""
    config = plan.config
    check_model_config(plan)
    check_optimizer_config(config)
    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    if config.mantissa_weights and dtype != torch.bfloat16:
        raise ConfigError("--mantissa-weights stores NorMuon's matrices in bf16, which needs bf16 autocast "
                          "(--dtype bfloat16, or auto on CUDA)")
    try:
        attention = resolve_backend(config.attention, device, dtype)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if attention == "flex" and device.type == "cpu":
        raise ConfigError("--attention flex needs CUDA: FlexAttention has no backward on CPU; use sdpa")
    fast_paths = {"mlp_kernel": triton_mlp_available, "loss_kernel": triton_loss_available}
    for name, available in fast_paths.items():
        if getattr(config, name) == "triton" and not available(device):
            raise ConfigError(f"--{name.replace('_', '-')} triton needs CUDA and Triton (on CPU only Triton's "
                              "interpreter runs it, TRITON_INTERPRET=1, for tests): use auto or plain")
    kernels = {name: kernel_choice(getattr(config, name), available, device) for name, available in fast_paths.items()}
    if config.loss_kernel == "triton" and config.softcap != "sigmoid":
        raise ConfigError(f"--loss-kernel triton computes HEAD's sigmoid soft-cap, not --softcap {config.softcap}: "
                          "use auto or plain")
    # Any world size: each rank computes whole rows, the first ranks one more where they do not split evenly.
    if config.batch_tokens % config.seq_len or config.batch_tokens // config.seq_len < world_size:
        raise ConfigError(
            f"--batch-tokens {config.batch_tokens} must be whole rows of --seq-len {config.seq_len}, at least one for "
            f"each of {world_size} rank(s): use a multiple of {config.seq_len} of at least {world_size * config.seq_len}")
    val_row = config.val_seq_len or config.seq_len
    if config.val_tokens % val_row or config.val_tokens // val_row < world_size:
        raise ConfigError(
            f"--val-tokens {config.val_tokens} must be whole validation rows of {val_row} tokens (--val-seq-len, or "
            f"--seq-len), at least one for each of {world_size} rank(s): use a multiple of {val_row} of at least "
            f"{world_size * val_row}")
    use_compile = uses_compile(config, device)
    micro, pieces, reason = resolve_micro_batch_tokens(plan, world_size, device, dtype, use_compile)
    return Runtime(rank, world_size, device, dtype, use_compile, attention, micro, reason, prefix_table(plan),
                   row_split_tokens=pieces, **kernels)


def check_data(plan):
    """(train paths, val paths) after checking every shard's header and that they hold the run's tokens."""
    config = plan.config
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
    available_steps = steps_available(train_counts, plan)
    if available_steps == 0 or (config.steps > available_steps and not config.data_wrap):
        staged = len({stage.seq_len for stage in plan.stages}) > 1
        raise ConfigError(
            f"--steps {config.steps} needs {plan.total_tokens:,} train tokens ({config.steps} x {config.batch_tokens}"
            f"{' x the stage multipliers' if staged else ''}) but the {len(train_paths)} train file(s) hold "
            f"{sum(train_counts):,}, enough for {available_steps} steps: lower --steps, add shards or set --data-wrap true")
    if config.val_tokens + 1 > val_available:
        raise ConfigError(
            f"--val-tokens {config.val_tokens} needs {config.val_tokens + 1} tokens but the val files hold "
            f"{val_available}: lower --val-tokens")
    return train_paths, val_paths


def steps_available(train_counts, plan):
    """How many steps the shards serve read contiguously (a shard's tail too short for the step's batch
    is skipped, as the loader does)."""
    if len(plan.stages) == 1 or len({stage.tokens_per_step for stage in plan.stages}) == 1:
        return sum(whole_steps_in_shard(n, plan.stages[0].tokens_per_step) for n in train_counts)
    shard, position = 0, 0
    for step in range(plan.config.steps):
        batch = plan.stage_at(step).tokens_per_step
        while shard < len(train_counts) and position + batch + 1 > train_counts[shard]:
            shard, position = shard + 1, 0
        if shard == len(train_counts):
            return step
        position += batch
    return plan.config.steps


def prefix_table(plan):
    """The prefix-token table the run's loss needs (int64, vocab_size ids), or None when no stage weights
    the prefix loss. Raises ConfigError for a table that does not fit the vocabulary."""
    c = plan.config
    if not any(s.prefix_weight_start or s.prefix_weight_end for s in plan.stages):
        return None
    if c.prefix_table == "gpt2":
        if c.vocab_size < 50257 or c.bos_token != 50256:
            raise ConfigError(f"--prefix-table gpt2 is GPT-2's vocabulary; --vocab-size {c.vocab_size} / --bos-token "
                              f"{c.bos_token} are not: give a .npy table or --prefix-weight-stages ''")
        return gpt2_prefix_table(c.vocab_size)
    try:
        table = torch.from_numpy(np.load(c.prefix_table)).long()
    except (OSError, ValueError) as e:
        raise ConfigError(f"--prefix-table {c.prefix_table}: cannot read it as a .npy array ({e})") from None
    if table.shape != (c.vocab_size,) or table.min() < NO_PREFIX or table.max() >= c.vocab_size:
        raise ConfigError(f"--prefix-table {c.prefix_table}: expected {c.vocab_size} ids in -1..{c.vocab_size - 1}, "
                          f"got shape {tuple(table.shape)}")
    return table


def project_sources():
    """Source of every file of this project that the run imported, so the log alone reproduces the run."""
    # The script that runs (__main__) may carry the relative path it was started with; other modules
    # with a relative __file__ (torch's _classes) are not files at all.
    main = getattr(sys.modules["__main__"], "__file__", None)
    paths = {getattr(module, "__file__", None) or "" for module in list(sys.modules.values())}
    paths = {p for p in paths | {os.path.abspath(main) if main else ""}
             if os.path.isabs(p) and p.endswith(".py") and p.startswith(REPO_ROOT + os.sep)}
    return {os.path.relpath(p, REPO_ROOT): open(p, encoding="utf-8").read() for p in sorted(paths)}


def load_resume_state(config, sources):
    """The checkpoint --resume names, checked against this run's model settings and code."""
    try:
        path = checkpoint.resolve(config.resume, config.checkpoint_dir)
        state = checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        raise ConfigError(str(e)) from None
    checkpoint.check_resumable(state, path, config)
    if state["code_hash"] != checkpoint.code_hash(sources) and not config.allow_code_change:
        raise ConfigError(f"checkpoint {path} was written by different code (hash {state['code_hash']}, this "
                          f"checkout {checkpoint.code_hash(sources)}): check out that code, or pass "
                          "--allow-code-change true to continue with this one on purpose")
    if state["step"] >= config.steps:
        raise ConfigError(f"checkpoint {path} is at step {state['step']}, not before --steps {config.steps}: "
                          "raise --steps to train further")
    state["path"] = path
    return state
