"""Ghost verdicts (dynprobe.analysis.verdicts) on synthetic outcomes: each threshold is the largest of its
measured scales, a ghost is diverged above a threshold, close at or below half of every one, borderline between —
checked against a reference written out by hand over a grid of values."""
from __future__ import annotations

import itertools
import math

import pytest

from dynprobe.analysis.verdicts import GhostOutcome, ghost_verdict


def expected_verdict(values_and_thresholds: list[tuple[float, float]]) -> str:
    if not values_and_thresholds:
        return "borderline"
    if any(v > t for v, t in values_and_thresholds):
        return "diverged"
    if all(2 * v <= t for v, t in values_and_thresholds):
        return "close"
    return "borderline"


def test_the_d_threshold_is_the_largest_of_its_scales_and_says_which():
    base = dict(spawn_step=10, final_step=100, D=0.0, error=0.2)
    cases = [  # (eval_size, control_D, threshold, source)
        (None, None, 0.05, "0.25 × main eval error"),
        (20, None, 0.1, "two eval examples"),  # 2 / 20 > 0.25 × 0.2
        (100, 0.07, 0.07, "the ε = 0 control's D"),
        (100, math.nan, 0.05, "0.25 × main eval error"),  # a non-finite scale is not a scale
    ]
    for eval_size, control_d, threshold, source in cases:
        check = ghost_verdict(GhostOutcome(**base, control_D=control_d), eval_size=eval_size).checks["D"]
        assert check["threshold"] == pytest.approx(threshold) and check["source"] == source


def test_regression_has_no_two_examples_floor():
    outcome = GhostOutcome(10, 100, D=0.01, error=0.02, regression=True)
    check = ghost_verdict(outcome, eval_size=4).checks["D"]  # 2/4 would dominate a classification threshold
    assert check["threshold"] == pytest.approx(0.005) and check["above"] is True


def test_verdicts_on_a_grid_match_the_hand_written_rule():
    error, loss, b_scale = 0.4, 2.0, 0.15  # thresholds: D 0.1, B_linear max(0.2, 0.15) = 0.2
    d_values = [None, 0.0, 0.05, 0.0500001, 0.1, 0.1000001, math.inf, math.nan]
    b_values = [None, 0.0, 0.1, 0.1000001, 0.2, 0.2000001, 5.0]
    for d, b in itertools.product(d_values, b_values):
        verdict = ghost_verdict(GhostOutcome(3, 50, D=d, error=error, loss=loss, B_linear=b, B_scale=b_scale))
        measured = [(v, t) for v, t in ((d, 0.1), (b, 0.2)) if v is not None and math.isfinite(v)]
        assert verdict.verdict == expected_verdict(measured), (d, b)
        assert set(verdict.checks) == {name for name, v in (("D", d), ("B_linear", b))
                                       if v is not None and math.isfinite(v)}


def test_the_b_threshold_ignores_a_zero_main_loss_and_falls_back_to_the_measured_scales():
    outcome = GhostOutcome(3, 50, D=0.0, error=0.4, loss=0.0, B_linear=0.3, B_scale=0.25, control_B_linear=0.1)
    check = ghost_verdict(outcome).checks["B_linear"]
    assert check["threshold"] == 0.25 and check["source"] == "B_linear between consecutive main-run snapshots"
    assert check["above"] is True


def test_a_ghost_that_stopped_diverged_is_diverged_even_when_its_values_look_close():
    verdict = ghost_verdict(GhostOutcome(3, 50, D=0.0, error=0.4, stopped_diverged=True, ghost=2))
    assert verdict.verdict == "diverged" and verdict.checks["stopped"]["above"] is True
    assert verdict.to_dict()["ghost"] == 2 and verdict.to_dict()["checks"]["D"]["above"] is False


@pytest.mark.parametrize("d_fraction, b_fraction", [(0.0, 0.1), (1.0, 0.1), (0.25, 0.0), (0.25, -1.0)])
def test_fractions_outside_their_range_are_refused(d_fraction, b_fraction):
    with pytest.raises(ValueError, match="d_fraction must be in"):
        ghost_verdict(GhostOutcome(0, 1, D=0.0, error=0.1), d_fraction=d_fraction, b_fraction=b_fraction)
