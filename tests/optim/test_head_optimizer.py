"""HEAD's optimizer (docs/RECORD-HEAD.md section 5) through the one Optimizer object, on a stub module with the
parameter names and shapes HEAD's model has here, at a tiny width: the Adam table, NorMuon's blocks and LR
multipliers, and the embedding tied to the head until the untie step, each against its formula written out here."""
import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from config import Config, ConfigError, make_plan
from optim.normuon import polar_express
from optim.optimizer import Optimizer, check_optimizer_config, parameter_roles

V, D, HEADS, LAYERS, BIGRAM_ROWS = 24, 16, 4, 2, 30
HEAD_DIM = D // HEADS


class HeadStub(nn.Module):
    """HEAD's parameters under this project's names (the model's contract), random but for embed = lm_head."""

    def __init__(self, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)

        def param(*shape):
            return nn.Parameter(torch.randn(shape, generator=gen) * 0.5)

        def holder(**params):
            module = nn.Module()
            for name, value in params.items():
                setattr(module, name, value)
            return module

        self.embed = nn.Embedding(V, D)
        self.value_embeds = nn.ModuleList(nn.Embedding(V, D) for _ in range(5))
        self.bigram = holder(table=param(BIGRAM_ROWS, D))
        self.bigram.register_buffer("signs", torch.ones(8, D))
        self.smear_gate = nn.Linear(12, 1, bias=False)
        self.smear_lambda = param()
        self.blocks = nn.ModuleList()
        for i in range(LAYERS):
            attn = holder(qkvo=param(4, D, D), qkvo_lambdas=param(2))
            if i == 1:  # a value-embedding layer's gate
                attn.ve_gate = param(HEADS, 12)
            self.blocks.append(holder(attn=attn, mlp=holder(fc=nn.Linear(D, 4 * D, bias=False),
                                                            proj=nn.Linear(4 * D, D, bias=False))))
        self.resid_lambdas, self.post_lambdas = param(LAYERS, 2), param(LAYERS, 2)
        self.skip_weights = param(1)
        self.mudd = holder(w1=param(2, 64, D), w2=param(2, 14, 64), b2=param(2, 14))
        self.mudd_gates = holder(w1=param(2, 64, D), w2=param(2, 41, 64), b2=param(2, 41), scale=param())
        self.lm_head = nn.Linear(D, V, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            self.embed.weight.copy_(self.lm_head.weight)  # tied at init, as HEAD's model is


def head_config(**fields):
    """HEAD's optimizer settings (docs/RECORD-HEAD.md 5.1, 5.2) on a 10-step run of 2 stages: the head unties
    after the update of step 5, stage 1's first step (made odd)."""
    settings = dict(optimizer="normuon", adam_every=2, adam_table="head", adam_lr=0.008, adam_weight_decay=0.005,
                    adam_eps=1e-10, muon_lr=0.023, weight_decay=1.2, normuon_beta2=0.9, normuon_qk_block_heads=2,
                    normuon_square_stat="row", muon_orthogonalizer="polar_express", muon_ns_dtype="float32",
                    cautious_weight_decay=True, merged_qkvo=True, model_dim=D, num_heads=HEADS, num_layers=LAYERS,
                    vocab_size=V, bos_token=0, steps=10, batch_stages="1,1", tied_head_stages=1, cooldown_frac=0.5,
                    muon_momentum_warmup_steps=0, muon_momentum_end=0.95)
    return Config(**{**settings, **fields})


def lr_factor(step):
    """The schedule of head_config: 1, then a cooldown over the last 5 of the 10 steps to 0."""
    return min(1.0, (10 - step) / 5)


def coefficients(step, rank, micro):
    """Rank `rank`'s data at (step, micro-batch): the loss is sum(p * c) over the parameters, so c is the gradient."""
    gen = torch.Generator().manual_seed(10_000 * step + 100 * rank + micro)
    return {name: torch.randn(p.shape, generator=gen) for name, p in HeadStub(0).named_parameters()}


def train(model, opt, steps, ranks, after=None):
    """The loop's calls for `steps`, 2 micro-batches each; the loss is the mean over `ranks`' data."""
    named = dict(model.named_parameters())
    for step in steps:
        assert opt.set_schedules(step) == pytest.approx(lr_factor(step))
        for micro in range(2):
            with opt.backward_context(step, last=micro == 1):
                loss = sum(sum((named[n] * c).sum() for n, c in coefficients(step, r, micro).items())
                           for r in ranks) / len(ranks)
                loss.backward()
        opt.step(step)
        if after:
            after(step)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def restored(params, state, plan):
    """A fresh stub and optimizer given saved parameters and a saved Optimizer.state_dict()."""
    model = HeadStub(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
    opt = Optimizer(model, plan)
    opt.load_state_dict(state)
    return model, opt


# --- HEAD's table ---------------------------------------------------------------------------------------------

# HEAD L2026-2055 by HEAD's label: (betas, lr_mul, wd_mul); absent multipliers are 1 (L482-483).
HEAD_ADAM_TABLE = {
    "scalars": ((0.9, 0.99), 5.0, 0.0), "smear_gate": ((0.9, 0.99), 0.01, 0.0), "ve_gate_bank": ((0.9, 0.99), 1.0, 1.0),
    "lm_head": ((0.5, 0.95), 1.0, 150.0), "bigram_embed": ((0.75, 0.95), 75.0, 5.0),
    "post_lambdas": ((0.9, 0.95), 1.0, 0.0), "resid_lambdas": ((0.9, 0.95), 5.0, 0.0),
    "value_embeds": ((0.75, 0.95), 75.0, 5.0), "embed": ((0.5, 0.95), 1.0, 150.0),
    "mudd_w1": ((0.9, 0.99), 0.25, 1.0), "mudd_w2": ((0.9, 0.99), 0.25, 1.0), "mudd_b2": ((0.9, 0.99), 0.25, 0.0),
    "mudd_gate_w1": ((0.9, 0.99), 0.1, 1.0), "mudd_gate_w2": ((0.9, 0.99), 0.1, 1.0),
    "mudd_gate_b2": ((0.9, 0.99), 0.1, 0.0), "_mudd_gate_scale": ((0.9, 0.99), 0.1, 0.0),
}
# HEAD's total NorMuon LR multipliers (L510-522): QK blocks 1, V and O 1, c_fc 2, c_proj 4
HEAD_MATRIX_LR = {"qkvo": 1.0, "fc": 2.0, "proj": 4.0}


def head_label(name):
    """The HEAD label of one of the stub's (the model's) parameter names."""
    if name.endswith(("qkvo_lambdas", "smear_lambda", "skip_weights")):
        return "scalars"  # HEAD's one scalars vector holds the attention lambdas, the smear and skip lambdas
    if name.startswith("value_embeds."):
        return "value_embeds"
    fixed = {"embed.weight": "embed", "lm_head.weight": "lm_head", "bigram.table": "bigram_embed",
             "smear_gate.weight": "smear_gate", "resid_lambdas": "resid_lambdas", "post_lambdas": "post_lambdas",
             "mudd.w1": "mudd_w1", "mudd.w2": "mudd_w2", "mudd.b2": "mudd_b2", "mudd_gates.w1": "mudd_gate_w1",
             "mudd_gates.w2": "mudd_gate_w2", "mudd_gates.b2": "mudd_gate_b2", "mudd_gates.scale": "_mudd_gate_scale"}
    return "ve_gate_bank" if name.endswith(".attn.ve_gate") else fixed.get(name)


def test_every_parameter_gets_its_row_of_heads_table():
    model = HeadStub()
    opt = Optimizer(model, make_plan(head_config()))
    groups = {id(p): (type(part).__name__, g) for part in opt.parts for g in part.param_groups for p in g["params"]}
    assert sorted(groups) == sorted(id(p) for p in model.parameters())  # each parameter in exactly one group
    seen = set()
    for name, p in model.named_parameters():
        kind, group = groups[id(p)]
        label = head_label(name)
        if label is None:  # a NorMuon matrix
            assert kind == "NorMuon", name
            continue
        seen.add(label)
        betas, lr_mul, wd_mul = HEAD_ADAM_TABLE[label]
        assert kind == "DistAdam", name
        assert tuple(group["betas"]) == betas, name
        assert group["lr"] == pytest.approx(0.008 * lr_mul), name
        assert group["cautious_decay"] == pytest.approx(0.005 * wd_mul), name
        assert group["eps"] == 1e-10
    assert seen == set(HEAD_ADAM_TABLE)  # the stub has every row


def expected_normuon_piece(p, g, lr, momentum, tall_as_head=False):
    """HEAD's NorMuon on one matrix (or block) at its first step, float64 but for the orthogonalisation (L189-192,
    L936-947, L869-932), with lr the effective LR (base x schedule x HEAD's multiplier): momentum from zero, Polar
    Express, the second moment reduced over the last dim when rows >= cols (else the second to last), the norm
    restored, cautious decay (mask O p >= 0) at 0.023 x 1.2 x lr. tall_as_head: p, g are c_proj as this project
    stores it, (d, 4d); HEAD stores it transposed, (4d, d), and that is the matrix it works on."""
    if tall_as_head:
        return expected_normuon_piece(p.T, g.T, lr, momentum).T
    p, g = p.double(), g.double()
    buf = (1 - momentum) * g
    u = (1 - momentum) * g + momentum * buf
    O = polar_express(u.float(), dtype=torch.float32).double()
    rows, cols = O.shape
    r = (O ** 2).mean(dim=-1 if rows >= cols else -2, keepdim=True)
    s = 0.1 * r  # 0.9 x 0 + 0.1 x r
    q = 1 / torch.sqrt(torch.clamp(s, min=1e-10))
    O = O * q * (O.norm() / (O * q).norm())
    mask = (O * p >= 0).double()
    return p - 0.023 * 1.2 * lr_factor(0) * lr * mask * p - lr * O


def test_normuon_step_takes_heads_blocks_statistics_and_lr_multipliers():
    """Step 0: NorMuon alone (Adam waits for the odd step). Q and K of each layer in blocks of 2 heads' rows, V and
    O whole, with one second-moment value per row of the square V and O; the total LR multipliers 1, 2 and 4."""
    model = HeadStub()
    before = snapshot(model)
    opt = Optimizer(model, make_plan(head_config()))
    train(model, opt, [0], [0])
    g = {n: coefficients(0, 0, 0)[n] + coefficients(0, 0, 1)[n] for n in before}
    after = snapshot(model)
    rows = 2 * HEAD_DIM
    for name, p0 in before.items():
        if head_label(name) is not None:
            assert torch.equal(after[name], p0), name  # Adam's parameters wait for step 1
            continue
        if name.endswith(".attn.qkvo"):
            expected = p0.double().clone()
            for m in range(4):  # Q, K: blocks of 2 heads' rows; V, O: whole
                height = rows if m < 2 else D
                for start in range(0, D, height):
                    piece = slice(start, start + height)
                    expected[m, piece] = expected_normuon_piece(p0[m, piece], g[name][m, piece], 0.023, 0.95)
        else:
            kind = "fc" if name.endswith(".mlp.fc.weight") else "proj"
            expected = expected_normuon_piece(p0, g[name], 0.023 * HEAD_MATRIX_LR[kind], 0.95, kind == "proj")
        error = (after[name].double() - expected).abs().max()
        assert error < 2e-6, (name, error)
    # Whole Q and K (and #46's statistic for a square matrix) give other results.
    for fields in (dict(normuon_qk_block_heads=0), dict(normuon_square_stat="column")):
        other = HeadStub()
        opt = Optimizer(other, make_plan(head_config(**fields)))
        train(other, opt, [0], [0])
        assert not torch.allclose(other.blocks[0].attn.qkvo, after["blocks.0.attn.qkvo"], atol=1e-5), fields


# --- the tied embedding and head -------------------------------------------------------------------------------


class WrittenOutAdam:
    """HEAD's Adam on one tensor (L828-865), float64: m, v from zero; the step count t; eps on the uncorrected sqrt(v);
    cautious decay lr^2 x 0.005 x wd_mul on the entries where update and weight agree in sign, strictly."""

    def __init__(self, p, betas, wd_mul):
        self.p, self.betas, self.wd_mul = p.double().clone(), betas, wd_mul
        self.m, self.v, self.t = torch.zeros_like(self.p), torch.zeros_like(self.p), 0

    def step(self, g, lr):
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * g.double()
        self.v = b2 * self.v + (1 - b2) * g.double() ** 2
        u = lr * math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t) * self.m / (self.v.sqrt() + 1e-10)
        mask = (u * self.p > 0).double()
        self.p = self.p - (u + lr * lr * 0.005 * self.wd_mul * mask * self.p)


def test_tied_phase_steps_the_head_on_both_gradients_then_the_embedding_takes_its_moments():
    plan = make_plan(head_config())
    assert plan.untie_step == 5
    model = HeadStub()
    opt = Optimizer(model, plan)
    head = WrittenOutAdam(model.lm_head.weight.detach(), (0.5, 0.95), 150.0)
    embed = None
    grads = {"embed": 0, "head": 0}

    def check(step):
        nonlocal embed
        c = [coefficients(step, 0, micro) for micro in range(2)]
        grads["embed"] = grads["embed"] + c[0]["embed.weight"] + c[1]["embed.weight"]
        grads["head"] = grads["head"] + c[0]["lm_head.weight"] + c[1]["lm_head.weight"]
        if step % 2 == 0:
            return  # Adam steps on odd steps, on the sum of two steps' gradients
        lr = 0.008 * lr_factor(step)
        if step <= 5:  # tied: one Adam step of the head on the sum of both gradients; the embedding is its copy
            head.step(grads["embed"] + grads["head"], lr)
            assert opt.tied == (step < 5)
            assert torch.equal(model.embed.weight, model.lm_head.weight)
            assert not opt.adam.state[model.embed.weight] or step == 5
        else:
            head.step(grads["head"], lr)
            embed.step(grads["embed"], lr)
            assert not torch.equal(model.embed.weight, model.lm_head.weight)
            assert torch.allclose(model.embed.weight.double(), embed.p, rtol=0, atol=1e-6)
        assert torch.allclose(model.lm_head.weight.double(), head.p, rtol=0, atol=1e-6), step
        grads["embed"] = grads["head"] = 0
        if step == 5:  # untied: the embedding's Adam state is the head's (step count and moments)
            embed = WrittenOutAdam(model.embed.weight.detach(), (0.5, 0.95), 150.0)
            embed.m, embed.v, embed.t = head.m.clone(), head.v.clone(), head.t
            s_embed, s_head = opt.adam.state[model.embed.weight], opt.adam.state[model.lm_head.weight]
            assert s_embed["step"] == s_head["step"] == 3
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(s_embed[key], s_head[key]) and s_embed[key] is not s_head[key]

    train(model, opt, range(10), [0], after=check)
    assert not opt.tied


def test_rewinding_the_local_state_ties_them_again():
    """The untimed warm-up runs past the untie step, then restores the initial state: tied again."""
    plan = make_plan(head_config())
    model = HeadStub()
    initial, params = Optimizer(model, plan), snapshot(model)
    saved = copy.deepcopy(initial.local_state())
    train(model, initial, range(8), [0])
    assert not initial.tied
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
    initial.load_local_state(saved)
    assert initial.tied and not initial.adam.state[model.embed.weight]
    train(model, initial, range(10), [0])
    fresh = HeadStub()
    train(fresh, Optimizer(fresh, plan), range(10), [0])
    for (n, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), n


# --- two ranks, and checkpoints across the untie and world sizes -----------------------------------------------

CHECKPOINTS = (2, 5, 6)  # after step 2 (tied, gradients pending), 5 (the untie), 6 (untied, gradients pending)


def _two_rank_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    plan = make_plan(head_config())
    model = HeadStub()
    opt = Optimizer(model, plan)
    opt.distribute(model)
    out = {"checkpoints": {}}

    def save(step):
        if step in CHECKPOINTS:
            out["checkpoints"][step] = (snapshot(model), opt.state_dict())  # a collective
        out.setdefault("tied_embed_equal", []).append(torch.equal(model.embed.weight, model.lm_head.weight))

    train(model, opt, range(10), [rank], after=save)
    out["final"] = snapshot(model)
    # Resumed on two ranks from the one-process checkpoints.
    one = torch.load(os.path.join(out_dir, "one.pt"))
    out["resumed_from_one"] = {}
    for step in CHECKPOINTS:
        resumed, opt = restored(*one[step], plan)
        train(resumed, opt, range(step + 1, 10), [rank])
        out["resumed_from_one"][step] = snapshot(resumed)
    if rank == 0:
        torch.save(out, os.path.join(out_dir, "two.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process given the two ranks' average gradient (its checkpoints saved), and two gloo ranks."""
    out_dir = tmp_path_factory.mktemp("head_optimizer")
    plan = make_plan(head_config())
    model = HeadStub()
    opt = Optimizer(model, plan)
    checkpoints = {}

    def save(step):
        if step in CHECKPOINTS:
            checkpoints[step] = (snapshot(model), opt.state_dict())

    train(model, opt, range(10), [0, 1], after=save)
    torch.save(checkpoints, out_dir / "one.pt")
    mp.start_processes(_two_rank_worker, args=(str(out_dir / "rendezvous"), str(out_dir)), nprocs=2,
                       start_method="fork")
    return dict(plan=plan, one_final=snapshot(model), one_checkpoints=checkpoints, two=torch.load(out_dir / "two.pt"))


def assert_same(a, b, exact=False):
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            assert torch.allclose(a[name], b[name], rtol=0, atol=2e-6), (name, (a[name] - b[name]).abs().max())


def test_two_ranks_give_one_process_result_through_the_untie(runs):
    two = runs["two"]
    # equal after steps 0-6 (the first update apart is step 7's, Adam's next), apart after 7-9
    assert two["tied_embed_equal"] == [True] * 7 + [False] * 3
    assert_same(two["final"], runs["one_final"])
    assert not torch.allclose(two["final"]["embed.weight"], HeadStub().embed.weight, atol=1e-3)


@pytest.mark.parametrize("step", CHECKPOINTS)
def test_a_checkpoint_resumes_exactly_across_the_untie_and_world_sizes(runs, step):
    params, state = runs["one_checkpoints"][step]
    assert state["embed_tied"] == (step < 5)
    # saved by one process, resumed by one: bit for bit
    model, opt = restored(params, state, runs["plan"])
    train(model, opt, range(step + 1, 10), [0, 1])
    assert_same(snapshot(model), runs["one_final"], exact=True)
    # saved by two ranks, resumed by one; saved by one, resumed by two
    model, opt = restored(*runs["two"]["checkpoints"][step], runs["plan"])
    train(model, opt, range(step + 1, 10), [0, 1])
    assert_same(snapshot(model), runs["one_final"])
    assert_same(runs["two"]["resumed_from_one"][step], runs["one_final"])
    if step == 2:  # a checkpoint that forgot the tie would step the embedding on its own at step 3
        model, opt = restored(params, dict(state, embed_tied=False), runs["plan"])
        train(model, opt, range(step + 1, 10), [0, 1])
        assert not torch.allclose(model.embed.weight, runs["one_final"]["embed.weight"], atol=1e-4)


# --- settings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    (dict(optimizer="muon", muon_orthogonalizer="newton_schulz", adam_every=1, normuon_qk_block_heads=0,
          normuon_square_stat="column", tied_head_stages=0), "--adam-table head need"),
    (dict(optimizer="muon", muon_orthogonalizer="newton_schulz", adam_every=1, adam_table="fields",
          adam_weight_decay=0.0, normuon_qk_block_heads=0, normuon_square_stat="column"), "--tied-head-stages need"),
    (dict(adam_table="lion"), "--adam-table lion is not one of fields, head"),
    (dict(normuon_square_stat="diagonal"), "--normuon-square-stat diagonal is not one of column, row"),
    (dict(adam_table="fields"), "--adam-weight-decay 0.005 .* needs --adam-table head"),
    (dict(adam_lr=-0.1), "--adam-lr -0.1 and --adam-weight-decay 0.005 must be >= 0"),
    (dict(normuon_qk_block_heads=3), "--normuon-qk-block-heads 3 must divide --num-heads 4"),
    (dict(merged_qkvo=False), "--normuon-qk-block-heads 2 .* needs --merged-qkvo true"),
    (dict(adam_every=4), "the untie step 5 is not an Adam step \\(--adam-every 4\\)"),
])
def test_settings_that_cannot_work_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        check_optimizer_config(head_config(**fields))


def test_a_tied_state_needs_the_tie_and_a_tie_needs_both_weights():
    model = HeadStub()
    state = Optimizer(model, make_plan(head_config())).state_dict()
    untied = Optimizer(model, make_plan(head_config(tied_head_stages=0)))
    with pytest.raises(ValueError, match="resume it with the --tied-head-stages it was saved with"):
        untied.load_state_dict(state)
    untied.load_state_dict(dict(state, embed_tied=False))  # the same state untied loads
    del model.embed
    with pytest.raises(ConfigError, match="needs both, of one shape"):
        Optimizer(model, make_plan(head_config()))


def test_the_fields_table_trains_heads_parameters_with_the_nearest_fields():
    model = HeadStub()
    roles = parameter_roles(model)  # every parameter has a role (or this raises)
    assert sum(len(v) for v in roles.values()) == len(list(model.parameters()))
    opt = Optimizer(model, make_plan(head_config(adam_table="fields", adam_weight_decay=0.0,
                                                 normuon_qk_block_heads=0, normuon_square_stat="column")))
    lrs = {g["role"]: g["lr"] for g in opt.adam.param_groups}
    assert lrs == {"embed": 0.6, "value_embeds": 0.6, "head": 0.008, "scalars": 0.04, "bigram": 0.6,
                   "resid_lambdas": 0.04, "post_lambdas": 0.04, "mudd_weights": 0.04, "mudd_biases": 0.04,
                   "mudd_gate_weights": 0.04, "mudd_gate_biases": 0.04}
    # one NorMuon group: the block matrices in the model's order, then the smear gate and the value-embedding gate
    names = {id(p): n for n, p in model.named_parameters()}
    [group] = opt.muon.param_groups
    assert [names[id(p)] for p in group["params"]] == [
        "blocks.0.attn.qkvo", "blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight", "blocks.1.attn.qkvo",
        "blocks.1.mlp.fc.weight", "blocks.1.mlp.proj.weight", "smear_gate.weight", "blocks.1.attn.ve_gate"]
