"""Causal self-attention backends: FlexAttention on CUDA, PyTorch SDPA elsewhere.

Each backend builds a mask once per forward pass from `doc_ids` (batch, seq), or None for
plain causal attention, and attends with it: a token attends only to earlier tokens of its
own document. One `mask_mod` function defines that pattern for every backend. q, k, v and the output are (batch, heads, seq, head_dim). `attention_reference` spells the
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


def _reference_mask(seq_len, doc_ids, device):
    """(batch or 1, 1, seq, seq) boolean: True where a query may attend to a key; written out
    independently of the mask_mod, for the tests to hold it to."""
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    if doc_ids is None:
        return causal[None, None]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same_doc)[:, None]


def attention_reference(q, k, v, doc_ids=None):
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~_reference_mask(q.size(-2), doc_ids, q.device), float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def document_causal_mask_mod(doc_ids):
    """The attention pattern as a FlexAttention `mask_mod`: the single source of it for every backend.

    A query attends to keys at or before its position, and with `doc_ids` (batch, seq) only to keys
    of its own document. FlexAttention turns it into a block-sparse mask on CUDA; SDPA gets the
    same function evaluated densely, so a CPU run exercises the mask logic of the GPU run.
    """
    def causal_same_document(b, h, q_idx, kv_idx):
        causal = q_idx >= kv_idx
        if doc_ids is None:
            return causal
        return causal & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return causal_same_document


def sdpa_mask(doc_ids, batch, seq_len, device):
    """(batch or 1, 1, seq, seq) boolean mask from the mask_mod."""
    from torch.nn.attention.flex_attention import create_mask

    return create_mask(document_causal_mask_mod(doc_ids), batch if doc_ids is not None else 1, None, seq_len,
                       seq_len, device=device)


def sdpa_attention(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@functools.lru_cache(maxsize=8)
def _causal_block_mask(seq_len, device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(document_causal_mask_mod(None), None, None, seq_len, seq_len, device=device)


@functools.lru_cache(maxsize=1)
def _flex_attention_kernel(compiled):
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled FlexAttention materialises the full score matrix; only the compiled form is fast.
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


# Built outside the compiled graph. Traced into it, inductor fuses the mask construction into the
# FlexAttention kernel of the no-grad (validation) graph, and that kernel hits an illegal memory
# access (torch 2.11, H200, 64 rows of 1024 tokens with documents; the training graph ran fine).
@torch.compiler.disable
def flex_mask(doc_ids, batch, seq_len, device):
    if doc_ids is None:
        return _causal_block_mask(seq_len, str(device))
    from torch.nn.attention.flex_attention import create_block_mask

    # Blocks that cross no document boundary are skipped or computed without a mask.
    return create_block_mask(document_causal_mask_mod(doc_ids), batch, None, seq_len, seq_len, device=str(device))


def flex_attention(q, k, v, mask):
    return _flex_attention_kernel(q.device.type == "cuda")(q, k, v, block_mask=mask)


class AttentionBackend(NamedTuple):
    """`mask` is built once per forward pass and shared by every layer's `attend`."""
    mask: Callable  # (doc_ids or None, batch, seq_len, device) -> what attend takes
    attend: Callable  # (q, k, v, mask) -> output


ATTENTION_BACKENDS = {"flex": AttentionBackend(flex_mask, flex_attention),
                      "sdpa": AttentionBackend(sdpa_mask, sdpa_attention)}
