"""bf16 weights with a 16-bit mantissa beside them (optim/mantissa.py, NorMuon's mantissa_weights): the split is
exact and truncates, and NorMuon's update of the joined float32 master is the float32 update bit for bit, through
checkpoints and across two ranks."""
import io
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optim.mantissa import join, split
from optim.normuon import NorMuon

# --- split and join ---


def bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def truncated(x):
    """float32 x rounded toward zero to bf16's grid, in float64, from frexp: x = m 2^e with m in [0.5, 1), so bf16's
    8 significant bits are a spacing of 2^(e - 8), and 2^-133 below the normal range (bf16's subnormals)."""
    _, e = torch.frexp(x.double())
    spacing = torch.pow(2.0, (e.clamp_min(-125) - 8).double())
    return torch.trunc(x.double() / spacing) * spacing


def special_values():
    tiny = torch.finfo(torch.float32).tiny
    values = [0.0, -0.0, 1.0, -1.0, tiny, -tiny, tiny * 0.75, -tiny / 3, 2.0 ** -149, -(2.0 ** -149),
              torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max, math.inf, -math.inf, math.nan,
              1 + 2 ** -8 + 2 ** -9, -(1 + 2 ** -8 + 2 ** -9), 3.0e-39, -1.17e-38]
    patterns = torch.tensor([0x7FC00001, 0xFFFF_FFFF - 2 ** 32, 0x0000FFFF, 0x8000FFFF - 2 ** 32, 0x3F80FFFF,
                             0x7F7FFFFF, 0x00010000], dtype=torch.int32)  # NaN payloads, all-ones lower halves
    return torch.cat([torch.tensor(values, dtype=torch.float32), patterns.view(torch.float32)])


def test_split_and_join_are_exact_inverses_on_every_bit_pattern():
    gen = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-2 ** 31, 2 ** 31, (4096,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = torch.cat([random_bits.view(torch.float32), special_values(), torch.randn(512, generator=gen)])
    upper, lower = split(x)
    assert upper.dtype == torch.bfloat16 and lower.dtype == torch.uint16 and upper.shape == lower.shape == x.shape
    assert torch.equal(bits(join(upper, lower)), bits(x))
    # The upper half is x with its lower 16 bits cleared, the lower half those bits.
    ints = x.view(torch.int32).to(torch.int64) % 2 ** 32
    assert torch.equal(bits(upper.float()).to(torch.int64) % 2 ** 32, ints - ints % 2 ** 16)
    assert torch.equal(lower.to(torch.int64), ints % 2 ** 16)
    # Non-contiguous: a transposed view splits and joins back as itself.
    m = torch.randn(6, 10, generator=gen).t()
    assert torch.equal(bits(join(*split(m))), bits(m))


def test_the_bf16_half_is_the_value_truncated_toward_zero():
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([special_values(), torch.randn(4096, generator=gen) * 10.0 ** torch.randint(-40, 38, (4096,),
                                                                                               generator=gen)])
    x = x[torch.isfinite(x)]
    upper = split(x)[0].double()
    assert torch.equal(upper, truncated(x))
    assert torch.equal(torch.signbit(upper), torch.signbit(x))  # -0.0 and tiny negatives keep their sign
    assert (upper.abs() <= x.double().abs()).all()
    # ... which is not what a cast rounds to: round to nearest moves about half of them away from zero.
    rounded_up = x.bfloat16().double().abs() > x.double().abs()
    assert rounded_up.float().mean() > 0.3


def test_split_and_join_refuse_other_dtypes():
    with pytest.raises(TypeError):
        split(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError):
        join(torch.zeros(3, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.int16))


# --- NorMuon: the update of the master is the float32 update ---

SHAPES = [[(8, 16), (16, 8), (8, 16), (3, 8, 12)], [(4, 8, 12)]]  # group 1: HEAD's blocks of Q and K rows


def make_params(seed=4):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.nn.Parameter(torch.randn(s, generator=gen) * 0.3) for s in group] for group in SHAPES]


def make_optimizer(groups, mantissa, cautious=True, beta2=0.9):
    return NorMuon([dict(params=groups[0]), dict(params=groups[1], row_blocks=(4, 4, 0, 0), lr_mul=2.0)],
                   lr=0.05, weight_decay=1.2, beta2=beta2, cautious=cautious, ns_dtype="float32",
                   mantissa_weights=mantissa)


def gradients(step, rank=0):
    """float32 gradients of every parameter at `step`, from rank `rank`'s data."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return [[torch.randn(s, generator=gen) for s in group] for group in SHAPES]


def bf16_exact(grads):
    """The gradients rounded to bf16, as float32: given as bf16 or float32, the same values."""
    return [[g.bfloat16().float() for g in gs] for gs in grads]


def give(groups, grads, dtype=None):
    for params, gs in zip(groups, grads):
        for p, g in zip(params, gs):
            p.grad = g.to(dtype or p.grad_dtype or p.dtype)


def schedule(opt, step):
    for group in opt.param_groups:  # the trainer's schedule changes both each step
        group.update(lr=0.05 * (1 - 0.1 * step), momentum=0.85 + 0.03 * step)


def flat(groups):
    return [p for group in groups for p in group]


def master(opt, p):
    return join(p.detach(), opt.state[p]["mantissa"])


def assert_is_the_split_of(opt, mantissa_groups, float32_groups):
    """Each mantissa parameter's joined master is the float32 parameter, bit for bit, and its bf16 weight that
    parameter truncated toward zero."""
    for p, q in zip(flat(mantissa_groups), flat(float32_groups), strict=True):
        assert p.dtype == torch.bfloat16 and q.dtype == torch.float32
        assert torch.equal(bits(master(opt, p)), bits(q.detach()))
        assert torch.equal(p.detach().double(), truncated(q.detach()))


CASES = {"cautious, float32 gradients": dict(grads="float32"),
         "cautious, bf16 gradients": dict(grads="bfloat16"),
         "plain decay, no normalisation": dict(grads="float32", cautious=False, beta2=0.0)}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_the_update_of_the_master_is_the_float32_update(case):
    """The same gradients, given explicitly, to float32 parameters and to mantissa ones: after every step the
    master is the float32 parameter bit for bit. Float32 gradients reach the bf16 parameters through torch's
    grad_dtype (as autograd would hand them over with it set); bf16 ones are the real run's, given to both."""
    kwargs = dict(cautious=case.get("cautious", True), beta2=case.get("beta2", 0.9))
    reference, stored = make_params(), make_params()
    ref_opt, opt = make_optimizer(reference, False, **kwargs), make_optimizer(stored, True, **kwargs)
    assert_is_the_split_of(opt, stored, reference)  # at construction: the split of the float32 init
    grad_dtype = getattr(torch, case["grads"])
    for p in flat(stored):
        p.grad_dtype = grad_dtype
    for step in range(4):
        schedule(ref_opt, step)
        schedule(opt, step)
        grads = gradients(step)
        if grad_dtype == torch.bfloat16:
            grads = bf16_exact(grads)
        give(reference, grads)
        give(stored, grads, grad_dtype)
        ref_opt.step()
        opt.step()
        assert all(p.grad is None for p in flat(stored))
        assert_is_the_split_of(opt, stored, reference)
    # The check means something: the weights moved, and the bf16 weights are not the rounded masters.
    start = make_params()
    assert all((p - q).abs().max() > 1e-3 for p, q in zip(flat(reference), flat(start)))
    truncation_differs = [(p.detach() != q.detach().bfloat16()).any() for p, q in zip(flat(stored), flat(reference))]
    assert all(truncation_differs)


def test_a_checkpoint_taken_midway_continues_bit_identically(tmp_path):
    """Two steps, a checkpoint (the model's bf16 weights and the optimizer's state, through torch.save), two more
    steps (bf16 gradients, the real run's); and the same from the file in a fresh model and optimizer: through the world-size-free checkpoint
    (state_for_checkpoint) and torch's own state_dict (the trainer's rewind after its warm-up). The checkpoint
    also resumes exactly without mantissa_weights: the float32 parameters become the masters."""
    groups = make_params()
    opt = make_optimizer(groups, True)
    for step in range(2):
        schedule(opt, step)
        give(groups, bf16_exact(gradients(step)))
        opt.step()
    torch.save(dict(weights=[p.detach().clone() for p in flat(groups)], sharded=opt.state_for_checkpoint(),
                    local=opt.state_dict()), tmp_path / "ckpt.pt")
    masters_at_2 = [master(opt, p).clone() for p in flat(groups)]
    for step in range(2, 4):
        schedule(opt, step)
        give(groups, bf16_exact(gradients(step)))
        opt.step()
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(entry["mantissa"].dtype == torch.uint16 for entry in saved["sharded"].values())
    for how in ("checkpoint", "state_dict", "without mantissa_weights"):
        resumed = make_params(seed=9)  # other weights: everything comes from the file
        mantissa = how != "without mantissa_weights"
        fresh = make_optimizer(resumed, mantissa)
        with torch.no_grad():  # the model's weights are loaded first, as training/checkpoint.py restores
            for p, w in zip(flat(resumed), saved["weights"]):
                p.copy_(w)
        if how == "state_dict":
            fresh.load_state_dict(saved["local"])
        else:
            fresh.load_checkpoint_state(saved["sharded"])
        for p, m in zip(flat(resumed), masters_at_2):
            assert torch.equal(bits(master(fresh, p) if mantissa else p.detach()), bits(m)), how
        for step in range(2, 4):
            schedule(fresh, step)
            give(resumed, bf16_exact(gradients(step)))
            fresh.step()
        for p, q in zip(flat(resumed), flat(groups)):
            if mantissa:
                assert torch.equal(bits(p.detach()), bits(q.detach())), how
                assert torch.equal(bits(master(fresh, p)), bits(master(opt, q))), how
                assert set(fresh.state[p]) == set(opt.state[q])
                assert all(fresh.state[p][k].dtype == opt.state[q][k].dtype for k in opt.state[q])
            else:
                assert torch.equal(bits(p.detach()), bits(master(opt, q))), how
                assert "mantissa" not in fresh.state[p]


def test_a_checkpoint_without_mantissas_starts_the_masters_at_the_bf16_weights():
    groups = make_params()
    opt = make_optimizer(groups, True)
    opt.load_checkpoint_state({})
    give(groups, bf16_exact(gradients(0)))
    opt.step()
    plain = make_params()
    with torch.no_grad():
        for p, q in zip(flat(plain), flat(make_params())):
            p.copy_(split(q.detach())[0].float())  # the float32 run from the bf16 weights
    plain_opt = make_optimizer(plain, False)
    give(plain, bf16_exact(gradients(0)))
    plain_opt.step()
    assert_is_the_split_of(opt, groups, plain)


def test_mantissa_weights_refuse_other_parameter_dtypes():
    with pytest.raises(ValueError, match="mantissa_weights"):
        NorMuon([torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))], mantissa_weights=True)


# --- two ranks against one ---


def _two_rank_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    groups = make_params()
    opt = make_optimizer(groups, True)
    owned = [p for p in flat(groups) if "mantissa" in opt.state[p]]
    for step in range(3):
        schedule(opt, step)
        give(groups, [[g.bfloat16() for g in gs] for gs in gradients(step, rank)])  # each rank its own data
        opt.step()
    state = opt.state_for_checkpoint()
    torch.save(dict(weights=[p.detach() for p in flat(groups)], state=state, owned=len(owned)),
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_give_the_masters_of_one_with_the_average_gradient(tmp_path):
    """The changed sharded path: bf16 gradients upcast before the reduce-scatter, bf16 chunks gathered, each
    mantissa kept by the rank that updates it. Each rank's bf16 gradients; one process gets their float32
    average (through grad_dtype), which a bf16 reduction would not give."""
    mp.start_processes(_two_rank_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2,
                       start_method="fork")
    reference = make_params()
    ref_opt = make_optimizer(reference, False)
    for step in range(3):
        schedule(ref_opt, step)
        ranks = [bf16_exact(gradients(step, rank)) for rank in (0, 1)]
        give(reference, [[(a + b) / 2 for a, b in zip(ga, gb)] for ga, gb in zip(*ranks)])
        ref_opt.step()
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    # buckets of 2, 1, 1, 1 parameters: rank 0 updates one of the pair and the single ones, rank 1 the other one
    assert [r["owned"] for r in results] == [4, 1]
    for r in results:  # both ranks hold every weight, the truncated float32 one
        for w, q in zip(r["weights"], flat(reference), strict=True):
            assert torch.equal(w.double(), truncated(q.detach()))
    state = results[0]["state"]
    assert set(state) == {f"{g}.{i}" for g, group in enumerate(SHAPES) for i in range(len(group))}
    for key, w, q in zip(sorted(state), results[0]["weights"], flat(reference)):
        assert torch.equal(bits(join(w, state[key]["mantissa"])), bits(q.detach())), key
