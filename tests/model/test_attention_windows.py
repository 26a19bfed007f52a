import math
import sys
import types

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from model import attention
from model.attention import (ATTENTION_BACKENDS, FA3_BACKEND, _reference_mask, attention_backend,
                             attention_reference, fa3_attention, fa3_available, fa3_interface, fa3_mask,
                             resolve_backend, sdpa_mask)

CPU = torch.device("cpu")
WINDOWS = [None, 0, 1, 5, 40, 200]


def documents(batch, seq_len, seed=0):
    """Random document ids per row, with a long document spanning a 128-token block boundary."""
    generator = torch.Generator().manual_seed(seed)
    doc_ids = (torch.rand(batch, seq_len, generator=generator) < 0.03).cumsum(1)
    doc_ids[:, 100:140] = doc_ids[:, 100:101]
    doc_ids[:, 140:] += 1
    return doc_ids


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("docs", [False, True], ids=["causal", "documents"])
def test_mask_mod_gives_the_band_and_document_mask(window, docs):
    doc_ids = documents(2, 256) if docs else None
    expected = _reference_mask(256, doc_ids, CPU, window)
    assert torch.equal(sdpa_mask(doc_ids, 2, 256, CPU, window), expected)
    block_mask = ATTENTION_BACKENDS["flex"].mask(doc_ids, 2, 256, CPU, window)
    assert torch.equal(create_mask(block_mask.mask_mod, expected.size(0), None, 256, 256, device=CPU), expected)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("window", WINDOWS)
def test_windowed_attention_matches_the_reference(backend, window):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 256, 16) for _ in range(3))
    doc_ids = documents(2, 256)
    mask, attend = ATTENTION_BACKENDS[backend]
    out = attend(q, k, v, mask(doc_ids, 2, 256, CPU, window))
    torch.testing.assert_close(out, attention_reference(q, k, v, doc_ids, window), rtol=0, atol=1e-5)


def test_the_window_is_token_exact():
    """A query at i sees keys i - window .. i: with equal scores, its output is their values' mean."""
    seq_len, window = 12, 3
    q = k = torch.zeros(1, 1, seq_len, 4)
    v = torch.eye(seq_len)[None, None]  # key j's value marks position j
    out = ATTENTION_BACKENDS["sdpa"].attend(q, k, v, sdpa_mask(None, 1, seq_len, CPU, window))[0, 0]
    for i in range(seq_len):
        seen = list(range(max(0, i - window), i + 1))
        expected = torch.zeros(seq_len)
        expected[seen] = 1 / len(seen)
        torch.testing.assert_close(out[i], expected)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_the_softmax_scale_is_honoured(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    scale = 0.37
    scores = (q @ k.transpose(-2, -1)) * scale
    scores = scores.masked_fill(torch.ones(64, 64, dtype=torch.bool).triu(1), float("-inf"))
    expected = scores.softmax(-1) @ v
    mask, attend = ATTENTION_BACKENDS[backend]
    torch.testing.assert_close(attend(q, k, v, mask(None, 1, 64, CPU), scale), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(attention_reference(q, k, v, scale=scale), expected, rtol=0, atol=1e-5)
    default = attend(q, k, v, mask(None, 1, 64, CPU))  # None: 1/sqrt(head_dim)
    torch.testing.assert_close(default, attention_reference(q, k, v, scale=1 / math.sqrt(16)), rtol=0, atol=1e-5)
    assert not torch.allclose(default, expected, atol=1e-3)


def test_fa3_segments_are_documents_and_rows():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2],
                            [2, 2, 2, 3, 3, 3, 3, 3]])  # row 2 starts inside the id row 1 ended with
    mask = fa3_mask(doc_ids, 2, 8, CPU, window=3)
    assert mask.cu_seqlens.dtype == torch.int32
    assert mask.cu_seqlens.tolist() == [0, 3, 5, 8, 11, 16]
    assert (mask.max_seqlen, mask.window) == (8, 3)
    assert fa3_mask(None, 2, 8, CPU).cu_seqlens.tolist() == [0, 8, 16]


def fake_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                softmax_scale, window_size):
    """FA3's varlen attention, segment by segment through the reference, for the CPU."""
    assert causal and torch.equal(cu_seqlens_q, cu_seqlens_k) and max_seqlen_q == max_seqlen_k
    assert window_size[1] == 0
    window = None if window_size[0] == -1 else window_size[0]
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        assert end - start <= max_seqlen_q
        segment = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]  # (1, heads, len, head_dim)
        out[start:end] = attention_reference(*segment, window=window, scale=softmax_scale)[0].transpose(0, 1)
    return out, None  # the output and a softmax LSE, as older FA3 releases return them


@pytest.mark.parametrize("window", [None, 5])
def test_fa3_attention_flattens_rows_to_segments_and_back(window, monkeypatch):
    """The plumbing around the kernel, with a stand-in kernel: the real one needs a Hopper GPU."""
    monkeypatch.setitem(sys.modules, "flash_attn_interface",
                        types.SimpleNamespace(flash_attn_varlen_func=fake_flash_attn_varlen_func))
    fa3_interface.cache_clear()
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 256, 16) for _ in range(3))
    doc_ids = documents(2, 256)
    try:
        out = fa3_attention(q, k, v, fa3_mask(doc_ids, 2, 256, CPU, window), 0.2)
    finally:
        fa3_interface.cache_clear()
    torch.testing.assert_close(out, attention_reference(q, k, v, doc_ids, window, scale=0.2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("fa3_loads", [True, False])
def test_auto_picks_fa3_where_it_runs_then_flex_on_cuda_then_sdpa(fa3_loads, monkeypatch):
    monkeypatch.setattr(attention, "fa3_available", lambda: fa3_loads)
    assert resolve_backend("auto", torch.device("cuda")) == ("fa3" if fa3_loads else "flex")
    assert resolve_backend("auto", CPU) == "sdpa"
    # FA3 computes in bf16 and fp16 only: a float32 run gets FlexAttention, and fa3 by name is refused
    assert resolve_backend("auto", torch.device("cuda"), torch.float32) == "flex"
    with pytest.raises(ValueError, match="'fa3' computes in bf16 or fp16"):
        resolve_backend("fa3", torch.device("cuda"), torch.float32)
    if fa3_loads:
        assert resolve_backend("fa3", torch.device("cuda")) == "fa3"
    else:
        with pytest.raises(ValueError, match="'fa3' needs a Hopper GPU"):
            resolve_backend("fa3", torch.device("cuda"))


def test_fa3_is_kept_out_of_the_backends_every_device_runs():
    assert attention_backend("fa3") is FA3_BACKEND and attention_backend("sdpa") is ATTENTION_BACKENDS["sdpa"]
    assert "fa3" not in ATTENTION_BACKENDS  # the CPU tests run every backend listed there
    if not torch.cuda.is_available():
        assert not fa3_available()
        with pytest.raises(ValueError, match="'fa3' needs a Hopper GPU"):
            resolve_backend("fa3", CPU)
