"""The fused MLP kernel against `relu(x W1^T)^2 W2^T` written out, run on CPU by Triton's interpreter."""
import pytest
import torch

pytest.importorskip("triton")
from model import triton_mlp  # noqa: E402

# Tiles smaller than the shapes, which are no multiples of them: M = 150 (10 row tiles, so two groups of 8),
# d = 24 (both kernels' K), h = 96 (their N): every mask is used
SMALL_BLOCKS = (16, 64, 16)
SHAPE = dict(batch=(3, 50), d=24, h=96)


@pytest.fixture
def mlp():
    """model.triton_mlp, its kernel run on CPU tensors by Triton's interpreter (tests/conftest.py)."""
    if not triton_mlp.triton_mlp_available("cpu"):
        pytest.skip("needs Triton's interpreter, which tests/conftest.py turns on where no GPU is")
    return triton_mlp


def random_mlp():
    generator = torch.Generator().manual_seed(0)
    d, h = SHAPE["d"], SHAPE["h"]
    x = torch.randn(*SHAPE["batch"], d, generator=generator)
    fc = torch.randn(h, d, generator=generator) / d**0.5
    proj = torch.randn(d, h, generator=generator) / h**0.5
    grad = torch.randn(*SHAPE["batch"], d, generator=generator)
    return x, fc, proj, grad


def on_grid(shape, numerator, denominator, generator):
    """Random multiples of 1/denominator: their products and sums of a few dozen are exact in float32."""
    return torch.randint(-numerator, numerator + 1, shape, generator=generator) / denominator


def grid_mlp(dtype):
    """Inputs whose matmuls are exact in float32 in any order, with |pre| a multiple of 2^-7 below 256: its
    square is a normal float16, and some pre (those above 16) need more bits than a 16-bit float has."""
    generator = torch.Generator().manual_seed(0)
    d, h = SHAPE["d"], SHAPE["h"]
    x = on_grid((*SHAPE["batch"], d), 32, 8, generator)
    fc = on_grid((h, d), 32, 16, generator)
    proj = on_grid((d, h), 32, 16, generator)
    grad = on_grid((*SHAPE["batch"], d), 32, 8, generator)
    return [t.to(dtype) for t in (x, fc, proj, grad)]


def grads(fn, *inputs, grad):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("blocks", [SMALL_BLOCKS, None], ids=["small-blocks", "default-blocks"])
def test_forward_matches_formula(mlp, blocks):
    x, fc, proj, _ = random_mlp()
    out = mlp.fused_relu_square_mlp(x, fc, proj, blocks)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.relu(x @ fc.T) ** 2 @ proj.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocks", [SMALL_BLOCKS, None], ids=["small-blocks", "default-blocks"])
def test_backward_matches_autograd_of_formula(mlp, blocks):
    x, fc, proj, grad = random_mlp()
    _, got = grads(lambda *t: mlp.fused_relu_square_mlp(*t, blocks), x, fc, proj, grad=grad)
    _, expected = grads(lambda x, fc, proj: torch.relu(x @ fc.T) ** 2 @ proj.T, x, fc, proj, grad=grad)
    for name, g, e in zip(("dx", "dW1", "dW2"), got, expected):
        assert g.shape == e.shape, name
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=name)


def test_kernel_rounds_as_a_16_bit_mlp(mlp):
    """float16 stands in for bf16 (whose tl.dot the interpreter gets wrong): both passes bit for bit."""
    x, fc, proj, grad = grid_mlp(torch.float16)
    out, (dx, dfc, dproj) = grads(lambda *t: mlp.fused_relu_square_mlp(*t, SMALL_BLOCKS), x, fc, proj, grad=grad)

    pre32 = x.float() @ fc.float().T  # exact on the grid
    pre = pre32.half()  # the matmul's one rounding; relu and square then in float16
    assert (pre.float() != pre32).any(), "the inputs must make the rounding of pre matter"
    post = torch.relu(pre) * torch.relu(pre)
    grad_post = (grad.float() @ proj.float()).half()
    dpre = grad_post * (2 * torch.relu(pre))  # square's then relu's backward, as autograd computes them
    g, x2 = grad.reshape(-1, SHAPE["d"]), x.reshape(-1, SHAPE["d"])
    assert torch.equal(out, post @ proj.T)
    assert torch.equal(dx, dpre @ fc)
    assert torch.equal(dfc, dpre.reshape(-1, SHAPE["h"]).T @ x2)
    assert torch.equal(dproj, g.T @ post.reshape(-1, SHAPE["h"]))

    # and so bit for bit the plain reference and its autograd
    ref_out, ref_grads = grads(mlp.relu_square_mlp_reference, x, fc, proj, grad=grad)
    assert torch.equal(out, ref_out)
    assert all(torch.equal(a, b) for a, b in zip((dx, dfc, dproj), ref_grads))


def test_reference_rounds_pre_to_bf16_before_the_activation():
    x, fc, proj, _ = grid_mlp(torch.bfloat16)
    pre = (x.float() @ fc.float().T).bfloat16()
    expected = (torch.relu(pre) * torch.relu(pre)) @ proj.T
    assert torch.equal(triton_mlp.relu_square_mlp_reference(x, fc, proj), expected)
    # the activation in float32, rounded once, is a different function on these inputs
    assert not torch.equal(expected, (torch.relu(x.float() @ fc.float().T) ** 2).bfloat16() @ proj.T)


def test_computes_in_x_dtype_or_autocast_and_returns_grads_in_each_input_dtype(mlp):
    x, fc, proj, grad = random_mlp()
    out, (dx, dfc, dproj) = grads(lambda *t: mlp.fused_relu_square_mlp(*t, SMALL_BLOCKS),
                                  x, fc.double(), proj.double(), grad=grad)
    assert [t.dtype for t in (out, dx, dfc, dproj)] == [torch.float32, torch.float32, torch.float64, torch.float64]

    # Under autocast, float32 inputs run as their autocast-dtype copies would (float16: see above)
    x, fc, proj, grad = grid_mlp(torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        out, got = grads(lambda *t: mlp.fused_relu_square_mlp(*t, SMALL_BLOCKS), x, fc, proj, grad=grad)
        reference = mlp.relu_square_mlp_reference(x, fc, proj)
    half_out, half_grads = grads(lambda *t: mlp.fused_relu_square_mlp(*t, SMALL_BLOCKS),
                                 x.half(), fc.half(), proj.half(), grad=grad.half())
    assert torch.equal(out, half_out) and torch.equal(reference, half_out)
    assert all(g.dtype == torch.float32 and torch.equal(g, h.float()) for g, h in zip(got, half_grads))


def test_available_on_cpu_only_in_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_mlp.triton_mlp_available(torch.device("cpu"))
    assert triton_mlp.triton_mlp_available(torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_mlp.triton_mlp_available("cpu")
