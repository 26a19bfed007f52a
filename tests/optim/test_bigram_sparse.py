"""The bigram table's gradient exchanged as its touched rows (--bigram-grad sparse, DistAdam.exchange_sparsely):
the same chunks of the averaged gradient, so the same update and Adam state, as the dense reduce-scatter and as
one process on the ranks' batches together, for less traffic."""
import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from config import PRESETS, Config, make_plan
from model.bigram import BigramEmbedding
from model.gpt import GPT
from optim import comm, dist_adam
from optim.dist_adam import DistAdam, _chunk_size, _owned_rows
from optim.optimizer import Optimizer

# 104 elements: chunks of 52 under two ranks cut row 6, chunks of 35 under three cut rows 4 and 8 (and pad 1)
ROWS, DIM, SIGN_ROWS = 13, 8, 4
STEPS = 6  # loop steps, two micro-batches each; Adam steps on the odd ones, on two steps' summed gradients
# the rows each rank's batches draw from: overlapping, row 3 and 10 in none; row 7 only in steps 0 and 1, so
# from the second Adam step on it moves on its decaying moments alone
TOUCHABLE = {0: (0, 1, 5, 6, 7, 12), 1: (5, 6, 9, 11, 12), 2: (2, 4, 6, 8, 9)}
NEVER, EARLY_ONLY = (3, 10), 7


class Stub(nn.Module):
    """The real bigram module with a tiny table (nonzero, so the decay shows), and a dense parameter beside it."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.bigram = BigramEmbedding(ROWS, DIM, sign_rows=SIGN_ROWS, generator=gen)
        with torch.no_grad():
            self.bigram.table.copy_(torch.randn(ROWS, DIM, generator=gen) * 0.1)
        self.scale = nn.Parameter(torch.randn(DIM, generator=gen))


def make_optimizer(model, sparse):
    opt = DistAdam([dict(params=[model.bigram.table], lr=0.05, betas=(0.75, 0.95), cautious_decay=5.0),
                    dict(params=[model.scale], lr=0.02)], eps=1e-8)
    if sparse:
        opt.exchange_sparsely(model.bigram.table)
    return opt


def batch(step, rank, micro, dyadic):
    gen = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    rows = torch.tensor([r for r in TOUCHABLE[rank] if step < 2 or r != EARLY_ONLY])
    hash_ids = rows[torch.randint(len(rows), (2, 5), generator=gen)]
    sign_ids = torch.randint(SIGN_ROWS, (2, 5), generator=gen)
    coeff = torch.randn(2, 5, DIM, generator=gen)
    if dyadic:  # quarters: every sum of the table's gradients is exact in float32, in any order
        coeff = coeff.mul(4).round().div(4)
    return hash_ids, sign_ids, coeff


def loss(model, hash_ids, sign_ids, coeff):
    out = model.bigram(hash_ids, sign_ids)
    return (out * coeff).sum() + torch.sin(model.scale * out.detach().mean((0, 1))).sum()


def train(model, opt, ranks, dyadic):
    """On the mean over `ranks`' batches: their summed gradient divided by their number before each Adam step,
    as the exchange averages (a mean loss would round each batch's share instead, and where the sum cancels
    exactly leave a tiny gradient that Adam and the cautious decay's mask blow up). The hooks send the two
    steps' summed gradients, but on the last step, where step() sends them itself."""
    for k in range(STEPS):
        for group, lr in zip(opt.param_groups, (0.05, 0.02)):
            group["lr"] = lr * (1 - 0.1 * k)
        stepping = k % 2 == 1
        for micro in range(2):
            opt.sync_grads = stepping and micro == 1 and k != STEPS - 1
            sum(loss(model, *batch(k, r, micro, dyadic)) for r in ranks).backward()
        if stepping:
            for p in model.parameters():
                p.grad.div_(len(ranks))
            opt.step()
        opt.sync_grads = False


def result(model, opt):
    return dict(table=model.bigram.table.detach().clone(), scale=model.scale.detach().clone(),
                state=opt.state_for_checkpoint()["state"])


def _worker(rank, world_size, init_file, out_dir, dyadic):
    torch.set_num_threads(1)  # a forked child: before any tensor work
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    calls = []

    def counted(name, fn):
        def wrapped(output, input, *args, **kwargs):
            calls.append((name, input.numel()))
            return fn(output, input, *args, **kwargs)
        return wrapped

    dist_adam._reduce_scatter = counted("reduce_scatter", dist_adam._reduce_scatter)
    comm._all_to_all = counted("all_to_all", comm._all_to_all)
    out = {}
    for mode in ("dense", "sparse"):
        model = Stub()
        opt = make_optimizer(model, mode == "sparse")
        calls.clear()
        train(model, opt, [rank], dyadic)
        out[mode] = dict(calls=list(calls), **result(model, opt))
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=["two_ranks", "three_ranks"])
def runs(request, tmp_path_factory):
    """One process on all ranks' batches (the table marked sparse: nothing to exchange), then `world_size`
    gloo ranks, each training a dense and a sparse copy. Two ranks on float gradients (a sum of two is
    exact in any order), three on dyadic ones (exact sums whatever order the reduce-scatter takes)."""
    world_size = request.param
    dyadic = world_size > 2
    model = Stub()
    opt = make_optimizer(model, sparse=True)
    train(model, opt, list(range(world_size)), dyadic)
    one = result(model, opt)
    out_dir = tmp_path_factory.mktemp(f"bigram_sparse_{world_size}")
    mp.start_processes(_worker, args=(world_size, str(out_dir / "rendezvous"), str(out_dir), dyadic),
                       nprocs=world_size, start_method="fork")
    ranks = [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]
    return dict(world_size=world_size, one=one, ranks=ranks)


def test_sparse_exchange_gives_the_dense_result_exactly(runs):
    for out in runs["ranks"]:
        dense, sparse = out["dense"], out["sparse"]
        assert torch.equal(sparse["table"], dense["table"]) and torch.equal(sparse["scale"], dense["scale"])
        assert sparse["state"].keys() == dense["state"].keys() == {"0.0", "1.0"}
        for key in dense["state"]:
            assert sparse["state"][key]["step"] == dense["state"][key]["step"] == STEPS // 2
            for name in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(sparse["state"][key][name], dense["state"][key][name]), (key, name)
        assert torch.equal(out["sparse"]["table"], runs["ranks"][0]["sparse"]["table"])  # every rank the same


def test_ranks_match_one_process_on_the_batches_together(runs):
    one, sparse = runs["one"], runs["ranks"][0]["sparse"]
    assert torch.allclose(sparse["table"], one["table"], rtol=0, atol=2e-6), (sparse["table"] - one["table"]).abs().max()
    assert torch.allclose(sparse["scale"], one["scale"], rtol=0, atol=2e-6)
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.allclose(sparse["state"]["0.0"][name], one["state"]["0.0"][name], rtol=1e-5, atol=1e-7), name
    v = sparse["state"]["0.0"]["exp_avg_sq"]
    # rows no rank touched never had a gradient; the early-only row kept stepping on moments that decayed
    assert torch.all(v[list(NEVER)] == 0) and v[EARLY_ONLY].sum() > 0
    table0 = Stub().bigram.table.detach()
    assert torch.equal(sparse["table"][list(NEVER)], table0[list(NEVER)])
    assert not torch.equal(sparse["table"][EARLY_ONLY], table0[EARLY_ONLY])


def test_sparse_mode_sends_only_rows_and_fewer_elements(runs):
    """Dense: the whole padded table reduce-scattered at each of the 3 Adam steps. Sparse: no reduce-scatter
    of it, but per Adam step the counts, the row ids and whole rows, fewer than the table's."""
    world_size = runs["world_size"]
    padded_table = _chunk_size(torch.empty(ROWS, DIM), world_size) * world_size
    for rank, out in enumerate(runs["ranks"]):
        dense, sparse = out["dense"]["calls"], out["sparse"]["calls"]
        assert [n for name, n in dense if name == "reduce_scatter" and n == padded_table] == [padded_table] * 3
        assert not any(name == "all_to_all" for name, _ in dense)
        assert not any(name == "reduce_scatter" and n == padded_table for name, n in sparse)
        exchanges = [n for name, n in sparse if name == "all_to_all"]
        assert len(exchanges) == 3 * 3  # counts, ids, rows per Adam step
        for counts, ids, rows in zip(exchanges[0::3], exchanges[1::3], exchanges[2::3]):
            assert counts == world_size and rows == ids * DIM
            # at most the rows this rank's batches touch (all but its own, whole)
            assert 0 < ids <= len(TOUCHABLE[rank]) and rows < ROWS * DIM


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8, 16, 200])
def test_the_owned_rows_cover_each_ranks_chunk_of_the_flat_table(world_size):
    table = torch.arange(ROWS * DIM, dtype=torch.float32).view(ROWS, DIM)
    chunk = _chunk_size(table, world_size)
    padded = torch.cat([table.view(-1), torch.zeros(chunk * world_size - table.numel())])
    for rank in range(world_size):
        lo, hi, offset = _owned_rows(rank, chunk, ROWS, DIM)
        region = table[lo:hi].reshape(-1)[offset : offset + chunk]
        assert torch.equal(region, padded[rank * chunk : rank * chunk + region.numel()])
        assert torch.all(padded[rank * chunk + region.numel() : (rank + 1) * chunk] == 0)  # the rest is padding


def test_exchange_sparsely_takes_a_table_of_this_optimizer_and_leaves_its_state_dict_alone():
    model = Stub()
    dense, sparse = make_optimizer(model, sparse=False), make_optimizer(model, sparse=True)
    assert sparse.is_sparse(model.bigram.table) and not dense.is_sparse(model.bigram.table)
    with pytest.raises(ValueError, match="a table of rows"):
        sparse.exchange_sparsely(model.scale)
    with pytest.raises(ValueError, match="a parameter of this optimizer"):
        sparse.exchange_sparsely(nn.Parameter(torch.zeros(3, 3)))
    assert sparse.state_dict() == dense.state_dict()  # local_state / load_local_state see no difference


@pytest.mark.parametrize("bigram_grad", ["dense", "sparse"])
def test_the_config_marks_the_bigram_table_under_normuon(bigram_grad):
    config = dataclasses.replace(Config(**PRESETS["speedrun"]), model_dim=64, num_heads=2, vocab_size=512,
                                 bos_token=0, bigram_rows=1000, bigram_grad=bigram_grad)
    model = GPT(make_plan(config))
    opt = Optimizer(model, make_plan(config))
    sparse = [p for group in opt.adam.param_groups for p in group["params"] if opt.adam.is_sparse(p)]
    assert [p.shape for p in sparse] == ([model.bigram.table.shape] if bigram_grad == "sparse" else [])
    assert sparse == [] or sparse[0] is model.bigram.table


class _Delivered:
    """A finished RowExchange: what the other ranks sent this one."""

    def __init__(self, ids, rows):
        self.ids, self.rows = ids, rows

    def wait(self):
        return self.ids, self.rows


@pytest.mark.parametrize("rows, width, world_size", [(13, 8, 2), (13, 8, 3), (13, 8, 5), (13, 8, 16), (3, 40, 7),
                                                     (5, 3, 4), (7, 1, 3), (4, 17, 64), (1, 9, 2)])
def test_a_simulated_exchange_gives_each_rank_its_chunk_of_the_dense_average(rows, width, world_size):
    """Every rank's send plan carried out by hand, in one process, for chunks narrower than a row (a row on
    three or more ranks), chunks wholly in the padding and rows of one element: each owner's merged chunk is
    the dense reduce-scatter's, the rows of the average's flat chunk (exact: sums of quarters)."""
    gen = torch.Generator().manual_seed(rows * 1000 + width * 10 + world_size)
    grads = []
    for _ in range(world_size):
        g = torch.randint(-4, 5, (rows, width), generator=gen).float() / 4
        g[torch.rand(rows, generator=gen) < 0.5] = 0  # about half the rows untouched on each rank
        grads.append(g)
    chunk = _chunk_size(grads[0], world_size)
    average = torch.cat([sum(grads).view(-1), torch.zeros(chunk * world_size - rows * width)]) / world_size
    inbox = {r: ([], []) for r in range(world_size)}
    for sender, g in enumerate(grads):
        ids, runs = dist_adam._send_plan(g, chunk, world_size, sender)
        assert runs[sender][1] == 0
        for receiver, (start, count) in enumerate(runs):
            part = ids[start : start + count]
            # exactly the sender's nonzero rows that hold elements of the receiver's chunk
            holds = [i for i in g.any(dim=1).nonzero().squeeze(1).tolist() if receiver != sender
                     and i * width < (receiver + 1) * chunk and (i + 1) * width > receiver * chunk]
            assert part.tolist() == holds
            inbox[receiver][0].append(part)
            inbox[receiver][1].append(g[part])
    for rank in range(world_size):
        delivered = _Delivered(torch.cat(inbox[rank][0]), torch.cat(inbox[rank][1]))
        merged = dist_adam._SparseReduce(delivered, grads[rank], rank, chunk, world_size).result()
        assert torch.equal(merged, average[rank * chunk : (rank + 1) * chunk]), rank
