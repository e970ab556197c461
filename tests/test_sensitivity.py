"""The chaos estimate from ghost separation curves (dynprobe.analysis.sensitivity) and the ghost verdicts
(dynprobe.analysis.verdicts): hand-made exponential curves with known growth rates, synthetic runs cut at several
horizons, and thresholds stated with the values they were compared with."""
from __future__ import annotations

import math

import numpy as np
import pytest

import dynprobe
from dynprobe import analysis
from dynprobe.analysis import GhostOutcome, SeparationCurve, ghost_verdict

from .synthetic_runs import write_synthetic_run

EPS = 1e-7


def curve(ghost: int, spawn: int, until: int, *, before: float = 0.08, after: float = 0.0, transition: int = 310,
          status: str = "finished", every: int = 1, eps: float = EPS) -> SeparationCurve:
    """log l2 grows by `before` per step until `transition`, by `after` per step later; recorded every `every`."""
    steps = np.arange(spawn, until + 1)
    log_l2 = math.log(eps) + np.concatenate([[0.0], np.cumsum(np.where(steps[:-1] < transition, before, after))])
    keep = (steps - spawn) % every == 0
    keep[-1] = True
    return SeparationCurve(ghost, spawn, eps, steps[keep], np.exp(log_l2[keep]), status=status)


def ghosts(until: int, spawns=(0, 100, 200, 400, 800), **kwargs) -> list[SeparationCurve]:
    control = SeparationCurve(0, spawns[0], 0.0, np.arange(spawns[0], until + 1), np.zeros(until + 1 - spawns[0]),
                              control=True)
    return [control] + [curve(k + 1, s, until, **kwargs) for k, s in enumerate(spawns) if s <= until]


# --------------------------------------------------------------------------------------------- A and λ


def test_amplification_and_growth_rate_equal_the_separation_ratio_over_the_window():
    c = curve(1, 100, 1000, before=0.05, after=0.01)
    for window in (1, 50, 200, 500):
        # Independently: δ(t0 + Δ) = exp(Σ of the per-step log growth over the window).
        rates = [0.05 if t < 310 else 0.01 for t in range(100, 100 + window)]
        assert analysis.amplification(c, window) == pytest.approx(math.exp(sum(rates)), rel=1e-12)
        assert analysis.growth_rate(analysis.amplification(c, window), window) == pytest.approx(
            sum(rates) / window, rel=1e-12)
    assert math.isnan(analysis.amplification(c, 901))  # the ghost has not run that long
    thinned = curve(1, 100, 1000, before=0.05, after=0.01, every=10)
    assert analysis.amplification(thinned, 205) == pytest.approx(analysis.amplification(c, 205), rel=1e-12)
    stopped = curve(2, 0, 150, status="diverged")
    assert analysis.amplification(stopped, 400) == math.inf
    control = SeparationCurve(0, 0, 0.0, np.arange(10), np.zeros(10), control=True)
    assert math.isnan(analysis.amplification(control, 5)) and np.isnan(control.delta).all()
    assert analysis.growth_rate(0.0, 10) == -math.inf and math.isnan(analysis.growth_rate(math.nan, 10))
    with pytest.raises(ValueError, match="window"):
        analysis.amplification(c, 0)
    with pytest.raises(ValueError, match="strictly increasing"):
        SeparationCurve(1, 0, EPS, np.array([0, 2, 1]), np.ones(3))


def test_windows_are_one_two_five_up_to_the_longest_ghost():
    assert analysis.default_windows([curve(1, 0, 1200)]) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    table = analysis.sensitivity_table([curve(1, 0, 300), curve(2, 200, 300)], [10, 200])
    assert table.shape == (2, 2) and math.isnan(table[1, 1]) and table[0, 1] == pytest.approx(math.exp(16))


# --------------------------------------------------------------------------------------------- the chaos estimate


def test_chaos_estimate_is_the_first_spawn_whose_sensitivity_dropped_bracketed_by_the_spawn_grid():
    estimate = analysis.transition_from_sensitivity(ghosts(2000))
    e = estimate.evidence
    # A ≥ 10³ first within Δ = 100 steps (e^8 ≈ 2981; at Δ = 50, e^4 ≈ 55): spawns 0, 100, 200 amplify e^8,
    # the spawn at 400 (after the transition) not at all.
    assert e["window"] == 100 and e["threshold_A"] == pytest.approx(math.exp(4), rel=1e-9)
    assert [g["sensitive"] for g in e["ghosts"]] == [True, True, True, False, False]
    assert estimate.step == 400 and estimate.interval == (200, 400) and estimate.quality == "high"
    # Longer windows dilute a late chaotic spawn's short chaotic stretch (the spawn at 200 has 110 chaotic steps):
    # Δ* is the first window whose answer the next window repeats.
    assert e["per_window"] == {"100": 400, "200": 400, "500": 200, "1000": 200, "2000": None}
    assert e["window_stable"]
    assert "weaker chaos" not in estimate.summary and e["control_separation"] == "exactly 0"


def test_chaos_estimate_says_undetermined_when_later_ghosts_have_not_run_the_window():
    short = analysis.transition_from_sensitivity(ghosts(450))  # the ghost spawned at 400 has run 50 steps
    assert short.step is None and short.quality == "undetermined" and short.interval == (200, None)
    assert "undetermined" in short.summary and "400" in short.summary and "run longer" in short.summary
    # With 100 steps after the spawn at 400 the window Δ = 100 decides, but Δ = 200 cannot confirm it yet.
    assert analysis.transition_from_sensitivity(ghosts(500)).quality == "undetermined"
    assert analysis.transition_from_sensitivity(ghosts(600)).step == 400
    weak = analysis.transition_from_sensitivity(ghosts(2000, before=0.001))
    assert weak.quality == "undetermined" and weak.interval is None and "×1000" in weak.summary


def burst(ghost: int, spawn: int, until: int, *, delay: int = 50, rate: float = 0.25,
          transition: int = 400) -> SeparationCurve:
    """A real run's shape: ×~20 of transient growth over `delay` steps, then a burst (chaotic spawns only)."""
    steps = np.arange(spawn, until + 1)
    age = steps - spawn
    log_growth = np.log1p(age * 20.0 / delay).clip(max=math.log(21))
    if spawn < transition:
        log_growth = log_growth + np.clip(age - delay, 0, None) * rate
    log_growth = np.minimum(log_growth, 16.0)
    return SeparationCurve(ghost, spawn, EPS, steps, EPS * np.exp(log_growth))


def test_a_burst_after_a_transient_is_not_mistaken_for_a_drop():
    """On real runs the first spawn's burst comes before a later spawn's: at Δ = 50 only the first has burst. The
    answer must wait for a window that two consecutive windows agree on."""
    early = [burst(1, 0, 237, delay=20), burst(2, 25, 237), burst(3, 60, 237), burst(4, 200, 237)]
    estimate = analysis.transition_from_sensitivity(early)
    assert estimate.evidence["per_window"]["50"] == 25  # the window alone would call the spawn at 25 stable
    assert estimate.step is None and estimate.quality == "undetermined" and "depends on the window" in \
        estimate.summary
    later = [burst(1, 0, 1500, delay=20), burst(2, 25, 1500), burst(3, 60, 1500), burst(4, 200, 1500),
             burst(5, 600, 1500)]
    settled = analysis.transition_from_sensitivity(later)
    assert settled.step == 600 and settled.interval == (200, 600) and settled.evidence["window"] == 100


def test_still_positive_late_growth_is_reported_as_weaker_chaos_not_stability():
    estimate = analysis.transition_from_sensitivity(ghosts(2000, after=0.03))
    assert estimate.step == 400
    late = estimate.evidence["late_growth"]
    assert late and late[0]["spawn_step"] == 400 and late[0]["lambda"] == pytest.approx(0.03, rel=1e-9)
    assert "weaker chaos, not stability" in estimate.summary


def test_chaos_estimate_bounds_noise_floor_stopped_ghosts_and_non_monotone_spawns():
    all_sensitive = analysis.transition_from_sensitivity(ghosts(2000, transition=5000))
    assert all_sensitive.quality == "bound" and all_sensitive.interval == (800, None) and all_sensitive.step is None
    # A drifting control (a vectorized shadow): late ghosts within 10× its separation are unresolved.
    curves = ghosts(2000)
    curves[0] = SeparationCurve(0, 0, 0.0, np.arange(2001), 1e-7 * np.arange(2001.0), control=True)
    noisy = analysis.transition_from_sensitivity(curves)
    assert noisy.quality == "undetermined" and "control" in noisy.summary
    # A ghost that stopped as diverged before the window counts as sensitive.
    curves = ghosts(2000)
    curves[3] = curve(3, 200, 250, status="diverged")
    assert analysis.transition_from_sensitivity(curves).interval == (200, 400)
    # An insensitive spawn between two sensitive ones: the last sensitive one decides, quality low.
    curves = ghosts(2000)
    curves[2] = curve(2, 100, 2000, before=0.0)
    low = analysis.transition_from_sensitivity(curves)
    assert low.interval == (200, 400) and low.quality == "low" and "not monotone" in low.summary
    assert analysis.transition_from_sensitivity(ghosts(2000)[:1]).quality == "unavailable"
    with pytest.raises(ValueError):
        analysis.transition_from_sensitivity(ghosts(2000), fraction=1.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chaos_estimate_and_consensus_do_not_move_with_the_horizon(tmp_path, seed):
    """The same simulated run cut at 1,000, 1,500 and 2,000 steps: the chaos estimate is identical and the
    consensus moves ≤ ×1.5 (final ghost values keep changing; sensitivity over a fixed window does not)."""
    reports = []
    for horizon in (1000, 1500, 2000):
        truth = write_synthetic_run(tmp_path / f"h{horizon}", transition=300, seed=seed, horizon=horizon)
        reports.append(analysis.estimate_transition(dynprobe.load_run(truth.root)))
    chaos = [r.get("chaos") for r in reports]
    assert len({(c.step, c.interval, c.quality) for c in chaos}) == 1, [c.summary for c in chaos]
    assert chaos[0].interval == (150, 600) and chaos[0].quality == "high"
    steps = [r.step for r in reports]
    assert all(s is not None for s in steps) and max(steps) / min(steps) <= 1.5, steps


def test_chaos_estimate_reads_the_recorded_separation_curves(tmp_path):
    truth = write_synthetic_run(tmp_path / "run", transition=300, late_rate=0.02)
    run = dynprobe.load_run(truth.root)
    curves = analysis.separation_curves(run)
    assert [c.ghost for c in curves] == [g.index for g in run.ghosts]
    for c in curves:
        steps, l2 = truth.separation[c.ghost]
        np.testing.assert_array_equal(c.steps, steps)
        np.testing.assert_array_equal(c.l2, l2)
    assert not curves[0].l2.any()  # the ε = 0 control: exactly 0 at every step
    estimate = analysis.estimate_transition(run).get("chaos")
    assert estimate.interval == (150, 600) and "weaker chaos, not stability" in estimate.summary
    # Dropping the spawn snapshot of a ghost changes nothing: separation is recorded at every step.
    dropped = write_synthetic_run(tmp_path / "drop", transition=300, late_rate=0.02, keep=truth.steps[truth.steps
                                                                                                      != 150])
    again = analysis.estimate_transition(dynprobe.load_run(dropped.root)).get("chaos")
    assert (again.step, again.interval) == (estimate.step, estimate.interval)


# --------------------------------------------------------------------------------------------- verdicts


def outcome(spawn: int, **kwargs) -> GhostOutcome:
    values = {"final_step": 1000, "D": 0.0, "error": 0.3, "loss": 1.0, "C_scale": 1e-4, "control_D": 0.0,
              "control_C": 0.0, "control_B_linear": 0.0}
    values.update(kwargs)
    return GhostOutcome(spawn_step=spawn, **values)


def test_verdicts_use_measured_scales_and_state_each_threshold():
    # The audit's MLP: eval error 30.8 %, early ghosts' final C 60–130× the late ghost's, D under ¼ of the error.
    early = ghost_verdict(outcome(0, D=0.05, error=0.308, C=2.4e-2, C_scale=1e-4), eval_size=1000)
    late = ghost_verdict(outcome(1000, D=0.001, error=0.308, C=1.8e-4 / 1000, C_scale=1e-4), eval_size=1000)
    assert early.verdict == "diverged" and late.verdict == "close"
    assert early.checks["C"] == {"value": 2.4e-2, "threshold": 1e-4, "above": True,
                                 "source": "main-run C over its last snapshot interval"}
    assert early.checks["D"]["threshold"] == pytest.approx(0.25 * 0.308) and not early.checks["D"]["above"]
    # D threshold floors: two eval examples, and the control's D.
    assert ghost_verdict(outcome(0, D=0.0015, error=0.0), eval_size=1000).checks["D"]["threshold"] == 0.002
    assert ghost_verdict(outcome(0, D=0.1, control_D=0.2)).checks["D"]["source"] == "the ε = 0 control's D"


def test_verdicts_never_use_the_endpoint_loss_gap_and_never_decide_at_a_threshold():
    # Eq. 5's B is large from a loss gap alone (B ≥ ½|ΔL|); the linear-reference barrier is tiny: not diverged.
    gap = ghost_verdict(outcome(0, B=0.3, B_linear=0.001, C=1e-9))
    assert gap.verdict == "close" and "B" not in gap.checks and gap.checks["B_linear"]["threshold"] == 0.1
    assert ghost_verdict(outcome(0, B_linear=0.2)).verdict == "diverged"
    # Exactly at a threshold, or within a factor 2 under it: borderline, not a decision.
    assert ghost_verdict(outcome(0, D=0.075, error=0.3)).verdict == "borderline"
    assert ghost_verdict(outcome(0, C=0.7e-4)).verdict == "borderline"
    assert ghost_verdict(outcome(0, C=0.4e-4)).verdict == "close"
    # SGD's own barrier between consecutive snapshots raises the barrier threshold.
    noisy = ghost_verdict(outcome(0, B_linear=0.15, B_scale=0.4))
    assert noisy.verdict == "close" and noisy.checks["B_linear"]["threshold"] == 0.4
    assert ghost_verdict(outcome(0, D=math.nan, stopped_diverged=True)).verdict == "diverged"
    with pytest.raises(ValueError, match="d_fraction"):
        ghost_verdict(outcome(0), d_fraction=1.5)


def test_ghost_verdicts_of_a_synthetic_run(tmp_path):
    truth = write_synthetic_run(tmp_path / "run", transition=300)
    run = dynprobe.load_run(truth.root)
    verdicts = analysis.ghost_verdicts(run)
    assert [v.spawn_step for v in verdicts] == truth.spawn_steps
    assert [v.verdict == "diverged" for v in verdicts] == truth.diverging
    outcomes = analysis.ghost_outcomes(run)
    for o, ghost in zip(outcomes, [g for g in run.ghosts if not g.control]):
        row = run.ghosts.index(ghost)
        assert o.B_linear == run.chaos["B_linear"][row, -1] and o.B == run.chaos["B"][row, -1]
        assert o.C_scale == run.C[-1, -2] and o.control_C == 0.0


def test_the_final_value_rule_is_deprecated():
    with pytest.warns(DeprecationWarning, match="horizon"):
        estimate = analysis.transition_from_chaos([outcome(0, D=0.2, C=1e-2), outcome(100, C=1e-9)])
    assert estimate.interval == (0, 100)
