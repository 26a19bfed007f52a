"""Rotary position embedding, standard or record #46's half-truncated form, and YaRN window growth."""
import math

import torch
import torch.nn as nn


class Rotary(nn.Module):
    """Rotates each pair (j, j + head_dim/2) of (batch, seq, heads, head_dim) vectors by angle t * frequency_j.

    Standard frequencies are 1 / base^(2j/head_dim). truncated=True is record #46's half-truncated form:
    head_dim/4 frequencies log-spaced from 1 down to 1/base, then zeros. The slow half of the standard
    frequencies turns a pair by a small fraction of a rotation across an attention window, so it carries
    little position information; held at zero, those channels stay stationary and match by content alone.
    """

    def __init__(self, head_dim, base=10000.0, truncated=False, bf16_tables=False, adjacent_pairs=False):
        super().__init__()
        # HEAD pairs dims (2j, 2j+1) instead of (j, j + head_dim/2): the same rotations of other dims,
        # so its stationary dims are the last half (the partial key offset shifts those)
        self.adjacent_pairs = adjacent_pairs
        self.bf16_tables = bf16_tables  # round cos and sin to bf16, as record #46's cached tables are
        if truncated and (head_dim % 4 or head_dim < 8):
            raise ValueError(f"truncated rotary needs head_dim a multiple of 4 and at least 8, got {head_dim}")
        self.head_dim, self.base, self.truncated = head_dim, base, truncated
        # Not persistent, so state dicts keep their keys: a run resumed after a YaRN step must apply it again.
        self.register_buffer("frequencies", self._initial_frequencies(), persistent=False)

    def _initial_frequencies(self):
        if not self.truncated:
            return 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        rotating = (1 / self.base) ** torch.linspace(0, 1, steps=self.head_dim // 4, dtype=torch.float32)
        return torch.cat((rotating, rotating.new_zeros(self.head_dim // 2 - self.head_dim // 4)))

    def forward(self, x, positions=None):
        """x (batch, seq, heads, head_dim) rotated by its positions, computed in float32, returned in x's
        dtype: 0..seq-1 along dim 1, or `positions` (seq, heads) per head (HEAD's paired layers)."""
        # Angles come from the frequencies on every call: YaRN changes them in place, and no table
        # has to cover the longest row (262,144 validation tokens in record #46).
        if positions is None:
            positions = torch.arange(x.size(1), dtype=torch.float32, device=x.device)[:, None]
        angles = (positions.float()[..., None] * self.frequencies)[None]  # (1, seq, heads or 1, head_dim/2)
        cos, sin = angles.cos(), angles.sin()
        if self.bf16_tables:
            cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
        if self.adjacent_pairs:
            pairs = x.float().unflatten(-1, (-1, 2))
            x1, x2 = pairs[..., 0], pairs[..., 1]
            return torch.stack((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).flatten(-2).type_as(x)
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x)

    @torch.no_grad()
    def apply_yarn(self, old_window, new_window, alpha=1.0, beta=32.0):
        """Adapts the frequencies to an attention window grown from old_window to new_window tokens (YaRN).

        A frequency that turned fewer than alpha times across the old window is scaled by old/new, so the
        new window spans the angles that training saw; one that turned beta times or more has seen every
        angle and is kept; those between are interpolated linearly. Zero frequencies stay zero. In place,
        so compiled graphs that read the buffer see the new values.
        """
        rotations = old_window * self.frequencies / (2 * math.pi)
        ratio = old_window / new_window
        kept = ((rotations - alpha) / (beta - alpha)).clamp(0, 1)
        self.frequencies.mul_(ratio + kept * (1 - ratio))

    @torch.no_grad()
    def reset(self):
        """Restores the frequencies from before any YaRN step."""
        self.frequencies.copy_(self._initial_frequencies())


def yarn_attention_scale(scale, old_window, new_window, coefficient=0.2):
    """The softmax scale for a window grown from old_window to new_window: more keys spread attention,
    and sharpening it by the log of the growth keeps it about as focused (record #46: 0.1 -> 0.131778)."""
    return scale * (1 + coefficient * math.log(new_window / old_window))
