"""Causal self-attention backends: FlexAttention on CUDA, PyTorch SDPA elsewhere.

Each backend builds a mask once per forward pass from `doc_ids` (batch, seq), or None for
plain causal attention, and attends with it: a token attends only to earlier tokens of its
own document. q, k, v and the output are (batch, heads, seq, head_dim). `attention_reference` spells the
computation out with an explicit mask; the tests hold the fast backends to it.
"""
import functools
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F



def resolve_backend(name, device):
    """'auto' picks FlexAttention on CUDA (block-sparse, compiled) and SDPA elsewhere."""
    if name == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend '{name}', expected auto or one of {tuple(ATTENTION_BACKENDS)}")
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


def sdpa_mask(doc_ids, batch, seq_len, device):
    """None means plain causal attention, which SDPA runs with its fused kernels."""
    return None if doc_ids is None else _dense_mask(seq_len, doc_ids, device)


def sdpa_attention(q, k, v, mask):
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


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


def flex_mask(doc_ids, batch, seq_len, device):
    if doc_ids is None:
        return _causal_block_mask(seq_len, str(device))
    from torch.nn.attention.flex_attention import create_block_mask

    def causal_same_document(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    # Blocks that cross no document boundary are skipped or computed without a mask.
    return create_block_mask(causal_same_document, batch, None, seq_len, seq_len, device=str(device))


def flex_attention(q, k, v, mask):
    return _flex_attention_kernel(q.device.type == "cuda")(q, k, v, block_mask=mask)


class AttentionBackend(NamedTuple):
    """`mask` is built once per forward pass and shared by every layer's `attend`."""
    mask: Callable  # (doc_ids or None, batch, seq_len, device) -> what attend takes
    attend: Callable  # (q, k, v, mask) -> output


ATTENTION_BACKENDS = {"flex": AttentionBackend(flex_mask, flex_attention),
                      "sdpa": AttentionBackend(sdpa_mask, sdpa_attention)}
