"""Causal self-attention backends: FlexAttention on CUDA, PyTorch SDPA elsewhere.

All take and return (batch, heads, seq, head_dim). `causal_attention_reference` spells the
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


def causal_attention_reference(q, k, v):
    seq_len = q.size(-2)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.size(-1))
    future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def sdpa_causal_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _causal_mask(batch, head, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=8)
def _causal_block_mask(seq_len, device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_causal_mask, None, None, seq_len, seq_len, device=device)


@functools.lru_cache(maxsize=1)
def _flex_attention_kernel(compiled):
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled FlexAttention materialises the full score matrix; only the compiled form is fast.
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def flex_causal_attention(q, k, v):
    block_mask = _causal_block_mask(q.size(-2), str(q.device))
    return _flex_attention_kernel(q.device.type == "cuda")(q, k, v, block_mask=block_mask)


def attention_function(backend):
    return {"flex": flex_causal_attention, "sdpa": sdpa_causal_attention}[backend]
