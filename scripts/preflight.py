"""Check a machine before paying for a run: devices, collectives, kernels, and a few timed steps.

    python scripts/preflight.py                                          # one GPU (or the CPU)
    torchrun --standalone --nproc_per_node=8 scripts/preflight.py        # every GPU of the box
    python scripts/preflight.py --preset cpu-tiny --device cpu           # the same checks, small

Takes the flags of train_gpt.py (the preset, --micro-batch-tokens, --compile, ...) plus
--preflight-steps. Trains on synthetic tokens, so it needs no data and writes no record log.
Prints one PASS or FAIL line per check and exits non-zero if any check fails.
"""
import dataclasses
import datetime
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ConfigError, make_plan, parse_config  # noqa: E402
from model.attention import attention_backend, attention_reference, fa3_available, resolve_backend  # noqa: E402
from model.fp8 import fp8_linear, fp8_linear_reference, fp8_supported, head_scales  # noqa: E402
from model.gpt import GPT, kernel_choice  # noqa: E402
from model.loss import HEAD_SOFTCAP, kernel_position_losses  # noqa: E402
from model.triton_loss import triton_loss_available, triton_position_losses  # noqa: E402
from model.triton_mlp import fused_relu_square_mlp, relu_square_mlp_reference, triton_mlp_available  # noqa: E402
from optim.optimizer import Optimizer  # noqa: E402
from training.benchmark import flops_per_token, peak_flops, synthetic_micro_batches  # noqa: E402
from training.loop import train_step  # noqa: E402
from training.memory import GIB, compiled_estimate, estimate_training_memory  # noqa: E402
from training.reporting import hardware_description, software_versions  # noqa: E402
from training.setup import compile_model, largest_stage_config, resolve_device, resolve_dtype, resolve_runtime  # noqa: E402

class Report:
    def __init__(self, rank):
        self.rank, self.failed = rank, []

    def check(self, name, ok, detail):
        if self.rank == 0:
            print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if not ok:
            self.failed.append(name)

    def info(self, text):
        if self.rank == 0:
            print(f"     {text}", flush=True)


def check_environment(report, device, world_size):
    versions = software_versions()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        driver = "unknown"
        try:
            import subprocess
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
        detail = (f"{world_size} x {props.name}, compute capability {props.major}.{props.minor}, "
                  f"{props.total_memory / GIB:.1f} GiB, driver {driver}, CUDA {torch.version.cuda}, "
                  f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, {versions}")
    else:
        detail = f"{world_size} process(es) on {hardware_description(device)}, {versions}"
    report.check("environment", True, detail)


def check_collectives(report, device, world_size, rank):
    if world_size == 1:
        report.check("collectives", True, "1 process: nothing to reduce")
        return
    numel = (64 * 2**20 if device.type == "cuda" else 4 * 2**20) // 4  # 64 MiB on GPUs, 4 MiB on CPU
    x = torch.full((numel,), float(rank + 1), device=device)
    dist.all_reduce(x)
    expected = world_size * (world_size + 1) / 2
    reduce_ok = bool((x == expected).all())
    gathered = torch.empty(world_size * numel, device=device)
    dist.all_gather_into_tensor(gathered, torch.full((numel,), float(rank), device=device))
    gather_ok = all(bool((gathered[r * numel:(r + 1) * numel] == r).all()) for r in range(world_size))

    def bus_bandwidth(op, factor, repeats=5):
        for _ in range(2):
            op()
        torch.cuda.synchronize() if device.type == "cuda" else None
        started = time.perf_counter()
        for _ in range(repeats):
            op()
        torch.cuda.synchronize() if device.type == "cuda" else None
        seconds = (time.perf_counter() - started) / repeats
        # nccl-tests' bus bandwidth: what each link carries, comparable across world sizes.
        return numel * 4 * factor / seconds / 1e9

    ar = bus_bandwidth(lambda: dist.all_reduce(x), 2 * (world_size - 1) / world_size)
    ag = bus_bandwidth(lambda: dist.all_gather_into_tensor(gathered, x), (world_size - 1) / world_size)
    report.check("collectives", reduce_ok and gather_ok,
                 f"{dist.get_backend()} all_reduce {'correct' if reduce_ok else 'WRONG'} ({ar:.1f} GB/s bus), "
                 f"all_gather {'correct' if gather_ok else 'WRONG'} ({ag:.1f} GB/s bus), "
                 f"{numel * 4 / 2**20:.0f} MiB per rank")


def check_attention(report, config, device):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 64, generator=generator).to(device) for _ in range(3))
    doc_ids = (torch.rand(2, 256, generator=generator) < 0.02).cumsum(1).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    backends = ["sdpa", "flex"]
    if device.type == "cpu":
        backends.append("flex-compiled")  # the inductor CPU kernel, forward only
    if fa3_available():
        backends.append("fa3")
    # causal; documents; documents with a sliding window and record #46's softmax scale
    cases = [(None, None, None), (doc_ids, None, None), (doc_ids, 48, 0.1)]
    for name in backends:
        backend = attention_backend(name.split("-")[0])
        try:
            errors = []
            for ids, window, scale in cases:
                mask = backend.mask(ids, 2, 256, device, window)
                if name == "flex-compiled":
                    from torch.nn.attention.flex_attention import flex_attention
                    out = torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=mask, scale=scale)
                else:
                    out = backend.attend(q, k, v, mask, scale)
                reference = attention_reference(q, k, v, ids, window, scale)
                errors.append((out.float() - reference.float()).abs().max().item())
            error, tolerance = max(errors), 2e-2 if dtype == torch.bfloat16 else 1e-4
            report.check(f"attention {name}", error <= tolerance,
                         f"max error {error:.1e} against the explicit-mask reference ({dtype}, causal, documents, window; "
                         f"tolerance {tolerance:.0e})")
        except Exception as e:  # noqa: BLE001 - a backend that cannot run here is the finding
            report.check(f"attention {name}", False, f"{type(e).__name__}: {str(e).splitlines()[0]}")
    attention = resolve_backend(config.attention, device, resolve_dtype(config, device))
    report.info(f"attention: the run uses {attention} (--attention {config.attention})")


def check_kernels(report, config, device):
    """The Triton kernels the run uses (--mlp-kernel, --loss-kernel), each against its plain PyTorch form at
    the preset's width and vocabulary, forward and backward."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device).requires_grad_()

    def relative_errors(fast, reference, inputs):
        """Of the output and of each input's gradient, from the same random output gradient."""
        grad = torch.randn(fast.shape, generator=generator).to(device, fast.dtype)
        errors = []
        for a, b in zip((fast, *torch.autograd.grad(fast, inputs, grad)),
                        (reference, *torch.autograd.grad(reference, inputs, grad))):
            errors.append(((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item())
        return errors

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    d, rows = config.model_dim, 256
    if kernel_choice(config.mlp_kernel, triton_mlp_available, device) == "triton":
        x, fc, proj = randn(rows, d), randn(4 * d, d, scale=d ** -0.5), randn(d, 4 * d, scale=(4 * d) ** -0.5)
        inputs = (x, fc, proj)
        errors = relative_errors(fused_relu_square_mlp(x.to(dtype), fc, proj),
                                 relu_square_mlp_reference(x.to(dtype), fc, proj), inputs)
        report.check("mlp kernel triton", max(errors) <= 2e-2,
                     f"relative error against PyTorch ({dtype}): output {errors[0]:.1e}, gradients "
                     f"{', '.join(f'{e:.1e}' for e in errors[1:])} (tolerance 2e-02)")
    else:
        report.info(f"mlp kernel: plain PyTorch (--mlp-kernel {config.mlp_kernel})")
    if kernel_choice(config.loss_kernel, triton_loss_available, device) == "triton":
        vocab = config.vocab_size
        logits = randn(2, 64, vocab, scale=4.0)
        targets = torch.randint(0, vocab, (2, 66), generator=generator).to(device)
        prefix = torch.randint(-1, vocab, (2, 64), generator=generator).to(device)
        weights = torch.tensor([1.0, 0.5, 0.25], device=device)
        args = (targets, weights, prefix, 0.25, HEAD_SOFTCAP)
        errors = relative_errors(triton_position_losses(logits, *args), kernel_position_losses(logits, *args),
                                 (logits,))
        report.check("loss kernel triton", max(errors) <= 1e-4,
                     f"relative error against PyTorch (float32, 2 x 64 positions x {vocab:,} ids, 3 tokens ahead "
                     f"and the prefix): losses {errors[0]:.1e}, logits' gradient {errors[1]:.1e} (tolerance 1e-04)")
    else:
        report.info(f"loss kernel: plain PyTorch (--loss-kernel {config.loss_kernel})")


def check_matmul(report, device):
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(512, 512, generator=generator).to(device) for _ in range(2))
    exact = a.double() @ b.double()
    for dtype in (torch.bfloat16, torch.float32):
        result = (a.to(dtype) @ b.to(dtype)).double()
        error = ((result - exact).norm() / exact.norm()).item()
        tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-3  # tf32 matmuls may run for float32 on GPUs
        report.check(f"matmul {str(dtype).split('.')[1]}", error <= tolerance,
                     f"relative error {error:.1e} against float64 (tolerance {tolerance:.0e})")


def check_fp8_head(report, config, device):
    """The FP8 head's kernels (forward with fast accumulation, both backward products) against the same
    rounding in float ops, at the preset's head shape: CUDA's `_scaled_mm` has layout rules the CPU's
    does not."""
    if not config.fp8_head:
        report.info("fp8 head: not checked, the run does not use it (--fp8-head false)")
        return
    if not fp8_supported(device):
        report.info(f"fp8 head: not checked, float8 matmuls do not run on this {device.type} (the head stays bf16)")
        return
    try:
        errors, error_vs_exact, rows = _fp8_head_errors(config, device)
    except Exception as e:  # noqa: BLE001 - a kernel that cannot run this shape here is the finding
        report.check("fp8 head", False, f"{type(e).__name__}: {str(e).splitlines()[0]}")
        return
    tolerance = 1e-2  # bf16 results of the same products summed in another order
    report.check("fp8 head", all(e <= tolerance for e in errors),
                 f"relative error against the float-op rounding: logits {errors[0]:.1e}, input gradient "
                 f"{errors[1]:.1e}, weight gradient {errors[2]:.1e} (tolerance {tolerance:.0e}); float8's own "
                 f"error against the exact logits {error_vs_exact:.1e} ({rows} x {config.model_dim} x "
                 f"{config.vocab_size})")


def _fp8_head_errors(config, device):
    """Relative errors of the FP8 head's logits and gradients against `fp8_linear_reference`, and of
    its logits against the exact product."""
    generator = torch.Generator().manual_seed(0)
    rows = 4096 if device.type == "cuda" else 256
    x = torch.nn.functional.rms_norm(torch.randn(rows, config.model_dim, generator=generator), (config.model_dim,))
    x = x.to(device, torch.bfloat16).requires_grad_()
    weight = (0.02 * torch.randn(config.vocab_size, config.model_dim, generator=generator)).to(device).requires_grad_()
    grad = (1e-3 * torch.randn(rows, config.vocab_size, generator=generator)).to(device, torch.bfloat16)
    scales = head_scales(config.model_dim)
    results = []
    for linear in (fp8_linear, fp8_linear_reference):
        out = linear(x, weight, *scales)
        results.append((out, *torch.autograd.grad(out, (x, weight), grad)))

    def relative(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    errors = [relative(a, b) for a, b in zip(*results)]
    return errors, relative(results[0][0], x.detach().float() @ weight.detach().t()), rows


def check_training(report, config, preset, device, dtype, world_size, rank, timed_steps):
    # With a batch-size schedule, the last stage: the longest rows and windows, the memory peak.
    plan = make_plan(config)
    last = max(plan.stages, key=lambda stage: stage.seq_len)  # the longest rows: the memory peak
    plan_windows = plan.windows_at(config.steps - 1)  # the last step's: the widest
    largest = last.seq_len // config.seq_len
    # as the run resolves it, --micro-batch-tokens included (the synthetic tokens need no prefix table)
    runtime = resolve_runtime(make_plan(dataclasses.replace(config, prefix_weight_stages="")), rank, world_size)
    micro, use_compile = runtime.micro_batch_tokens * largest, runtime.compile
    most_rows = -(-(config.batch_tokens // config.seq_len) // world_size)  # 8 rows on 3 ranks: 3, 3 and 2
    config = largest_stage_config(plan)
    plan = make_plan(config)
    report.info(f"preset {preset}: {runtime.micro_batch_reason}")
    torch.manual_seed(config.seed)
    raw_model = GPT(plan, runtime.attention).to(device)
    raw_model.set_windows(plan_windows)
    optimizer = Optimizer(raw_model, plan, fused=device.type == "cuda", compile_muon=use_compile)
    model = optimizer.distribute(compile_model(raw_model) if use_compile else raw_model)
    autocast = runtime.autocast()
    generator = torch.Generator().manual_seed(config.seed + rank)
    pieces = runtime.row_split_tokens
    if pieces:  # the rows in pieces of at most `pieces` tokens (--row-split-tokens), each a forward pass
        pieces = min(pieces, config.seq_len)
        batch = synthetic_micro_batches(dataclasses.replace(config, seq_len=pieces), pieces,
                                        most_rows * -(-config.seq_len // pieces), device, generator)
    else:
        batch = synthetic_micro_batches(config, micro, -(-most_rows * config.seq_len // micro), device, generator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def timed_step(step):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        optimizer.set_schedules(step)
        raw_model.refresh_fp8(step)
        loss = train_step(model, optimizer, batch, autocast, step, config).item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss, time.perf_counter() - started

    first_loss, first_s = timed_step(0)  # compiles
    losses, times = [first_loss], []
    for step in range(1, timed_steps + 1):
        loss, seconds = timed_step(step)
        losses.append(loss)
        times.append(seconds)
    step_s = statistics.median(times)
    tokens_per_s = config.batch_tokens / step_s
    finite = all(math.isfinite(x) for x in losses)
    # The same synthetic batch every step: a working model and optimizer fit it, fast.
    learning = losses[-1] < losses[0]
    report.check("training", finite and learning,
                 f"{preset} loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps on one repeated "
                 f"synthetic batch ({batch[0][0].numel():,}-token micro-batches x {len(batch)} x {world_size} rank(s))")
    report.check("step time", True,
                 f"first step (compile {'on' if use_compile else 'off'}) {first_s:.1f} s; then {1000 * step_s:.0f} ms "
                 f"a step (median of {timed_steps}), {tokens_per_s:,.0f} tokens/s, "
                 f"{tokens_per_s / world_size:,.0f} per device")
    peak = peak_flops(device)
    # Attention stays inside documents only with document masking; BOS-aligned rows cut them.
    doc_len = min(config.seq_len, last.max_doc_len or config.max_doc_len or config.seq_len) \
        if config.doc_masking and config.bos_align else config.seq_len
    fpt = flops_per_token(raw_model, config.seq_len, doc_len)
    mfu = f"{fpt * tokens_per_s / world_size / peak:.1%}" if peak else "n/a (no peak FLOP/s known for this device)"
    report.check("mfu", True, f"{fpt / 1e9:.2f} GFLOP/token (attention counted over {doc_len:,}-token documents: "
                              f"an upper bound) x {tokens_per_s / world_size:,.0f} tokens/s per device over the "
                              f"device's bf16 peak: {mfu}")
    if device.type == "cuda":
        measured = torch.cuda.max_memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        eager = estimate_training_memory(config, dtype)
        estimate = (compiled_estimate(eager) if use_compile else eager).peak_bytes(micro // config.seq_len)
        report.check("memory", measured <= 0.95 * total,
                     f"peak {measured / GIB:.1f} GiB allocated of {total / GIB:.1f} GiB; estimate "
                     f"{estimate / GIB:.1f} GiB (eager estimate {eager.peak_bytes(micro // config.seq_len) / GIB:.1f} GiB)")
    projected = step_s * config.steps
    report.check("projected run", True,
                 f"{config.steps} steps x {1000 * step_s:.0f} ms = {projected / 60:.1f} min of train_time on "
                 f"{world_size} device(s) (validation and compile not included"
                 f"{'; every step at the largest stage: an upper bound' if largest > 1 else ''})")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    timed_steps = 3
    if "--preflight-steps" in argv:
        i = argv.index("--preflight-steps")
        timed_steps = int(argv[i + 1])
        del argv[i:i + 2]
    try:
        preset, config = parse_config(argv)
        make_plan(config)  # every setting checked, as the run checks it
        device = resolve_device(config)
        dtype = resolve_dtype(config, device)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    if "RANK" in os.environ:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None,
                                timeout=datetime.timedelta(seconds=config.collective_timeout_s))
    report = Report(rank)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    try:
        check_environment(report, device, world_size)
        check_collectives(report, device, world_size, rank)
        check_attention(report, config, device)
        check_kernels(report, config, device)
        check_matmul(report, device)
        check_fp8_head(report, config, device)
        try:
            check_training(report, config, preset, device, dtype, world_size, rank, timed_steps)
        except ConfigError as e:
            report.check("training", False, str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(f"preflight: {'FAIL: ' + ', '.join(report.failed) if report.failed else 'all checks passed'}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
