import math

import pytest
import torch

from model.rotary import Rotary, yarn_attention_scale

BLOCK = 128  # record #46 counts windows in blocks of 128 tokens


def test_truncated_frequencies_are_record_46s():
    frequencies = Rotary(128, base=1024, truncated=True).frequencies
    expected = [(1 / 1024) ** (j / 31) for j in range(32)] + [0.0] * 32
    torch.testing.assert_close(frequencies, torch.tensor(expected), rtol=1e-6, atol=0)
    assert frequencies[0] == 1 and not frequencies[32:].any()


def test_standard_rotary_is_unchanged_bit_for_bit():
    """The frequencies and the output of the table-based Rotary that model/gpt.py had before."""
    rotary = Rotary(64)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    assert torch.equal(rotary.frequencies, inv_freq)
    angles = torch.outer(torch.arange(256, dtype=torch.float32), inv_freq)  # the old max_seq_len table
    cos, sin = angles.cos()[None, :100, None, :], angles.sin()[None, :100, None, :]
    for x in (torch.randn(2, 100, 3, 64), torch.randn(2, 100, 3, 64).bfloat16()):
        x1, x2 = x.float().chunk(2, dim=-1)
        assert torch.equal(rotary(x), torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x))


def test_each_pair_turns_by_position_times_frequency():
    rotary = Rotary(128, base=1024, truncated=True)
    x = torch.randn(1, 40, 1, 128)
    t = 37
    y = rotary(x)[0, t, 0]
    for j in (0, 5, 31, 32, 63):  # fast, middle, slowest rotating, and two stationary pairs
        angle = t * (1 / 1024) ** (j / 31) if j < 32 else 0.0
        a, b = x[0, t, 0, j].item(), x[0, t, 0, j + 64].item()
        expected = (a * math.cos(angle) + b * math.sin(angle), -a * math.sin(angle) + b * math.cos(angle))
        torch.testing.assert_close((y[j].item(), y[j + 64].item()), expected, rtol=0, atol=1e-5)
    assert torch.equal(y[32:64], x[0, t, 0, 32:64]) and torch.equal(y[96:], x[0, t, 0, 96:])


def rotated_at(rotary, vector, position):
    return rotary(vector.expand(1, position + 1, 1, -1))[0, position, 0]


@pytest.mark.parametrize("truncated", [False, True])
def test_scores_depend_only_on_the_position_difference(truncated):
    rotary = Rotary(64, base=1024, truncated=truncated)
    q, k = torch.randn(64), torch.randn(64)

    def score(q_position, k_position):
        return rotated_at(rotary, q, q_position) @ rotated_at(rotary, k, k_position)

    same_difference = torch.stack([score(5, 2), score(50, 47), score(300, 297)])
    torch.testing.assert_close(same_difference, same_difference[:1].expand(3), rtol=0, atol=1e-4)
    assert (score(5, 2) - score(5, 4)).abs() > 1e-2


def test_yarn_formula_for_3_to_7_blocks():
    rotary = Rotary(128, base=1024, truncated=True)
    before = rotary.frequencies.clone()
    rotary.apply_yarn(3 * BLOCK, 7 * BLOCK)
    after = rotary.frequencies

    def expected(j):
        omega = (1 / 1024) ** (j / 31)
        rotations = 128 * 3 * omega / (2 * math.pi)  # record #46's r_j with w_old = 3 blocks
        gamma = min(max((rotations - 1) / (32 - 1), 0.0), 1.0)
        return omega * (3 / 7 + gamma * (1 - 3 / 7))

    assert torch.equal(after[:3], before[:3])  # fast: r >= 32, unchanged
    assert expected(8) != pytest.approx(before[8].item(), rel=0.1)  # middle: 1 < r < 32, interpolated
    assert expected(31) == pytest.approx(before[31].item() * 3 / 7, rel=1e-12)  # slow: r <= 1, scaled by old/new
    for j in (0, 8, 31):
        assert after[j].item() == pytest.approx(expected(j), rel=1e-6)
    assert not after[32:].any()


def test_three_yarn_steps_and_reset_as_record_46():
    rotary = Rotary(128, base=1024, truncated=True)
    initial = rotary.frequencies.clone()
    scales = [0.1]
    for old, new in ((3, 7), (7, 11), (11, 13)):
        rotary.apply_yarn(old * BLOCK, new * BLOCK)
        scales.append(yarn_attention_scale(scales[-1], old * BLOCK, new * BLOCK))
    assert rotary.frequencies[31].item() == pytest.approx(initial[31].item() * 3 / 13, rel=1e-6)
    assert torch.equal(rotary.frequencies[:3], initial[:3]) and not rotary.frequencies[32:].any()
    assert scales == pytest.approx([0.1, 0.116946, 0.127518, 0.131778], abs=5e-7)
    rotary.reset()
    assert torch.equal(rotary.frequencies, initial)


def test_a_compiled_rotary_sees_yarn_steps():
    """The frequencies reach the graph as an input, not a constant (aot_eager: dynamo's capture without
    inductor's 15 s CPU compile)."""
    rotary = Rotary(32, base=1024, truncated=True)
    compiled = torch.compile(rotary, backend="aot_eager", dynamic=False)
    x = torch.randn(1, 64, 2, 32)
    before = compiled(x)
    rotary.apply_yarn(16, 48)
    after = compiled(x)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, rotary(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [4, 6, 30])
def test_truncation_needs_a_quarter_of_the_dims_and_two_frequencies(head_dim):
    with pytest.raises(ValueError, match="truncated rotary"):
        Rotary(head_dim, truncated=True)
