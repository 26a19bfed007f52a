"""The MLP `out = relu(x W1^T)^2 W2^T` with its activation fused into a Triton matmul, forward and backward.

A plain MLP writes the pre-activation `pre = x W1^T` (4 * model_dim wide, the largest activation of a block)
to memory, reads it back for relu and square, and keeps it for the backward. Here one kernel computes each
tile of `x W1^T` in float32 and applies the activation before the tile leaves the chip, so only
`post = relu(pre)^2` is written, and `post` is all the backward needs: relu(pre) = sqrt(post). The same
kernel, in its backward mode, computes `dpre = 2 (g W2) relu(pre)` tile by tile, so `g W2` is never written
either. The two other matmuls of each pass (`post W2^T`, and dW2, dW1, dx) are plain torch matmuls.

Roundings are those of the plain MLP under bf16 autocast on a GPU: the float32 accumulator is rounded to the
compute dtype, then relu and square run in that dtype. The backward's relu(pre) = sqrt(post), rounded to the
compute dtype, is exactly the relu(pre) the forward squared (sqrt(fl(r * r)) = r in binary floating point)
unless post underflowed to a subnormal or zero, for |pre| below about 1e-19 in bf16.

The kernel uses plain pointers and masks (no TMA descriptors), so it runs on any CUDA GPU Triton supports,
and on CPU in Triton's interpreter (TRITON_INTERPRET=1), which is how the tests run it.
"""
# The kernel's `tl.constexpr` annotations stay strings (Triton reads them as such), so this module imports
# where Triton is not installed (it is a Linux-only requirement) and only the kernel is unavailable there.
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# (BLOCK_M, BLOCK_N, BLOCK_K) where the caller chooses none and nothing is autotuned (in the interpreter);
# also the first of the tile shapes a GPU autotunes among, one that suits Ampere and Hopper in bf16
DEFAULT_BLOCKS = (128, 128, 64)


def triton_mlp_available(device):
    """Whether the Triton kernel can run on `device`: CUDA with Triton, or CPU in Triton's interpreter."""
    if triton is None:
        return False
    if torch.device(device).type == "cuda":
        return True
    # The interpreter runs kernels on CPU tensors, slowly: for tests, never picked by a CPU training run
    return torch.device(device).type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _matmul_relu_square(a_ptr, b_ptr, post_ptr, out_ptr, M, N, K,
                        stride_am, stride_ak, stride_bk, stride_bn,
                        BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of `a @ b` (a: M x K, b: K x N, any strides), then its activation:
    forward, out = relu(tile)^2; backward, out = 2 tile sqrt(post). `post` and `out` are contiguous M x N."""
    # Only builtins (not tl.cdiv, tl.zeros): Triton's library functions are jitted when Triton is imported,
    # and in a process that imported it before setting TRITON_INTERPRET, they fail in the interpreter
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    tiles_n = (N + BLOCK_N - 1) // BLOCK_N
    # Tiles in groups of GROUP_M rows, column by column within a group, so that the programs running at
    # once share their rows of `a` and columns of `b` in L2
    pid = tl.program_id(0)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_rows)
    pid_n = (pid % (GROUP_M * tiles_n)) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        # Out-of-range rows, columns and k load as zeros, which add nothing to the sum
        a = tl.load(a_ptrs, mask=(rows[:, None] < M) & (ks[None, :] < K - k), other=0.0)
        b = tl.load(b_ptrs, mask=(ks[:, None] < K - k) & (cols[None, :] < N), other=0.0)
        # "ieee": a float32 run multiplies in float32 as torch does by default, not in TF32
        acc = tl.dot(a, b, acc, input_precision="ieee")
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    dtype = out_ptr.dtype.element_ty
    # Rounded to the compute dtype first, as the plain MLP's matmul output is
    tile = acc.to(dtype)
    offsets = rows[:, None] * N + cols[None, :]
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    if BACKWARD:
        post = tl.load(post_ptr + offsets, mask=mask, other=0.0)
        relu_pre = tl.sqrt_rn(post.to(tl.float32)).to(dtype)  # exactly the forward's relu(pre): see the docstring
        # The product of two values in a 16-bit dtype is exact in float32: one rounding, as autograd's
        out = 2 * tile.to(tl.float32) * relu_pre.to(tl.float32)
    else:
        relu_pre = tl.maximum(tile, 0.0)
        out = relu_pre * relu_pre
    tl.store(out_ptr + offsets, out.to(dtype), mask=mask)


if triton is not None:
    _kernel = triton.jit(_matmul_relu_square)
    # On a GPU without a block size from the caller, the fastest of a few tile shapes; one that does not fit
    # the GPU's shared memory is skipped by the autotuner rather than failing the run
    _tuned_kernel = triton.autotune(
        [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
         triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
         triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
         triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4)],
        key=["M", "N", "K", "BACKWARD"])(_kernel)


def _launch(a, b, post, blocks):
    """`relu(a @ b)^2` (post is None) or `2 (a @ b) sqrt(post)`, in a's dtype; b may be a transposed view."""
    (M, K), N = a.shape, b.shape[1]
    out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    # The kernel's offsets are int32
    assert out.numel() < 2**31 and a.numel() < 2**31 and b.numel() < 2**31, "too large for int32 offsets"
    # The forward never reads post_ptr: out stands in for it
    args = (a, b, out if post is None else post, out, M, N, K, *a.stride(), *b.stride())
    if blocks is None and a.is_cuda:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _tuned_kernel[grid](*args, BACKWARD=post is not None)
    else:
        block_m, block_n, block_k = blocks or DEFAULT_BLOCKS
        grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
        _kernel[grid](*args, BACKWARD=post is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                      GROUP_M=8, num_warps=4, num_stages=3)
    return out


class FusedReluSquareMLP(torch.autograd.Function):
    """`relu(x W1^T)^2 W2^T` saving only x, the weights and post for the backward; all in one dtype."""

    @staticmethod
    def forward(ctx, x, fc_weight, proj_weight, blocks=None):
        assert x.dtype == fc_weight.dtype == proj_weight.dtype, "x and both weights in one compute dtype"
        x2 = x.reshape(-1, x.shape[-1])
        post = _launch(x2, fc_weight.t(), None, blocks)
        ctx.save_for_backward(x2, fc_weight, proj_weight, post)
        ctx.blocks = blocks
        return (post @ proj_weight.t()).view(*x.shape[:-1], proj_weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x2, fc_weight, proj_weight, post = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        dpre = _launch(g, proj_weight, post, ctx.blocks)
        dx = dpre @ fc_weight
        return dx.view(*grad_out.shape[:-1], dx.shape[-1]), dpre.t() @ x2, g.t() @ post, None


def _compute_dtype(x):
    """Autocast's dtype where it is on, as F.linear computes in, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def fused_relu_square_mlp(x, fc_weight, proj_weight, blocks=None):
    """`relu(x @ fc_weight.T)^2 @ proj_weight.T` by the fused kernel, in autocast's dtype if on, else x's.

    The weights are in nn.Linear's layout: fc (4d, d), proj (d, 4d). All three are cast to the compute
    dtype, as F.linear's inputs are under autocast, and get their gradients in their own dtypes.
    `blocks` = (BLOCK_M, BLOCK_N, BLOCK_K) fixes the tile size (the tests' small ones); by default a GPU
    picks among a few by autotuning."""
    dtype = _compute_dtype(x)
    return FusedReluSquareMLP.apply(x.to(dtype), fc_weight.to(dtype), proj_weight.to(dtype), blocks)


def relu_square_mlp_reference(x, fc_weight, proj_weight):
    """The same MLP in plain PyTorch, in the same dtype, with the kernel's roundings: pre in that dtype,
    then relu and square in it."""
    dtype = _compute_dtype(x)
    pre = x.to(dtype) @ fc_weight.to(dtype).t()
    return torch.relu(pre).square() @ proj_weight.to(dtype).t()
