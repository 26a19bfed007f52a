"""Schedules as pure functions of the step index (0-based index of the update being made).

A run's steps are `scheduled` steps, over which the LR schedule and the stages run, then
optional extension steps at the floor LR with the last stage's batch (record #46 trains 2120
scheduled steps plus 40).
"""
import dataclasses

from config import ConfigError, floats, lr_stages, windows


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


def stage_at(step, scheduled_steps, num_stages):
    """The stage of a step: the scheduled steps split into num_stages equal parts; the extension
    steps after them are stage num_stages."""
    if step >= scheduled_steps:
        return num_stages
    return num_stages * step // scheduled_steps


@dataclasses.dataclass(frozen=True)
class Stages:
    """A run's stages: per stage a batch multiplier and attention windows (config.py's *_stages fields)."""
    scheduled_steps: int
    batch_multipliers: tuple  # one per stage; the extension keeps the last
    windows: tuple  # (short, long) blocks per stage, plus the extension's; empty: no windows
    final_window: tuple  # (short, long) blocks for the final validation, or None
    window_block: int
    extension_steps: int = 0

    @classmethod
    def from_config(cls, config):
        multipliers = floats(config.batch_stages, "batch_stages") or [1.0]
        if any(m <= 0 or m != int(m) for m in multipliers):
            raise ConfigError(f"--batch-stages {config.batch_stages}: multipliers must be positive whole numbers")
        stage_windows = windows(config.window_stages, "window_stages")
        final = windows(config.final_window, "final_window")
        if len(final) > 1:
            raise ConfigError(f"--final-window {config.final_window}: give one short/long pair")
        if not 0 <= config.extension_steps < config.steps:
            raise ConfigError(f"--extension-steps {config.extension_steps} must be at least 0 and below --steps "
                              f"{config.steps}")
        if stage_windows and not config.batch_stages:
            multipliers = [1.0] * (len(stage_windows) - (1 if config.extension_steps else 0))
        # one entry per stage, and one more for the extension steps (without it they keep the last
        # stage's; without extension steps it goes unused)
        if stage_windows and len(stage_windows) not in (len(multipliers), len(multipliers) + 1):
            raise ConfigError(
                f"--window-stages {config.window_stages} has {len(stage_windows)} entries; {len(multipliers)} "
                f"stage(s) need {len(multipliers)}, or {len(multipliers) + 1} with the extension's")
        if final and not stage_windows:
            raise ConfigError("--final-window needs --window-stages")
        return cls(config.steps - config.extension_steps, tuple(int(m) for m in multipliers), tuple(stage_windows),
                   final[0] if final else (stage_windows[-1] if stage_windows else None), config.window_block,
                   config.extension_steps)

    @property
    def count(self):
        return len(self.batch_multipliers)

    def index(self, step):
        return stage_at(step, self.scheduled_steps, self.count)

    def batch_multiplier(self, step):
        return self.batch_multipliers[min(self.index(step), self.count - 1)]

    def windows_at(self, step):
        """(short, long) attention windows in tokens at a step, or None for full attention."""
        if not self.windows:
            return None
        short, long = self.windows[min(self.index(step), len(self.windows) - 1)]
        return short * self.window_block, long * self.window_block

    def final_windows(self):
        if not self.final_window:
            return None
        return self.final_window[0] * self.window_block, self.final_window[1] * self.window_block

    def first_steps(self):
        """The first step of every stage, the extension's included: what a warm-up must visit."""
        has_extension = len(self.windows) > self.count and self.extension_steps > 0
        # a run shorter than its stages reaches some of them at the same step, or never
        return sorted({min(-(-i * self.scheduled_steps // self.count), self.scheduled_steps)
                       for i in range(self.count + has_extension)})

    def windows_path(self, step):
        """The windows of every stage a run passed through to reach `step`, in order: setting them one
        after another rebuilds the model's YaRN state (each stretch depends on the one before)."""
        return [self.windows_at(first) for first in self.first_steps() if first <= step]
