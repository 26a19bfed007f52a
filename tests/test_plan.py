"""The plan: the config parsed once into stages and layouts, and `--plan` printing the run."""
import contextlib
import io

import pytest

import train_gpt
from config import PRESETS, Config, ConfigError, Stage, make_plan, parse_config


def plan_output(args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train_gpt.main(args + ["--plan"]) == 0
    return out.getvalue()


def test_speedrun_plan_is_record_46s_run():
    plan = make_plan(Config(**PRESETS["speedrun"]))
    assert [(s.first_step, s.end_step, s.tokens_per_step, s.windows) for s in plan.stages] == [
        (0, 707, 131_072, (128, 384)), (707, 1414, 262_144, (384, 896)), (1414, 2120, 393_216, (640, 1408)),
        (2120, 2160, 393_216, (768, 1664))]
    assert plan.stages[-1].extension and plan.final_windows == (768, 2560)
    # 707 x 131,072 + 707 x 262,144 + 746 x 393,216
    assert plan.total_tokens == 707 * 131_072 + 707 * 262_144 + 746 * 393_216 == 571_342_848


def test_every_step_is_in_exactly_one_stage():
    for preset in PRESETS:
        plan = make_plan(Config(**PRESETS[preset]))
        covered = [step for stage in plan.stages for step in range(stage.first_step, stage.end_step)]
        assert covered == list(range(plan.config.steps)), preset
        assert all(isinstance(stage, Stage) for stage in plan.stages)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_plan_flag_prints_the_run_without_its_data(preset, tmp_path):
    # the default train files are not on this machine: --plan must not read them
    text = plan_output(["--preset", preset, "--records-dir", str(tmp_path / "records")])
    plan = make_plan(Config(**PRESETS[preset]))
    assert f"total: {plan.config.steps:,} steps, {plan.total_tokens:,} train tokens" in text
    assert "train shards:" in text
    assert not (tmp_path / "records").exists()


def test_speedrun_plan_flag_shows_stages_tokens_and_shards():
    text = plan_output(["--preset", "speedrun"])
    assert "stage ends (exclusive): 707, 1,414, 2,120, 2,160" in text
    assert "total: 2,160 steps, 571,342,848 train tokens" in text
    for tokens, rows in (("131,072", "8 x 16,384"), ("262,144", "8 x 32,768"), ("393,216", "8 x 49,152")):
        assert f"{tokens}  {rows:>17}" in text
    assert "train shards: 9 of fineweb10B" in text


def test_plan_flag_takes_the_other_flags():
    text = plan_output(["--preset", "record11", "--steps", "100", "--batch-tokens", "8192", "--seq-len", "1024"])
    assert "total: 100 steps, 819,200 train tokens" in text


def test_without_final_window_the_last_window_entry_validates_even_unused():
    # speedrun's fourth window entry is the extension's; with no extension steps it still sets the
    # final validation's windows, as before the plan existed
    plan = make_plan(Config(**{**PRESETS["speedrun"], "extension_steps": 0, "final_window": ""}))
    assert plan.final_windows == (768, 1664) and plan.stages[-1].windows == (640, 1408)


def test_window_stages_that_leave_no_stage_are_one_line():
    with pytest.raises(ConfigError, match="leaves no stage"):
        make_plan(Config(**{**PRESETS["record11"], "window_stages": "1/3", "extension_steps": 4}))


def test_the_tools_refuse_plan_which_only_the_run_takes():
    with pytest.raises(ConfigError, match="--plan is train_gpt.py's"):
        parse_config(["--plan"])


def test_plan_flag_checks_the_model_and_optimizer_settings(capsys):
    assert train_gpt.main(["--preset", "record11", "--optimizer", "sgd", "--plan"]) == 2
    assert "--optimizer sgd is not one of" in capsys.readouterr().err
