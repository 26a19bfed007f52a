"""Causal self-attention backends: FlexAttention on CUDA, PyTorch SDPA elsewhere.

All take and return (batch, heads, seq, head_dim). With `doc_ids` (batch, seq), a token
attends only to earlier tokens of its own document. `attention_reference` spells the
computation out with an explicit mask; the tests hold the fast backends to it.
"""
import functools
import math

import torch
import torch.nn.functional as F

BACKENDS = ("flex", "sdpa")


def resolve_backend(name, device):
    """'auto' picks FlexAttention on CUDA (block-sparse, compiled) and SDPA elsewhere."""
    if name == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend '{name}', expected auto or one of {BACKENDS}")
    return name


def _dense_mask(seq_len, doc_ids, device):
    """(batch or 1, 1, seq, seq) boolean: True where a query may attend to a key."""
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    if doc_ids is None:
        return causal[None, None]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same_doc)[:, None]


def attention_reference(q, k, v, doc_ids=None):
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~_dense_mask(q.size(-2), doc_ids, q.device), float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def sdpa_attention(q, k, v, doc_ids=None):
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_dense_mask(q.size(-2), doc_ids, q.device))


def _causal(batch, head, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=8)
def _causal_block_mask(seq_len, device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_causal, None, None, seq_len, seq_len, device=device)


@functools.lru_cache(maxsize=1)
def _flex_attention_kernel(compiled):
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled FlexAttention materialises the full score matrix; only the compiled form is fast.
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def flex_attention(q, k, v, doc_ids=None):
    from torch.nn.attention.flex_attention import create_block_mask

    batch, _, seq_len, _ = q.shape
    if doc_ids is None:
        block_mask = _causal_block_mask(seq_len, str(q.device))
    else:
        def causal_same_document(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

        # Blocks that cross no document boundary are skipped or computed without a mask.
        block_mask = create_block_mask(causal_same_document, batch, None, seq_len, seq_len, device=str(q.device))
    return _flex_attention_kernel(q.device.type == "cuda")(q, k, v, block_mask=block_mask)


def attention_function(backend):
    return {"flex": flex_attention, "sdpa": sdpa_attention}[backend]
