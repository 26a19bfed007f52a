"""Schedules as pure functions of the step index (0-based index of the update being made)."""


def lr_multiplier_at(step, total_steps, cooldown_frac, warmup_steps=0, floor=0.0):
    """Linear warmup, then 1.0, then a linear cooldown over the last cooldown_frac of steps to `floor`.

    The cooldown reaches `floor` exactly at step == total_steps, one past the last update.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    cooldown_steps = cooldown_frac * total_steps
    steps_left = total_steps - step
    if steps_left >= cooldown_steps:
        return 1.0
    return floor + (1.0 - floor) * max(steps_left, 0) / cooldown_steps


def muon_momentum_at(step, warmup_steps=300, start=0.85, end=0.95):
    """Muon momentum ramps linearly from `start` to `end` over the first `warmup_steps` steps."""
    if warmup_steps <= 0:
        return end
    frac = min(step / warmup_steps, 1.0)
    return (1 - frac) * start + frac * end
