"""scripts/bench_step.py's batches: one GPU's share of the rows of a larger run, stage by stage."""
import types

import pytest
import torch

from config import PRESETS, Config, make_plan
from scripts.bench_step import stage_batches


def test_each_stage_gets_one_gpus_share_of_an_8_gpu_runs_rows():
    config = Config(**PRESETS["speedrun"])
    plan = make_plan(config)
    generator = torch.Generator().manual_seed(0)
    one_row = types.SimpleNamespace(micro_batch_tokens=config.seq_len, device=torch.device("cpu"),
                                    row_split_tokens=None)
    shapes = [[tuple(inputs.shape) for inputs, _ in stage_batches(config, stage, one_row, 8, generator)]
              for stage in plan.stages if not stage.extension]
    assert shapes == [[(1, 16_384)], [(1, 32_768)], [(1, 49_152)]]  # HEAD's 8 rows a step, one a GPU
    # two GPUs of four rows each, in micro-batches of two rows (the runtime's first-stage tokens)
    two_rows = types.SimpleNamespace(micro_batch_tokens=2 * config.seq_len, device=torch.device("cpu"),
                                     row_split_tokens=None)
    batches = stage_batches(config, plan.stages[2], two_rows, 2, generator)
    assert [tuple(inputs.shape) for inputs, _ in batches] == [(2, 49_152), (2, 49_152)]
    inputs, targets = batches[0]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the next tokens
    # three GPUs: 3, 3 and 2 rows; the first ranks, with 3, set the step's time
    assert [tuple(x.shape) for x, _ in stage_batches(config, plan.stages[0], one_row, 3, generator)] == [(1, 16_384)] * 3
    # a small card: each row of 49,152 tokens in pieces of at most 20,000, timed as 3 full pieces
    pieces = types.SimpleNamespace(micro_batch_tokens=config.seq_len, device=torch.device("cpu"),
                                   row_split_tokens=20_000)
    assert [tuple(x.shape) for x, _ in stage_batches(config, plan.stages[2], pieces, 8, generator)] == [(1, 20_000)] * 3
