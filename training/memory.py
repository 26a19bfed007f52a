"""Peak memory of one training step on one GPU, estimated on CPU without allocating it.

The model, its optimizers and two training steps run on fake tensors (FakeTensorMode: shapes,
no data), typed by CUDA autocast's rules (`model.cuda_autocast`), while torch's MemTracker
follows every allocation and free: parameters, gradients, optimizer state, and the saved
activations and temporaries of forward and backward. Memory grows linearly with the rows of a
micro-batch, so two sizes give the line. It is the eager (uncompiled) peak; compiled runs fuse
elementwise work and keep less (`docs/PERFORMANCE.md` has measured figures).
"""
import contextlib
import dataclasses
import io

import torch

from config import make_plan
from model.cuda_autocast import cuda_autocast_policy
from model.gpt import GPT
from optim.optimizer import Optimizer

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    fixed_bytes: int  # parameters, gradients, optimizer state: independent of the micro-batch
    bytes_per_row: int  # activations and temporaries of one sequence of the micro-batch

    def peak_bytes(self, rows):
        return self.fixed_bytes + rows * self.bytes_per_row


def _peak_bytes(config, rows, dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    # The plain MLP and loss stand in for their Triton and float8 forms, which launch no kernel on fake
    # tensors and keep no more for the backward.
    config = dataclasses.replace(config, mlp_kernel="plain", loss_kernel="plain", fp8_mlp=False)
    with FakeTensorMode(), cuda_autocast_policy():
        # SDPA stands in for FlexAttention (no CPU backward): both keep q, k, v, the output and
        # the log-sum-exp for backward, not the score matrix.
        model = GPT.from_config(config, "sdpa")
        optimizers = Optimizer(model, make_plan(config)).parts
        tokens = torch.zeros(rows, config.seq_len + 1, dtype=torch.int64)
        tracker = MemTracker()
        tracker.track_external(model, *optimizers)
        with tracker, contextlib.redirect_stdout(io.StringIO()):
            for _ in range(2):  # the second step runs with the optimizer state the first created
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    loss = model(tokens[:, :-1], tokens[:, 1:])
                loss.backward()
                for opt in optimizers:
                    opt.step()
                model.zero_grad(set_to_none=True)
                tracker.reset_mod_stats()
        return max(snapshot["Total"] for snapshot in tracker.get_tracker_snapshot("peak").values())


_estimates = {}


def estimate_training_memory(config, dtype=torch.bfloat16):
    """The per-GPU memory line of `config`'s model (a config.Config) under `dtype` autocast."""
    key = (repr(config), dtype)
    if key not in _estimates:
        one, two = _peak_bytes(config, 1, dtype), _peak_bytes(config, 2, dtype)
        _estimates[key] = MemoryEstimate(fixed_bytes=2 * one - two, bytes_per_row=two - one)
    return _estimates[key]


def choose_micro_batch_tokens(config, world_size, device_bytes, estimate, margin=0.8):
    """The largest micro-batch whose estimated peak fits `margin` of a device's memory.

    The margin covers what the estimate leaves out: the caching allocator's reserve (13% above the
    allocated peak in the measurement above), NCCL's buffers, and the CUDA context.

    Candidates are the divisors of a rank's share of the batch that are whole sequences, so the
    optimizer update stays the same and only the accumulation changes. Returns (tokens, reason);
    raises ValueError when not even one sequence fits.
    """
    per_rank_rows = config.batch_tokens // world_size // config.seq_len
    budget = margin * device_bytes
    for rows in sorted((r for r in range(1, per_rank_rows + 1) if per_rank_rows % r == 0), reverse=True):
        if estimate.peak_bytes(rows) <= budget:
            return rows * config.seq_len, (
                f"micro-batch {rows * config.seq_len:,} tokens ({per_rank_rows // rows} accumulation steps): the "
                f"largest whose estimated peak, {estimate.peak_bytes(rows) / GIB:.1f} GiB, fits {margin:.0%} of "
                f"{device_bytes / GIB:.1f} GiB")
    raise ValueError(f"not even one sequence of {config.seq_len} tokens fits: estimated "
                     f"{estimate.peak_bytes(1) / GIB:.1f} GiB against {margin:.0%} of {device_bytes / GIB:.1f} GiB; "
                     "use a smaller model or --seq-len, or set --micro-batch-tokens to skip the estimate (record "
                     "#46's last stage measured 30% below it on an H100: docs/PERFORMANCE.md)")


def choose_piece_tokens(config, device_bytes, estimate, margin=0.8, multiple=128):
    """(the most tokens of one forward pass that fit `margin` of a device's memory, why), for rows split at
    document starts: the estimate's per-row memory spread over the row's tokens, rounded down to a multiple
    of 128, the length every piece is padded to (attention kernels' blocks; float8's multiples of 16).
    Raises ValueError when the fixed memory alone does not fit."""
    budget = margin * device_bytes - estimate.fixed_bytes
    tokens = int(budget * config.seq_len / estimate.bytes_per_row) // multiple * multiple if budget > 0 else 0
    if tokens <= 0:
        raise ValueError(f"the weights and optimizer state alone, {estimate.fixed_bytes / GIB:.1f} GiB, do not fit "
                         f"{margin:.0%} of {device_bytes / GIB:.1f} GiB")
    peak = estimate.fixed_bytes + estimate.bytes_per_row * tokens / config.seq_len
    return tokens, (f"one row of {config.seq_len:,} tokens does not fit: rows split at document starts into pieces "
                    f"of at most {tokens:,} tokens, whose estimated peak, {peak / GIB:.1f} GiB, fits {margin:.0%} of "
                    f"{device_bytes / GIB:.1f} GiB")


# Compiled, record #11's preset (then `speedrun`) kept 0.37 of the eager estimate's per-row memory:
# measured on an H200 (torch 2.11, 64 rows of 1024 tokens, validation included) as 35.5 GiB
# allocated against an eager estimate of 92.4 GiB, of which 1.7 GiB fixed. Rounded up to 0.38;
# docs/PERFORMANCE.md. Record #46's recipe keeps less (31.3 GiB against 45.0 on an H100).
COMPILED_ACTIVATION_FRACTION = 0.38


def compiled_estimate(estimate):
    """The line for a compiled run: inductor fuses the elementwise chains whose outputs eager keeps."""
    return MemoryEstimate(estimate.fixed_bytes, int(estimate.bytes_per_row * COMPILED_ACTIVATION_FRACTION))
