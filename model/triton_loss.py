"""HEAD's soft-capped multi-token + prefix cross-entropy (model/loss.py) as two Triton kernels, with the
gradient of HEAD's fused CUDA kernel (`kernel_position_losses`).

Why fuse: in plain PyTorch the loss writes the soft-capped float32 logits z = cap * s of every position
and word (positions x vocabulary, the largest tensor of a step), reads them back for the logsumexp, the
picked targets and the softmax, and writes a gradient of the same size for each of those steps. Here the
forward reads each row of logits once, computing s, z and an online logsumexp block by block, and keeps
one float32 per position (the logsumexp); the backward reads the logits once more, computes s and the
softmax again on the chip and writes the gradient once. Nothing of size positions x vocabulary is written
but the gradient.

One program per position (a row of V logits), looping over the vocabulary in blocks of VOCAB_BLOCK.
Per position i of a row of T (targets may run past the T positions, as in model/loss.py):

    loss_i = sum_{k < n} w_k CE(z_i, t_{i+k})  +  w_p CE(z_i, prefix_i)      (absent targets add nothing)
    grad_ij = g_i (cap / temperature) s_ij (1 - s_ij) (S_i p_ij - H_ij)

with H_ij the weight of position i's terms whose target is j and S_i either every w_k plus w_p where the
prefix target exists (HEAD's kernel, full_weight_sum=True) or sum_j H_ij (the loss's own gradient).

Roundings are done on the float32 bits (`_round_mantissa`), not by Triton's casts: the interpreter's
float32 -> bf16 cast truncates and its float32 -> float8 cast loses a rounded-up mantissa's carry, and on
the bits the rounding is the same on every GPU, with float8 conversions or without. So "record" numerics
(s in bf16), the saturating e5m2 rounding of grad_fp8_scale and a bf16 gradient are all rounded to
nearest even, as torch rounds, in the kernel: the e5m2 gradient is never a separate pass.

Plain pointers and masks (no TMA descriptors): it runs on any CUDA GPU Triton supports and on CPU tensors in
Triton's interpreter (TRITON_INTERPRET=1 before triton and this module are imported), as the tests run it.
"""
# The kernels' `tl.constexpr` annotations stay strings (Triton reads them as such), so this module imports
# where Triton is not installed (it is a Linux-only requirement); only the kernels are unavailable there.
from __future__ import annotations

import torch

from model.loss import HEAD_SOFTCAP, _as_weights, _check_shapes

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:
    triton = None

# Vocabulary columns per block: 50304 logits of a row in 50 blocks, 8 per thread at 4 warps
VOCAB_BLOCK = 1024

_jit = triton.jit if triton is not None else (lambda fn: fn)


def triton_loss_available(device):
    """Whether the kernels can run on `device`: CUDA with Triton, or CPU in Triton's interpreter (slow: for
    tests, never a CPU training run's choice)."""
    device = torch.device(device)
    if triton is None:
        return False
    # Triton compiles or interprets a function as it is decorated: its own library's (tl.sum) when triton was
    # first imported, the kernels when this module was. On CPU both must have seen TRITON_INTERPRET=1
    return device.type == "cuda" or (device.type == "cpu" and isinstance(tl.sum, InterpretedFunction)
                                     and isinstance(_forward_kernel, InterpretedFunction))


def triton_position_losses(logits, targets, mtp_weights, prefix_targets=None, prefix_weight=0.0,
                           cap=HEAD_SOFTCAP, numerics="float32", full_weight_sum=True, grad_fp8_scale=None,
                           *, vocab_block=VOCAB_BLOCK):
    """`kernel_position_losses` (model/loss.py) by the fused kernels: the same arguments, losses (..., T) in
    float32 and gradient of logits (..., T, V) (float32 or bf16, in their dtype). vocab_block: the
    columns a program handles at once, a power of two (the tests' small one crosses block edges)."""
    _check_shapes(logits, targets, prefix_targets)
    if numerics not in ("float32", "record"):
        raise ValueError(f"numerics {numerics!r} is not float32 or record")
    if cap.kind != "sigmoid":
        raise ValueError("HEAD's kernel gradient is for a sigmoid soft-cap")
    device = logits.device
    if prefix_targets is None:  # one kernel for both: a prefix target of -1 adds no term
        prefix_targets, prefix_weight = torch.full(logits.shape[:-1], -1, device=device), 0.0
    return _FusedLoss.apply(logits, targets, _as_weights(mtp_weights, device), prefix_targets,
                            _as_weights(prefix_weight, device).reshape(1), cap, numerics == "record",
                            full_weight_sum, grad_fp8_scale, vocab_block)


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, weights, prefix_targets, prefix_weight, cap, record, full_weight_sum,
                grad_fp8_scale, vocab_block):
        rows = logits.reshape(-1, logits.size(-1)).contiguous()
        # Row r of `rows` is position r % T of row r // T of `targets`
        targets = targets.reshape(-1, targets.size(-1)).long().contiguous()
        prefix_targets = prefix_targets.reshape(-1).long().contiguous()
        losses = torch.empty(rows.size(0), dtype=torch.float32, device=rows.device)
        lse = torch.empty_like(losses)
        _forward_kernel[(rows.size(0),)](
            rows, rows.size(1), targets, logits.size(-2), targets.size(1), weights,
            weights.numel(), prefix_targets, prefix_weight, losses, lse, cap.cap, cap.offset, cap.temperature,
            RECORD=record, TERMS=_terms_size(weights), BLOCK=vocab_block, num_warps=4)
        # The logits (bf16 in HEAD) and one float32 per position: s and the softmax are made again
        ctx.save_for_backward(rows, lse, targets, weights, prefix_targets, prefix_weight)
        ctx.cap, ctx.record, ctx.full_weight_sum = cap, record, full_weight_sum
        ctx.grad_fp8_scale, ctx.vocab_block, ctx.shape = grad_fp8_scale, vocab_block, logits.shape
        return losses.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_losses):
        rows, lse, targets, weights, prefix_targets, prefix_weight = ctx.saved_tensors
        cap, fp8 = ctx.cap, ctx.grad_fp8_scale is not None
        scale = ctx.grad_fp8_scale if fp8 else 1.0
        grad = torch.empty_like(rows)
        _backward_kernel[(rows.size(0),)](
            rows, rows.size(1), targets, ctx.shape[-2], targets.size(1), weights,
            weights.numel(), prefix_targets, prefix_weight, lse, grad_losses.float().reshape(-1).contiguous(),
            grad, cap.cap, cap.offset, cap.temperature, cap.cap / cap.temperature, scale, 1.0 / scale,
            RECORD=ctx.record, FULL_WEIGHT_SUM=ctx.full_weight_sum, FP8=fp8, TERMS=_terms_size(weights),
            BLOCK=ctx.vocab_block, num_warps=4)
        return grad.view(ctx.shape), None, None, None, None, None, None, None, None, None


def _terms_size(weights):
    """Entries of a position's term vectors: n MTP terms and the prefix term, padded to a power of two."""
    return triton.next_power_of_2(weights.numel() + 1)


# -- the kernels

@_jit
def _round_mantissa(x, DROPPED: tl.constexpr):
    """float32 x rounded to 23 - DROPPED mantissa bits, to nearest, ties to even (bf16: 16 dropped, e5m2's
    normal range: 21). Adding half a step less one, plus the last kept bit, and clearing the dropped bits
    rounds the magnitude; a carry moves into the exponent, as it should."""
    bits = x.to(tl.int32, bitcast=True)
    bits = bits + ((1 << (DROPPED - 1)) - 1) + ((bits >> DROPPED) & 1)
    return (bits & -(1 << DROPPED)).to(tl.float32, bitcast=True)


@_jit
def _round_to_e5m2(x):
    """float32 x rounded to the nearest e5m2 value, ties to even, saturating at the largest finite one
    (57344 = E5M2_MAX, as HEAD's kernel's conversion does), in float32."""
    x = tl.clamp(x, -57344.0, 57344.0)
    # Below e5m2's smallest normal value, 2^-14, its step is a fixed 2^-16: adding 192 (where float32's step
    # is 2^-16) and taking it off again rounds there
    subnormal = (x + 192.0) - 192.0
    return tl.where(tl.abs(x) < 2.0**-14, subnormal, _round_mantissa(x, 21))


@_jit
def _squashed(x, offset, temperature, RECORD: tl.constexpr):
    """s = sigmoid((logit + offset) / temperature) in float32. Record numerics: from the logit in bf16,
    and s rounded to bf16 (HEAD's kernel keeps s in bf16 and computes everything else from it)."""
    x = x.to(tl.float32)
    if RECORD:
        x = _round_mantissa(x, 16)
    s = tl.sigmoid((x + offset) / temperature)
    if RECORD:
        s = _round_mantissa(s, 16)
    return s


@_jit
def _terms(row, targets_ptr, positions, length, weights_ptr, n_weights, prefix_ptr, prefix_weight_ptr, vocab,
           TERMS: tl.constexpr):
    """Position `row`'s loss terms as vectors of TERMS entries: entry k < n is target t_{i+k} with w_k,
    entry n the prefix target with w_p; target -1 and weight 0 where there is no term (past the targets'
    end, outside the vocabulary). Also HEAD's normaliser weight: every w_k (a target past the row's end
    too) and w_p where the prefix target exists, 0 where the position's own target is outside the vocabulary."""
    k = tl.arange(0, TERMS)
    i = row % positions
    is_mtp = k < n_weights
    mtp_target = tl.load(targets_ptr + (row // positions) * length + i + k, mask=is_mtp & (i + k < length),
                         other=-1)
    target = tl.where(is_mtp, mtp_target, tl.where(k == n_weights, tl.load(prefix_ptr + row), -1))
    # Entries past n have target -1, so weight 0 below
    weight = tl.where(is_mtp, tl.load(weights_ptr + k, mask=is_mtp, other=0.0), tl.load(prefix_weight_ptr))
    present = (target >= 0) & (target < vocab)
    full_weight = tl.sum(tl.where(is_mtp | present, weight, 0.0), 0)
    # none at a position whose own target is ignored (a padded piece's; HEAD's rows have none)
    own_target = tl.sum(tl.where((k == 0) & present, 1, 0), 0) > 0
    return tl.where(present, target, -1), tl.where(present, weight, 0.0), tl.where(own_target, full_weight, 0.0)


@_jit
def _forward_kernel(logits_ptr, vocab, targets_ptr, positions, length, weights_ptr, n_weights,
                    prefix_ptr, prefix_weight_ptr, losses_ptr, lse_ptr, cap, offset, temperature,
                    RECORD: tl.constexpr, TERMS: tl.constexpr, BLOCK: tl.constexpr):
    """losses[row] and lse[row]: the row's logits read once, block by block."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * vocab  # rows x V passes 2^31 in a training step
    # Online logsumexp: a running maximum and the sum of exp(z - maximum), rescaled when the maximum grows
    running_max = tl.full((), float("-inf"), tl.float32)
    total = tl.full((), 0.0, tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_vocab = cols < vocab
        z = cap * _squashed(tl.load(row_ptr + cols, mask=in_vocab, other=0.0), offset, temperature, RECORD)
        z = tl.where(in_vocab, z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, 0))
        total = total * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), 0)
        running_max = new_max
    lse = running_max + tl.log(total)

    target, weight, _ = _terms(row, targets_ptr, positions, length, weights_ptr, n_weights, prefix_ptr,
                               prefix_weight_ptr, vocab, TERMS)
    # The few target logits loaded again (a gather) and squashed as in the loop, so z_target is the z above
    picked = cap * _squashed(tl.load(row_ptr + target, mask=target >= 0, other=0.0), offset, temperature, RECORD)
    tl.store(losses_ptr + row, tl.sum(weight * (lse - picked), 0))
    tl.store(lse_ptr + row, lse)


@_jit
def _backward_kernel(logits_ptr, vocab, targets_ptr, positions, length, weights_ptr, n_weights,
                     prefix_ptr, prefix_weight_ptr, lse_ptr, grad_losses_ptr, grad_ptr, cap, offset,
                     temperature, cap_over_temperature, fp8_scale, fp8_inverse, RECORD: tl.constexpr,
                     FULL_WEIGHT_SUM: tl.constexpr, FP8: tl.constexpr, TERMS: tl.constexpr,
                     BLOCK: tl.constexpr):
    """grad[row]: g (cap / temperature) s (1 - s) (S p - H), multiplied in `_KernelGradient.backward`'s
    order (model/loss.py), then rounded to e5m2 at fp8_scale (FP8) and to the logits' dtype. The constants
    come from Python's float64 arithmetic, rounded to float32 once, as torch takes them."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * vocab
    grad_row_ptr = grad_ptr + row.to(tl.int64) * vocab
    lse = tl.load(lse_ptr + row)
    target, weight, full_weight = _terms(row, targets_ptr, positions, length, weights_ptr, n_weights,
                                         prefix_ptr, prefix_weight_ptr, vocab, TERMS)
    normaliser = full_weight if FULL_WEIGHT_SUM else tl.sum(weight, 0)
    coefficient = tl.load(grad_losses_ptr + row) * cap_over_temperature
    if FP8:
        coefficient = coefficient * fp8_inverse
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_vocab = cols < vocab
        s = _squashed(tl.load(row_ptr + cols, mask=in_vocab, other=0.0), offset, temperature, RECORD)
        p = tl.exp(cap * s - lse)
        hits = tl.sum(tl.where(cols[:, None] == target[None, :], weight[None, :], 0.0), 1)
        grad = coefficient * (normaliser * p - hits) * s * (1.0 - s)
        if FP8:
            grad = _round_to_e5m2(grad) * fp8_scale
        if grad_ptr.dtype.element_ty == tl.bfloat16:
            grad = _round_mantissa(grad, 16)  # the store's conversion then is exact (the interpreter truncates)
        tl.store(grad_row_ptr + cols, grad, mask=in_vocab)

