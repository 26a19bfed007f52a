"""Causal self-attention backends: FlashAttention-3 on Hopper where present, FlexAttention on other CUDA
GPUs, PyTorch SDPA elsewhere.

Each backend builds a mask once per forward pass, and per window, from `doc_ids` (batch, seq), or None
for plain causal attention, and attends with it: a token attends only to earlier tokens of its own
document and, with a sliding `window`, only to the `window` tokens before it. One `mask_mod` function
defines that pattern for flex and SDPA; FA3 gets it as document segments and a window size. q, k, v
and the output are (batch, heads, seq, head_dim); `scale` is the softmax scale, 1/sqrt(head_dim) when
None. `attention_reference` spells the computation out with an explicit mask; the tests hold the fast
backends to it.
"""
import functools
import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F


def resolve_backend(name, device, dtype=torch.bfloat16):
    """'auto' picks the fastest backend that runs here: FlashAttention-3 on a Hopper GPU where it is
    present (for bf16 and fp16 only, as FA3 computes), FlexAttention (block-sparse, compiled) on other
    CUDA GPUs, SDPA elsewhere."""
    half = dtype in (torch.bfloat16, torch.float16)
    if name == "auto":
        if device.type != "cuda":
            return "sdpa"
        return "fa3" if half and fa3_available() else "flex"
    if name == "fa3":
        if not half:
            raise ValueError(f"attention backend 'fa3' computes in bf16 or fp16, not {dtype}: use --dtype bfloat16")
        if not fa3_available():
            raise ValueError("attention backend 'fa3' needs a Hopper GPU and FlashAttention-3: the "
                             "flash_attn_interface package, or the kernels package with the hub's "
                             f"{FA3_HUB_KERNEL[0]} in its cache (README, 'Fewer GPUs and other cards')")
        return name
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend '{name}', expected auto, fa3 or one of "
                         f"{tuple(ATTENTION_BACKENDS)}")
    return name


def _reference_mask(seq_len, doc_ids, device, window=None):
    """(batch or 1, 1, seq, seq) boolean: True where a query may attend to a key; written out
    independently of the mask_mod, for the tests to hold it to."""
    ones = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    allowed = ones.tril() if window is None else ones.tril() & ones.triu(-window)
    if doc_ids is None:
        return allowed[None, None]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (allowed & same_doc)[:, None]


def attention_reference(q, k, v, doc_ids=None, window=None, scale=None):
    scale = 1 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale
    scores = scores.masked_fill(~_reference_mask(q.size(-2), doc_ids, q.device, window), float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def document_causal_mask_mod(doc_ids, window=None):
    """The attention pattern as a FlexAttention `mask_mod`: the single source of it for flex and SDPA.

    A query attends to keys at or before its position, with `doc_ids` (batch, seq) only to keys of its
    own document, and with a `window` only to keys at most `window` positions back: itself and the
    `window` keys before it, FlashAttention's window_size=(window, 0). FlexAttention turns it into a
    block-sparse mask on CUDA; SDPA gets the same function evaluated densely, so a CPU run exercises
    the mask logic of the GPU run.
    """
    def causal_same_document(b, h, q_idx, kv_idx):
        allowed = q_idx >= kv_idx
        if window is not None:
            allowed = allowed & (q_idx - kv_idx <= window)
        if doc_ids is None:
            return allowed
        return allowed & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return causal_same_document


def sdpa_mask(doc_ids, batch, seq_len, device, window=None):
    """(batch or 1, 1, seq, seq) boolean mask: the mask_mod evaluated once on broadcast index grids.

    The same values as FlexAttention's create_mask, which calls it through vmap at 28 ms a call on
    two CPU cores for a 1,024-token row (2 s of a 16-step test run)."""
    positions = torch.arange(seq_len, device=device)
    rows = torch.arange(batch if doc_ids is not None else 1, device=device)[:, None, None, None]
    mask = document_causal_mask_mod(doc_ids, window)(rows, None, positions[:, None], positions[None, :])
    return mask if doc_ids is not None else mask[None, None]


def sdpa_attention(q, k, v, mask, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@functools.lru_cache(maxsize=8)
def _causal_block_mask(seq_len, device, window):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(document_causal_mask_mod(None, window), None, None, seq_len, seq_len, device=device,
                             _compile=device.startswith("cuda"))


@functools.lru_cache(maxsize=1)
def _flex_attention_kernel(compiled):
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled FlexAttention materialises the full score matrix; only the compiled form is fast.
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


# Built outside the compiled graph. Traced into it, inductor fuses the mask construction into the
# FlexAttention kernel of the no-grad (validation) graph, and that kernel hits an illegal memory
# access (torch 2.11, H200, 64 rows of 1024 tokens with documents; the training graph ran fine).
@torch.compiler.disable
def flex_mask(doc_ids, batch, seq_len, device, window=None):
    if doc_ids is None:
        return _causal_block_mask(seq_len, str(device), window)
    from torch.nn.attention.flex_attention import create_block_mask

    # Blocks that cross no document boundary or window edge are skipped or computed without a mask.
    # Uncompiled, create_block_mask evaluates the mask_mod densely: about 11 bytes per query-key
    # pair, 690 GiB for record #46's 262,144-token validation rows. Compiled on its own (not
    # inside the model's graph: see above), it works block by block.
    return create_block_mask(document_causal_mask_mod(doc_ids, window), batch, None, seq_len, seq_len,
                             device=str(device), _compile=device.type == "cuda")


def flex_attention(q, k, v, mask, scale=None):
    if torch.compiler.is_compiling():  # traced into the compiled model, which compiles FlexAttention with it
        from torch.nn.attention.flex_attention import flex_attention as kernel
    else:
        kernel = _flex_attention_kernel(q.device.type == "cuda")
    return kernel(q, k, v, block_mask=mask, scale=scale)


# FlashAttention-3 from the Hugging Face hub through the `kernels` package, as HEAD loads it: builds
# made for each torch release, fetched once into the hub's cache, where a source build of FA3 takes
# an hour. A `flash_attn_interface` package (FA3 built from source) comes first where installed.
FA3_HUB_KERNEL = ("kernels-community/flash-attn3", 1)  # (repository, major version)


_fa3_module = None  # what fa3_interface loaded: the compiled forward reads this, not the loader


@functools.lru_cache(maxsize=1)
def fa3_interface():
    """The module with `flash_attn_varlen_func`, or None where FA3 cannot load."""
    global _fa3_module
    try:
        import flash_attn_interface
        _fa3_module = flash_attn_interface
    except ImportError:
        try:
            from kernels import get_kernel

            repository, version = FA3_HUB_KERNEL
            _fa3_module = get_kernel(repository, version=version).flash_attn_interface
        except Exception:  # noqa: BLE001 - no package, no network and no cached build, no build for this torch
            _fa3_module = None
    return _fa3_module


@functools.lru_cache(maxsize=1)
def fa3_available():
    """A Hopper GPU (compute capability 9.0, the only one FA3 targets) and FlashAttention-3 loadable."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        return False
    return fa3_interface() is not None


class Fa3Mask(NamedTuple):
    cu_seqlens: torch.Tensor  # int32 offsets of every segment in the flattened (batch * seq) tokens, then the total
    max_seqlen: int
    window: Optional[int]


# nonzero() has a data-dependent size: outside the compiled graph, as the flex mask is.
@torch.compiler.disable
def fa3_mask(doc_ids, batch, seq_len, device, window=None):
    """Documents as varlen segments of the flattened rows; a row start is always a segment start."""
    starts = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
    starts[:, 0] = True
    if doc_ids is not None:
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    total = torch.full((1,), batch * seq_len, device=device)
    cu_seqlens = torch.cat((starts.flatten().nonzero().flatten(), total)).to(torch.int32)
    # The row length bounds every segment, and unlike the longest document's length needs no device sync.
    return Fa3Mask(cu_seqlens, seq_len, window)


def fa3_attention(q, k, v, mask, scale=None):
    # Loaded when the backend was chosen (fa3_available): dynamo would trace the loader's body here
    flash_attn_varlen_func = (_fa3_module or fa3_interface()).flash_attn_varlen_func
    batch, heads, seq_len, head_dim = q.shape

    def varlen(t):
        return t.transpose(1, 2).reshape(batch * seq_len, heads, head_dim)

    out = flash_attn_varlen_func(varlen(q), varlen(k), varlen(v), cu_seqlens_q=mask.cu_seqlens,
                                 cu_seqlens_k=mask.cu_seqlens, max_seqlen_q=mask.max_seqlen,
                                 max_seqlen_k=mask.max_seqlen, causal=True, softmax_scale=scale,
                                 window_size=(-1 if mask.window is None else mask.window, 0))
    out = out[0] if isinstance(out, tuple) else out  # older FA3 releases also return the softmax LSE
    return out.view(batch, seq_len, heads, head_dim).transpose(1, 2)


class AttentionBackend(NamedTuple):
    """`mask` is built once per forward pass (and window) and shared by every layer's `attend`."""
    mask: Callable  # (doc_ids or None, batch, seq_len, device, window=None) -> what attend takes
    attend: Callable  # (q, k, v, mask, scale=None) -> output


# The backends that run on every device, CPU included; the CPU tests run each of them.
ATTENTION_BACKENDS = {"flex": AttentionBackend(flex_mask, flex_attention),
                      "sdpa": AttentionBackend(sdpa_mask, sdpa_attention)}
FA3_BACKEND = AttentionBackend(fa3_mask, fa3_attention)  # Hopper only, so kept out of ATTENTION_BACKENDS


def attention_backend(name):
    """The backend of a name that `resolve_backend` returned."""
    return FA3_BACKEND if name == "fa3" else ATTENTION_BACKENDS[name]
