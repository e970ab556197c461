"""``dynprobe.analysis.learning_rate``: step changes of ``run.lr`` against a brute-force scan of every pair of
consecutive known rates, and the bracket note."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dynprobe.analysis.learning_rate import MIN_RATIO, LrChange, lr_change_note, lr_changes


def brute_force_changes(lr: np.ndarray, min_ratio: float) -> list[tuple[int, int, float, float]]:
    """Per group, each finite rate against the previous finite one; a change when after/before ≥ min_ratio or
    ≤ 1/min_ratio (a rise from 0 is infinite, 0 → 0 no change)."""
    found = []
    for group in range(lr.shape[1]):
        previous = None
        for step in range(lr.shape[0]):
            value = float(lr[step, group])
            if math.isnan(value):
                continue
            if previous is not None:
                before = previous
                ratio = value / before if before > 0 else (math.inf if value > 0 else 1.0)
                if ratio >= min_ratio or ratio <= 1 / min_ratio:
                    found.append((step, group, before, value))
            previous = value
    return sorted(found)


@pytest.mark.parametrize("seed", range(5))
def test_lr_changes_equal_a_brute_force_scan_of_random_schedules(seed):
    rng = np.random.default_rng(seed)
    steps, groups = 200, 3
    levels = rng.choice([0.0, 1e-3, 1e-2, 0.05, 0.1, 0.15], size=(steps, groups))
    hold = rng.random((steps, groups)) < 0.9  # mostly constant, with jumps
    lr = levels.copy()
    for step in range(1, steps):
        lr[step] = np.where(hold[step], lr[step - 1], levels[step])
    lr[rng.random((steps, groups)) < 0.1] = np.nan  # steps before the probe attached / groups added later
    for min_ratio in (1.2, MIN_RATIO, 10.0):
        got = [(c.step, c.group, c.before, c.after) for c in lr_changes(lr, min_ratio=min_ratio)]
        assert got == brute_force_changes(lr, min_ratio)
    assert lr_changes(lr) == lr_changes(lr, min_ratio=MIN_RATIO)


def test_a_smooth_schedule_has_no_step_change_and_a_step_decay_has_each_of_its_drops():
    cosine = 0.1 * 0.5 * (1 + np.cos(np.pi * np.arange(1000) / 1000))[:, None]
    assert lr_changes(cosine[:990]) == []  # per-step ratios stay above 1/1.5 until the very end
    step_decay = np.repeat([0.1, 0.01, 0.001], [300, 300, 400])[:, None]
    assert lr_changes(step_decay) == [LrChange(300, 0, 0.1, 0.01), LrChange(600, 0, 0.01, 0.001)]
    assert lr_changes(step_decay)[0].text == "the lr drop ÷10 at step 300"
    assert LrChange(5, 1, 0.01, 0.02).text == "the lr rise ×2 at step 5 (param group 1)"


def test_lr_changes_rejects_a_ratio_that_is_not_above_one():
    with pytest.raises(ValueError, match="min_ratio must be > 1"):
        lr_changes(np.ones((3, 1)), min_ratio=1.0)


def test_the_note_names_the_largest_change_inside_the_bracket_only():
    lr = np.repeat([0.1, 0.05, 0.005, 0.01], [100, 100, 100, 100])[:, None]  # ÷2 at 100, ÷10 at 200, ×2 at 300
    assert lr_change_note(lr, (50, 250)) == "coincides with the lr drop ÷10 at step 200"
    assert lr_change_note(lr, (50, 150)) == "coincides with the lr drop ÷2 at step 100"
    assert lr_change_note(lr, (100, 199)) is None  # (low, high]: the change at 100 is outside
    assert lr_change_note(lr, (None, 100)) == "coincides with the lr drop ÷2 at step 100"
    assert lr_change_note(lr, (250, None)) == "coincides with the lr rise ×2 at step 300"
    assert lr_change_note(lr, None) is None
