"""The per-GPU memory estimate, and --micro-batch-tokens auto choosing from it."""
import dataclasses
import types

import pytest
import torch

from training.memory import GIB, MemoryEstimate, _peak_bytes, choose_micro_batch_tokens, choose_piece_tokens, \
    compiled_estimate, estimate_training_memory
from config import PRESETS, Config, make_plan
from training.setup import largest_stage_config, resolve_micro_batch_tokens

RECORD11 = Config(**PRESETS["record11"])
RECORD46 = Config(**PRESETS["record46"])
SPEEDRUN = Config(**PRESETS["speedrun"])


def test_auto_takes_the_largest_micro_batch_that_fits():
    estimate = MemoryEstimate(fixed_bytes=2 * GIB, bytes_per_row=GIB // 2)
    # 8 ranks: 64 rows each. 2 + 64 * 0.5 = 34 GiB fits 80% of 80 GB (59.6 GiB), not of 40 GB (29.8 GiB).
    assert choose_micro_batch_tokens(RECORD11, 8, 80e9, estimate)[0] == 64 * 1024
    tokens, reason = choose_micro_batch_tokens(RECORD11, 8, 40e9, estimate)
    assert tokens == 32 * 1024 and "2 accumulation steps" in reason and "18.0 GiB" in reason
    # One rank: 512 rows, so 512, 256, 128 (66 GiB) are too big and 64 fits; the update is unchanged.
    tokens, reason = choose_micro_batch_tokens(RECORD11, 1, 80e9, estimate)
    assert tokens == 64 * 1024 and "8 accumulation steps" in reason
    with pytest.raises(ValueError, match="not even one sequence of 1024 tokens fits.*set --micro-batch-tokens"):
        choose_micro_batch_tokens(RECORD11, 8, 2e9, estimate)


def test_where_not_one_row_fits_rows_are_split_into_the_longest_pieces_that_do():
    # HEAD's last stage on a 24 GB card: rows of 49,152 tokens, 10 GiB fixed and 100 GiB a row (an example)
    row = dataclasses.replace(SPEEDRUN, seq_len=49_152)
    estimate = MemoryEstimate(fixed_bytes=10 * GIB, bytes_per_row=100 * GIB)
    with pytest.raises(ValueError, match="not even one sequence"):
        choose_micro_batch_tokens(row, 8, 24e9, estimate)
    tokens, reason = choose_piece_tokens(row, 24e9, estimate)
    # 80% of 24e9 bytes less the fixed 10 GiB, at 100 GiB / 49,152 tokens, down to a multiple of 128
    expected = int((0.8 * 24e9 - 10 * GIB) / (100 * GIB / 49_152)) // 128 * 128
    assert tokens == expected == 3840 and "pieces of at most 3,840 tokens" in reason
    with pytest.raises(ValueError, match="alone, 20.0 GiB, do not fit 80% of 22.4 GiB"):
        choose_piece_tokens(row, 24e9, MemoryEstimate(fixed_bytes=20 * GIB, bytes_per_row=GIB))


def test_compiled_estimate_scales_only_the_activations():
    eager = MemoryEstimate(fixed_bytes=3 * GIB, bytes_per_row=GIB)
    compiled = compiled_estimate(eager)
    assert compiled.fixed_bytes == 3 * GIB and 0.3 * GIB < compiled.bytes_per_row < 0.5 * GIB


TINY = dataclasses.replace(RECORD11, num_layers=2, model_dim=64, num_heads=2, seq_len=64)


def test_estimate_is_a_line_that_holds_what_training_must():
    estimate = estimate_training_memory(TINY)
    params = sum(n * m for n, m in [(50304, 64), (64, 50304)]) + 2 * (4 * 64 * 64 + 2 * 4 * 64 * 64)
    # Always alive: float32 weights and Adam's two moments of the embedding and head, at least.
    assert estimate.fixed_bytes >= 4 * params + 2 * 4 * 2 * 50304 * 64
    # Every row holds at least its float32 logits at the peak.
    assert estimate.bytes_per_row >= 64 * 50304 * 4
    # Linear in the rows: a direct measurement at 4 rows lands on the line fitted at 1 and 2.
    assert _peak_bytes(TINY, 4, torch.bfloat16) == pytest.approx(
        estimate.peak_bytes(4), rel=0.02)


@pytest.mark.slow
def test_record11_preset_fits_h100_at_64k_and_a100_40gb_at_32k():
    """The full-size preset on fake tensors, typed by CUDA autocast's rules."""
    eager = estimate_training_memory(RECORD11)
    # Measured on an H200 with compile: 35.5 GiB allocated at 64 rows (docs/PERFORMANCE.md).
    assert 33 * GIB < compiled_estimate(eager).peak_bytes(64) < 40 * GIB
    assert eager.peak_bytes(64) > 80 * GIB  # eager, 64K tokens would not fit an 80 GB card
    h100, a100_40gb = 81559 * 2**20, 40960 * 2**20
    assert choose_micro_batch_tokens(RECORD11, 8, h100, compiled_estimate(eager))[0] == 65536
    assert choose_micro_batch_tokens(RECORD11, 8, a100_40gb, compiled_estimate(eager))[0] == 32768


@pytest.mark.slow
def test_record46_preset_fits_an_h100_with_one_row_of_its_largest_stage():
    """Record #46's last stage: one 49,152-token row per GPU on 8 GPUs."""
    largest = dataclasses.replace(RECORD46, batch_tokens=3 * 131_072, seq_len=3 * 16_384, batch_stages="")
    estimate = compiled_estimate(estimate_training_memory(largest))
    h100 = 81559 * 2**20
    # The record measured 29,892 MiB allocated with bf16 embeddings, head, Adam moments and logits;
    # here they are float32, so the estimate must lie above that, and still fit. This project's
    # compiled run of the stage on one H100, holding all the optimizer state that 8 GPUs would shard,
    # measured 31.3 GiB (docs/PERFORMANCE.md).
    assert 31.3 * GIB < estimate.peak_bytes(1) < 0.8 * h100
    assert choose_micro_batch_tokens(largest, 8, h100, estimate)[0] == 49_152


def test_speedrun_preset_takes_one_row_on_an_h100_and_pieces_of_rows_on_a_24_gb_card(monkeypatch):
    """HEAD's last stage in plain PyTorch (its loss in slices recomputed in the backward, DC-MHA one key
    offset at a time), sized as the run sizes it on a GPU: one 49,152-token row per GPU on 8 H100s by the
    estimate; on a 24 GB card one row does not fit, and the rows go in pieces of whole documents."""
    plan = make_plan(SPEEDRUN)
    largest = largest_stage_config(plan)
    assert (largest.seq_len, largest.batch_tokens, largest.mtp_weight_stages) == (49_152, 393_216, "1")
    estimate = compiled_estimate(estimate_training_memory(largest))
    h100, rtx4090 = 81559 * 2**20, 24564 * 2**20  # the memory torch reports for each card
    assert estimate.peak_bytes(1) < 0.8 * h100 < estimate.peak_bytes(2)
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=h100))
    assert resolve_micro_batch_tokens(plan, 8, cuda, torch.bfloat16, True)[:2] == (16_384, None)  # a row a pass
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=rtx4090))
    micro, pieces, reason = resolve_micro_batch_tokens(plan, 8, cuda, torch.bfloat16, True)
    assert micro == 16_384 and 2048 <= pieces < 49_152 and pieces % 128 == 0  # a piece holds a whole document
    assert estimate.fixed_bytes + estimate.bytes_per_row * pieces / 49_152 <= 0.8 * rtx4090
    assert "rows split at document starts" in reason and "the look-back gate, the key offset and the bigram hash" in reason
