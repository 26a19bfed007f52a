"""Schedules as pure functions of the step index (0-based index of the update being made).

A run's steps are `scheduled` steps, over which the LR schedule and the stages run, then
optional extension steps at the floor LR with the last stage's batch (record #46 trains 2120
scheduled steps plus 40). `lr_multiplier`, `muon_momentum` and `loss_weights` read them from a
config.Plan.
"""


def lr_multiplier_at(step, total_steps, cooldown_frac, warmup_steps=0, floor=0.0, stages=(), plateau=None,
                     cooldown_start="fraction"):
    """Linear warmup, then the plateau, then a linear cooldown to `floor` that ends at step == total_steps.

    The plateau is `plateau` where given (HEAD's: the multiplier of the step's batch stage), else
    1.0 or the multiplier of the last of `stages` ((fraction, multiplier) pairs) whose fraction of
    total_steps the step is past; the cooldown blends that plateau with the floor, so a stage change
    during the cooldown still lifts the rate (record #46 at step 1400).

    Where the cooldown starts (`cooldown_start`):
    - "fraction" (record #46): over the last cooldown_frac * total_steps steps, a real number: with
      w = (total_steps - step) / that, the rate is plateau * w + floor * (1 - w);
    - "step" (HEAD): from the whole step start = int(total_steps * (1 - cooldown_frac)): with
      t = (step - start) / (total_steps - start), the rate is plateau * (1 - t) + floor * t.
    They agree to a rounding error where cooldown_frac * total_steps and total_steps * (1 - cooldown_frac)
    are whole numbers in floating point, and differ by a step's share elsewhere. Either reaches `floor`
    exactly at total_steps and stays there after (the extension steps).
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if plateau is None:
        plateau = 1.0
        for frac, multiplier in stages:
            if step / total_steps > frac:
                plateau = multiplier
    if cooldown_start == "step":
        start = int(total_steps * (1 - cooldown_frac))
        if step < start:
            return plateau
        t = min(1.0, (step - start) / (total_steps - start)) if total_steps > start else 1.0
        return plateau * (1 - t) + floor * t
    cooldown_steps = cooldown_frac * total_steps
    steps_left = total_steps - step
    if not cooldown_steps:  # no cooldown: the extension steps at the floor all the same
        return plateau if steps_left > 0 else floor
    if steps_left >= cooldown_steps:
        return plateau
    weight = max(steps_left, 0) / cooldown_steps
    return plateau * weight + floor * (1 - weight)


def muon_momentum_at(step, warmup_steps=300, start=0.85, end=0.95, total_steps=0, cooldown_steps=0):
    """Muon momentum ramps linearly from `start` to `end` over the first `warmup_steps` steps, and
    back towards `start` over the last `cooldown_steps` of `total_steps`."""
    if cooldown_steps and step > total_steps - cooldown_steps:
        return end - (end - start) * (step - (total_steps - cooldown_steps)) / cooldown_steps
    if warmup_steps <= 0:
        return end
    frac = min(step / warmup_steps, 1.0)
    return (1 - frac) * start + frac * end


def stage_progress_at(step, stages):
    """(stage, t): the config.Stage holding `step` and how far through it the step is, as HEAD measures it:
    t = (step - first_step) / (end_step - first_step), from 0 at a stage's first step to just under 1 at
    its last; for a step past the last stage's end (the final validation's), the last stage and t = 1."""
    for stage in stages:
        if step < stage.end_step:  # an empty stage never holds a step: an earlier one ends at or before it
            return stage, (step - stage.first_step) / (stage.end_step - stage.first_step)
    return stages[-1], 1.0


def loss_weights_at(step, stages):
    """(multi-token prediction weights, prefix-token weight) of the training loss at `step`: each weight
    goes from its stage's start value to its end value as start + (end - start) * t, t of stage_progress_at
    (at its stage's last step a ramp is one step short of its end value, which the next stage need not take)."""
    stage, t = stage_progress_at(step, stages)
    mtp = tuple(a + (b - a) * t for a, b in zip(stage.mtp_weights_start, stage.mtp_weights_end))
    return mtp, stage.prefix_weight_start + (stage.prefix_weight_end - stage.prefix_weight_start) * t


def lr_multiplier(plan, step):
    """The LR multiplier of the update at `step` in the run of a config.Plan."""
    c = plan.config
    return lr_multiplier_at(step, plan.scheduled_steps, c.cooldown_frac, c.warmup_steps, c.lr_floor, plan.lr_stages,
                            plan.stage_at(step).lr_multiplier, c.cooldown_start)


def loss_weights(plan, step):
    """The training loss weights (multi-token prediction, prefix token) of `step` in the run of a config.Plan."""
    return loss_weights_at(step, plan.stages)


def muon_momentum(plan, step):
    """Muon's (and NorMuon's) momentum for the update at `step` in the run of a config.Plan."""
    c = plan.config
    return muon_momentum_at(step, c.muon_momentum_warmup_steps, c.muon_momentum_start, c.muon_momentum_end, c.steps,
                            c.muon_momentum_cooldown_steps)
