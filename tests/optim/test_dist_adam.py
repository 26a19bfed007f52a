import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optim.dist_adam import DistAdam

BETAS = (0.65, 0.95)


def adam_reference(p0, grads, lrs, eps, betas=BETAS, weight_decay=0.0, textbook=False):
    """#46's Adam written out in float64: eps goes on the uncorrected sqrt(v), the bias
    corrections into the step size. textbook=True puts eps on sqrt(v_hat) instead."""
    b1, b2 = betas
    p, m, v = p0.double(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p * (1 - lr * weight_decay)
        if textbook:
            p = p - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
        else:
            p = p - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (v.sqrt() + eps)
    return p.float()


def test_three_steps_match_the_formula_with_two_groups():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2, 3))
    a0, b0 = a.detach().clone(), b.detach().clone()
    # Gradients of the order of eps, so that where eps is added changes the result.
    grads_a = [torch.randn(5) * 1e-3 for _ in range(3)]
    grads_b = [torch.randn(2, 3) * 1e-3 for _ in range(3)]
    lrs_a, lrs_b = [0.1, 0.08, 0.05], [0.03, 0.02, 0.01]
    opt = DistAdam([dict(params=[a], lr=1.0), dict(params=[b], lr=1.0, weight_decay=0.2)], eps=1e-3)
    for t in range(3):
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lrs_a[t], lrs_b[t]
        a.grad, b.grad = grads_a[t].clone(), grads_b[t].clone()
        opt.step()
        assert a.grad is None and b.grad is None
    expected_a = adam_reference(a0, grads_a, lrs_a, eps=1e-3)
    expected_b = adam_reference(b0, grads_b, lrs_b, eps=1e-3, weight_decay=0.2)
    assert torch.allclose(a.detach(), expected_a, rtol=1e-6, atol=1e-7)
    assert torch.allclose(b.detach(), expected_b, rtol=1e-6, atol=1e-7)
    # The textbook placement of eps is far from it: this test tells the two apart.
    assert (adam_reference(a0, grads_a, lrs_a, eps=1e-3, textbook=True) - expected_a).abs().max() > 1e-3
    assert opt.state[a]["step"] == 3 and opt.state[a]["exp_avg"].dtype == torch.float32


def test_every_other_step_is_adam_on_summed_grads_at_the_odd_steps_lr():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(6))
    c = [torch.rand(6) for _ in range(6)]
    d = [torch.randn(6) for _ in range(6)]
    # eps of the gradients' order: Adam is otherwise blind to the sum being taken for a mean.
    opt = DistAdam([p], lr=1.0, eps=0.1)
    ref_p, summed, lrs = p.detach().clone(), [], []
    for k in range(6):
        opt.param_groups[0]["lr"] = lr = 0.1 * (1 - 0.1 * k)
        grad = 2 * p.detach() * c[k] + d[k]  # d/dp of (p^2 c + p d).sum(), at the current p
        ((p.pow(2) * c[k]).sum() + (p * d[k]).sum()).backward()
        if k % 2 == 0:
            even_grad = grad
            assert torch.allclose(p.grad, grad)  # kept for the next step, not applied
            continue
        before = p.detach().clone()
        opt.step()
        summed.append(even_grad + grad)
        lrs.append(lr)
        expected = adam_reference(ref_p, summed, lrs, eps=0.1)
        assert torch.allclose(p.detach(), expected, rtol=1e-5, atol=1e-6), k
        assert not torch.equal(p.detach(), before)
    assert opt.state[p]["step"] == 3


# --- two gloo ranks against one process ------------------------------------------------------

STEPS, CHECKPOINT_AFTER, COMPARE_AFTER = 6, 2, 3  # loop steps; Adam steps on odd ones


def _params():
    gen = torch.Generator().manual_seed(7)
    # Odd numels (7, 15) and a 0-d scalar: every one is padded to a multiple of 2.
    return [torch.nn.Parameter(torch.randn(7, generator=gen)), torch.nn.Parameter(torch.tensor(0.8)),
            torch.nn.Parameter(torch.randn(3, 5, generator=gen))]


def _optimizer(params):
    a, s, w = params
    # eps of the gradients' order, so that a sum over ranks taken for their mean shows.
    return DistAdam([dict(params=[a, s], lr=0.05), dict(params=[w], lr=0.02, weight_decay=0.1)],
                    betas=BETAS, eps=0.1)


def _loss(params, step, rank, micro):
    a, s, w = params
    gen = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    u, v = torch.randn(5, generator=gen), torch.randn(7, generator=gen)
    return (s * torch.tanh(w @ u)).pow(2).sum() + torch.sin(a * v).sum() + 0.5 * s * a.pow(2).sum()


def _train(params, opt, steps, ranks):
    """Loop steps `steps`, 2 micro-batches each; the loss is the mean over `ranks`' data."""
    launched = []
    for k in steps:
        for i, group in enumerate(opt.param_groups):
            group["lr"] = (0.05, 0.02)[i] * (1 - 0.1 * k)
        stepping = k % 2 == 1
        for micro in range(2):
            # The hooks send the two steps' summed grads; on the last step step() sends them itself.
            opt.sync_grads = stepping and micro == 1 and k != STEPS - 1
            (sum(_loss(params, k, r, micro) for r in ranks) / len(ranks)).backward()
        launched.append(len(opt._pending))
        if stepping:
            opt.step()
        opt.sync_grads = False
        yield k, launched


def _two_rank_worker(rank, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    params = _params()
    opt = _optimizer(params)
    out = {}
    for k, launched in _train(params, opt, range(STEPS), [rank]):
        if k == CHECKPOINT_AFTER:  # after a skipped step: the grads of step 2 are pending
            grads = [p.grad.clone() for p in params]
            out["checkpoint"] = opt.state_for_checkpoint()
            out["checkpoint_params"] = [p.detach().clone() for p in params]
            out["grads_untouched"] = all(torch.equal(g, p.grad) for g, p in zip(grads, params))
        if k == COMPARE_AFTER:
            out["after_4"] = [p.detach().clone() for p in params]
    out["final"] = [p.detach().clone() for p in params]
    out["launched"] = launched
    torch.save(out, f"{out_path}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from tests.util import free_port

    out_path = tmp_path_factory.mktemp("dist_adam") / "out"
    mp.spawn(_two_rank_worker, args=(free_port(), out_path), nprocs=2)
    return [torch.load(f"{out_path}.{rank}") for rank in range(2)]


def _assert_close(got, expected):
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert torch.allclose(g, e, rtol=1e-6, atol=1e-6), (g - e).abs().max()


def test_two_ranks_match_one_process_given_the_average_gradient(two_ranks):
    for out in two_ranks:
        # The hooks launched all 3 reduce-scatters during the last backward of a stepping step only.
        assert out["launched"] == [0, 3, 0, 3, 0, 0]
        _assert_close(out["after_4"], two_ranks[0]["after_4"])
    params = _params()
    opt = _optimizer(params)
    for k, _ in _train(params, opt, range(COMPARE_AFTER + 1), [0, 1]):
        pass
    _assert_close(two_ranks[0]["after_4"], [p.detach() for p in params])
    assert not torch.allclose(params[1].detach(), _params()[1].detach())  # the scalar did move


def test_checkpoint_after_a_skipped_step_resumes_in_one_process(two_ranks):
    out = two_ranks[0]
    assert out["grads_untouched"] and two_ranks[1]["grads_untouched"]
    checkpoint = out["checkpoint"]
    assert set(checkpoint["pending_grads"]) == {"0.0", "0.1", "1.0"}
    assert checkpoint["state"]["0.1"]["exp_avg"].shape == () and checkpoint["state"]["1.0"]["step"] == 1
    params = [torch.nn.Parameter(p.clone()) for p in out["checkpoint_params"]]
    opt = _optimizer(params)
    opt.load_checkpoint_state(checkpoint)
    for k, _ in _train(params, opt, range(CHECKPOINT_AFTER + 1, STEPS), [0, 1]):
        pass
    _assert_close(out["final"], [p.detach() for p in params])
    # Dropping the pending grads (what a checkpoint without them would do) gives another result.
    params = [torch.nn.Parameter(p.clone()) for p in out["checkpoint_params"]]
    opt = _optimizer(params)
    opt.load_checkpoint_state(dict(checkpoint, pending_grads={}))
    for k, _ in _train(params, opt, range(CHECKPOINT_AFTER + 1, STEPS), [0, 1]):
        pass
    assert not torch.allclose(out["final"][2], params[2].detach(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        _optimizer([torch.nn.Parameter(torch.zeros(8)), *params[1:]]).load_checkpoint_state(checkpoint)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1e-3), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(betas=(1.0, 0.95)), "betas"),
    (dict(betas=(0.9, -0.1)), "betas"),
    (dict(betas=(0.9,)), "betas"),
    (dict(eps=0.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
])
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistAdam([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_bad_group_hyperparameters_raise():
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="lr"):
        DistAdam([dict(params=[p]), dict(params=[q], lr=-0.5)])
    with pytest.raises(ValueError, match="require grad"):
        DistAdam([torch.zeros(3)])


def test_bf16_state_rounds_each_moment_once_and_steps_from_the_rounded_moments():
    """record #46 keeps Adam's moments in bf16: each step's new moment is computed in float32 and stored once."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(7).bfloat16())
    grads = [torch.randn(7).bfloat16() for _ in range(3)]
    opt = DistAdam([dict(params=[p], lr=0.05)], eps=1e-8, state_dtype=torch.bfloat16)
    b1, b2 = BETAS
    x, m, v = p.detach().float().clone(), torch.zeros(7), torch.zeros(7)
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        g = g.float()
        m = (b1 * m + (1 - b1) * g).bfloat16().float()
        v = (b2 * v + (1 - b2) * g * g).bfloat16().float()
        x = (x - 0.05 * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (v.sqrt() + 1e-8)).bfloat16().float()
        state = opt.state[p]
        assert state["exp_avg"].dtype == torch.bfloat16
        assert torch.allclose(state["exp_avg"].float(), m, rtol=0, atol=0)
        assert torch.allclose(state["exp_avg_sq"].float(), v, rtol=0, atol=0)
        assert torch.allclose(p.detach().float(), x, rtol=1e-2, atol=0)


def test_cautious_decay_is_heads_lr_squared_decay_where_update_and_weight_agree_strictly():
    """HEAD's Adam (docs/RECORD-HEAD.md 5.2, HEAD L828-865), written out: u = lr sqrt(1-b2^t)/(1-b1^t) m/(sqrt(v)+eps),
    p <- p - (u + lr^2 c [u p > 0] p). An entry whose gradient is always 0 has u = 0: the strict mask spares it."""
    torch.manual_seed(3)
    p0 = torch.randn(9)
    grads = [torch.randn(9) for _ in range(3)]
    for g in grads:
        g[0] = 0.0
    lrs, c, b1, b2 = [0.1, 0.07, 0.04], 5.0, 0.9, 0.99
    p = torch.nn.Parameter(p0.clone())
    opt = DistAdam([dict(params=[p], lr=1.0, cautious_decay=c)], betas=(b1, b2), eps=1e-10)
    x, m, v = p0.double(), torch.zeros(9, dtype=torch.float64), torch.zeros(9, dtype=torch.float64)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        opt.param_groups[0]["lr"] = lr
        p.grad = g.clone()
        opt.step()
        m = b1 * m + (1 - b1) * g.double()
        v = b2 * v + (1 - b2) * g.double() ** 2
        u = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (v.sqrt() + 1e-10)
        x = x - (u + lr * lr * c * (u * x > 0).double() * x)
        assert torch.allclose(p.detach().double(), x, rtol=0, atol=1e-6), t
    assert p.detach()[0] == p0[0]  # u = 0 there: no decay
    plain = adam_reference(p0, grads, lrs, eps=1e-10, betas=(b1, b2))
    assert (plain - p.detach()).abs().max() > 1e-3  # the decay really moved the weights


def test_tied_copy_is_stepped_with_its_source_then_untied_takes_its_state():
    """DistAdam.tie on one process: the copy's gradient joins the source's, the copy is the source after each step
    and keeps no state; untie() hands it the source's step count and moments, and each then steps on its own."""
    torch.manual_seed(4)
    copy_, source = torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(2, 3))
    other = torch.nn.Parameter(torch.randn(4))
    opt = DistAdam([dict(params=[copy_, source]), dict(params=[other])], lr=0.05, eps=0.1)
    opt.tie(copy_, source)
    reference = torch.nn.Parameter(source.detach().clone())
    alone = DistAdam([reference], lr=0.05, eps=0.1)
    for _ in range(2):
        gc, gs = torch.randn(2, 3), torch.randn(2, 3)
        copy_.grad, source.grad, other.grad = gc.clone(), gs.clone(), torch.randn(4)
        reference.grad = gc + gs
        opt.step()
        alone.step()
        assert torch.equal(copy_, source) and torch.allclose(source, reference, rtol=0, atol=1e-7)
        assert not opt.state[copy_] and copy_.grad is None
    opt.untie()
    assert opt.tied is None and opt.state[copy_]["step"] == 2
    assert torch.equal(opt.state[copy_]["exp_avg"], opt.state[source]["exp_avg"])
    gc, gs = torch.randn(2, 3), torch.randn(2, 3)
    copy_.grad, source.grad, other.grad = gc.clone(), gs.clone(), torch.randn(4)
    twin = torch.nn.Parameter(copy_.detach().clone())
    twin_opt = DistAdam([twin], lr=0.05, eps=0.1)
    twin_opt.state[twin] = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[source].items()}
    twin.grad = gc.clone()
    opt.step()
    twin_opt.step()
    assert torch.equal(copy_, twin) and not torch.equal(copy_, source)
    with pytest.raises(ValueError, match="shape"):
        opt.tie(copy_, other)
    with pytest.raises(ValueError, match="two different parameters"):
        opt.tie(copy_, copy_)
