"""The leaderboard HEAD's MUDD modules: small per-token MLPs that output named coefficients.

MUDD (multiway dynamic dense connections, record #81, arXiv:2502.12170) computes, from the
residual stream at a point, per-token weights with which later code mixes earlier snapshots of
the stream. The MUDD gate (record #85) uses the same kind of MLP for the per-token gates of the
earlier layers: XSA strengths, attention output gates, x0 and bigram injections, the U-net skip
and the DC-MHA weights. Every MLP here is

    out(x) = (W2 gelu(W1 x) + b2) * scale,     W1: (64, dim), W2: (outputs, 64), b2: (outputs,),

with the exact (erf) gelu and no bias on W1. W1 has nn.Linear's default init (Kaiming uniform,
a = sqrt(5): U(+-1/sqrt(dim))); W2 is zero, so every output starts at its bias times the scale
whatever x is, and W1 receives no gradient until W2 has moved. The biases are stored divided by
the initial scale (0.1), so that `initial` below is what comes out at init; scale is a constant
0.1 for MUDD and one learnable scalar (init 0.1) shared by both gate MLPs.

Each module stacks its two MLPs in one tensor per weight, as HEAD does (HEAD names: mudd_w1
(2, 64, 768), mudd_w2 (2, 14, 64), mudd_b2 (2, 14); mudd_gate_w1 (2, 64, 768), mudd_gate_w2
(2, 41, 64), mudd_gate_b2 (2, 41), _mudd_gate_scale ()); an MLP with fewer outputs than its
stack's width uses the first rows of W2 and b2, and the rest stay zero. HEAD keeps the stacks in
bfloat16 and the gate scale in float32, cast to the input's dtype; here so under --numerics record,
all float32 otherwise.

The outputs come back as a dict of named views `out[..., a:b]` (the last dim kept, so a width-1
coefficient broadcasts over channels): `gate["xsa_layer1"]` instead of `gate[..., 0:6]`. The
layouts follow HEAD (init_mudd L1352-1395, forward_mudd L1397-1401, init_mudd_gate and its
unpacking L1436-1484; uses at L1551-1557, L1580-1590, L1601-1609, L1634-1636, L1666, L1677-1680).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

HIDDEN = 64
INITIAL_SCALE = 0.1


class OutputLayout:
    """The named slices of an MLP's outputs: (name, width, initial value) in output order."""

    def __init__(self, fields):
        self.slices, self.initial, start = {}, {}, 0
        for name, width, initial in fields:
            self.slices[name] = slice(start, start + width)
            self.initial[name] = initial
            start += width
        self.width = start

    def initial_values(self):
        """The initial value of each output channel, in order."""
        return [self.initial[name] for name, s in self.slices.items() for _ in range(s.stop - s.start)]

    def split(self, out):
        return {name: out[..., s] for name, s in self.slices.items()}


def gate_layout(heads, xsa=(), gated_attn=(), injections=(), skip=False, dc=()):
    """The outputs of one gate MLP, in HEAD's order: per XSA layer its heads' strengths (0), per gated
    layer its heads' output gates (0.25, no sigmoid), per injecting layer (x0 gate 0, bigram gate 0.05),
    the U-net skip's gate (0.5), per DC layer its head-mixing weights w1 (1.0) and output weights w2 (0).

    HEAD's pre gate (from x0): xsa (1, 3), gated (3,), injections (0, 1, 2, 3); its post gate (from the
    stream entering layer 4): xsa (4, 7), gated (10,), injections (4, 5, 7, 8, 9), skip, dc (10,).
    After layer i's attention, x += x0_i * x0 and x[:bigram_dim] += bigram_i * bigram; layer 0's bigram
    gate scales the injection before layer 0 instead (HEAD L1562, L1638-1640).
    """
    return OutputLayout([*((f"xsa{i}", heads, 0.0) for i in xsa),
                         *((f"attn_gate{i}", heads, 0.25) for i in gated_attn),
                         *(field for i in injections for field in ((f"x0_{i}", 1, 0.0), (f"bigram_{i}", 1, 0.05))),
                         *((("skip", 1, 0.5),) if skip else ()),
                         *((f"dc_w1_{i}", heads, 1.0) for i in dc),
                         *((f"dc_w2_{i}", heads, 0.0) for i in dc)])


# MUDD at the start of the last layer, from x = the stream entering it. stream0 is the stream
# entering layer 0 (x0 plus the gated bigram); source is the stream after the layer whose norm the
# last layers' attention reads (HEAD: layer 7).
LAST_LAYER = OutputLayout([
    ("value_stream0", 1, 0.0),  # the layer's V += value_stream0 * stream0 + value_source * source
    ("value_source", 1, 0.0),  # + value_x * x (viewed as heads), L1604
    ("value_x", 1, 0.0),
    ("stream0", 1, 0.0),  # x <- (1 + x_extra) * x + stream0 * stream0 + source * source, L1605
    ("source", 1, 0.0),
    ("x_extra", 1, 0.0),
    ("value_embed_gate", 2, 2.0),  # two lanes, each the gate of half the heads' value embedding, L1606-1609
    ("resid_attn", 1, math.sqrt(1.1)),  # after attention: x = resid_attn * x + post_attn * attn_out
    ("post_attn", 1, 1.0),  # + x0 * stream0, L1635
    ("x0", 1, 0.0),
    ("bigram", 1, 0.05),  # x[:bigram_dim] += bigram * bigram embedding, L1636
    ("resid_mlp", 1, math.sqrt(1.1)),  # after the MLP: x = resid_mlp * x + post_mlp * mlp_out, L1666
    ("post_mlp", 1, 1.0),
])

# MUDD after the last layer (L1677-1680): x += the sum of these times their sources. source starts
# at -0.5: record #46's backout, x -= 0.5 * (stream after layer 7), absorbed.
FINAL = OutputLayout([
    ("stream0", 1, 0.0),
    ("source", 1, -0.5),
    ("before_last", 1, 0.0),  # the stream entering the last layer
    ("value_embed0", 1, 0.0),  # value embedding table 0 of the tokens
    ("skip_source", 1, 0.0),  # the stream after the U-net skip's source layer
])


class _StackedMLPs(nn.Module):
    """One MLP per layout, stacked: w1 (n, 64, dim), w2 (n, widest, 64), b2 (n, widest)."""

    def __init__(self, model_dim, layouts):
        super().__init__()
        self.layouts = layouts
        width = max(layout.width for layout in layouts)
        self.w1 = nn.Parameter(torch.empty(len(layouts), HIDDEN, model_dim))
        for w in self.w1.data:  # drawn one MLP after the other, as HEAD draws them
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.w2 = nn.Parameter(torch.zeros(len(layouts), width, HIDDEN))
        # the initial values divided by the initial scale in Python floats, as HEAD computes them
        bias = torch.zeros(len(layouts), width)
        for k, layout in enumerate(layouts):
            bias[k, : layout.width] = torch.tensor([v / INITIAL_SCALE for v in layout.initial_values()])
        self.b2 = nn.Parameter(bias)

    def outputs(self, x, k, scale):
        """MLP k's named outputs for x (..., dim): a dict of (..., width) views."""
        n = self.layouts[k].width
        hidden = F.gelu(F.linear(x, self.w1[k].type_as(x)))  # weights stored in bf16 under --numerics record
        return self.layouts[k].split((F.linear(hidden, self.w2[k, :n].type_as(x)) + self.b2[k, :n].type_as(x)) * scale)


class MuddConnections(_StackedMLPs):
    """HEAD's two MUDD MLPs (record #81), scale a constant 0.1: last_layer(x) has the LAST_LAYER
    outputs, final(x) the FINAL ones."""

    def __init__(self, model_dim):
        super().__init__(model_dim, (LAST_LAYER, FINAL))

    def last_layer(self, x):
        return self.outputs(x, 0, INITIAL_SCALE)

    def final(self, x):
        return self.outputs(x, 1, INITIAL_SCALE)


class MuddGates(_StackedMLPs):
    """HEAD's MUDD gate stack (record #85): pre(x0) has the pre layout's outputs, post(x) the post
    one's; both are multiplied by one learnable scalar `scale` (init 0.1), cast to x's dtype."""

    def __init__(self, model_dim, pre_layout, post_layout):
        super().__init__(model_dim, (pre_layout, post_layout))
        self.scale = nn.Parameter(torch.tensor(INITIAL_SCALE))

    def pre(self, x0):
        return self.outputs(x0, 0, self.scale.type_as(x0))

    def post(self, x):
        return self.outputs(x, 1, self.scale.type_as(x))


class StaticGates(nn.Module):
    """The same named gates as learned constants, one value per output whatever the token (the
    ablation of the MUDD gate): b2 (2, widest) starts at the layouts' initial values."""

    def __init__(self, pre_layout, post_layout):
        super().__init__()
        self.layouts = (pre_layout, post_layout)
        width = max(layout.width for layout in self.layouts)
        bias = torch.zeros(2, width)
        for k, layout in enumerate(self.layouts):
            bias[k, : layout.width] = torch.tensor(layout.initial_values())
        self.b2 = nn.Parameter(bias)

    def pre(self, x0):
        return self.layouts[0].split(self.b2[0, : self.layouts[0].width].type_as(x0))

    def post(self, x):
        return self.layouts[1].split(self.b2[1, : self.layouts[1].width].type_as(x))
