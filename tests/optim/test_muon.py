
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optim.muon import Muon, ns_dtype, orthogonalize


def polar_factor(G):
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U @ Vh).float()


def cosine(a, b):
    return ((a * b).sum() / (a.norm() * b.norm())).item()


# GPT-2 small's MLP matrix iterates in float32: bf16 matmuls are emulated on CPUs without native bf16
# (AMX), and took 30 s of the suite at that size; the smaller shapes check bf16.
@pytest.mark.parametrize("shape, dtype", [((64, 256), torch.bfloat16), ((256, 64), torch.bfloat16),
                                          ((128, 384), torch.bfloat16), ((768, 3072), torch.float32)])
def test_rectangular_matrices_land_in_band_and_point_along_polar_factor(shape, dtype):
    torch.manual_seed(0)
    G = torch.randn(shape)
    X = orthogonalize(G, steps=5, dtype=dtype).float()
    s = torch.linalg.svdvals(X)
    # The tuned quintic trades exact convergence for speed: singular values end in about [0.68, 1.15].
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    assert cosine(X, polar_factor(G)) > 0.97


@pytest.mark.parametrize("n", [100, 256])
def test_square_matrices_bulk_in_band(n):
    # Square Gaussian matrices have singular values near zero that 5 steps cannot lift all the way.
    torch.manual_seed(1)
    G = torch.randn(n, n)
    X = orthogonalize(G).float()
    s = torch.linalg.svdvals(X)
    assert (s > 0.6).float().mean() > 0.95 and s.max() < 1.25
    assert cosine(X, polar_factor(G)) > 0.97


def test_batched_matches_one_by_one_and_keeps_shape():
    torch.manual_seed(2)
    G = torch.randn(3, 48, 96)
    batched = orthogonalize(G)
    assert batched.shape == G.shape
    for i in range(3):
        assert torch.allclose(batched[i].float(), orthogonalize(G[i]).float(), atol=2e-2)


def test_per_step_coefficients_converge_to_exact_polar_factor():
    # The cubic Newton-Schulz (1.5, -0.5, 0) converges to U V^T exactly, given enough steps.
    torch.manual_seed(3)
    G = torch.randn(32, 96)
    X = orthogonalize(G, steps=25, coefficients=[(1.5, -0.5, 0.0)] * 25).float()
    assert torch.allclose(X, polar_factor(G), atol=3e-2)
    with pytest.raises(ValueError, match="coefficient triples"):
        orthogonalize(G, steps=5, coefficients=[(1.5, -0.5, 0.0)] * 4)
    with pytest.raises(ValueError, match="2D or 3D"):
        orthogonalize(torch.randn(8))


def test_muon_step_is_scaled_orthogonal_update_with_weight_decay():
    torch.manual_seed(4)
    p = torch.nn.Parameter(torch.randn(96, 32))
    before = p.detach().clone()
    p.grad = torch.randn(96, 32)
    opt = Muon([p], lr=0.1, weight_decay=0.5, momentum=0.9, nesterov=True)
    opt.step()
    g = p.grad + 0.9 * p.grad  # nesterov on a fresh buffer: g + momentum * buf, buf = g
    update = (before * (1 - 0.1 * 0.5) - p.detach()) / 0.1
    expected = orthogonalize(g, dtype=ns_dtype(p.device)).float() * (96 / 32) ** 0.5
    assert (update - expected).norm() / expected.norm() < 1e-2  # rounding of the scaled update
    with pytest.raises(ValueError, match="2D"):
        Muon([torch.nn.Parameter(torch.randn(4))])


def test_second_step_uses_the_momentum_buffer_of_the_first():
    """Step 2's direction is orthogonalize(g2 + m * (m * g1 + g2)): a Muon that forgets its buffer fails here."""
    torch.manual_seed(6)
    p = torch.nn.Parameter(torch.randn(64, 32))
    g1, g2 = torch.randn(64, 32), torch.randn(64, 32)
    m, lr = 0.9, 0.1
    opt = Muon([p], lr=lr, momentum=m, nesterov=True)
    p.grad = g1
    opt.step()
    before = p.detach().clone()
    p.grad = g2
    opt.step()
    update = (before - p.detach()) / lr
    expected = orthogonalize(g2 + m * (m * g1 + g2), dtype=ns_dtype(p.device)).float() * (64 / 32) ** 0.5
    forgetful = orthogonalize(g2 + m * g2, dtype=ns_dtype(p.device)).float() * (64 / 32) ** 0.5
    assert (update - expected).norm() / expected.norm() < 1e-2
    assert (forgetful - expected).norm() / expected.norm() > 0.1  # the two hypotheses are far apart


def _shapes():
    return [(32, 64), (64, 32), (32, 64), (16, 16), (32, 64), (64, 32), (48, 24)]


def _run_muon(rank, world_size, init_file, out_path):
    if world_size > 1:
        torch.set_num_threads(1)  # a forked child, as DataLoader workers: before any tensor work
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s)) for s in _shapes()]
    opt = Muon(params, lr=0.05, momentum=0.9)
    for step in range(3):
        gen = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    if rank == 0:
        torch.save([p.detach() for p in params], out_path)
    if world_size > 1:
        dist.destroy_process_group()


def test_two_ranks_give_the_same_parameters_as_one(tmp_path):
    _run_muon(0, 1, None, tmp_path / "one.pt")
    # Forked, with a file rendezvous, as tests/optim/test_normuon.py: spawned children here sometimes
    # died at exit under a loaded machine ("terminate called without an active exception")
    mp.start_processes(_run_muon, args=(2, str(tmp_path / "rendezvous"), tmp_path / "two.pt"), nprocs=2,
                       start_method="fork")
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(48, 80), (2, 48, 80), (80, 48)])
def test_round_once_rounds_each_combination_once_as_record_46s_kernels(shape):
    """b A + c A A and a X + B X computed in float32 from the bf16 operands, then rounded once to bf16."""
    torch.manual_seed(0)
    G = torch.randn(shape)
    coefficients = [(3.0, -2.5, 0.5), (2.0, -1.5, 0.4)]
    X = G.bfloat16()
    tall = shape[-2] > shape[-1]
    X = X.mT if tall else X
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in coefficients:
        A = (X.float() @ X.float().mT).bfloat16()
        B = (b * A.float() + c * (A.float() @ A.float())).bfloat16()
        X = (a * X.float() + B.float() @ X.float()).bfloat16()
    expected = X.mT if tall else X
    def share_off(out):
        return (out != expected).float().mean().item()

    # Equal but for the odd entry where a transposed operand sums in another order (1 in 1,920 for
    # the tall matrix); each product and term rounded on its own moves over 40% of the entries.
    assert share_off(orthogonalize(G, 2, coefficients, 1e-6, torch.bfloat16, 1.02, round_once=True)) < 0.002
    assert share_off(orthogonalize(G, 2, coefficients, 1e-6, torch.bfloat16, 1.02)) > 0.3
