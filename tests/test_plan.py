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


def test_record46_plan_is_record_46s_run():
    plan = make_plan(Config(**PRESETS["record46"]))
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


def test_record46_plan_flag_shows_stages_tokens_and_shards():
    text = plan_output(["--preset", "record46"])
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


# ----------------------------------------------------------------------------- HEAD's schedules as fields

# modded-nanogpt HEAD (f411b3d3): 1270 scheduled + 15 extension steps in stages ending at round(N/3),
# round(2N/3), N; LR 1.0/1.52/1.73 by stage, cooldown frac 0.60 from a whole step to 0.15; documents
# cut to 896 tokens in stage 1, 2048 after; loss weights ramped per stage; head tied until step 847.
HEAD_SCHEDULES = dict(
    bos_align=True, batch_tokens=131_072, seq_len=16_384, batch_stages="1,2,3", steps=1285, extension_steps=15,
    window_stages="1/3,3/7,5/11,6/13", final_window="6/20", window_block=128, stage_boundaries="round",
    stage_lr="1,1.52,1.73", cooldown_start="step", cooldown_frac=0.60, lr_floor=0.15,
    max_doc_len_stages="896,2048,2048", mtp_weight_stages="1/0.5/0.25>0,1/0.5>0,1",
    prefix_weight_stages="0.25,0.25>0,0", tied_head_stages=2)


def head_lr(step):
    """HEAD's get_lr written out: the stage's multiplier m (stages end at 423 and 847), then from step
    int(1270 * (1 - 0.6)) = 508 the blend m * (1 - t) + 0.15 * t, t = (step - 508) / (1270 - 508) up to 1."""
    m = 1.0 if step < 423 else 1.52 if step < 847 else 1.73
    if step < 508:
        return m
    t = min(1.0, (step - 508) / (1270 - 508))
    return m * (1 - t) + 0.15 * t


def test_heads_schedule_fields_give_heads_stages_tokens_doc_lengths_untie_step_and_lr():
    from optim.schedules import lr_multiplier

    plan = make_plan(Config(**HEAD_SCHEDULES))
    assert [(s.first_step, s.end_step) for s in plan.stages] == [(0, 423), (423, 847), (847, 1270), (1270, 1285)]
    assert [s.tokens_per_step for s in plan.stages] == [131_072, 262_144, 393_216, 393_216]
    assert plan.total_tokens == 423 * 131_072 + 424 * 262_144 + (423 + 15) * 393_216 == 338_821_120
    assert [s.max_doc_len for s in plan.stages] == [896, 2048, 2048, 2048]
    assert [s.windows for s in plan.stages] == [(128, 384), (384, 896), (640, 1408), (768, 1664)]
    assert plan.final_windows == (768, 2560)
    assert plan.untie_step == 847
    assert [lr_multiplier(plan, s) for s in range(1285)] == [head_lr(s) for s in range(1285)]  # bit for bit
    assert [(s.mtp_weights_start, s.mtp_weights_end, s.prefix_weight_start, s.prefix_weight_end)
            for s in plan.stages] == [((1, 0.5, 0.25), (1, 0.5, 0), 0.25, 0.25), ((1, 0.5), (1, 0), 0.25, 0),
                                      ((1,), (1,), 0, 0), ((1,), (1,), 0, 0)]


def test_stage_boundaries_ceil_is_record_46s_and_round_is_pythons_half_to_even():
    def ends(rule, steps, stages):
        config = Config(steps=steps, batch_stages=",".join(["1"] * stages), stage_boundaries=rule)
        return [s.end_step for s in make_plan(config).stages]

    assert ends("ceil", 1270, 3) == [424, 847, 1270]  # step s in stage int(3s / N)
    assert ends("round", 1270, 3) == [423, 847, 1270]  # 423.33 and 846.67 rounded
    # halves: round to the even neighbour (2.5 -> 2, 7.5 -> 8, 3.5 -> 4), not up
    assert ends("round", 5, 2) == [2, 5] and ends("round", 7, 2) == [4, 7]
    assert ends("round", 10, 4) == [2, 5, 8, 10] and ends("ceil", 10, 4) == [3, 5, 8, 10]


def test_new_fields_default_to_todays_plan():
    for preset in ("record11", "record46"):
        config = Config(**PRESETS[preset])
        plan = make_plan(config)
        assert plan.untie_step is None
        for stage in plan.stages:
            assert stage.max_doc_len == config.max_doc_len and stage.lr_multiplier is None
            assert (stage.mtp_weights_start, stage.mtp_weights_end) == ((1.0,), (1.0,))
            assert (stage.prefix_weight_start, stage.prefix_weight_end) == (0.0, 0.0)


def test_the_extension_keeps_the_last_stages_end_values_or_takes_its_own_entry():
    base = dict(steps=10, extension_steps=2, batch_stages="1,2", bos_align=True)
    plan = make_plan(Config(**base, mtp_weight_stages="1/1>0.5,1/0.5>0.25", prefix_weight_stages="0.5,0.5>0.1",
                            max_doc_len_stages="64,0", stage_lr="1,2"))
    extension = plan.stages[-1]
    assert extension.extension and (extension.mtp_weights_start, extension.mtp_weights_end) == ((1, 0.25), (1, 0.25))
    assert (extension.prefix_weight_start, extension.prefix_weight_end) == (0.1, 0.1)
    assert extension.max_doc_len == 0 and extension.lr_multiplier == 2
    plan = make_plan(Config(**base, mtp_weight_stages="1/1,1/0.5,1", prefix_weight_stages="0.5,0.5>0.1,0.3>0",
                            max_doc_len_stages="64,0,128"))
    extension = plan.stages[-1]
    assert (extension.mtp_weights_start, extension.prefix_weight_start, extension.prefix_weight_end,
            extension.max_doc_len) == ((1,), 0.3, 0, 128)


def test_tied_head_stages_untie_at_the_odd_first_step_of_the_next_stage():
    def untie(stages, **fields):
        return make_plan(Config(**{**HEAD_SCHEDULES, "tied_head_stages": stages, **fields})).untie_step

    assert [untie(k) for k in (0, 1, 2, 3)] == [None, 423, 847, 1271]
    assert untie(1, stage_boundaries="ceil") == 425  # stage 2 starts at 424 under record #46's rule: made odd


@pytest.mark.parametrize("fields, message", [
    (dict(stage_boundaries="floor"), "--stage-boundaries floor is not one of ceil, round"),
    (dict(cooldown_start="end"), "--cooldown-start end is not one of fraction, step"),
    (dict(stage_lr="1,1.52"), "--stage-lr 1,1.52: give 3 multiplier"),
    (dict(stage_lr="1,x,2"), "--stage-lr: '1,x,2' is not a comma-separated list"),
    (dict(stage_lr="1,-1,2"), "--stage-lr 1,-1,2: give 3 multiplier"),
    (dict(lr_stages="0.33:1.5"), "--stage-lr and --lr-stages both"),
    (dict(max_doc_len_stages="896,2048"), "--max-doc-len-stages 896,2048 has 2 entries; 3 stage"),
    (dict(max_doc_len_stages="896,-1,2048"), "--max-doc-len-stages: '-1' is not a number of tokens"),
    (dict(max_doc_len_stages="896,1.5k,2048"), "--max-doc-len-stages: '1.5k'"),
    (dict(bos_align=False), "--max-doc-len-stages needs --bos-align true"),
    (dict(max_doc_len=2048), "replaces --max-doc-len 2048: set --max-doc-len 0"),
    (dict(mtp_weight_stages="1/0.5,1"), "--mtp-weight-stages 1/0.5,1 has 2 entries"),
    (dict(mtp_weight_stages="1//0.5,1,1"), "--mtp-weight-stages: '1//0.5' is not weights"),
    (dict(mtp_weight_stages="1/-0.5,1,1"), "--mtp-weight-stages: '1/-0.5'"),
    (dict(mtp_weight_stages="1/0.5>x,1,1"), "--mtp-weight-stages: '1/0.5>x'"),
    (dict(mtp_weight_stages="1/nan,1,1"), "--mtp-weight-stages: '1/nan'"),
    (dict(prefix_weight_stages="0.25>,0,0"), "--prefix-weight-stages: '0.25>' is not weights"),
    (dict(prefix_weight_stages="0.25,0"), "--prefix-weight-stages 0.25,0 has 2 entries"),
    (dict(prefix_weight_stages="0.25>0>1,0,0"), "--prefix-weight-stages: '0.25>0>1'"),
    (dict(tied_head_stages=-1), "--tied-head-stages -1: give 0 \\(untied throughout\\)"),
    (dict(tied_head_stages=4), "--tied-head-stages 4: .* below the run's 4 stages"),
    (dict(tied_head_stages=3, steps=1271, extension_steps=1), "the untie step 1271 .* past the run's last step 1270"),
])
def test_heads_schedule_fields_refuse_what_cannot_work_naming_the_flag(fields, message):
    with pytest.raises(ConfigError, match=message):
        make_plan(Config(**{**HEAD_SCHEDULES, **fields}))


def test_speedrun_is_heads_run_and_its_plan_flag_shows_it():
    """The issue's numbers: 1,285 steps, stage ends 423 / 847 / 1,270, 131,072 / 262,144 / 393,216 tokens a
    step, 338,821,120 tokens, documents of 896 tokens in stage 1 and 2,048 after, untied after step 847."""
    speedrun = make_plan(Config(**PRESETS["speedrun"]))
    assert speedrun.stages == make_plan(Config(**{**PRESETS["speedrun"], **HEAD_SCHEDULES})).stages
    assert speedrun.untie_step == 847
    text = plan_output(["--preset", "speedrun"])
    assert "preset speedrun: 1,285 steps (1,270 scheduled + 15 extension), 11 layers x 768" in text
    assert "stage ends (exclusive): 423, 847, 1,270, 1,285" in text
    assert "total: 1,285 steps, 338,821,120 train tokens" in text
    for tokens, rows in (("131,072", "8 x 16,384"), ("262,144", "8 x 32,768"), ("393,216", "8 x 49,152")):
        assert f"{tokens}  {rows:>17}" in text
    rows = [line for line in text.splitlines() if line.lstrip().startswith(("0 ", "1 ", "2 ", "3e "))]
    assert rows[0].endswith("      896  1/0.5/0.25 -> 1/0.5/0, prefix 0.25")
    assert rows[1].endswith("    2,048  1/0.5 -> 1/0, prefix 0.25 -> 0")
    assert "embedding and head: tied through the update of step 847" in text


def test_heads_schedule_fields_come_from_the_command_line_and_plan_shows_them():
    flags = [arg for name, value in HEAD_SCHEDULES.items() for arg in ("--" + name.replace("_", "-"), str(value))]
    flags += ["--lr-stages", "", "--max-doc-len", "0"]
    _, config = parse_config(["--preset", "record46"] + flags)
    plan = make_plan(config)
    assert [(s.end_step, s.max_doc_len, s.lr_multiplier) for s in plan.stages] == [
        (423, 896, 1.0), (847, 2048, 1.52), (1270, 2048, 1.73), (1285, 2048, 1.73)]
    text = plan_output(["--preset", "record46"] + flags)
    assert "stage ends (exclusive): 423, 847, 1,270, 1,285" in text
    assert "total: 1,285 steps, 338,821,120 train tokens" in text
    rows = [line for line in text.splitlines() if line.lstrip().startswith(("0 ", "1 ", "2 ", "3e "))]
    assert rows[0].endswith("      896  1/0.5/0.25 -> 1/0.5/0, prefix 0.25")
    assert rows[1].endswith("    2,048  1/0.5 -> 1/0, prefix 0.25 -> 0")
    assert rows[2].endswith("    2,048  1") and rows[3].endswith("    2,048  1")
    assert "LR x: by stage 1, 1.52, 1.73; cooldown from step 508 = int(1,270 x (1 - 0.6)) to the floor 0.15" in text
    assert "embedding and head: tied through the update of step 847 (stage 2's first odd step), untied from step 848" \
        in text
