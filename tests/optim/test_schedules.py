import pytest

from optim.schedules import lr_multiplier_at, muon_momentum_at


def test_stable_then_linear_cooldown_to_zero():
    total, frac = 100, 0.3
    values = [lr_multiplier_at(s, total, frac) for s in range(total + 1)]
    assert values[:71] == [1.0] * 71  # cooldown covers the last 30 steps
    assert values[85] == pytest.approx(15 / 30)
    assert values[total] == 0.0
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cooldown_ends_at_floor_and_warmup_ramps_up():
    assert lr_multiplier_at(100, 100, 0.5, floor=0.1) == pytest.approx(0.1)
    assert lr_multiplier_at(75, 100, 0.5, floor=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert [lr_multiplier_at(s, 100, 0.2, warmup_steps=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_no_cooldown_keeps_full_rate():
    assert all(lr_multiplier_at(s, 50, 0.0) == 1.0 for s in range(50))


def test_muon_momentum_warmup():
    assert muon_momentum_at(0) == pytest.approx(0.85)
    assert muon_momentum_at(150) == pytest.approx(0.90)
    assert muon_momentum_at(300) == pytest.approx(0.95)
    assert muon_momentum_at(10_000) == pytest.approx(0.95)
    assert muon_momentum_at(5, warmup_steps=0) == 0.95


# Record #46's schedules, checked against values written out from its log (docs/RECORD46.md §5).

from config import ConfigError, make_plan, parse_config  # noqa: E402
from optim.schedules import lr_multiplier, muon_momentum  # noqa: E402


def record46_lr(step):
    """Record #46's LR multiplier, as its log computes it, written out independently."""
    x = step / 2120
    lr_max = 1.93 if x > 0.66 else 1.51 if x > 0.33 else 1.0
    if x >= 0.45:
        w = (1 - x) / 0.55 if x <= 1 else 0.0
        return lr_max * w + 0.1 * (1 - w)
    return lr_max


def test_record46_lr_multiplier_is_record_46s_at_every_step():
    _, config = parse_config(["--preset", "record46"])
    plan = make_plan(config)
    ours = [lr_multiplier_at(s, config.steps - config.extension_steps, config.cooldown_frac, config.warmup_steps,
                             config.lr_floor, plan.lr_stages) for s in range(config.steps)]
    assert [lr_multiplier(plan, s) for s in range(config.steps)] == ours  # what the run's optimizer sets
    assert ours == pytest.approx([record46_lr(s) for s in range(config.steps)], abs=1e-12)
    # the log's sample values, and the jump up when the last stage starts during the cooldown
    for step, value in {0: 1.0, 699: 1.0, 700: 1.51, 954: 1.51, 1000: 1.4544, 1399: 0.9719, 1400: 1.2300,
                        2000: 0.2883, 2119: 0.1016, 2120: 0.1, 2159: 0.1}.items():
        assert ours[step] == pytest.approx(value, abs=1e-4), step


def test_record46_momentum_warms_up_then_cools_down_over_the_last_50_steps():
    _, c = parse_config(["--preset", "record46"])
    ours = [muon_momentum_at(s, c.muon_momentum_warmup_steps, c.muon_momentum_start, c.muon_momentum_end, c.steps,
                             c.muon_momentum_cooldown_steps) for s in range(c.steps)]
    assert [muon_momentum(make_plan(c), s) for s in range(c.steps)] == ours  # what the run's optimizer sets
    expected = [0.85 + 0.10 * s / 300 if s < 300 else 0.95 - 0.10 * (s - 2110) / 50 if s > 2110 else 0.95
                for s in range(2160)]
    assert ours == pytest.approx(expected, abs=1e-12)
    assert ours[2159] == pytest.approx(0.852)


def test_record46_stages_switch_batch_and_windows_at_707_1414_and_2120():
    _, c = parse_config(["--preset", "record46"])
    plan = make_plan(c)
    assert [plan.stage_at(s).index for s in (0, 706, 707, 1413, 1414, 2119, 2120, 2159)] == [0, 0, 1, 1, 2, 2, 3, 3]
    tokens = [plan.stage_at(s).tokens_per_step for s in range(c.steps)]
    assert (tokens[706], tokens[707], tokens[1414], tokens[2159]) == (131_072, 262_144, 393_216, 393_216)
    assert sum(tokens) == 571_342_848  # the record's training tokens
    rows = [plan.stage_at(s).seq_len for s in (0, 707, 1414)]
    assert rows == [16_384, 32_768, 49_152]  # one packed row per rank on 8 GPUs
    assert [plan.windows_at(s) for s in (0, 707, 1414, 2120)] == [(128, 384), (384, 896), (640, 1408), (768, 1664)]
    assert plan.final_windows == (768, 2560)
    assert plan.first_steps() == [0, 707, 1414, 2120]


def test_without_extension_steps_the_extensions_window_goes_unused():
    _, c = parse_config(["--preset", "record46", "--steps", "2120", "--extension-steps", "0"])
    plan = make_plan(c)
    assert plan.first_steps() == [0, 707, 1414]
    assert plan.windows_at(2119) == (640, 1408) and plan.windows_path(2120)[-1] == (640, 1408)


def test_a_single_stage_run_has_one_batch_and_no_windows():
    _, c = parse_config(["--preset", "record11"])
    plan = make_plan(c)
    assert len(plan.stages) == 1 and plan.windows_at(100) is None and plan.first_steps() == [0]
    assert {plan.stage_at(s).seq_len for s in range(c.steps)} == {c.seq_len}  # every step's batch multiplier is 1
    assert {plan.stage_at(s).tokens_per_step for s in range(c.steps)} == {c.batch_tokens}


@pytest.mark.parametrize("flags, message", [
    (["--window-stages", "1/3,3/7"], "has 2 entries; 3 stage"),
    (["--batch-stages", "1,2.5"], "positive whole numbers"),
    (["--window-stages", "3/1,3/7,5/11,6/13"], "0 < short <= long"),
    (["--extension-steps", "5000"], "below --steps"),
    (["--lr-stages", "0.3"], "fraction:multiplier"),
])
def test_stage_settings_that_cannot_work_are_one_clear_error(flags, message):
    _, c = parse_config(["--preset", "record46"] + flags)
    with pytest.raises(ConfigError, match=message):
        make_plan(c)


def test_a_resumed_run_replays_every_stage_window_it_passed():
    _, c = parse_config(["--preset", "record46"])
    plan = make_plan(c)
    assert plan.windows_path(0) == [(128, 384)]
    assert plan.windows_path(1500) == [(128, 384), (384, 896), (640, 1408)]
    assert plan.windows_path(2159) == [(128, 384), (384, 896), (640, 1408), (768, 1664)]


# HEAD's schedules (modded-nanogpt f411b3d3, TrainingSchedule): LR by stage with a cooldown from a whole
# step, and loss weights that ramp linearly within a stage.

from config import Config, Stage  # noqa: E402
from optim.schedules import loss_weights, loss_weights_at, stage_progress_at  # noqa: E402


def head_lr(step, ends=(423, 847), scheduled=1270, multipliers=(1.0, 1.52, 1.73), frac=0.60, floor=0.15):
    """HEAD's LR multiplier, written out: the step's stage multiplier m until the cooldown starts at the
    whole step int(N * (1 - frac)), then m * (1 - t) + floor * t, t = (step - start) / (N - start), at most 1."""
    m = multipliers[0] if step < ends[0] else multipliers[1] if step < ends[1] else multipliers[2]
    start = int(scheduled * (1 - frac))
    if step < start:
        return m
    t = min(1.0, (step - start) / (scheduled - start))
    return m * (1 - t) + floor * t


def test_cooldown_from_a_whole_step_is_heads_formula_exactly():
    for step in range(1286):
        m = 1.0 if step < 423 else 1.52 if step < 847 else 1.73
        ours = lr_multiplier_at(step, 1270, 0.60, floor=0.15, plateau=m, cooldown_start="step")
        assert ours == head_lr(step), step  # bit for bit
    assert lr_multiplier_at(508, 1270, 0.6, floor=0.15, plateau=1.52, cooldown_start="step") == 1.52
    assert lr_multiplier_at(1270, 1270, 0.6, floor=0.15, plateau=1.73, cooldown_start="step") == 0.15


def test_record_46s_cooldown_differs_from_heads_where_its_length_is_not_a_whole_step():
    # N = 1270, frac 0.6: the same schedule to a rounding error, not bit for bit
    fraction = [lr_multiplier_at(s, 1270, 0.6, floor=0.15, plateau=1.73) for s in range(1286)]
    step = [lr_multiplier_at(s, 1270, 0.6, floor=0.15, plateau=1.73, cooldown_start="step") for s in range(1286)]
    assert fraction == pytest.approx(step, abs=1e-12) and fraction != step
    # N = 1271: 0.6 x 1271 = 762.6 steps of cooldown from 508.4, against HEAD's 763 steps from step 508
    assert lr_multiplier_at(509, 1271, 0.6, plateau=1.0) == pytest.approx(762 / 762.6)
    assert lr_multiplier_at(509, 1271, 0.6, plateau=1.0, cooldown_start="step") == pytest.approx(1 - 1 / 763)
    # 1 - 0.55 is 0.44999999999999996 in floating point: HEAD's cooldown starts at int(2120 x that) = 953
    assert lr_multiplier_at(953, 2120, 0.55, floor=0.1, cooldown_start="step") == 1.0
    assert lr_multiplier_at(954, 2120, 0.55, floor=0.1, cooldown_start="step") == pytest.approx(1 - 0.9 / 1167)
    assert lr_multiplier_at(954, 2120, 0.55, floor=0.1) == 1.0


@pytest.mark.parametrize("cooldown_start", ["fraction", "step"])
def test_without_a_cooldown_the_extension_steps_run_at_the_floor(cooldown_start):
    values = [lr_multiplier_at(s, 10, 0.0, floor=0.2, plateau=1.5, cooldown_start=cooldown_start) for s in range(13)]
    assert values[:10] == [1.5] * 10 and values[10:] == [0.2] * 3


def test_stage_progress_is_heads_share_of_the_stage():
    stages = (Stage(0, 0, 4, 1, 8), Stage(1, 4, 4, 1, 8), Stage(2, 4, 10, 1, 8))  # stage 1 is empty
    assert [stage_progress_at(s, stages) for s in (0, 3, 4, 9)] == [
        (stages[0], 0.0), (stages[0], 0.75), (stages[2], 0.0), (stages[2], 5 / 6)]
    assert stage_progress_at(10, stages) == (stages[2], 1.0)  # past the end: the final validation's step


def head_loss_weights(step):
    """HEAD's multi-token prediction and prefix weights, written out for stage ends 423, 847, 1270:
    stage 1 [1, 0.5, 0.25 -> 0] with prefix 0.25, stage 2 [1, 0.5 -> 0] with prefix 0.25 -> 0, then [1] and 0."""
    if step < 423:
        t = step / 423
        return [1.0, 0.5, 0.25 * (1 - t)], 0.25
    if step < 847:
        t = (step - 423) / 424
        return [1.0, 0.5 * (1 - t)], 0.25 * (1 - t)
    return [1.0], 0.0


def test_heads_loss_weights_at_every_step():
    from config import make_plan

    plan = make_plan(Config(steps=1285, extension_steps=15, batch_stages="1,2,3", stage_boundaries="round",
                            mtp_weight_stages="1/0.5/0.25>0, 1/0.5>0, 1", prefix_weight_stages="0.25, 0.25>0, 0"))
    for step in range(1286):
        mtp, prefix = loss_weights(plan, step)
        expected_mtp, expected_prefix = head_loss_weights(step)
        assert mtp == pytest.approx(expected_mtp, abs=1e-15) and len(mtp) == len(expected_mtp), step
        assert prefix == pytest.approx(expected_prefix, abs=1e-15), step
    # a ramp ends one step short of its end value; the next stage starts from its own
    assert loss_weights(plan, 422)[0] == pytest.approx((1.0, 0.5, 0.25 / 423))
    assert loss_weights(plan, 423)[0] == (1.0, 0.5)
    assert loss_weights(plan, 0) == ((1.0, 0.5, 0.25), 0.25)


def test_default_loss_is_the_next_token_alone():
    plan = make_plan(parse_config(["--preset", "record46"])[1])
    assert {loss_weights(plan, s) for s in range(plan.config.steps + 1)} == {((1.0,), 0.0)}
    assert loss_weights_at(5, (Stage(0, 0, 10, 1, 8),)) == ((1.0,), 0.0)
