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
