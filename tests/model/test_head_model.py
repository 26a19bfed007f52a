"""The leaderboard HEAD's model (the speedrun preset): its layout, and its residual stream written out
with every branch replaced by a known function, so the wiring is checked apart from the branches
(those have their own tests: test_attention_ops, test_mudd, test_bigram, test_loss)."""
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from config import PRESETS, Config, ConfigError, make_plan
from model.bigram import bigram_hash_ids, bigram_sign_ids
from model.gpt import GPT, check_model_config

VOCAB = 256


def head_model(preset="speedrun", **overrides):
    """The preset's model at a small width: 6 heads of 16 (HEAD's gate layouts are per head)."""
    base = dict(model_dim=96, num_heads=6, vocab_size=VOCAB, bos_token=0, bigram_rows=1001, seq_len=64,
                window_block=16, dc_window=16, numerics="float32", fp8_head=False, fp8_mlp=False,
                mantissa_weights=False)
    if preset == "cpu-tiny":
        base.update(model_dim=64, num_heads=2, dc_window=8)
    config = dataclasses.replace(Config(**PRESETS[preset]), **{**base, **overrides})
    torch.manual_seed(0)
    plan = make_plan(config)
    model = GPT(plan)
    model.set_windows(plan.windows_at(0))
    return model


def test_the_speedrun_layout_is_heads():
    model = head_model()
    layout = model.layout
    attention = [i for i, b in enumerate(model.blocks) if b.attn is not None]
    assert len(model.blocks) == 11 and attention == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10]
    attn = {i: model.blocks[i].attn for i in attention}
    assert [i for i in attention if attn[i].paired] == [0, 2, 5, 9]
    assert [i for i in attention if attn[i].key_offset] == [3, 10]  # the long windows
    assert [i for i in attention if attn[i].xsa] == [1, 3, 4, 7]
    assert [i for i in attention if attn[i].dc_window] == [10]
    assert [i for i in attention if attn[i].ve_gate is not None] == [1, 2, 8, 9]  # 10's gate is MUDD's
    assert layout.attn_input == {8: 7, 9: 7, 10: 7} and layout.skip == (3, 6) and layout.mudd_layer == 10
    pre, post = layout.gate_layouts
    assert (pre.width, post.width) == (26, 41)  # HEAD's gate MLPs at 6 heads
    assert list(pre.slices)[:3] == ["xsa1", "xsa3", "attn_gate3"] and "attn_gate10" in post.slices
    assert [n for n in post.slices if n.startswith("x0_")] == ["x0_4", "x0_5", "x0_7", "x0_8", "x0_9"]
    assert model.mudd.w2.shape == (2, 14, 64) and model.mudd_gates.w2.shape == (2, 41, 64)
    assert model.resid_lambdas.shape == model.post_lambdas.shape == (11, 2)
    assert torch.allclose(model.resid_lambdas, torch.full((11, 2), 1.1 ** 0.5))
    assert not hasattr(model.blocks[1], "residual_mix") or model.blocks[1].residual_mix is None
    assert model.rotary.adjacent_pairs and model.backout_lambda is None
    # the head starts small and random, tied to the embedding; the value embeddings N(0, 0.01^2)
    assert 0.004 < model.lm_head.weight.std() < 0.006 and torch.equal(model.embed.weight, model.lm_head.weight)
    assert 0.008 < model.value_embeds[0].weight.std() < 0.012


class Linear(nn.Module):
    """A branch replaced by a fixed random linear map; attention's also records its extras."""

    def __init__(self, dim, seed, attention):
        super().__init__()
        self.weight = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed)) / dim ** 0.5
        self.attention, self.extras = attention, None

    def forward(self, x, *args):
        if self.attention:
            self.extras = args[-1]
            return x @ self.weight.T, None
        return x @ self.weight.T


def randomise(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("preset", ["speedrun", "cpu-tiny"])
def test_the_residual_stream_is_heads_written_out(preset):
    model = head_model(preset).eval()
    c, layout = model.config, model.layout
    for i, block in enumerate(model.blocks):
        if block.attn is not None:
            block.attn = Linear(c.model_dim, 100 + i, attention=True)
        block.mlp = Linear(c.model_dim, 200 + i, attention=False)
    for module, seed in ((model.mudd, 1), (model.mudd_gates, 2), (model.bigram, 3)):
        randomise(module, seed)
    with torch.no_grad():
        model.resid_lambdas.add_(0.1 * torch.randn(model.resid_lambdas.shape))
        model.post_lambdas.add_(0.1 * torch.randn(model.post_lambdas.shape))
        model.skip_weights.fill_(0.3)
    idx = torch.randint(1, VOCAB, (2, 64), generator=torch.Generator().manual_seed(4))
    idx[:, 0] = idx[1, 30] = 0

    def norm(x):
        return F.rms_norm(x, (x.size(-1),))

    with torch.no_grad():
        x0 = norm(model.embed(idx))  # the smear starts off (lambda 0)
        ve = [table(idx) for table in model.value_embeds]
        bigram = model.bigram(bigram_hash_ids(idx, c.bigram_rows), bigram_sign_ids(idx, c.bigram_sign_rows))
        g = dict(model.mudd_gates.pre(x0))
        r, p = model.resid_lambdas, model.post_lambdas
        x = x0 + g["bigram_0"] * bigram
        stream0, after, last = x, {}, c.num_layers - 1
        source, (skip_from, skip_to) = max(layout.attn_input.values()), layout.skip
        for i, block in enumerate(model.blocks):
            if i == c.mudd_gate_layer:
                g.update(model.mudd_gates.post(x))
            if i == skip_to:
                x = x + torch.sigmoid(model.skip_weights[0]) * g["skip"] * after[skip_from]
            if block.attn is not None:
                attn_in = norm(after[layout.attn_input[i]] if i in layout.attn_input else x)
                if i == last:
                    mu, before_last = model.mudd.last_layer(x), x
                    x = (1 + mu["x_extra"]) * x + mu["stream0"] * stream0 + mu["source"] * after[source]
                    a = attn_in @ block.attn.weight.T
                    x = mu["resid_attn"] * x + mu["post_attn"] * a + mu["x0"] * stream0 + mu["bigram"] * bigram
                else:
                    a = attn_in @ block.attn.weight.T
                    x = r[i, 0] * x + p[i, 0] * a + g[f"x0_{i}"] * x0 + (g[f"bigram_{i}"] * bigram if i else 0)
            m = norm(x) @ block.mlp.weight.T
            x = mu["resid_mlp"] * x + mu["post_mlp"] * m if i == last else r[i, 1] * x + p[i, 1] * m
            after[i] = x
        f = model.mudd.final(x)
        x = (x + f["stream0"] * stream0 + f["source"] * after[source] + f["before_last"] * before_last
             + f["value_embed0"] * ve[0] + f["skip_source"] * after[skip_from])
        expected = model.head(norm(x))
        got = model(idx)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # each attention layer got its gates, and the MUDD layer its value inputs
    for i, block in enumerate(model.blocks):
        if block.attn is None:
            continue
        extras = block.attn.extras
        assert ("xsa" in extras) == (i in layout.xsa) and ("attn_gate" in extras) == (i in layout.gated_attn)
        assert ("dc" in extras) == (i in layout.dc) and ("value_add" in extras) == (i == last)
    mu = model.mudd.last_layer(before_last)
    value_add = mu["value_stream0"] * stream0 + mu["value_source"] * after[source] + mu["value_x"] * before_last
    torch.testing.assert_close(model.blocks[last].attn.extras["value_add"], value_add)


@pytest.mark.parametrize("overrides, message", [
    (dict(residual="block"), "need --residual sublayer"),
    (dict(xsa_layers="6"), "have no attention"),
    (dict(dc_layers="0"), "paired-head layer"),
    (dict(attn_input_layers="8:9"), "comes after it"),
    (dict(backout_layer="8"), "--mudd needs"),
    (dict(mudd_gate_layer=7), "skip's gate"),
    (dict(num_heads=3, model_dim=96), "even --num-heads"),
])
def test_head_settings_that_cannot_work_are_refused(overrides, message):
    config = dataclasses.replace(Config(**PRESETS["speedrun"]), **overrides)
    with pytest.raises(ConfigError, match=message):
        check_model_config(make_plan(config))


def test_static_gates_replace_the_gate_mlps_with_learned_constants():
    """--mudd-gates false, the MUDD gate's ablation: the same gates, one learned value each."""
    model = head_model(mudd_gates=False)
    assert [n for n, _ in model.mudd_gates.named_parameters()] == ["b2"]
    idx = torch.randint(1, VOCAB, (1, 64), generator=torch.Generator().manual_seed(5))
    loss = model(idx, idx.roll(-1, 1), reduction="sum")
    loss.backward()
    assert model.mudd_gates.b2.grad.abs().sum() > 0


@pytest.mark.parametrize("numerics", ["float32", "record"])
def test_the_training_loss_in_slices_equals_it_in_one_piece(numerics, monkeypatch):
    """HEAD's loss goes in slices of a row (recomputed in the backward): the same loss and gradients,
    the multi-token terms of a slice's last positions reaching into the next slice's targets."""
    import model.gpt as gpt_module

    model = head_model(numerics=numerics)
    model.prefix_table = torch.randint(-1, VOCAB, (VOCAB,), generator=torch.Generator().manual_seed(6))
    model.set_loss_weights((1.0, 0.5, 0.25), 0.25)
    idx = torch.randint(1, VOCAB, (2, 64), generator=torch.Generator().manual_seed(7))
    targets = idx.roll(-1, 1)
    results = []
    for slice_tokens in (64, 24):  # one slice; slices of 24, 24 and 16
        monkeypatch.setattr(gpt_module, "LOSS_SLICE_TOKENS", slice_tokens)
        model.zero_grad()
        loss = model(idx, targets, reduction="sum")
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (whole, whole_grads), (sliced, sliced_grads) = results
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-4)
    assert whole_grads.keys() == sliced_grads.keys()
    for name in whole_grads:
        a, b = sliced_grads[name].float(), whole_grads[name].float()
        if whole_grads[name].dtype == torch.bfloat16:
            # bf16 gradients (the record's tables and head) are summed slice by slice, each slice's
            # rounded to bf16, where one piece rounds once: equal to bf16's precision, as a whole
            assert (a - b).norm() <= 1e-2 * b.norm(), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
