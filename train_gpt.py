"""Train a GPT on FineWeb token shards and write a record log.

    torchrun --standalone --nproc_per_node=8 train_gpt.py            # the speedrun preset
    python train_gpt.py --preset cpu-tiny --train-files ... --val-files ...
    python train_gpt.py --preset speedrun --plan                     # the run's stages, then exit

Read top to bottom: config and plan, distributed setup, data, model, optimizer, the training loop
with periodic validation, the summary. Every hyperparameter is a field of `Config` (config.py);
presets override it and every field is also a command-line flag (`--field-name value`). The
library this file reads from lives in training/ (run-time setup, the step, checkpoints, the log).
"""
import copy
import dataclasses
import json
import os
import resource
import signal
import sys
import time
import uuid
from datetime import timedelta

# On CPU, glibc returns every freed tensor over 32 MiB to the kernel, so each step page-faults the
# head's float32 logits back in 4 KiB at a time: a third to half of a small CPU run's time went to
# the kernel. With this set, torch asks for 2 MiB pages for its CPU buffers over 2 MiB (measured
# 1.3-1.6x faster steps on 2 cores, docs/PERFORMANCE.md). torch reads it when it loads, so it comes
# before `import torch`; 0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch
import torch.distributed as dist

from config import ConfigError, make_plan, parse_command_line
from data.loader import TrainLoader, load_validation_tokens, validation_batches
from data.shards import ShardError
from model.gpt import GPT, check_model_config
from optim.optimizer import Optimizer, check_optimizer_config
from training import checkpoint
from training import record_log as fmt
from training.loop import (DivergenceWatch, StopSignal, TrainClock, TrainingDiverged, prepare_step, train_step,
                           validation_loss)
from training.plan import describe_plan
from training.record_log import ProgressLine, RecordLog
from training.reporting import WandbRun, hardware_description, software_versions
from training.setup import (check_data, compile_model, load_compile_cache, load_resume_state, project_sources,
                            resolve_runtime, save_compile_cache)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    # ---------------------------------------------------------------- config and plan, checked before any work
    try:
        preset, config, plan_only = parse_command_line(argv)
        plan = make_plan(config)
        if plan_only:
            check_model_config(plan)
            check_optimizer_config(config)
            if rank == 0:
                print(describe_plan(plan, preset))
            return 0
        runtime = resolve_runtime(plan, rank, world_size)
        train_paths, val_paths = check_data(plan)
        sources = project_sources()
        checkpoint.check_folder(config.checkpoint_dir)  # a file there would otherwise fail only at the first save
        resume_state = load_resume_state(config, sources) if config.resume else None
    except (ConfigError, ValueError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2

    # ---------------------------------------------------------------- distributed setup (torchrun sets RANK)
    distributed = "RANK" in os.environ
    cuda = runtime.device.type == "cuda"
    if cuda:
        torch.cuda.set_device(runtime.device)
    if distributed:
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=runtime.device if cuda else None,
                                timeout=timedelta(seconds=config.collective_timeout_s))
    stop = StopSignal(runtime.device)
    progress = ProgressLine(rank == 0 and (config.progress == "on" or (config.progress == "auto" and sys.stderr.isatty())))
    log = RecordLog(config.records_dir, enabled=rank == 0, progress=progress)
    metrics = WandbRun(config.wandb_project if rank == 0 else "", dataclasses.asdict(config))
    try:
        status = run(plan, runtime, preset, argv, log, metrics, stop, sources, resume_state, train_paths, val_paths)
    except (TrainingDiverged, ShardError) as e:  # the data's errors name the file: one line, like the checks
        status = fmt.format_failed_status(e)
    except BaseException as e:
        status = fmt.format_failed_status(f"{type(e).__name__}: {e}").splitlines()[0]
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
    outcome = fmt.parse_status_line(fmt.format_status_line(status))
    if outcome.kind == fmt.STATUS_FAILED and rank == 0:
        print(f"error: {outcome.reason}", file=sys.stderr)
    if outcome.kind == fmt.STATUS_COMPLETED:
        return 0
    return 128 + stop.signum if outcome.kind == fmt.STATUS_INTERRUPTED else 1


def run(plan, runtime, preset, argv, log, metrics, stop, sources, resume_state, train_paths, val_paths):
    config, device = plan.config, runtime.device
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---------------------------------------------------------------- data
    train_loader = TrainLoader(train_paths, config.batch_tokens, config.seq_len, runtime.micro_batch_tokens,
                               runtime.rank, runtime.world_size, device, bos_align=config.bos_align,
                               bos_token=config.bos_token, max_doc_len=config.max_doc_len, wrap=config.data_wrap,
                               vocab_size=config.vocab_size, stages=plan.stages,
                               restart_at_shard_end=config.shard_end == "restart", piece_tokens=runtime.row_split_tokens)
    val_tokens, val_sha256 = load_validation_tokens(val_paths, config.val_tokens, runtime.rank, runtime.world_size,
                                                    config.vocab_size, row_len=config.val_seq_len or config.seq_len)

    def validation_data():
        return validation_batches(val_tokens, config.val_seq_len or config.seq_len, runtime.micro_batch_tokens, device)

    # ---------------------------------------------------------------- model and optimizer
    raw_model = GPT(plan, runtime.attention).to(device)
    raw_model.prefix_table = runtime.prefix_table.to(device) if runtime.prefix_table is not None else None
    optimizer = Optimizer(raw_model, plan, fused=device.type == "cuda", compile_muon=runtime.compile)
    model = optimizer.distribute(compile_model(raw_model) if runtime.compile else raw_model)
    autocast = runtime.autocast()
    # A resumed run continues its checkpoint's run (its id), so --keep-last prunes the checkpoints before it too,
    # and the records tool counts the logs of one run resumed several times as one run.
    run_id = resume_state.get("run_id", uuid.uuid4().hex) if resume_state else uuid.uuid4().hex
    write_log_header(log, plan, runtime, preset, sources, raw_model, train_loader.accumulation_steps, run_id,
                     fmt.format_val_set_line(config.val_tokens, val_sha256, config.vocab_size))

    # ---------------------------------------------------------------- untimed warm-up
    # Compile and touch every kernel of every stage's shapes, then restore the initial state: the
    # timed run is exactly the run without warm-up. The compile cache of an earlier run on this kind
    # of machine spares most of the compiling.
    warmup_started = time.perf_counter()
    use_cache = runtime.compile and config.compile_cache
    cache_note = load_compile_cache(config.compile_cache, device) if use_cache else None
    if config.untimed_warmup_steps:
        initial = copy.deepcopy(dict(model=raw_model.state_dict(), loader=train_loader.state_dict(),
                                     optimizer=optimizer.local_state()))
        for first in plan.first_steps():
            for step in range(first, first + config.untimed_warmup_steps):
                prepare_step(raw_model, optimizer, plan, step)
                train_loader.serve_as_step(step)
                train_step(model, optimizer, train_loader.next_batch(), autocast, step, config)
        raw_model.zero_grad(set_to_none=True)
        raw_model.reset_windows()
        raw_model.load_state_dict(initial["model"])
        train_loader.load_state_dict(initial["loader"])
        optimizer.load_local_state(initial["optimizer"])
        del initial
    if use_cache:
        cache_note += "; " + save_compile_cache(config.compile_cache, device, runtime.rank)
    runtime.synchronize()
    log.line(fmt.format_warmup_line(time.perf_counter() - warmup_started, runtime.compile, cache_note))

    # ---------------------------------------------------------------- resume
    start_step, last_checkpoint, clock = 0, None, TrainClock(runtime)
    if resume_state:
        checkpoint.restore(resume_state, raw_model, optimizer, train_loader)
        start_step, last_checkpoint = resume_state["step"], resume_state["path"]
        clock = TrainClock(runtime, resume_state["train_time_ms"])
        changed = [(k, v, getattr(config, k)) for k, v in resume_state["config"].items()
                   if k in dataclasses.asdict(config) and k != "resume" and v != getattr(config, k)]
        log.line(fmt.format_resumed_line(last_checkpoint, start_step, clock.elapsed_ms, resume_state["world_size"],
                                         changed))
        del resume_state
    for windows in plan.windows_path(start_step):  # YaRN's stretch depends on the path of windows
        raw_model.set_windows(windows)
    watch = DivergenceWatch(device)
    tokens_trained = 0

    def save_checkpoint(step):
        watch.check(last_checkpoint)  # never save a diverged model as a good checkpoint
        return checkpoint.save(config.checkpoint_dir, step, raw_model, optimizer, train_loader, clock.elapsed_ms,
                               dataclasses.asdict(config), sources, run_id, config.keep_last)

    # ---------------------------------------------------------------- the training loop
    clock.resume()
    for step in range(start_step, config.steps + 1):
        last_step = step == config.steps
        # validation: at --val-every and at the end, with the final windows (YaRN as the last stage left it)
        if last_step or (config.val_every and step % config.val_every == 0):
            clock.pause()
            watch.check(last_checkpoint)
            raw_model.set_windows(plan.final_windows if last_step else plan.windows_at(step),
                                  yarn=False if last_step else None)
            # under --numerics record also the loss with a float32 head: the model's own, beside the record's
            val_loss, val_loss_float32 = (validation_loss(model, validation_data(), autocast, device, with_float32=True)
                                          if config.numerics == "record" else
                                          (validation_loss(model, validation_data(), autocast, device), None))
            log.line(fmt.format_step_line(step, config.steps, clock.elapsed_ms, val_loss=val_loss,
                                          val_loss_float32=val_loss_float32))
            metrics.log({"val_loss": val_loss, **({"val_loss_float32": val_loss_float32}
                                                  if val_loss_float32 is not None else {})}, step)
            if last_step:
                log.line(fmt.format_final_val_loss_line(val_loss))  # every digit, for statistics over runs
                break
            clock.resume()
        # one optimizer step; the next batch is made while the device still computes this one
        lr_multiplier = prepare_step(raw_model, optimizer, plan, step)
        train_loss = train_step(model, optimizer, train_loader.next_batch(), autocast, step, config)
        tokens_trained += plan.stage_at(step).tokens_per_step
        if step + 1 < config.steps:
            train_loader.prefetch()
        watch.record(step, train_loss)
        stop_signum = stop.requested()  # every rank learns whether any rank was asked to stop
        # logging: a synchronisation, so only every --train-log-every steps
        if (step + 1) % config.train_log_every == 0 or step + 1 == config.steps:
            clock.pause()
            watch.check(last_checkpoint)
            log_train_step(log, metrics, plan, runtime, step, train_loss, clock, tokens_trained, start_step,
                           lr_multiplier, optimizer.momentum)
            clock.resume()
        # stop on a signal, with a checkpoint to resume from; periodic checkpoints
        if stop_signum:
            clock.pause()
            path = save_checkpoint(step + 1)
            train_loader.close()
            command = fmt.format_resume_command(argv, path, runtime.world_size if dist.is_initialized() else None)
            return fmt.format_interrupted_status(signal.Signals(stop_signum).name, step + 1, path, command)
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            clock.pause()
            last_checkpoint = save_checkpoint(step + 1)
            clock.resume()

    # ---------------------------------------------------------------- summary
    train_loader.close()
    if config.save_final:
        log.line(fmt.format_checkpoint_line(save_checkpoint(config.steps)))
    if device.type == "cuda":
        log.line(fmt.format_cuda_peak_memory_line(torch.cuda.max_memory_allocated(device) // 2**20,
                                                  torch.cuda.max_memory_reserved(device) // 2**20))
    else:
        log.line(fmt.format_cpu_peak_memory_line(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                                                 runtime.rank))
    if not torch.isfinite(torch.tensor(val_loss)):
        return fmt.format_failed_status(f"final val_loss is {val_loss}")
    return fmt.STATUS_COMPLETED


def write_log_header(log, plan, runtime, preset, sources, raw_model, accumulation_steps, run_id, val_set_line):
    """The record log's sections (the command, every source file, environment, hardware, config, the run's
    id and validation set), and the run's summary on stdout."""
    config = plan.config
    log.section(fmt.COMMAND_SECTION, " ".join([os.path.basename(sys.executable)] + sys.argv))
    for path, source in sources.items():
        log.section(fmt.format_source_title(path), source)
    log.section(fmt.ENVIRONMENT_SECTION, "\n".join([
        software_versions(), fmt.format_environment_line(runtime.world_size, runtime.device.type, runtime.dtype,
                                                         runtime.attention, runtime.compile, accumulation_steps),
        runtime.micro_batch_reason]))
    log.section(fmt.HARDWARE_SECTION, hardware_description(runtime.device))
    log.section(fmt.format_config_title(preset), json.dumps(dataclasses.asdict(config), indent=2))
    num_params = sum(p.numel() for p in raw_model.parameters())
    log.section(fmt.RUN_SECTION, "\n".join([fmt.format_parameters_line(num_params), fmt.format_run_id_line(run_id),
                                            val_set_line]))
    if runtime.rank == 0:
        print(f"config (preset {preset}): {json.dumps(dataclasses.asdict(config))}", flush=True)
        print(f"preset {preset}: {num_params:,} parameters, world size {runtime.world_size}, {runtime.device.type}, "
              f"{runtime.dtype}, attention {runtime.attention}, compile {runtime.compile}, log {log.path}", flush=True)
        print(runtime.micro_batch_reason, flush=True)


def log_train_step(log, metrics, plan, runtime, step, train_loss, clock, tokens_trained, start_step, lr_multiplier,
                   momentum):
    """A train step line (the loss averaged over ranks), the metrics mirror and the progress line."""
    steps = plan.config.steps
    if dist.is_initialized():
        dist.all_reduce(train_loss, op=dist.ReduceOp.SUM)
        train_loss /= runtime.world_size
    loss = train_loss.item()
    log.line(fmt.format_step_line(step + 1, steps, clock.elapsed_ms, train_loss=loss))
    seconds = max((clock.elapsed_ms - clock.started_ms) / 1000, 1e-9)
    metrics.log({"train_loss": loss, "tokens_per_s": tokens_trained / seconds, "lr_multiplier": lr_multiplier,
                 "muon_momentum": momentum}, step + 1)
    remaining_s = (steps - step - 1) * seconds / (step + 1 - start_step)
    log.progress.show(f"step {step + 1}/{steps}  train_loss {loss:.4f}  {tokens_trained / seconds:,.0f} tokens/s  "
                      f"{remaining_s // 60:.0f}m{remaining_s % 60:02.0f}s left")


if __name__ == "__main__":
    sys.exit(main())
