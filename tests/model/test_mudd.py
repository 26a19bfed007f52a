import math
import re

import pytest
import torch

from model.mudd import FINAL, LAST_LAYER, MuddConnections, MuddGates, StaticGates, gate_layout

LAYER10 = LAST_LAYER
# HEAD's two gate layouts (6 heads): the pre gate's layers 0-3, the post gate's 4-10
PRE_GATE = gate_layout(6, xsa=(1, 3), gated_attn=(3,), injections=(0, 1, 2, 3))
POST_GATE = gate_layout(6, xsa=(4, 7), gated_attn=(10,), injections=(4, 5, 7, 8, 9), skip=True, dc=(10,))

DIM = 8
SQRT_1_1 = math.sqrt(1.1)

# HEAD's stored biases (pre-scaled: the initial output divided by 0.1), index by index
HEAD_MUDD_B2 = [
    [0, 0, 0, 0, 0, 0, 20, 20, SQRT_1_1 / 0.1, 10, 0, 0.5, SQRT_1_1 / 0.1, 10],
    [0, -5, 0, 0, 0] + [0] * 9,
]
HEAD_GATE_B2 = [
    [0] * 12 + [2.5] * 6 + [0, 0.5] * 4 + [0] * 15,
    [0] * 12 + [2.5] * 6 + [0, 0.5] * 5 + [5] + [10] * 6 + [0] * 6,
]


def gelu(z):
    return 0.5 * z * (1 + math.erf(z / math.sqrt(2)))


def gelu_slope(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2))) + z * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def mlp_by_hand(w1, w2, b2, scale, x):
    """(W2 gelu(W1 x) + b2) * scale for one token, as nested loops over plain floats."""
    hidden = [gelu(sum(w1[j][i] * x[i] for i in range(len(x)))) for j in range(len(w1))]
    return [(sum(w2[o][j] * hidden[j] for j in range(len(hidden))) + b2[o]) * scale for o in range(len(w2))]


def randomised(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


def test_shapes_dtypes_and_names():
    mudd, gates = MuddConnections(DIM), MuddGates(DIM, PRE_GATE, POST_GATE)
    assert {n: tuple(p.shape) for n, p in mudd.named_parameters()} == {
        "w1": (2, 64, DIM), "w2": (2, 14, 64), "b2": (2, 14)}
    assert {n: tuple(p.shape) for n, p in gates.named_parameters()} == {
        "w1": (2, 64, DIM), "w2": (2, 41, 64), "b2": (2, 41), "scale": ()}
    assert all(p.dtype == torch.float32 for p in [*mudd.parameters(), *gates.parameters()])
    assert (LAYER10.width, FINAL.width, PRE_GATE.width, POST_GATE.width) == (14, 5, 26, 41)
    x = torch.randn(3, 5, DIM)
    for outputs, layout in ((mudd.last_layer(x), LAYER10), (mudd.final(x), FINAL), (gates.pre(x), PRE_GATE),
                            (gates.post(x), POST_GATE)):
        assert list(outputs) == list(layout.slices)
        widths = {name: s.stop - s.start for name, s in layout.slices.items()}
        assert {name: tuple(v.shape) for name, v in outputs.items()} == {n: (3, 5, w) for n, w in widths.items()}


def test_init_matches_head():
    torch.manual_seed(0)
    mudd, gates = MuddConnections(DIM), MuddGates(DIM, PRE_GATE, POST_GATE)
    torch.testing.assert_close(mudd.b2, torch.tensor(HEAD_MUDD_B2, dtype=torch.float32), rtol=0, atol=0)
    torch.testing.assert_close(gates.b2, torch.tensor(HEAD_GATE_B2, dtype=torch.float32), rtol=0, atol=0)
    assert not mudd.w2.any() and not gates.w2.any() and gates.scale.item() == pytest.approx(0.1)
    bound = 1 / math.sqrt(DIM)  # Kaiming uniform with a = sqrt(5): sqrt(2 / 6) * sqrt(3 / fan_in)
    for w1 in (mudd.w1, gates.w1):
        assert w1.abs().max() <= bound and w1.abs().max() > 0.8 * bound
    # each of the two MLPs drawn in turn from the global generator, as nn.Linear would draw them
    torch.manual_seed(7)
    drawn = MuddConnections(DIM).w1
    torch.manual_seed(7)
    expected = [torch.nn.Linear(DIM, 64, bias=False).weight for _ in range(2)]
    assert torch.equal(drawn[0], expected[0]) and torch.equal(drawn[1], expected[1])


def test_named_slices_are_heads_positions():
    assert PRE_GATE.slices["xsa1"] == slice(0, 6) and PRE_GATE.slices["xsa3"] == slice(6, 12)
    assert PRE_GATE.slices["attn_gate3"] == slice(12, 18)
    assert [PRE_GATE.slices[f"x0_{i}"].start for i in range(4)] == [18, 20, 22, 24]
    assert [PRE_GATE.slices[f"bigram_{i}"].start for i in range(4)] == [19, 21, 23, 25]
    assert POST_GATE.slices["xsa4"] == slice(0, 6) and POST_GATE.slices["xsa7"] == slice(6, 12)
    assert POST_GATE.slices["attn_gate10"] == slice(12, 18)
    assert [POST_GATE.slices[f"x0_{i}"].start for i in (4, 5, 7, 8, 9)] == [18, 20, 22, 24, 26]
    assert [POST_GATE.slices[f"bigram_{i}"].start for i in (4, 5, 7, 8, 9)] == [19, 21, 23, 25, 27]
    assert POST_GATE.slices["skip"] == slice(28, 29)
    assert POST_GATE.slices["dc_w1_10"] == slice(29, 35) and POST_GATE.slices["dc_w2_10"] == slice(35, 41)
    assert [LAYER10.slices[n].start for n in ("value_stream0", "value_source", "value_x", "stream0",
                                             "source", "x_extra", "value_embed_gate", "resid_attn",
                                             "post_attn", "x0", "bigram", "resid_mlp", "post_mlp")] == \
        [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13]
    assert LAYER10.slices["value_embed_gate"] == slice(6, 8)
    assert list(FINAL.slices) == ["stream0", "source", "before_last", "value_embed0", "skip_source"]


DOCUMENTED_INITIAL = {
    "xsa": 0.0, "attn_gate": 0.25, "x0": 0.0, "bigram": 0.05, "skip": 0.5, "dc_w1": 1.0, "dc_w2": 0.0,
}


def documented(name):
    if name in LAYER10.slices and name not in ("x0", "bigram"):
        return {"value_embed_gate": 2.0, "resid_attn": SQRT_1_1, "post_attn": 1.0, "resid_mlp": SQRT_1_1,
                "post_mlp": 1.0}.get(name, 0.0)
    return DOCUMENTED_INITIAL[name if name in DOCUMENTED_INITIAL else re.sub(r"_?\d+$", "", name)]


@pytest.mark.parametrize("shape", [(1, 4, DIM), (7, DIM)])
def test_initial_outputs_are_the_documented_values_at_any_input(shape):
    mudd, gates = MuddConnections(DIM), MuddGates(DIM, PRE_GATE, POST_GATE)
    x = 10 * torch.randn(shape)
    final = {"stream0": 0.0, "source": -0.5, "before_last": 0.0, "value_embed0": 0.0, "skip_source": 0.0}
    cases = [(mudd.last_layer(x), documented), (mudd.final(x), final.__getitem__), (gates.pre(x), documented),
             (gates.post(x), documented)]
    for outputs, initial in cases:
        for name, value in outputs.items():
            torch.testing.assert_close(value, torch.full_like(value, initial(name)), rtol=1e-6, atol=1e-7)


def test_outputs_are_the_formula_written_out():
    mudd, gates = randomised(MuddConnections(DIM).double()), randomised(MuddGates(DIM, PRE_GATE, POST_GATE).double(), seed=1)
    x = torch.randn(2, 3, DIM, dtype=torch.float64)
    cases = [(mudd.last_layer(x), mudd, 0, LAYER10, 0.1), (mudd.final(x), mudd, 1, FINAL, 0.1),
             (gates.pre(x), gates, 0, PRE_GATE, gates.scale.item()),
             (gates.post(x), gates, 1, POST_GATE, gates.scale.item())]
    for outputs, module, k, layout, scale in cases:
        w1, w2, b2 = module.w1[k].tolist(), module.w2[k, : layout.width].tolist(), module.b2[k].tolist()
        for b in range(2):
            for t in range(3):
                expected = mlp_by_hand(w1, w2, b2, scale, x[b, t].tolist())
                for name, s in layout.slices.items():
                    torch.testing.assert_close(outputs[name][b, t].tolist(), expected[s], rtol=1e-12, atol=1e-12)


def test_at_init_w1_gets_no_gradient_and_the_rest_does():
    gates = MuddGates(DIM, PRE_GATE, POST_GATE)
    x = torch.randn(4, DIM)
    weights = torch.randn(4, POST_GATE.width)
    out = torch.cat(list(gates.post(x).values()), dim=-1)
    (out * weights).sum().backward()
    assert not gates.w1.grad.any()  # W2 = 0: nothing flows back into the hidden layer
    assert gates.w2.grad[1].any() and gates.b2.grad[1].any() and gates.scale.grad != 0
    assert not gates.w2.grad[0].any() and not gates.b2.grad[0].any()  # the pre MLP was not used
    # d/d b2 = scale * sum over tokens of the weights; d/d scale = sum of weights * (b2 + 0)
    torch.testing.assert_close(gates.b2.grad[1], 0.1 * weights.sum(0))
    torch.testing.assert_close(gates.scale.grad, (weights * gates.b2[1].detach()).sum())

    mudd = MuddConnections(DIM)
    sum(v.sum() for v in mudd.final(x).values()).backward()
    assert not mudd.w1.grad.any() and mudd.b2.grad[1, :5].any()
    assert not mudd.w2.grad[1, 5:].any() and not mudd.b2.grad[1, 5:].any()  # rows past FINAL's 5 are unused


def test_w1_gradient_through_w2_written_out():
    mudd = randomised(MuddConnections(DIM).double(), seed=3)
    x = torch.randn(2, DIM, dtype=torch.float64)
    weights = torch.randn(2, LAYER10.width, dtype=torch.float64)
    out = torch.cat(list(mudd.last_layer(x).values()), dim=-1)
    (out * weights).sum().backward()
    w1, w2 = mudd.w1[0].tolist(), mudd.w2[0].tolist()
    for j in (0, 17, 63):
        for i in (0, 5):
            expected = 0.0
            for t in range(2):
                z = sum(w1[j][m] * x[t, m].item() for m in range(DIM))
                upstream = sum(weights[t, o].item() * 0.1 * w2[o][j] for o in range(LAYER10.width))
                expected += upstream * gelu_slope(z) * x[t, i].item()
            assert mudd.w1.grad[0, j, i].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert not mudd.w1.grad[1].any()


def test_static_gates_are_learned_constants_at_the_documented_initial_values():
    """The MUDD gate's ablation: the same named outputs, one learned value each whatever the input."""
    gates = StaticGates(PRE_GATE, POST_GATE)
    for layout, outputs in ((PRE_GATE, gates.pre(torch.randn(3, DIM))), (POST_GATE, gates.post(torch.randn(3, DIM)))):
        assert list(outputs) == list(layout.slices)
        for name, value in outputs.items():
            assert value.shape == (layout.slices[name].stop - layout.slices[name].start,)
            torch.testing.assert_close(value, torch.full_like(value, documented(name)))
    assert [name for name, _ in gates.named_parameters()] == ["b2"]
