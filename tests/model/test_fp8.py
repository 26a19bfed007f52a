import math

import pytest
import torch
import torch.nn.functional as F

from model.fp8 import fp8_linear, fp8_linear_reference, fp8_supported, head_scales

pytestmark = pytest.mark.skipif(not fp8_supported("cpu"),
                                reason="this torch build's CPU torch._scaled_mm does not take float8")

MODEL_DIM, VOCAB = 64, 96


def head_input(*shape, dtype=torch.bfloat16, seed=0):
    """RMS-normed rows, as the head gets them, and a weight of a trained head's size."""
    generator = torch.Generator().manual_seed(seed)
    x = F.rms_norm(torch.randn(*shape, MODEL_DIM, generator=generator), (MODEL_DIM,)).to(dtype)
    weight = 0.02 * torch.randn(VOCAB, MODEL_DIM, generator=generator)
    return x.requires_grad_(), weight.requires_grad_()


def test_record_46_scales():
    assert head_scales(768) == pytest.approx((0.0618590, 2 ** -9, 0.00223214), rel=1e-5)
    assert head_scales(768).x * 448 == pytest.approx(math.sqrt(768))  # the largest RMS-normed entry maps to 448


def test_forward_matches_the_float_rounding_and_the_exact_product_within_e4m3_error():
    """e4m3 keeps 3 mantissa bits, so rounding moves a value by at most 2^-4 of it, or by half the
    subnormal step 2^-10 times the scale near zero; the bf16 result adds 2^-8 of it. The error bound
    per logit sums those over the products. Measured: 3.8% relative (Frobenius) error, a quarter of
    the bound at most."""
    x, weight = head_input(2, 24)
    scales = head_scales(MODEL_DIM)
    out = fp8_linear(x, weight, *scales)
    assert out.shape == (2, 24, VOCAB) and out.dtype == torch.bfloat16
    # Both sum the same float32 products of the rounded operands, in an order the CPU's kernels choose
    # (AMX sums in another than AVX2): a sum near a bf16 rounding boundary lands one bf16 step apart.
    reference = fp8_linear_reference(x, weight, *scales).float()
    bf16_step = 2.0 ** (torch.floor(torch.log2(reference.abs().clamp_min(2 ** -126))) - 7)
    assert ((out.float() - reference).abs() <= bf16_step).all()

    x, weight, out = x.detach().float(), weight.detach(), out.detach().float()
    exact = x @ weight.t()
    x_error = torch.maximum(2 ** -4 * x.abs(), torch.tensor(2 ** -10 * scales.x))
    w_error = torch.maximum(2 ** -4 * weight.abs(), torch.tensor(2 ** -10 * scales.weight))
    bound = x.abs() @ w_error.t() + x_error @ weight.abs().t() + x_error @ w_error.t() + 2 ** -8 * out.abs()
    assert ((out - exact).abs() <= bound + 1e-6).all()
    assert 0.01 < ((out - exact).norm() / exact.norm()).item() < 0.06


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_gradients_match_the_float_rounding(x_dtype):
    """The backward multiplies the e5m2-rounded gradient by the forward's e4m3 operands."""
    x, weight = head_input(2, 24, dtype=x_dtype)
    scales = head_scales(MODEL_DIM)
    grad = (1e-3 * torch.randn(2, 24, VOCAB, generator=torch.Generator().manual_seed(1))).bfloat16()
    grad_x, grad_w = torch.autograd.grad(fp8_linear(x, weight, *scales), (x, weight), grad)
    ref_x, ref_w = torch.autograd.grad(fp8_linear_reference(x, weight, *scales), (x, weight), grad)
    assert grad_x.dtype == x_dtype and grad_w.dtype == weight.dtype
    # grad_x comes out of the FP8 matmul in bf16; the reference keeps float32.
    torch.testing.assert_close(grad_x, ref_x, rtol=2 ** -8, atol=1e-8)
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-5, atol=1e-8)
    assert not torch.equal(ref_w, torch.autograd.grad(x.float() @ weight.t(), weight, grad.float())[0])


def test_a_tiny_fp8_head_trains_like_a_float_one():
    """SGD on a zero-initialised head over fixed features, as record #46's head starts.

    The fp8 run goes a little ahead (1.2% lower loss by step 15): the near-uniform probabilities of a
    young head give many gradient entries of one size, which e5m2 rounds alike (1% up here), not at random.
    """
    x, _ = head_input(256, dtype=torch.float32)
    x = x.detach()
    targets = torch.randint(0, VOCAB, (256,), generator=torch.Generator().manual_seed(2))
    losses = {}
    for name in ("fp8", "float"):
        weight = torch.zeros(VOCAB, MODEL_DIM, requires_grad=True)
        losses[name] = []
        for _ in range(15):
            logits = fp8_linear(x, weight, *head_scales(MODEL_DIM)) if name == "fp8" else x @ weight.t()
            loss = F.cross_entropy(logits.float(), targets)
            loss.backward()
            with torch.no_grad():
                weight -= 0.5 * weight.grad
            weight.grad = None
            losses[name].append(loss.item())
    assert losses["float"][-1] < losses["float"][0] - 1.0
    assert losses["fp8"] == pytest.approx(losses["float"], rel=0.02)
