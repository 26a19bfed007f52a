"""HEAD's FP8 MLP (model/fp8.py, docs/RECORD-HEAD.md section 8.3) against its formulas written out here."""
import copy

import pytest
import torch
import torch.nn.functional as F

from model.fp8 import Fp8MlpState, _fp8_mlp_forward, fp8_mlp, fp8_mlp_reference, fp8_supported

pytestmark = pytest.mark.skipif(not fp8_supported("cpu"),
                                reason="this torch build's CPU torch._scaled_mm does not take float8")

D, H = 64, 256


def e4m3(t):
    """t rounded to float8 e4m3 and back to float32."""
    return t.float().to(torch.float8_e4m3fn).float()


def mlp_input(*shape, seed=0, dtype=torch.float32):
    """RMS-normed rows; W1 drawn as HEAD initialises c_fc, W2 of a trained-looking size (HEAD zero-inits it)."""
    generator = torch.Generator().manual_seed(seed)
    x = F.rms_norm(torch.randn(*shape, D, generator=generator), (D,))
    bound = 3 ** 0.5 * 0.5 * D ** -0.5
    w1 = (torch.rand(H, D, generator=generator) * 2 - 1) * bound
    w2 = 0.02 * torch.randn(D, H, generator=generator)
    return [t.to(dtype).requires_grad_() for t in (x, w1, w2)]


def up_written_out(x, w1):
    """The up-projection spelled out: (pre, post), bf16 (n, H), and the sums of |products| behind pre.
    x and W1 at their current amax / 448."""
    x, w1 = x.detach().reshape(-1, D).bfloat16().float(), w1.detach().float()
    x_amax, w1_scale = x.abs().max(), w1.abs().max() / 448
    x8, w1_8, scale = e4m3(x * (448 / x_amax)), e4m3(w1 / w1_scale), w1_scale * x_amax / 448
    pre = (x8 @ w1_8.t() * scale).bfloat16()
    return pre, (pre.relu().float() ** 2).bfloat16(), x8.abs() @ w1_8.abs().t() * scale


def down_written_out(post, w2, act_scale, proj_scale):
    """The down-projection spelled out, bf16 (n, D), and its sums of |products|: post and W2 at the delayed
    scales, saturating at 448."""
    post8 = e4m3(torch.clamp(post.float() / act_scale, max=448))
    w2_8 = e4m3(torch.clamp(w2.detach().float() / proj_scale, -448, 448))
    return (post8 @ w2_8.t() * (act_scale * proj_scale)).bfloat16(), post8 @ w2_8.abs().t() * (act_scale * proj_scale)


def implementation_up(x, state):
    """fp8_mlp's own pre and post, bf16 (n, H): CPU _scaled_mm sums in another order than a float32 matmul,
    so a few of 12,288 pre values (0 to 3 here) land one bf16 step from the formula's, and their post
    and everything after it differ more; the later steps are checked from these values."""
    pre, post, _ = _fp8_mlp_forward(x.detach().reshape(-1, D).bfloat16(), state.fc_f8, state.fc_scale,
                                    state.proj_f8, state.proj_scale, state.act_scale)
    return pre, post


def bf16_step(t):
    return 2.0 ** (torch.floor(torch.log2(t.float().abs().clamp_min(2 ** -126))) - 7)


def assert_within_one_bf16_step(out, expected_and_abs_sums, k):
    """Equal up to the order of the float32 sums of the matmuls (the CPU's _scaled_mm sums in its own):
    each of the two sums of k products is within k 2^-24 of the sum of their |products| of the exact one,
    and a sum near a bf16 rounding boundary lands one bf16 step apart. The first term matters only where
    the products cancel (an output near 0)."""
    expected, abs_sums = (t.float().reshape(out.shape) for t in expected_and_abs_sums)
    assert ((out.float() - expected).abs() <= bf16_step(expected) + 2 * k * 2 ** -24 * abs_sums).all()


def test_forward_is_the_written_out_float8_rounding():
    """Two forwards: the first at the initial activation scale 1.0, the second at the first's delayed
    scale. Each step is the formula's, the float-op reference is the formula exactly, and the output is
    about 6% (relative, Frobenius) off the exact product, which a bf16 MLP (0.5%) is not."""
    x, w1, w2 = mlp_input(2, 24)
    state = Fp8MlpState(D)
    state.quantize(w1, w2, bootstrap=True)
    proj_scale = w2.detach().abs().max() / 448
    assert state.proj_scale.item() == pytest.approx(proj_scale.item(), rel=1e-6)
    exact = (F.relu(x @ w1.t()).square() @ w2.t()).detach()
    pre, post, pre_abs_sums = up_written_out(x, w1)
    for act_scale in (torch.tensor(1.0), post.float().max() * 1.8 / 448):
        assert state.act_scale.item() == pytest.approx(act_scale.item(), rel=1e-2)
        act_scale = state.act_scale.clone()
        own_pre, own_post = implementation_up(x, state)
        out = fp8_mlp(x, w1, w2, state)
        assert out.shape == (2, 24, D) and out.dtype == torch.bfloat16
        assert_within_one_bf16_step(own_pre, (pre, pre_abs_sums), k=D)
        assert (own_pre != pre).float().mean() < 1e-3
        assert torch.equal(own_post, (own_pre.relu().float() ** 2).bfloat16())
        assert_within_one_bf16_step(out, down_written_out(own_post, w2, act_scale, state.proj_scale), k=H)
        expected, abs_sums = down_written_out(post, w2, act_scale, state.proj_scale)
        same_rows = (own_pre == pre).all(dim=1)  # end to end, where no pre value landed apart
        assert_within_one_bf16_step(out.reshape(-1, D)[same_rows], (expected[same_rows], abs_sums[same_rows]), k=H)
        assert torch.equal(fp8_mlp_reference(x, w1, w2, act_scale, state.proj_scale), expected.reshape(out.shape))
        assert state.post_amax.item() == own_post.float().max().item()
        assert 0.03 < ((out.float() - exact).norm() / exact.norm()).item() < 0.1
    bf16_mlp = F.relu(x.bfloat16() @ w1.bfloat16().t()).square() @ w2.bfloat16().t()
    assert ((bf16_mlp.float() - exact).norm() / exact.norm()).item() < 0.01


def test_the_activation_scale_is_the_previous_forwards_amax_and_saturates_above_it():
    """This torch's float -> e4m3fn cast saturates by itself (even inf -> 448), so here the explicit clamps
    of post and W2 (HEAD's kernels clamp: a CUDA cast need not saturate) change nothing the test can see."""
    x, w1, w2 = mlp_input(2, 24)
    state = Fp8MlpState(D)
    state.quantize(w1, w2, bootstrap=True)
    assert state.act_scale.item() == 1.0 and state.post_amax.item() == 0.0  # before any forward
    post_1 = implementation_up(x, state)[1].float()
    fp8_mlp(x, w1, w2, state)
    assert state.post_amax.item() == post_1.max().item()
    assert state.act_scale.item() == pytest.approx(post_1.max().item() * 1.8 / 448, rel=1e-6)
    # The next input is 3x: post grows 81x, far above 448 x the scale of the first's amax x 1.8.
    act_scale = state.act_scale.clone()
    big = (3 * x).detach().requires_grad_()
    post_2 = implementation_up(big, state)[1]
    out = fp8_mlp(big, w1, w2, state)
    assert (post_2.float() / act_scale > 448).float().mean() > 0.01  # entries past the scale ...
    assert torch.isfinite(out).all()  # ... saturate at 448 rather than becoming NaN or inf
    assert_within_one_bf16_step(out, down_written_out(post_2, w2, act_scale, state.proj_scale), k=H)
    assert state.act_scale.item() == pytest.approx(post_2.float().max().item() * 1.8 / 448, rel=1e-6)
    # Not the output at the scale of its own amax: the scale was the previous forward's.
    current = down_written_out(post_2, w2, state.act_scale, state.proj_scale)[0].reshape(out.shape)
    assert ((out.float() - current.float()).norm() / current.float().norm()).item() > 0.1


def test_the_proj_weight_scale_lags_one_quantisation_and_bootstrap_resets_it():
    x, w1, w2 = mlp_input(2, 24)
    w2_amax = w2.detach().abs().max()
    state = Fp8MlpState(D)
    state.quantize(w1, w2, bootstrap=True)  # at the current amax, without headroom
    assert state.proj_scale.item() == pytest.approx(w2_amax.item() / 448, rel=1e-6)
    assert state.proj_next_scale.item() == pytest.approx(w2_amax.item() * 1.12 / 448, rel=1e-6)
    assert state.fc_scale.item() == pytest.approx(w1.detach().abs().max().item() / 448, rel=1e-6)

    w2_grown = (2 * w2).detach().requires_grad_()  # an optimiser step doubled it
    w1_step = (1.5 * w1).detach().requires_grad_()
    state.quantize(w1_step, w2_grown)
    assert state.proj_scale.item() == pytest.approx(w2_amax.item() * 1.12 / 448, rel=1e-6)  # the previous one
    assert state.proj_next_scale.item() == pytest.approx(2 * w2_amax.item() * 1.12 / 448, rel=1e-6)
    assert state.fc_scale.item() == pytest.approx(1.5 * w1.detach().abs().max().item() / 448, rel=1e-6)  # current
    # W2 outgrew its scale: its largest entries saturate at 448.
    assert (state.proj_f8.float().abs() == 448).sum() > 1 and torch.isfinite(state.proj_f8.float()).all()
    assert torch.equal(state.proj_f8.float(), e4m3(torch.clamp(w2_grown.detach() / state.proj_scale, -448, 448)))
    assert torch.equal(state.fc_f8.float(), e4m3(w1_step.detach() / state.fc_scale))
    act_scale = state.act_scale.clone()
    post = implementation_up(x, state)[1]
    out = fp8_mlp(x, w1_step, w2_grown, state)
    assert torch.isfinite(out).all()
    assert_within_one_bf16_step(out, down_written_out(post, w2_grown, act_scale, state.proj_scale), k=H)

    state.quantize(w1_step, w2_grown, bootstrap=True)
    assert state.proj_scale.item() == pytest.approx(2 * w2_amax.item() / 448, rel=1e-6)
    assert state.proj_f8.float().abs().max() == 448
    assert torch.equal(state.proj_f8.float(), e4m3(w2_grown.detach() / (2 * w2_amax / 448)))


def test_zero_weights_and_inputs_give_zeros_not_nans():
    """HEAD zero-initialises c_proj, and a dead layer's post is all zeros: their scales are clamped at
    1e-12 / 448 (x 1.8 for post) rather than 0, whose 0/0 would be NaN."""
    x, w1, w2 = mlp_input(2, 24)
    zero_w2 = torch.zeros_like(w2, requires_grad=True)
    state = Fp8MlpState(D)
    state.quantize(w1, zero_w2, bootstrap=True)
    out = fp8_mlp(x, w1, zero_w2, state)
    assert torch.equal(out, torch.zeros_like(out))
    zero_x = torch.zeros_like(x, requires_grad=True)
    out = fp8_mlp(zero_x, w1, zero_w2, state)
    assert torch.equal(out, torch.zeros_like(out)) and state.post_amax.item() == 0
    assert state.act_scale.item() == pytest.approx(1e-12 * 1.8 / 448)
    state.quantize(w1, w2)  # W2 left its zero init at the zero weight's scale: it saturates (HEAD bootstraps)
    out = fp8_mlp(x, w1, w2, state)
    assert torch.isfinite(out).all() and out.abs().max() > 0
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (x, w1, w2))


class _ValueOf(torch.autograd.Function):
    """Forward: `value`; backward: the gradient goes to `t`. Autograd's bf16 backward at the FP8 forward's values."""

    @staticmethod
    def forward(ctx, t, value):
        return value

    @staticmethod
    def backward(ctx, grad):
        return grad, None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_the_bf16_mlps_gradient_at_the_fp8_forwards_post(dtype):
    """Autograd's gradient of the bf16 relu(x W1^T)^2 W2^T, with pre taken from the FP8 forward, computed
    from the bf16 weights, not their float8 copies. The FP8 backward gets relu(pre) as sqrt(post), bf16 of
    pre^2, a relative 2^-10 off pre, so an entry of dpre is at most one bf16 step (2^-7 of it) off (6% of
    them are here); a gradient entry of x or W1 is then off by at most 2^-7 of the sum of its |products|
    plus its own rounding (measured: up to half that bound). dW2 = g^T post is the same sum, maybe in
    another order (here identical)."""
    x, w1, w2 = mlp_input(2, 24, dtype=dtype)
    state = Fp8MlpState(D)
    state.quantize(w1, w2, bootstrap=True)
    fp8_mlp(x, w1, w2, state)  # a realistic activation scale
    grad = (1e-2 * torch.randn(2, 24, D, generator=torch.Generator().manual_seed(1))).bfloat16()
    pre, post = implementation_up(x, state)
    got = torch.autograd.grad(fp8_mlp(x, w1, w2, state), (x, w1, w2), grad)
    assert [g.dtype for g in got] == [dtype] * 3

    x16, w1_16, w2_16 = (t.detach().bfloat16().requires_grad_() for t in (x, w1, w2))
    rows, grad = x16.reshape(-1, D), grad.reshape(-1, D)
    expected = torch.autograd.grad(F.relu(_ValueOf.apply(rows @ w1_16.t(), pre)).square() @ w2_16.t(),
                                   (x16, w1_16, w2_16), grad)
    dpre = (2 * (grad @ w2_16.detach()).float() * post.float().sqrt()).abs()
    sums = ((dpre @ w1_16.detach().float().abs()).reshape(x.shape), dpre.t() @ rows.detach().float().abs(), None)
    for g, e, s in zip(got, expected, sums):
        g, e = g.float(), e.float()
        bound = bf16_step(e) if s is None else 2 ** -7 * s + 2 * bf16_step(e)
        assert ((g - e).abs() <= bound).all()

    # The plain bf16 MLP's gradient (its own forward) is a few percent away: the FP8 forward's post is used.
    plain = torch.autograd.grad(F.relu(rows @ w1_16.t()).square() @ w2_16.t(), (x16, w1_16, w2_16), grad)
    for g, p in zip(got, plain):
        assert 0.01 < ((g.float() - p.float()).norm() / p.float().norm()).item() < 0.15


def test_a_state_loaded_from_its_state_dict_continues_identically():
    x, w1, w2 = mlp_input(2, 24)
    state = Fp8MlpState(D)
    state.quantize(w1, w2, bootstrap=True)
    fp8_mlp(x, w1, w2, state)
    with torch.no_grad():  # an optimiser step
        w1.mul_(1.1), w2.add_(0.01)
    state.quantize(w1, w2)
    fp8_mlp(x, w1, w2, state)
    saved = copy.deepcopy(state.state_dict())
    assert sorted(saved) == ["act_scale", "post_amax", "proj_next_scale", "proj_scale", "quantizations"]
    # No float8 buffer: the run broadcasts every buffer, and gloo has no float8.
    assert {b.dtype for b in state.buffers()} == {torch.float32, torch.int64, torch.uint8}

    resumed = Fp8MlpState(D)
    resumed.load_state_dict(saved)
    with pytest.raises(RuntimeError, match="stale"):
        fp8_mlp(x, w1, w2, resumed)
    for s in (state, resumed):  # the next step's quantisation
        s.quantize(w1, w2)
    for step in range(3):
        outs = [fp8_mlp(x * (1 + step), w1, w2, s) for s in (state, resumed)]
        assert torch.equal(*outs)
        grads = [torch.autograd.grad(o.float().sum(), (w1, w2)) for o in outs]
        assert all(torch.equal(a, b) for a, b in zip(*grads))
        for name, buffer in state.named_buffers():
            assert torch.equal(buffer, resumed.get_buffer(name)), name
        with torch.no_grad():
            w2.mul_(1.3)
        for s in (state, resumed):
            s.quantize(w1, w2)
    state.load_state_dict(saved)  # loading marks the float8 copies stale in any state
    assert not state.ready


def test_compiled_forward_and_backward_match_eager_without_graph_breaks():
    x, w1, w2 = mlp_input(2, 24)
    eager = Fp8MlpState(D)
    eager.quantize(w1, w2, bootstrap=True)
    compiled_state = copy.deepcopy(eager)
    compiled = torch.compile(fp8_mlp, fullgraph=True, backend="aot_eager")
    for step in range(2):
        xs = [(x * (1 + step)).detach().requires_grad_() for _ in range(2)]
        outs = [fp8_mlp(xs[0], w1, w2, eager), compiled(xs[1], w1, w2, compiled_state)]
        assert torch.equal(*outs)
        grads = [torch.autograd.grad(o.float().square().sum(), (xi, w1, w2)) for o, xi in zip(outs, xs)]
        assert all(torch.equal(a, b) for a, b in zip(*grads))
        assert torch.equal(eager.act_scale, compiled_state.act_scale)  # the compiled graph updated the buffer
