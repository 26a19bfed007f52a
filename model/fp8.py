"""Record #46's FP8 LM head: x @ W^T with both operands in float8 e4m3 and the gradient in e5m2.

Each operand is divided by a fixed scale, rounded to float8, and multiplied back inside
`torch._scaled_mm`, which accumulates in float32. The backward reuses the float8 operands of the
forward. `fp8_linear_reference` spells the same rounding out with float ops, for the tests.
"""
import functools
import math
from typing import NamedTuple

import torch

E4M3 = torch.float8_e4m3fn  # 3 mantissa bits, largest value 448: the operands
E5M2 = torch.float8_e5m2  # 2 mantissa bits, a wider range: the gradient
E4M3_MAX = torch.finfo(E4M3).max


class HeadScales(NamedTuple):
    x: float
    weight: float
    grad: float


def head_scales(model_dim, kind="record46"):
    """The scales of a head over RMS-normed inputs of width model_dim, record #46's or HEAD's.

    Record #46: an RMS-normed row has sum(x^2) = model_dim, so |x| <= sqrt(model_dim), and
    x / (sqrt(model_dim) / 448) fits e4m3; the weight (2^-9) and gradient (1/448) scales are the
    record's choices. HEAD (records #51, #55): x / (100/448), weight / (1.6/448), gradient / (0.75/448),
    tuned rather than derived (an input entry above 100 saturates).
    """
    if kind == "head":
        return HeadScales(x=100 / E4M3_MAX, weight=1.6 / E4M3_MAX, grad=0.75 / E4M3_MAX)
    return HeadScales(x=math.sqrt(model_dim) / E4M3_MAX, weight=2.0 ** -9, grad=1 / E4M3_MAX)


def fp8_supported(device):
    """Whether `torch._scaled_mm` runs in float8 on `device`: CUDA from compute capability 8.9 (Ada, Hopper)
    on, and CPU where this torch build implements it."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu" and _cpu_scaled_mm_works()


@functools.lru_cache(maxsize=1)
def _cpu_scaled_mm_works():
    one = torch.ones((), dtype=torch.float32)
    a, b = torch.ones(16, 16, dtype=E4M3), torch.ones(16, 16, dtype=E5M2)
    try:  # both pairings the head uses: e4m3 x e4m3 forward, e5m2 x e4m3 backward
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        torch._scaled_mm(b, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _scaled_mm(a, b, scale_a, scale_b, out_dtype, fast_accum):
    """a @ b * scale_a * scale_b. CUDA's kernel takes `a` row-major and `b` column-major, with every
    dimension a multiple of 16."""
    return torch._scaled_mm(a, b, scale_a=a.new_tensor(scale_a, dtype=torch.float32),
                            scale_b=a.new_tensor(scale_b, dtype=torch.float32), out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, x_scale, w_scale, grad_scale):
        # Divided in float32, so a bf16 input is rounded once, to float8, eager and compiled alike
        # (inductor computes bf16 arithmetic in float32 anyway).
        x8 = x.reshape(-1, x.size(-1)).float().div(x_scale).to(E4M3)
        w8 = weight.float().div(w_scale).to(E4M3)
        # Fast (lower-precision) accumulation in the forward only, as record #46; CPU ignores the flag.
        out = _scaled_mm(x8, w8.t(), x_scale, w_scale, torch.bfloat16, fast_accum=True)
        ctx.save_for_backward(x8, w8)
        ctx.scales = x_scale, w_scale, grad_scale
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        return out.reshape(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx, grad):
        x8, w8 = ctx.saved_tensors
        x_scale, w_scale, grad_scale = ctx.scales
        g8 = grad.reshape(-1, grad.size(-1)).float().div(grad_scale).to(E5M2)
        # .t().contiguous().t(): the same matrix stored column-major, as the second operand must be.
        grad_x = _scaled_mm(g8, w8.t().contiguous().t(), grad_scale, w_scale, torch.bfloat16, fast_accum=False)
        # (x8^T g8)^T rather than g8^T x8: the faster layout for a (50304, 768) head in record #46.
        grad_w = _scaled_mm(x8.t().contiguous(), g8.t().contiguous().t(), x_scale, grad_scale, torch.float32,
                            fast_accum=False).t()
        return grad_x.reshape(ctx.x_shape).to(ctx.x_dtype), grad_w.to(ctx.w_dtype), None, None, None


def fp8_linear(x, weight, x_scale, w_scale, grad_scale):
    """x (..., in) @ weight (out, in)^T in float8, returned in bf16; the gradient of x comes back in x's
    dtype, the weight's in the weight's. On CUDA, in, out and the number of rows must be multiples of 16."""
    return _FP8Linear.apply(x, weight, x_scale, w_scale, grad_scale)


def _quantized(t, scale, dtype):
    """t rounded to `dtype` at `scale`, and back, in float32."""
    return t.float().div(scale).to(dtype).float() * scale


class _ToBF16WithE5M2Gradient(torch.autograd.Function):
    """A cast to bf16 whose backward rounds the incoming bf16 gradient to e5m2, as the FP8 head's does."""

    @staticmethod
    def forward(ctx, x, grad_scale):
        ctx.grad_scale = grad_scale
        return x.to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):
        return _quantized(grad, ctx.grad_scale, E5M2), None


def fp8_linear_reference(x, weight, x_scale, w_scale, grad_scale):
    """`fp8_linear` with float ops: operands rounded to e4m3 and back, a float32 matmul, a bf16 result.

    The rounding passes gradients straight through, so autograd's matmul backward uses the rounded
    operands and the e5m2-rounded gradient, as the FP8 backward does.
    """
    def rounded(t, scale):
        # Exactly the rounded value: an in-range t and its rounding are within 2x, so subtracting is exact.
        return t.float() + (_quantized(t, scale, E4M3) - t.float()).detach()

    return _ToBF16WithE5M2Gradient.apply(rounded(x, x_scale) @ rounded(weight, w_scale).t(), grad_scale)
