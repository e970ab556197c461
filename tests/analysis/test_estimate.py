"""The transition report (dynprobe.analysis.estimate): hand-built estimates with known answers — the headline is
the chaos estimate alone, the settling step is the medoid in log steps, and a bound that excludes the consensus
bracket is disagreement however close it is."""
from __future__ import annotations

import itertools
import math

import pytest

from dynprobe.analysis.estimate import SETTLING_METHODS, TransitionEstimate, combine_estimates, unavailable


def point(method: str, step: int, interval=None, quality: str = "medium") -> TransitionEstimate:
    return TransitionEstimate(method, step, interval if interval is not None else (step, step), quality, "s")


def bound(method: str, low, high) -> TransitionEstimate:
    return TransitionEstimate(method, None, (low, high), "bound", f"bound {low}..{high}")


def test_the_headline_is_the_chaos_estimate_alone_whatever_the_settling_estimates_say():
    chaos = TransitionEstimate("chaos", 120, (100, 150), "high", "ghosts saturate low from step 120")
    report = combine_estimates([point("kernel_velocity", 5000), chaos, point("trajectory_C", 7000)],
                               lr_note="coincides with the decay at step 118")
    assert (report.step, report.interval, report.quality) == (120, (100, 150), "high")
    assert report.summary == "ghosts saturate low from step 120"
    assert report.headline == ("Training left its chaotic phase between steps 100 and 150: a perturbation of the "
                               "weights before then changes where training ends up, one after it does not "
                               "(high quality). It coincides with the decay at step 118.")
    assert report.settles in (5000, 7000) and report.get("chaos") is chaos


def test_without_a_chaos_estimate_the_transition_is_unavailable_and_the_lr_note_is_dropped():
    report = combine_estimates([point("kernel_velocity", 300)], lr_note="coincides with nothing",
                               control_note="the control drifted by 1e-3")
    assert (report.step, report.interval, report.quality) == (None, None, "unavailable")
    assert report.lr_note is None
    assert report.headline == ("Transition undetermined, because the run has no chaos estimate. "
                               "Caution: the control drifted by 1e-3.")


def test_a_chaos_bound_says_which_side_of_the_run_the_transition_lies():
    beyond = combine_estimates([bound("chaos", 500, None)])
    before = combine_estimates([bound("chaos", None, 40)])
    assert beyond.headline == "The chaotic phase lasts beyond step 500: bound 500..None."
    assert before.headline == "The chaotic phase ended before step 40: bound None..40."
    undetermined = TransitionEstimate("chaos", None, None, "undetermined", "undetermined: the ghosts still grow")
    assert combine_estimates([undetermined]).summary == "the ghosts still grow"


@pytest.mark.parametrize("steps", [(100, 150, 300), (10, 1000, 40, 35), (7, 7, 900), (64, 256, 128, 4096)])
def test_the_settling_step_is_the_medoid_in_log_steps(steps):
    methods = SETTLING_METHODS[:len(steps)]
    report = combine_estimates([point(m, s) for m, s in zip(methods, steps)], tolerance=1e6)
    # brute force: each candidate's summed |log ratio| to all the others; ties go to the earlier method
    costs = [sum(abs(math.log(s / o)) for o in steps) for s in steps]
    best = min(range(len(steps)), key=lambda k: (round(costs[k], 9), k))
    assert report.settles == steps[best]
    assert report.settles_agree is True


def test_agreement_is_overlap_with_the_consensus_bracket_widened_by_the_tolerance():
    # consensus: the medoid of the three points is 200, bracket (180, 220); ×2 widens it to (90, 440)
    for low, high, tolerance in itertools.product((50, 89, 90, 95, 439, 440, 500), (60, 91, 441, 900), (2.0, 3.0)):
        if high <= low:
            continue
        mid = (low + high) // 2
        other = TransitionEstimate("ghost_C", mid, (low, high), "low", "s")
        report = combine_estimates([point("kernel_velocity", 200, (180, 220)), point("trajectory_C", 210), other],
                                   tolerance=tolerance)
        steps = [200, 210, mid]
        costs = [sum(abs(math.log(s / o)) for o in steps) for s in steps]
        brackets = [(180, 220), (210, 210), (low, high)]
        c_low, c_high = brackets[min(range(3), key=lambda k: (round(costs[k], 9), k))]
        expected = all(lo < c_high * tolerance and hi > c_low / tolerance for lo, hi in brackets)
        assert report.settles_agree is expected, (low, high, tolerance)
        assert (report.settles is None) is (not expected)


def test_a_bound_that_excludes_the_consensus_bracket_is_disagreement_however_close():
    consensus = point("kernel_velocity", 100, (80, 120))
    assert combine_estimates([consensus, bound("trajectory_C", 119, None)]).settles_agree is True
    # 121 > 120: within ×2 of the bracket, but a half-line is compared unwidened
    disagree = combine_estimates([consensus, bound("trajectory_C", 121, None)])
    assert disagree.settles_agree is False and disagree.settles is None
    assert disagree.settles_summary.startswith("the trajectory estimates disagree (brackets more than ×2 apart)")
    assert combine_estimates([consensus, bound("trajectory_C", None, 79)]).settles_agree is False
    assert combine_estimates([consensus, bound("trajectory_C", None, 81)]).settles_agree is True


def test_uninformative_estimates_do_not_vote():
    report = combine_estimates([point("kernel_velocity", 100), unavailable("trajectory_C", "no C map"),
                                TransitionEstimate("ghost_C", None, None, "none", "no transition")])
    assert report.settles == 100 and report.settles_agree is None  # one voter: agreement is not defined
    only_bounds = combine_estimates([bound("trajectory_C", 300, None)])
    assert only_bounds.settles is None
    assert only_bounds.settles_summary.startswith("the trajectory has not settled by the end of the run")
    assert "> 300" in only_bounds.settles_summary


@pytest.mark.parametrize("tolerance", [0.5, 0.999, math.nan])
def test_a_tolerance_below_one_is_refused(tolerance):
    with pytest.raises(ValueError, match="tolerance must be a step ratio >= 1"):
        combine_estimates([], tolerance=tolerance)
