"""scripts/ablate.py's technique tables: every row switches its technique off with flags that build."""
import dataclasses

import pytest

from config import PRESETS, Config, make_plan
from model.gpt import check_model_config
from optim.optimizer import check_optimizer_config
from scripts.ablate import HEAD_TECHNIQUES, RECORD46_TECHNIQUES, switched, techniques


@pytest.mark.parametrize("preset, table", [("cpu-tiny", HEAD_TECHNIQUES), ("speedrun", HEAD_TECHNIQUES),
                                           ("record46", RECORD46_TECHNIQUES)])
def test_each_row_changes_the_preset_into_a_config_that_builds(preset, table):
    config = dataclasses.replace(Config(), **PRESETS[preset])
    assert techniques(config) is table
    for name, (description, flags) in table.items():
        off = dataclasses.replace(config, **switched(flags))
        assert off != config, f"{name} is already off in {preset}"
        plan = make_plan(off)  # a refusal here would fail the ablation run at its start
        check_model_config(plan)
        check_optimizer_config(off)
