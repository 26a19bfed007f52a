"""The attention variants of modded-nanogpt HEAD (f411b3d3) as pure functions: tensors in, tensors out.

Tensors are (batch, seq, heads, head_dim), HEAD's layout, unless a docstring says otherwise; a
`doc_ids` (batch, seq) gives each token its document (contiguous runs) and None means one document.
In a HEAD attention layer the pieces run in this order:

    q, k, v = x @ (lambda0 * W_qkv)^T                  lambdas on the weights, not on q, k, v
    q, k = rms_norm(q), rms_norm(k)
    plain layer:  q, k = rotary(q), rotary(k)            adjacent pairs (model.rotary), bf16 tables
                  k = offset_stationary_keys(k)          long-window layers (3, 10)
                  v = v + gated_value_embedding(...)     layers 1, 8 (layer 10's gate comes from MUDD)
    paired layer: q, k = rotary at paired_positions             layers 0, 2, 5, 9
                  v = v + gated_value_embedding(...)     layers 2, 9
                  y = attention over interleave_pairs(q, k, v) with doubled documents
    y = windowed causal attention, softmax scale = the YaRN scale
    y = dc_attention(y, q, k, v, ...)                    layer 10
    y = learnable_xsa(y, v, alpha)                       layers 1, 3, 4, 7
    y = attention_output_gate(y, gate)                   layers 3, 10
    out = y @ (lambda1 * W_O)^T
"""
import torch
import torch.nn.functional as F

from model.attention import attention_reference

DC_WINDOW = 112  # keys (the query's own included) that DC-MHA's local softmax spans
DC_EPS = 1e-6
XSA_MIN_NORM2 = 1e-8
VALUE_GATE_INPUTS = 6  # channels of the normed input and of the value embedding that the VE gate reads


# ---------------------------------------------------------------------------------------------------
# Rotary of a paired layer (model.rotary.Rotary with adjacent pairs turns q and k at these positions)

def paired_positions(seq_len, num_heads, device=None):
    """(seq, heads) rotary position of each head of a paired layer: 2t for even heads, 2t+1 for odd.

    HEAD rotates q and k viewed as (seq, heads/2, 2*head_dim), so heads (2p, 2p+1) are the rotary pair.
    The attention pairs are different heads, (p, p + heads/2): see `interleave_pairs`.
    """
    t = torch.arange(seq_len, device=device)[:, None]
    h = torch.arange(num_heads, device=device)[None, :]
    return 2 * t + h % 2


# ---------------------------------------------------------------------------------------------------
# Paired-head attention

def interleave_pairs(x):
    """(batch, seq, heads, d) -> (batch, 2 seq, heads/2, d): HEAD's reshape of a paired layer's q, k, v.

    Interleaved token 2t+i, slot p holds head i*heads/2 + p of token t. So slot p attends over the
    heads p and p + heads/2 of every token, in that order: a query of the second head sees the first
    head's key at its own token, a query of the first head does not see the second's.
    """
    batch, seq_len, heads, head_dim = x.shape
    if heads % 2:
        raise ValueError(f"paired heads need an even number of heads, got {heads}")
    return x.reshape(batch, 2 * seq_len, heads // 2, head_dim)


def deinterleave_pairs(y):
    """(batch, 2 seq, heads/2, d) -> (batch, seq, heads, d): the inverse of `interleave_pairs`."""
    batch, double_len, half_heads, head_dim = y.shape
    return y.reshape(batch, double_len // 2, 2 * half_heads, head_dim)


def interleaved_doc_ids(doc_ids):
    """(batch, seq) -> (batch, 2 seq): both copies of a token in its document; HEAD doubles cu_seqlens."""
    return None if doc_ids is None else doc_ids.repeat_interleave(2, dim=-1)


def paired_attention_reference(q, k, v, doc_ids=None, window=None, scale=None):
    """A paired layer's attention with an explicit mask (the reference the model's is held to in the tests);
    q, k already rotated at `paired_positions`.

    Causal, same-document attention over the interleaved sequence of 2 seq tokens. The window counts
    interleaved tokens, unchanged from the plain layers', so it reaches half as many original tokens.
    """
    def heads_first(x):
        return interleave_pairs(x).transpose(1, 2)

    y = attention_reference(heads_first(q), heads_first(k), heads_first(v), interleaved_doc_ids(doc_ids),
                            window, scale)
    return deinterleave_pairs(y.transpose(1, 2))


# ---------------------------------------------------------------------------------------------------
# Partial key offset, XSA, gates

def offset_stationary_keys(k):
    """k (..., seq, heads, head_dim) with its stationary half, dims [head_dim/2, head_dim), taken from the
    token before; token 0 keeps its own. A query matching a key's content then finds the token after
    it: induction in one layer. The shift crosses document boundaries, as HEAD's does.

    HEAD writes it as an in-place overlapping copy; compiled (as HEAD runs) that is this one-step shift.
    """
    half = k.size(-1) // 2
    stationary = k[..., half:]
    shifted = torch.cat((stationary[..., :1, :, :], stationary[..., :-1, :, :]), dim=-3)
    return torch.cat((k[..., :half], shifted), dim=-1)


def learnable_xsa(y, v, alpha):
    """y - tanh(alpha) * (y.v / max(|v|^2, 1e-8)) v per token and head: a learned share of each head's
    output along its own value is removed (XSA). alpha is (..., seq, heads); the math runs in y's dtype."""
    along = (y * v).sum(-1, keepdim=True) / v.square().sum(-1, keepdim=True).clamp_min(XSA_MIN_NORM2)
    return y - torch.tanh(alpha).type_as(y)[..., None] * along * v


def attention_output_gate(y, gate):
    """y (..., seq, heads, head_dim) times gate (..., seq, heads): linear, no sigmoid (layers 3 and 10)."""
    return y * gate.type_as(y)[..., None]


def gated_value_embedding(x_normed, value_embed, gate_weight, num_inputs=VALUE_GATE_INPUTS):
    """(..., seq, heads, head_dim) to add to v: each head's slice of the value embedding times
    2 sigmoid(W [x_normed[:6], value_embed[:6]]), so a zero W gives a gate of 1.

    x_normed is the layer's normed attention input (..., seq, dim), value_embed the token's value
    embedding (..., seq, dim), gate_weight (heads, 2 * num_inputs).
    """
    gate_in = torch.cat((x_normed[..., :num_inputs], value_embed[..., :num_inputs]), dim=-1)
    gate = 2 * torch.sigmoid(F.linear(gate_in, gate_weight.type_as(gate_in)))
    per_head = value_embed.unflatten(-1, (gate_weight.size(0), -1))
    return gate[..., None] * per_head


# ---------------------------------------------------------------------------------------------------
# Lightweight DC-MHA (layer 10)

def dc_mixing_weights(w1, w2, dtype=None):
    """(w1, w2), each (..., seq, heads): w1 RMS-normed over the heads (eps 1e-6, no weight, in float32).

    w1 mixes the heads' attention patterns, w2 scales each head's share of the mix. HEAD's gate biases
    start w1 at 1 (so the norm gives about 1 per head) and w2 at 0 (DC starts as a no-op).
    """
    dtype = dtype or w2.dtype
    normed = F.rms_norm(w1.float(), (w1.size(-1),), eps=DC_EPS)
    return normed.to(dtype), w2.to(dtype)


def _band_mask(doc_ids, batch, seq_len, window, device):
    """(batch or 1, seq, window) boolean: key t - r is in the band of query t and in its document."""
    t = torch.arange(seq_len, device=device)[:, None]
    r = torch.arange(window, device=device)[None, :]
    allowed = (t >= r)[None]
    if doc_ids is None:
        return allowed
    keys = (t - r).clamp_min(0)
    return allowed & (doc_ids[:, keys] == doc_ids[:, :, None])


def dc_band_probabilities(q, k, scale, doc_ids=None, window=DC_WINDOW):
    """(batch, seq, heads, window) float32: entry r is each head's softmax weight on key t - r.

    The softmax spans the `window` keys t-window+1..t (the query's own included) of the query's
    document, with its own normaliser. Built one offset at a time from views of q and k, so neither
    the forward nor what autograd keeps is ever O(seq^2) or O(seq * window * head_dim): a 49,152-token
    row of HEAD's layer 10 keeps 132 MB of scores.
    """
    batch, seq_len, heads, _ = q.shape
    qf, kf = q.float(), k.float()
    offsets = min(window, seq_len)
    scores = torch.stack([F.pad((qf[:, r:] * kf[:, : seq_len - r]).sum(-1), (0, 0, r, 0)) for r in range(offsets)],
                         dim=-1) * scale
    scores = F.pad(scores, (0, window - offsets))  # offsets past the row's start: masked below
    mask = _band_mask(doc_ids, batch, seq_len, window, q.device)[:, :, None, :]
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def _dc_correction_float32(q, k, v, w1, w2, scale, doc_ids, window):
    probs = dc_band_probabilities(q, k, scale, doc_ids, window)
    mixed = (w1.float()[..., None] * probs).sum(-2)  # (batch, seq, window)
    weights = w2.float()[..., None] * mixed[:, :, None, :]  # (batch, seq, heads, window)
    vf, seq_len = v.float(), v.size(1)
    out = torch.zeros_like(vf)
    for r in range(min(window, seq_len)):  # one offset at a time: each product is freed once added
        out = out + F.pad(weights[:, r:, :, r, None] * vf[:, : seq_len - r], (0, 0, 0, 0, r, 0))
    return out


def dc_correction(q, k, v, w1, w2, scale, doc_ids=None, window=DC_WINDOW):
    """The term DC-MHA adds to the attention output y: w2_h(t) sum_s a(t,s) v_h(s), with the mixed
    pattern a(t,s) = sum_h w1_h(t) P_h(t,s) shared by all heads.

    q, k as attention gets them (normed, rotated, key-offset), v with its value-embedding additions,
    w1, w2 from `dc_mixing_weights`, scale the YaRN softmax scale. Float32 math, v's dtype out.
    """
    return _dc_correction_float32(q, k, v, w1, w2, scale, doc_ids, window).to(v.dtype)


def dc_attention(y, q, k, v, w1, w2, scale, doc_ids=None, window=DC_WINDOW):
    """y plus `dc_correction`, rounded once to y's dtype as HEAD's kernel does: layer 10's output
    before its output gate."""
    return (y.float() + _dc_correction_float32(q, k, v, w1, w2, scale, doc_ids, window)).to(y.dtype)
