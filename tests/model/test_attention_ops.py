"""model/attention_ops.py against each formula written out with loops over positions and heads."""
import math

import pytest
import torch

from model.attention_ops import (attention_output_gate, dc_attention, dc_band_probabilities, dc_correction,
                                 dc_mixing_weights, deinterleave_pairs, gated_value_embedding, interleave_pairs,
                                 interleaved_doc_ids, learnable_xsa, offset_stationary_keys,
                                 paired_attention_reference, paired_positions)
from model.rotary import Rotary

HEADS, DIM, SEQ = 4, 8, 12
DOC_IDS = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2],
                        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def frequency(j, head_dim):
    """HEAD's angular frequency of pair j: log-spaced over the first head_dim/4 pairs, then zero."""
    count = head_dim // 4
    return (1 / 1024) ** (j / (count - 1)) if j < count else 0.0


def rotated_by_loop(x, position_of, head_dim):
    """x (batch, seq, heads, head_dim); every pair (2j, 2j+1) turned by position * frequency."""
    out = torch.empty_like(x)
    batch, seq_len, heads, _ = x.shape
    for b in range(batch):
        for t in range(seq_len):
            for h in range(heads):
                for j in range(head_dim // 2):
                    angle = position_of(t, h) * frequency(j, head_dim)
                    a, c = x[b, t, h, 2 * j].item(), x[b, t, h, 2 * j + 1].item()
                    out[b, t, h, 2 * j] = a * math.cos(angle) + c * math.sin(angle)
                    out[b, t, h, 2 * j + 1] = c * math.cos(angle) - a * math.sin(angle)
    return out


# ---------------------------------------------------------------------------------------------------
# Rotary: HEAD's form is model.rotary.Rotary with adjacent pairs, and per-head positions in paired layers

def head_rotary(head_dim, bf16_tables=False):
    return Rotary(head_dim, base=1024, truncated=True, bf16_tables=bf16_tables, adjacent_pairs=True)


def test_rotary_turns_adjacent_pairs_and_keeps_the_second_half():
    x = randn(2, SEQ, HEADS, DIM)
    out = head_rotary(DIM)(x)
    torch.testing.assert_close(out, rotated_by_loop(x, lambda t, h: t, DIM), rtol=0, atol=1e-5)
    assert torch.equal(out[..., DIM // 2:], x[..., DIM // 2:])


def test_rotary_with_bfloat16_tables_rotates_by_the_rounded_cos_and_sin():
    x = randn(1, SEQ, HEADS, DIM)
    out = head_rotary(DIM, bf16_tables=True)(x)
    for t in (0, 5, 11):
        for j in range(DIM // 2):
            angle = torch.tensor(t * frequency(j, DIM), dtype=torch.float32)
            cos, sin = angle.cos().bfloat16().float(), angle.sin().bfloat16().float()
            a, c = x[0, t, 1, 2 * j], x[0, t, 1, 2 * j + 1]
            torch.testing.assert_close(out[0, t, 1, 2 * j], a * cos + c * sin, rtol=0, atol=1e-6)
            torch.testing.assert_close(out[0, t, 1, 2 * j + 1], c * cos - a * sin, rtol=0, atol=1e-6)


def test_paired_positions_are_2t_for_even_heads_and_2t_plus_1_for_odd():
    positions = paired_positions(SEQ, 6)
    for t in range(SEQ):
        assert positions[t].tolist() == [2 * t, 2 * t + 1] * 3


def test_paired_rotary_rotates_each_head_at_its_paired_position():
    x = randn(1, SEQ, HEADS, DIM)
    out = head_rotary(DIM)(x, paired_positions(SEQ, HEADS))
    expected = rotated_by_loop(x, lambda t, h: 2 * t + h % 2, DIM)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_paired_rotary_is_a_rotary_of_head_pairs_joined_end_to_end():
    """HEAD's form: heads (2p, 2p+1) as one vector of 2 head_dim, halves at positions 2t and 2t+1."""
    x = randn(1, SEQ, HEADS, DIM)
    frequencies = torch.tensor([frequency(i // 2, DIM) for i in range(DIM)])
    joined = x.reshape(1, SEQ, HEADS // 2, 2 * DIM)
    t = torch.arange(SEQ, dtype=torch.float32)[:, None]
    angles = torch.cat((2 * t * frequencies, (2 * t + 1) * frequencies), dim=-1)[None, :, None, :]
    sign = torch.tensor([1.0, -1.0]).repeat(DIM)
    swapped = torch.stack((joined[..., 1::2], joined[..., 0::2]), dim=-1).flatten(-2)
    expected = (angles.cos() * joined + sign * angles.sin() * swapped).reshape(x.shape)
    torch.testing.assert_close(head_rotary(DIM)(x, paired_positions(SEQ, HEADS)), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Paired-head attention

def test_interleaving_puts_head_i_half_plus_p_of_token_t_at_token_2t_plus_i_slot_p():
    x = randn(2, SEQ, 6, DIM)
    inter = interleave_pairs(x)
    assert inter.shape == (2, 2 * SEQ, 3, DIM)
    for b in range(2):
        for t in range(SEQ):
            for i in range(2):
                for p in range(3):
                    assert torch.equal(inter[b, 2 * t + i, p], x[b, t, 3 * i + p])
    assert torch.equal(deinterleave_pairs(inter), x)
    assert interleaved_doc_ids(DOC_IDS)[0].tolist() == [d for d in DOC_IDS[0].tolist() for _ in range(2)]


@pytest.mark.parametrize("window", [None, 0, 3, 7])
def test_paired_attention_against_a_loop_over_the_interleaved_mask(window):
    q, k, v = (randn(2, SEQ, HEADS, DIM, seed=s) for s in range(3))
    scale = 0.3
    out = paired_attention_reference(q, k, v, DOC_IDS, window, scale)
    half = HEADS // 2
    expected = torch.empty_like(out)
    for b in range(2):
        for t in range(SEQ):
            for h in range(HEADS):
                i, p = divmod(h, half)
                query = 2 * t + i  # position in the interleaved sequence
                keys = []  # (token, head) of each key the query may attend to
                for key in range(query + 1):
                    same_doc = DOC_IDS[b, key // 2] == DOC_IDS[b, t]
                    in_window = window is None or query - key <= window
                    if same_doc and in_window:
                        keys.append((key // 2, (key % 2) * half + p))
                scores = torch.stack([scale * (q[b, t, h] @ k[b, s, g]) for s, g in keys])
                weights = scores.exp() / scores.exp().sum()
                expected[b, t, h] = sum(w * v[b, s, g] for w, (s, g) in zip(weights, keys))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_second_head_of_a_pair_sees_the_first_heads_key_at_its_own_token():
    """Each token its own document: the first head attends to itself alone, the second splits between
    its own value and the first head's at token t."""
    q, k, v = (randn(1, SEQ, HEADS, DIM, seed=s) for s in range(3))
    out = paired_attention_reference(q, k, v, torch.arange(SEQ)[None], None, 1.0)
    torch.testing.assert_close(out[:, :, :2], v[:, :, :2], rtol=0, atol=1e-6)
    t, h = 4, 3  # head 3 pairs with head 1
    s_own, s_first = q[0, t, h] @ k[0, t, h], q[0, t, h] @ k[0, t, 1]
    w_first = torch.sigmoid(s_first - s_own)
    torch.testing.assert_close(out[0, t, h], w_first * v[0, t, 1] + (1 - w_first) * v[0, t, h], rtol=1e-5,
                               atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Key offset, XSA, gates

def test_key_offset_shifts_the_stationary_half_by_one_token_across_documents():
    k = randn(2, SEQ, HEADS, DIM)
    before = k.clone()
    out = offset_stationary_keys(k)
    assert torch.equal(k, before)
    for b in range(2):
        for t in range(SEQ):
            for h in range(HEADS):
                assert torch.equal(out[b, t, h, :DIM // 2], k[b, t, h, :DIM // 2])
                source = t - 1 if t >= 1 else 0
                assert torch.equal(out[b, t, h, DIM // 2:], k[b, source, h, DIM // 2:])


def test_learnable_xsa_removes_tanh_alpha_of_the_projection_on_v():
    y, v = randn(2, SEQ, HEADS, DIM, seed=1), randn(2, SEQ, HEADS, DIM, seed=2)
    v[0, 3, 1] = 0  # a zero value: the clamp keeps the output finite and unchanged
    alpha = randn(2, SEQ, HEADS, seed=3)
    out = learnable_xsa(y, v, alpha)
    for b in range(2):
        for t in range(SEQ):
            for h in range(HEADS):
                dot = sum(y[b, t, h, d] * v[b, t, h, d] for d in range(DIM))
                norm2 = max(sum(v[b, t, h, d] ** 2 for d in range(DIM)), 1e-8)
                expected = y[b, t, h] - math.tanh(alpha[b, t, h]) * dot / norm2 * v[b, t, h]
                torch.testing.assert_close(out[b, t, h], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[0, 3, 1], y[0, 3, 1])
    full = learnable_xsa(y, v, torch.full_like(alpha, 30.0))  # tanh = 1: nothing left along v
    assert (full * v).sum(-1).abs().max() < 1e-4


def test_output_gate_multiplies_each_head_without_sigmoid():
    y, gate = randn(2, SEQ, HEADS, DIM), randn(2, SEQ, HEADS, seed=1)
    out = attention_output_gate(y, gate)
    for t in range(SEQ):
        for h in range(HEADS):
            assert torch.equal(out[1, t, h], y[1, t, h] * gate[1, t, h])


def test_value_embedding_gate_reads_six_channels_of_x_and_of_ve():
    dim = HEADS * DIM
    x, ve, weight = randn(1, SEQ, dim, seed=1), randn(1, SEQ, dim, seed=2), randn(HEADS, 12, seed=3)
    out = gated_value_embedding(x, ve, weight)
    assert out.shape == (1, SEQ, HEADS, DIM)
    for t in range(SEQ):
        inputs = [x[0, t, j] for j in range(6)] + [ve[0, t, j] for j in range(6)]
        for h in range(HEADS):
            gate = 2 / (1 + math.exp(-sum(weight[h, j] * inputs[j] for j in range(12))))
            torch.testing.assert_close(out[0, t, h], gate * ve[0, t, h * DIM:(h + 1) * DIM], rtol=1e-5, atol=1e-6)
    assert torch.equal(gated_value_embedding(x, ve, torch.zeros(HEADS, 12)), ve.view(1, SEQ, HEADS, DIM))


# ---------------------------------------------------------------------------------------------------
# DC-MHA

def test_dc_w1_is_rms_normed_over_heads_with_eps_and_w2_kept():
    w1, w2 = randn(2, SEQ, HEADS, seed=1), randn(2, SEQ, HEADS, seed=2)
    normed, kept = dc_mixing_weights(w1, w2)
    assert torch.equal(kept, w2)
    for b in range(2):
        for t in range(SEQ):
            rms = math.sqrt(sum(w1[b, t, h].item() ** 2 for h in range(HEADS)) / HEADS + 1e-6)
            for h in range(HEADS):
                assert normed[b, t, h].item() == pytest.approx(w1[b, t, h].item() / rms, rel=1e-5)
    at_init, _ = dc_mixing_weights(torch.ones(1, 1, 6), torch.zeros(1, 1, 6))
    torch.testing.assert_close(at_init, torch.full((1, 1, 6), 1 / math.sqrt(1 + 1e-6)))


def dc_by_loop(q, k, v, w1, w2, scale, doc_ids, window):
    """The O(seq^2) definition: per head a softmax over keys t-window+1..t of t's document, mixed over
    heads by w1, applied to each head's values and scaled by w2."""
    batch, seq_len, heads, _ = q.shape
    out = torch.zeros_like(v)
    for b in range(batch):
        for t in range(seq_len):
            probs = torch.zeros(heads, seq_len)
            for h in range(heads):
                keys = [s for s in range(seq_len)
                        if t - window < s <= t and (doc_ids is None or doc_ids[b, s] == doc_ids[b, t])]
                scores = torch.tensor([scale * (q[b, t, h] @ k[b, s, h]).item() for s in keys])
                exp = [math.exp(x - scores.max().item()) for x in scores.tolist()]
                for s, e in zip(keys, exp):
                    probs[h, s] = e / sum(exp)
            for h in range(heads):
                for s in range(seq_len):
                    mixed = sum(w1[b, t, g] * probs[g, s] for g in range(heads))
                    out[b, t, h] += w2[b, t, h] * mixed * v[b, s, h]
    return out


@pytest.mark.parametrize("window", [1, 4, 12, 20])
@pytest.mark.parametrize("docs", [False, True], ids=["one document", "documents"])
def test_dc_correction_against_a_loop_over_queries_keys_and_heads(window, docs):
    q, k, v = (randn(2, SEQ, HEADS, DIM, seed=s) for s in range(3))
    w1, w2 = randn(2, SEQ, HEADS, seed=4), randn(2, SEQ, HEADS, seed=5)
    doc_ids = DOC_IDS if docs else None
    out = dc_correction(q, k, v, w1, w2, 0.4, doc_ids, window)
    torch.testing.assert_close(out, dc_by_loop(q, k, v, w1, w2, 0.4, doc_ids, window), rtol=1e-5, atol=1e-5)


def test_dc_probabilities_are_a_band_of_window_entries_per_query():
    q, k = randn(1, SEQ, HEADS, DIM), randn(1, SEQ, HEADS, DIM, seed=1)
    probs = dc_band_probabilities(q, k, 0.5, DOC_IDS[:1], window=4)
    assert probs.shape == (1, SEQ, HEADS, 4)  # O(seq * window), not O(seq^2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, SEQ, HEADS))
    assert (probs[0, 0, :, 1:] == 0).all()  # the first token has only itself
    assert (probs[0, 5, :, 1:] == 0).all()  # token 5 starts a document
    assert (probs[0, 7, :, 3] == 0).all() and (probs[0, 7, :, :3] > 0).all()


def test_dc_attention_adds_the_correction_and_is_a_no_op_at_init():
    q, k, v, y = (randn(1, SEQ, HEADS, DIM, seed=s) for s in range(4))
    w1, w2 = dc_mixing_weights(torch.ones(1, SEQ, HEADS), torch.zeros(1, SEQ, HEADS))
    assert torch.equal(dc_attention(y, q, k, v, w1, w2, 0.1, DOC_IDS[:1], 4), y)
    w2 = randn(1, SEQ, HEADS, seed=5)
    expected = y + dc_by_loop(q, k, v, w1, w2, 0.1, DOC_IDS[:1], 4)
    torch.testing.assert_close(dc_attention(y, q, k, v, w1, w2, 0.1, DOC_IDS[:1], 4), expected, rtol=1e-5,
                               atol=1e-5)
