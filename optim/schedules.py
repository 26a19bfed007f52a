"""Schedules as pure functions of the step index (0-based index of the update being made).

A run's steps are `scheduled` steps, over which the LR schedule and the stages run, then
optional extension steps at the floor LR with the last stage's batch (record #46 trains 2120
scheduled steps plus 40). `lr_multiplier` and `muon_momentum` read them from a config.Plan.
"""


def lr_multiplier_at(step, total_steps, cooldown_frac, warmup_steps=0, floor=0.0, stages=()):
    """Linear warmup, then the plateau, then a linear cooldown over the last cooldown_frac of steps to `floor`.

    The plateau is 1.0, or the multiplier of the last of `stages` ((fraction, multiplier) pairs)
    whose fraction of total_steps the step is past; the cooldown blends that plateau with the
    floor, so a stage change during the cooldown still lifts the rate (record #46 at step 1400).
    The cooldown reaches `floor` exactly at step == total_steps, and stays there after.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    plateau = 1.0
    for frac, multiplier in stages:
        if step / total_steps > frac:
            plateau = multiplier
    cooldown_steps = cooldown_frac * total_steps
    steps_left = total_steps - step
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


def lr_multiplier(plan, step):
    """The LR multiplier of the update at `step` in the run of a config.Plan."""
    c = plan.config
    return lr_multiplier_at(step, plan.scheduled_steps, c.cooldown_frac, c.warmup_steps, c.lr_floor, plan.lr_stages)


def muon_momentum(plan, step):
    """Muon's (and NorMuon's) momentum for the update at `step` in the run of a config.Plan."""
    c = plan.config
    return muon_momentum_at(step, c.muon_momentum_warmup_steps, c.muon_momentum_start, c.muon_momentum_end, c.steps,
                            c.muon_momentum_cooldown_steps)
