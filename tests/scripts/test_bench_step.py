"""scripts/bench_step.py's batches: one GPU's share of the rows of a larger run, stage by stage."""
import types

import pytest
import torch

from config import PRESETS, Config, ConfigError, make_plan
from scripts.bench_step import stage_batches


def test_each_stage_gets_one_gpus_share_of_an_8_gpu_runs_rows():
    config = Config(**PRESETS["speedrun"])
    plan = make_plan(config)
    generator = torch.Generator().manual_seed(0)
    one_row = types.SimpleNamespace(micro_batch_tokens=config.seq_len, device=torch.device("cpu"))
    shapes = [[tuple(inputs.shape) for inputs, _ in stage_batches(config, stage, one_row, 8, generator)]
              for stage in plan.stages if not stage.extension]
    assert shapes == [[(1, 16_384)], [(1, 32_768)], [(1, 49_152)]]  # HEAD's 8 rows a step, one a GPU
    # two GPUs of four rows each, in micro-batches of two rows (the runtime's first-stage tokens)
    two_rows = types.SimpleNamespace(micro_batch_tokens=2 * config.seq_len, device=torch.device("cpu"))
    batches = stage_batches(config, plan.stages[2], two_rows, 2, generator)
    assert [tuple(inputs.shape) for inputs, _ in batches] == [(2, 49_152), (2, 49_152)]
    inputs, targets = batches[0]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the next tokens
    with pytest.raises(ConfigError, match="8 rows do not split evenly over --bench-world-size 3"):
        stage_batches(config, plan.stages[0], one_row, 3, generator)
