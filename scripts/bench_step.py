"""Time the training step of every stage of a preset, with the rows one GPU of a larger run computes.

    python scripts/bench_step.py --preset speedrun                        # one GPU, as one of 8
    python scripts/bench_step.py --preset speedrun --mlp-kernel plain     # an A/B of one fast path
    python scripts/bench_step.py --preset cpu-tiny --device cpu --bench-world-size 1

Takes train_gpt.py's flags, plus --bench-steps (timed steps per stage, after two untimed ones that
compile) and --bench-world-size (the GPUs of the run whose share of rows one device computes here;
default 8). Synthetic tokens with a document start every ~500 tokens; no data loading. Prints, per
stage: the forward-backward time, the optimizer step, the step, tokens/s per GPU, MFU and peak memory.

One process does the whole model's optimizer update, where a rank of the real run does its share and
the communication: the "step as 1 of N" column adds 1/N of the update to the forward-backward, an
estimate that leaves the collectives out (scripts/preflight.py measures those).
"""
import dataclasses
import os
import resource
import statistics
import sys
import time

# 2 MiB pages for torch's large CPU buffers, as train_gpt.py asks for them (before torch loads)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ConfigError, make_plan, parse_config  # noqa: E402
from model.gpt import GPT  # noqa: E402
from optim.optimizer import Optimizer  # noqa: E402
from training.benchmark import flops_per_token, peak_flops, synthetic_micro_batches  # noqa: E402
from training.loop import prepare_step  # noqa: E402
from training.setup import compile_model, resolve_runtime  # noqa: E402


def take_option(argv, name, default):
    if name not in argv:
        return default
    i = argv.index(name)
    value = int(argv[i + 1])
    del argv[i:i + 2]
    return value


def stage_batches(config, stage, runtime, world_size, generator):
    """The micro-batches of the rank with the most rows of the stage (it sets the step's time): its rows split
    as the run's loader splits them, into micro-batches of whole rows or into pieces (--row-split-tokens)."""
    rows_per_rank = -(-stage.rows // world_size)  # 8 rows on 3 ranks: 3, 3 and 2
    pieces = runtime.row_split_tokens
    # a row of the stage in pieces, each padded to `pieces` tokens: timed as the fewest a row can take (cut at
    # document starts, a real row often takes one more)
    if pieces:
        piece_config = dataclasses.replace(config, seq_len=min(pieces, stage.seq_len))
        return synthetic_micro_batches(piece_config, piece_config.seq_len,
                                       rows_per_rank * -(-stage.seq_len // piece_config.seq_len), runtime.device,
                                       generator)
    micro_rows = min(rows_per_rank, runtime.micro_batch_tokens // config.seq_len)
    stage_config = dataclasses.replace(config, seq_len=stage.seq_len)
    return synthetic_micro_batches(stage_config, micro_rows * stage.seq_len, -(-rows_per_rank // micro_rows),
                                   runtime.device, generator)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_stage(model, raw_model, optimizer, plan, stage, batches, autocast, device, steps):
    """Median seconds of the forward-backward and of the optimizer step at the stage's first step."""
    forward_backward, update = [], []
    for i in range(steps + 2):
        step = stage.first_step + i
        prepare_step(raw_model, optimizer, plan, step)
        synchronize(device)
        started = time.perf_counter()
        for inputs, targets in batches:
            with optimizer.backward_context(step, last=True), autocast:
                model(inputs, targets).backward()
        synchronize(device)
        middle = time.perf_counter()
        optimizer.step(step)
        synchronize(device)
        if i >= 2:  # the first two compile and fill the caches
            forward_backward.append(middle - started)
            update.append(time.perf_counter() - middle)
    return statistics.median(forward_backward), statistics.median(update)


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the process's resident peak


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    steps = take_option(argv, "--bench-steps", 5)
    world_size = take_option(argv, "--bench-world-size", 8)
    try:
        preset, config = parse_config(argv)
        plan = make_plan(config)
        runtime = resolve_runtime(plan, 0, world_size)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = runtime.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(config.seed)
    raw_model = GPT(plan, runtime.attention).to(device)
    raw_model.prefix_table = runtime.prefix_table.to(device) if runtime.prefix_table is not None else None
    optimizer = Optimizer(raw_model, plan, fused=device.type == "cuda", compile_muon=runtime.compile)
    model = compile_model(raw_model) if runtime.compile else raw_model
    generator = torch.Generator().manual_seed(config.seed)
    peak = peak_flops(device)
    print(f"{preset}: {sum(p.numel() for p in raw_model.parameters()):,} parameters, {device}, {runtime.dtype}, "
          f"attention {runtime.attention}, mlp {runtime.mlp_kernel}, loss {runtime.loss_kernel}, "
          f"fp8 mlp {config.fp8_mlp}, compile {runtime.compile}; each stage as one of {world_size} GPUs, "
          f"median of {steps} steps")
    print(f"{'stage':>5} {'rows x tokens':>14} {'fwd+bwd ms':>10} {'update ms':>9} {'step ms':>8} "
          f"{'as 1 of N ms':>12} {'tokens/s/GPU':>12} {'MFU':>6} {'peak GiB':>8}")
    for stage in plan.stages:
        if stage.extension:  # the last stage's shapes with wider windows: the same kernels
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batches = stage_batches(config, stage, runtime, world_size, generator)
        fwd_bwd, update = time_stage(model, raw_model, optimizer, plan, stage, batches, runtime.autocast(), device,
                                     steps)
        tokens = sum(inputs.numel() for inputs, _ in batches)
        as_one_of_n = fwd_bwd + update / world_size
        doc_len = min(stage.seq_len, stage.max_doc_len or stage.seq_len)
        mfu = (f"{flops_per_token(raw_model, stage.seq_len, doc_len) * tokens / as_one_of_n / peak:.1%}"
               if peak else "n/a")
        print(f"{stage.index + 1:>5} {f'{len(batches) * batches[0][0].size(0)} x {stage.seq_len}':>14} "
              f"{1000 * fwd_bwd:>10.1f} {1000 * update:>9.1f} {1000 * (fwd_bwd + update):>8.1f} "
              f"{1000 * as_one_of_n:>12.1f} {tokens / as_one_of_n:>12,.0f} {mfu:>6} {peak_memory_gib(device):>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
