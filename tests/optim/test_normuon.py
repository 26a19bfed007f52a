"""NorMuon (optim/normuon.py) against the formulas of docs/RECORD46.md section 4.1, written out here."""
import math
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optim.muon import ns_dtype, orthogonalize
from optim.normuon import NorMuon, POLAR_EXPRESS_COEFFICIENTS, polar_express
from tests.util import REPO_ROOT

CPU_NS_DTYPE = ns_dtype(torch.device("cpu"))  # what NorMuon iterates in on this machine


def with_spectrum(rows, cols, singular_values, seed):
    """G = U diag(s) V^T with random orthonormal U, V; returns G (float32) and its polar factor U V^T (float64)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen, dtype=torch.float64))
    return ((U * singular_values) @ V.T).float(), U @ V.T


def spread_spectrum(k):
    """One dominant singular value and the rest log-spaced over [1e-3, 0.1]: after the Frobenius
    normalisation the spectrum covers about [1e-3, 0.97], the range the coefficients were tuned for."""
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.logspace(-1, -3, k - 1, dtype=torch.float64)])


# --- Polar Express ---


def test_coefficients_are_the_records_table():
    """Catches a typo in any digit: the table is read from the spec itself."""
    text = open(os.path.join(REPO_ROOT, "docs", "RECORD46.md"), encoding="utf-8").read()
    section = text[text.index("### 4.1 NorMuon"):text.index("### 4.2")]
    number = r"\s*([−\-]?[\d.]+)\s*"
    rows = re.findall(rf"^\s*\|\s*([1-5])\s*\|{number}\|{number}\|{number}\|", section, re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5], "the coefficient table's format changed"
    table = tuple(tuple(float(x.replace("−", "-")) for x in r[1:]) for r in rows)
    assert POLAR_EXPRESS_COEFFICIENTS == table


@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])
def test_polar_express_lands_near_the_svd_polar_factor(shape):
    G, polar = with_spectrum(*shape, spread_spectrum(64), seed=0)
    X = polar_express(G, dtype=torch.float32).double()
    s = torch.linalg.svdvals(X)
    error = (X - polar).norm() / polar.norm()
    # Measured in float32: singular values in [0.825, 1.141], relative error 0.099. These bounds fail
    # for 25 of the 30 ways of getting one coefficient 10% wrong (the misses are in the first two
    # triples, whose errors the later ones absorb), and for swapped, reversed or missing triples.
    assert s.min() > 0.8 and s.max() < 1.15 and error < 0.11, (s.min(), s.max(), error)
    # The Frobenius-normalised input alone is far outside them (singular values down to 1e-3).
    raw = G.double() / G.double().norm()
    s_raw = torch.linalg.svdvals(raw)
    assert s_raw.min() < 0.8 and (raw - polar).norm() / polar.norm() > 0.11


def composed_polynomial(x):
    """The scalar map each singular value goes through: x <- a x + b x^3 + c x^5, once per triple."""
    for a, b, c in POLAR_EXPRESS_COEFFICIENTS:
        x = a * x + b * x**3 + c * x**5
    return x


def expected_polar_express(G):
    """U f(s / (||G||_F 1.02 + 1e-6)) V^T: the matrix iteration acts on the singular values alone."""
    U, s, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U * composed_polynomial(s / (s.norm() * 1.02 + 1e-6))) @ Vh


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_polar_express_maps_singular_values_through_the_triples(shape):
    G, _ = with_spectrum(*shape, torch.logspace(0, -2, 24, dtype=torch.float64), seed=1)
    X = polar_express(G, dtype=torch.float32)
    assert X.dtype == torch.float32 and X.shape == G.shape
    assert torch.allclose(X.double(), expected_polar_express(G), atol=2e-5)
    assert polar_express(G).dtype == torch.bfloat16  # the default, as the record runs it


def test_polar_express_treats_a_stack_as_separate_matrices():
    # Scales 100x apart: normalising by the whole stack's norm would leave the small ones near zero.
    gen = torch.Generator().manual_seed(2)
    stack = torch.stack([torch.randn(16, 24, generator=gen) * scale for scale in (1.0, 100.0, 0.01)])
    X = polar_express(stack, dtype=torch.float32)
    assert X.shape == stack.shape
    for i in range(3):
        assert torch.allclose(X[i].double(), expected_polar_express(stack[i]), atol=2e-5)
    with pytest.raises(ValueError, match="2D or 3D"):
        polar_express(torch.randn(4))


# --- one NorMuon step, written out ---


def expected_steps(p, grads, schedule, weight_decay, beta2, cautious, lr_mul, orthogonalizer="polar_express",
                   square_stat="column"):
    """Section 4.1 step by step, matrix by matrix (a 3D stack is a list of matrices), in float64
    apart from the orthogonalisation, which runs as NorMuon runs it. square_stat="row": a square
    matrix's second moment per row, as HEAD reduces it (docs/RECORD-HEAD.md 5.1: over the last dim
    when rows >= cols)."""
    p = p.double().clone()
    rows, cols = p.shape[-2:]
    mats = p.view(-1, rows, cols)
    buf = torch.zeros_like(mats)
    buf2 = [0.0] * len(mats)
    for g, (lr, m) in zip(grads, schedule):
        g = g.double().view(-1, rows, cols)
        for i in range(len(mats)):
            buf[i] = m * buf[i] + (1 - m) * g[i]
            u = (1 - m) * g[i] + m * buf[i]
            if orthogonalizer == "polar_express":
                V = polar_express(u.float(), dtype=CPU_NS_DTYPE).double()
            else:
                V = orthogonalize(u.float(), steps=3, dtype=CPU_NS_DTYPE).double()
            if beta2 > 0:
                n0 = math.sqrt((V**2).sum())
                if rows < cols or (rows == cols and square_stat == "column"):  # one mean per column
                    s = torch.tensor([[(V[:, j] ** 2).sum() / rows for j in range(cols)]], dtype=torch.float64)
                else:  # one mean per row
                    s = torch.tensor([[(V[r, :] ** 2).sum() / cols] for r in range(rows)], dtype=torch.float64)
                buf2[i] = beta2 * buf2[i] + (1 - beta2) * s
                V = V / torch.sqrt(torch.clamp(buf2[i], min=1e-10))
                V = V * n0 / max(math.sqrt((V**2).sum()), 1e-10)
            lr_eff = lr * math.sqrt(max(1.0, rows / cols)) * lr_mul
            wd_eff = lr * weight_decay
            mask = torch.where(V * mats[i] >= 0, 1.0, 0.0) if cautious else torch.ones_like(V)
            mats[i] = mats[i] - lr_eff * (V + wd_eff * mask * mats[i])
    return p.float()


STEP_CASES = {
    "tall, lr_mul 2, cautious": dict(shape=(12, 5), lr_mul=2.0, cautious=True, beta2=0.95),
    "wide, plain decay": dict(shape=(5, 12), lr_mul=1.0, cautious=False, beta2=0.9),
    "square, normalisation off": dict(shape=(6, 6), lr_mul=1.0, cautious=True, beta2=0.0),
    "3D stack, lr_mul 0.5": dict(shape=(3, 4, 7), lr_mul=0.5, cautious=True, beta2=0.95),
    "tall stack, newton-schulz": dict(shape=(2, 9, 4), lr_mul=1.0, cautious=True, beta2=0.95,
                                      orthogonalizer="newton_schulz"),
    "square stack, per row (HEAD)": dict(shape=(2, 6, 6), lr_mul=1.0, cautious=True, beta2=0.9, square_stat="row"),
}


@pytest.mark.parametrize("case", STEP_CASES.values(), ids=STEP_CASES.keys())
def test_two_steps_follow_the_written_out_formula(case):
    gen = torch.Generator().manual_seed(3)
    shape = case["shape"]
    p0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)]
    schedule = [(0.05, 0.85), (0.03, 0.9)]  # (lr, momentum) per step: the schedule changes both
    orthogonalizer = case.get("orthogonalizer", "polar_express")
    p = torch.nn.Parameter(p0.clone())
    square_stat = case.get("square_stat", "column")
    opt = NorMuon([dict(params=[p], lr_mul=case["lr_mul"])], weight_decay=1.2, beta2=case["beta2"],
                  cautious=case["cautious"], orthogonalizer=orthogonalizer, ns_steps=3, square_stat=square_stat)
    for g, (lr, m) in zip(grads, schedule):
        opt.param_groups[0].update(lr=lr, momentum=m)
        p.grad = g.clone()
        opt.step()
        assert p.grad is None  # the caller relies on NorMuon clearing its gradients
    expected = expected_steps(p0, grads, schedule, 1.2, case["beta2"], case["cautious"], case["lr_mul"], orthogonalizer,
                              square_stat)
    assert torch.allclose(p.detach(), expected, rtol=0, atol=2e-6), (p.detach() - expected).abs().max()
    if square_stat == "row":  # per column, the record #46 way, is another result
        per_column = expected_steps(p0, grads, schedule, 1.2, case["beta2"], case["cautious"], case["lr_mul"])
        assert (per_column - expected).abs().max() > 1e-4
    if case["beta2"] > 0:  # the normalisation moves the result far beyond the tolerance
        unnormalised = expected_steps(p0, grads, schedule, 1.2, 0.0, case["cautious"], case["lr_mul"], orthogonalizer)
        assert (unnormalised - expected).abs().max() > 1e-3


def test_row_blocks_are_matrices_of_their_own():
    """HEAD's Q and K (docs/RECORD-HEAD.md 5.1, L1278-1279): a (4, 8, 12) [Q; K; V; O]-like stack whose first two
    matrices are cut into blocks of 4 rows, each block orthogonalised, normalised (its own second moment, per
    column: the blocks are wide) and decayed as a matrix of its own; V and O whole. The shape factor is a
    block's: 1 for the (4, 12) blocks, 1 for the (8, 12) matrices. Written out: each piece as its own parameter."""
    gen = torch.Generator().manual_seed(6)
    p0 = torch.randn(4, 8, 12, generator=gen)
    grads = [torch.randn(4, 8, 12, generator=gen) for _ in range(2)]
    schedule = [(0.05, 0.85), (0.03, 0.9)]
    p = torch.nn.Parameter(p0.clone())
    opt = NorMuon([dict(params=[p], row_blocks=(4, 4, 0, 0))], weight_decay=1.2, beta2=0.9)
    for g, (lr, m) in zip(grads, schedule):
        opt.param_groups[0].update(lr=lr, momentum=m)
        p.grad = g.clone()
        opt.step()
    pieces = [(m, slice(r, r + 4)) for m in (0, 1) for r in (0, 4)] + [(2, slice(0, 8)), (3, slice(0, 8))]
    for m, rows in pieces:
        expected = expected_steps(p0[m, rows], [g[m, rows] for g in grads], schedule, 1.2, 0.9, True, 1.0)
        assert torch.allclose(p.detach()[m, rows], expected, rtol=0, atol=2e-6), (m, rows)
    assert set(opt.state[p]) == {"momentum", "second_moment.4", "second_moment.8"}
    assert opt.state[p]["second_moment.4"].shape == (4, 1, 12)  # 2 matrices x 2 blocks, one value per column
    whole = expected_steps(p0, grads, schedule, 1.2, 0.9, True, 1.0)
    assert (whole[0] - p.detach()[0]).abs().max() > 1e-3


def test_cautious_decay_only_where_update_and_weight_agree_in_sign():
    # A positive diagonal gradient has the identity as polar factor, and every Polar Express iterate
    # stays diagonal: V is positive on the diagonal and exactly 0 elsewhere.
    g = torch.diag(torch.tensor([3.0, 1.0, 2.0, 0.5]))
    p0 = torch.tensor([[1.0, -0.5, 0.25, 2.0],
                       [0.5, -1.0, -2.0, 0.75],
                       [-0.25, 1.5, -0.5, -1.0],
                       [2.0, 0.5, -1.5, 1.25]])
    after = {}
    for cautious in (True, False):
        p = torch.nn.Parameter(p0.clone())
        opt = NorMuon([p], lr=0.1, weight_decay=1.2, cautious=cautious)
        p.grad = g.clone()
        opt.step()
        after[cautious] = p.detach()
    # Decayed: the diagonal where p > 0, and every off-diagonal entry (V = 0 there: zeros count as agreeing).
    decayed = ~torch.eye(4, dtype=torch.bool) | (p0 > 0)
    lr_eff, wd_eff = 0.1, 0.1 * 1.2
    # Plain decay takes lr_eff * wd_eff * p everywhere; cautious decay spares the diagonal entries with p < 0.
    spared = torch.where(decayed, 0.0, lr_eff * wd_eff * p0)
    assert torch.allclose(after[True] - after[False], spared, atol=1e-7)
    assert spared.abs().sum() > 0.015  # two entries (p = -1.0 and -0.5) really differ


# --- two ranks against one, and checkpoints across world sizes ---


def make_params():
    """Counts per (group, shape) of 3, 1, 1, 1, 2, so most buckets need padding on 2 ranks."""
    gen = torch.Generator().manual_seed(4)
    shapes = [[(8, 16), (16, 8), (8, 16), (3, 8, 12), (8, 16)], [(8, 16), (6, 6), (6, 6)]]
    return [[torch.nn.Parameter(torch.randn(s, generator=gen)) for s in group] for group in shapes]


def make_optimizer(groups):
    return NorMuon([dict(params=groups[0]), dict(params=groups[1], lr_mul=2.0, weight_decay=0.5)],
                   lr=0.04, beta2=0.9)


def local_grads(groups, step, rank):
    """The gradient of rank `rank`'s own data at `step`; rank None is the average of ranks 0 and 1."""
    if rank is None:
        return [[(a + b) / 2 for a, b in zip(ga, gb)] for ga, gb in zip(local_grads(groups, step, 0),
                                                                         local_grads(groups, step, 1))]
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return [[torch.randn(p.shape, generator=gen) for p in group] for group in groups]


def run_steps(opt, groups, steps, rank):
    for step in steps:
        for group in opt.param_groups:  # a schedule, as the trainer sets one
            group.update(lr=0.04 * (1 - 0.1 * step), momentum=0.85 + 0.03 * step)
        for params, grads in zip(groups, local_grads(groups, step, rank)):
            for p, g in zip(params, grads):
                p.grad = g
        opt.step()


def snapshot(groups):
    return [[p.detach().clone() for p in group] for group in groups]


def load(groups, values):
    with torch.no_grad():
        for params, saved in zip(groups, values):
            for p, v in zip(params, saved):
                p.copy_(v)


def _two_rank_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    # Uninterrupted: 3 steps, the checkpoint taken after step 2 (a collective on both ranks).
    groups = make_params()
    opt = make_optimizer(groups)
    run_steps(opt, groups, [0, 1], rank)
    at_2, state_at_2 = snapshot(groups), opt.state_for_checkpoint()
    run_steps(opt, groups, [2], rank)
    # Resumed from the one-process checkpoint of step 2.
    one = torch.load(os.path.join(out_dir, "one_process_at_2.pt"))
    resumed = make_params()
    opt = make_optimizer(resumed)
    load(resumed, one["params"])
    opt.load_checkpoint_state(one["state"])
    run_steps(opt, resumed, [2], rank)
    if rank == 0:
        torch.save(dict(params_at_2=at_2, state_at_2=state_at_2, final=snapshot(groups),
                        resumed_from_one=snapshot(resumed)), os.path.join(out_dir, "two.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process given the average gradient, and two gloo ranks each given its own data's gradient."""
    out_dir = tmp_path_factory.mktemp("normuon")
    groups = make_params()
    opt = make_optimizer(groups)
    run_steps(opt, groups, [0, 1], None)
    one_at_2 = dict(params=snapshot(groups), state=opt.state_for_checkpoint())
    torch.save(one_at_2, out_dir / "one_process_at_2.pt")
    run_steps(opt, groups, [2], None)
    # Forked rather than spawned: the children start with torch already imported (seconds saved per
    # child on two CPU cores); each sets its thread count to 1 before any tensor work, as DataLoader
    # workers do.
    mp.start_processes(_two_rank_worker, args=(str(out_dir / "rendezvous"), str(out_dir)), nprocs=2,
                       start_method="fork")
    return dict(one_final=snapshot(groups), one_at_2=one_at_2, two=torch.load(out_dir / "two.pt"))


def assert_same_params(a, b):
    for ga, gb in zip(a, b, strict=True):
        for x, y in zip(ga, gb, strict=True):
            assert torch.allclose(x, y, rtol=0, atol=1e-6), (x - y).abs().max()  # steps move p by ~0.1


def test_two_ranks_give_the_same_parameters_as_one_with_the_average_gradient(runs):
    assert_same_params(runs["two"]["final"], runs["one_final"])


def test_checkpoint_moves_between_world_sizes(runs):
    one_state, two_state = runs["one_at_2"]["state"], runs["two"]["state_at_2"]
    keys = {f"{g}.{i}" for g, n in enumerate((5, 3)) for i in range(n)}
    # Both ranks' entries gathered, in the same world-size-free format as one process writes.
    assert set(one_state) == set(two_state) == keys
    for key in keys:
        assert set(two_state[key]) == {"momentum", "second_moment"}
        for name, value in two_state[key].items():
            assert value.device.type == "cpu"
            assert torch.allclose(value, one_state[key][name], rtol=1e-5, atol=1e-6)
    # Saved by 2 ranks, resumed by 1 process for step 3: the uninterrupted result.
    groups = make_params()
    opt = make_optimizer(groups)
    load(groups, runs["two"]["params_at_2"])
    opt.load_checkpoint_state(two_state)
    run_steps(opt, groups, [2], None)
    assert_same_params(snapshot(groups), runs["one_final"])
    # Saved by 1 process, resumed by 2 ranks (in the worker): the same.
    assert_same_params(runs["two"]["resumed_from_one"], runs["one_final"])


# --- hyperparameters ---


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-0.1), "lr"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(momentum=1.0), "momentum"),
    (dict(beta2=1.0), "beta2"),
    (dict(beta2=-0.5), "beta2"),
    (dict(orthogonalizer="svd"), "orthogonalizer"),
    (dict(ns_steps=0), "ns_steps"),
])
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NorMuon([torch.nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_bad_groups_and_shapes_raise():
    with pytest.raises(ValueError, match="lr_mul"):
        NorMuon([dict(params=[torch.nn.Parameter(torch.randn(4, 4))], lr_mul=0.0)])
    with pytest.raises(ValueError, match="square_stat"):
        NorMuon([torch.nn.Parameter(torch.randn(4, 4))], square_stat="diagonal")
    for blocks in ((4, 3), (2,), (-2, 0)):  # one entry per matrix, each 0 or dividing the rows
        with pytest.raises(ValueError, match="row_blocks"):
            NorMuon([dict(params=[torch.nn.Parameter(torch.randn(2, 4, 6))], row_blocks=blocks)])
    with pytest.raises(ValueError, match="2D matrices or 3D stacks"):
        NorMuon([torch.nn.Parameter(torch.randn(4))])
