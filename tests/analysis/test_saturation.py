"""The chaos estimate from where ghost separation curves saturate (dynprobe.analysis.saturation), amplification
over windows (dynprobe.analysis.sensitivity) and the ghost verdicts (dynprobe.analysis.verdicts): hand-made
curves with known growth and plateau levels, synthetic runs cut at several horizons, and thresholds stated with the
values they were compared with."""
from __future__ import annotations

import math

import numpy as np
import pytest

import dynprobe
from dynprobe import analysis
from dynprobe.analysis import GhostOutcome, SeparationCurve, ghost_verdict

from ..synthetic_runs import write_synthetic_run

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


def settling(ghost: int, spawn: int, until: int, level: float, *, rate: float = 0.1, noise: float = 0.0,
             seed: int = 0, every: int = 1, status: str = "finished") -> SeparationCurve:
    """ε grows at ``rate`` per step until it saturates at ``level`` (a nearly hard minimum), with multiplicative
    noise; recorded every ``every`` steps (the last step always)."""
    steps = np.arange(spawn, until + 1)
    log_l2 = np.minimum(math.log(EPS) + rate * (steps - spawn), math.log(level))
    log_l2 = log_l2 + np.random.default_rng([seed, ghost]).normal(0, noise, steps.size)
    keep = (steps - spawn) % every == 0
    keep[-1] = True
    return SeparationCurve(ghost, spawn, EPS, steps[keep], np.exp(log_l2[keep]), status=status)


CONTROL = SeparationCurve(0, 0, 0.0, np.arange(3001), np.zeros(3001), control=True)


def two_phase(until: int, *, levels=(1.0, 1.0, 1.0, 1e-3, 1e-3), spawns=(0, 100, 200, 400, 800), directions=1,
              **kwargs) -> list[SeparationCurve]:
    """Ghosts of a two-phase run: spawns before the transition (300) saturate at the chaotic level 1, later ones
    1000× lower (the two-phase paper's outcome); ``directions`` ghosts per spawn with their own noise."""
    out, ghost = [CONTROL], 1
    for spawn, level in zip(spawns, levels):
        for _ in range(directions):
            if spawn < until:
                out.append(settling(ghost, spawn, until, level, **kwargs))
            ghost += 1
    return out


def test_plateau_level_growth_and_saturation_equal_a_brute_force_computation():
    steps = np.arange(0, 1001)
    c = SeparationCurve(1, 0, EPS, steps, 1.0 + steps.astype(float))
    p = analysis.ghost_plateau(c)
    # Independently: life 1000, the last tenth is steps 901..1000 (l2 = 902..1001); half a life earlier, 401..500.
    last = [1.0 + t for t in range(901, 1001)]
    earlier = [1.0 + t for t in range(401, 501)]
    assert p.level == pytest.approx(float(np.median(last))) and p.level == pytest.approx(951.5)
    assert p.growth == pytest.approx(float(np.median(last)) / float(np.median(earlier))) and p.saturated
    assert p.growth == pytest.approx(951.5 / 451.5)  # ×2.11 ≤ ×3: saturated; not with a ×2 factor
    assert not analysis.ghost_plateau(c, plateau_factor=2.0).saturated
    assert p.window == 500 and p.amplification == pytest.approx(951.5 / EPS) and p.final_step == 1000
    flat = analysis.ghost_plateau(settling(2, 0, 1000, 1e-3))
    assert flat.saturated and flat.growth == pytest.approx(1.0) and flat.level == pytest.approx(1e-3)
    assert not analysis.ghost_plateau(settling(3, 0, 10, 1.0)).resolved  # younger than 20 steps
    diverged = analysis.ghost_plateau(settling(4, 0, 50, 1.0, status="diverged"))
    assert diverged.level == math.inf and diverged.saturated
    # A thinned curve gives the same level and growth within its sampling.
    thin = analysis.ghost_plateau(settling(5, 0, 1000, 1e-2, every=7))
    assert thin.saturated and thin.level == pytest.approx(1e-2)


def test_chaos_estimate_brackets_the_drop_in_where_ghosts_end_up():
    estimate = analysis.transition_from_saturation(two_phase(2000))
    e = estimate.evidence
    assert estimate.step == 400 and estimate.interval == (200, 400) and estimate.quality == "high"
    assert [g["class"] for g in e["ghosts"]] == ["high", "high", "high", "low", "low"]
    assert e["chaotic_level"] == pytest.approx(1.0) and e["threshold_L2"] == pytest.approx(0.1)
    assert e["contrast"] == pytest.approx(1e3) and e["rule"]["level_ratio"] == 10.0
    assert "between steps 200 and 400" in estimate.summary and "×10 lower" in estimate.summary
    # Amplification over windows is evidence only: every ghost amplifies ε here, late ones ×1e4.
    late = e["amplification"]["A"]["4"]
    assert late[e["amplification"]["windows"].index(1000)] == pytest.approx(1e-3 / EPS)


def test_several_directions_per_spawn_and_a_straddling_spawn_widens_the_bracket():
    curves = two_phase(2000, directions=3, noise=0.05)
    estimate = analysis.transition_from_saturation(curves)
    assert estimate.interval == (200, 400) and estimate.evidence["spawns"][3]["directions"] == 3
    # One of the three directions of the spawn at 400 still ends up on the chaotic level: the bracket widens to
    # the first spawn whose every direction is low, and says so.
    curves[11] = settling(11, 400, 2000, 1.0)
    wide = analysis.transition_from_saturation(curves)
    assert wide.interval == (200, 800) and wide.step == 800 and wide.quality == "medium"
    assert "straddle" in wide.summary and wide.evidence["straddling"] == [400]


def test_undetermined_while_the_deciding_ghosts_still_grow_and_later_growth_does_not_undo_a_bracket():
    # The first low spawn still grows over the last half of its life: it might reach the chaotic level.
    slow = two_phase(2000, spawns=(0, 100, 200, 400), levels=(1.0, 1.0, 1.0, 1.0), rate=0.1)
    slow[-1] = settling(4, 400, 2000, 1.0, rate=0.008)  # 1e-7 · e^(0.008 · 1600) ≈ 3.6e-2, growing
    estimate = analysis.transition_from_saturation(slow)
    assert estimate.step is None and estimate.quality == "undetermined"
    assert "still growing at the end of the run" in estimate.summary and "400" in estimate.summary
    # A later spawn that still grows slowly but stays far below does not undo what its neighbour decides.
    curves = two_phase(2000)
    curves[5] = settling(5, 800, 2000, 1.0, rate=0.005)  # ≈ 4e-5 at the end, growing
    later = analysis.transition_from_saturation(curves)
    assert later.step == 400 and later.evidence["later_still_growing"][0]["spawn_step"] == 800
    assert "still grow slowly" in later.summary


def test_a_run_that_stays_chaotic_gives_no_step():
    # Early ghosts saturated on the chaotic level, late ones amplified 1e5× and still growing at the end.
    curves = [CONTROL, settling(1, 0, 1500, 1.0), settling(2, 100, 1500, 1.0),
              settling(3, 800, 1500, 1.0, rate=0.017), settling(4, 1200, 1500, 1.0, rate=0.04)]
    estimate = analysis.transition_from_saturation(curves)
    assert estimate.step is None and estimate.quality == "undetermined"
    assert "still growing" in estimate.summary
    # Twice the horizon: every ghost has reached the chaotic level: a bound, never a step.
    longer = [CONTROL] + [settling(c.ghost, c.spawn_step, 3000, 1.0, rate=r)
                          for c, r in zip(curves[1:], (0.1, 0.1, 0.017, 0.04))]
    bound = analysis.transition_from_saturation(longer, verdicts={1: "diverged", 2: "diverged", 3: "diverged",
                                                                  4: "diverged"})
    assert bound.step is None and bound.quality == "bound" and bound.interval == (1200, None)


def test_without_contrast_the_verdicts_decide_between_the_two_bounds():
    same = two_phase(2000, levels=(1e-3,) * 5)
    assert analysis.transition_from_saturation(same).quality == "undetermined"
    close = analysis.transition_from_saturation(same, verdicts={g: "close" for g in range(1, 6)})
    assert close.quality == "bound" and close.interval == (None, 0)
    mixed = analysis.transition_from_saturation(same, verdicts={1: "diverged", 2: "close", 3: "close", 4: "close",
                                                                5: "close"})
    assert mixed.quality == "undetermined"


def test_non_monotone_spawns_diverged_ghosts_and_bad_input():
    curves = two_phase(2000)
    curves[2] = settling(2, 100, 2000, 1e-3)  # a low spawn before a chaotic one
    low = analysis.transition_from_saturation(curves)
    assert low.interval == (200, 400) and low.quality == "low" and "not monotone" in low.summary
    curves = two_phase(2000)
    curves[3] = settling(3, 200, 250, 1.0, status="diverged")  # stopped as diverged: on the chaotic level
    stopped = analysis.transition_from_saturation(curves)
    assert stopped.interval == (200, 400) and stopped.quality == "high"  # the level is read from finite ghosts
    assert stopped.evidence["chaotic_level"] == pytest.approx(1.0)
    last_high = two_phase(2000, levels=(1.0, 1e-3, 1e-3, 1e-3, 1.0))
    bound = analysis.transition_from_saturation(last_high)
    assert bound.quality == "bound" and bound.interval == (800, None) and "not monotone" in bound.summary
    assert analysis.transition_from_saturation([CONTROL]).quality == "unavailable"
    with pytest.raises(ValueError, match="level_ratio"):
        analysis.transition_from_saturation(two_phase(2000), level_ratio=1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chaos_estimate_holds_at_twice_the_horizon_and_with_thinned_curves(seed):
    kwargs = {"directions": 3, "noise": 0.1, "seed": seed}
    reference = analysis.transition_from_saturation(two_phase(1500, **kwargs))
    for variant in (two_phase(3000, **kwargs), two_phase(1500, every=2, **kwargs),
                    two_phase(3000, every=3, **kwargs)):
        again = analysis.transition_from_saturation(variant)
        assert (again.step, again.interval, again.quality) == (reference.step, reference.interval, reference.quality)
    assert reference.interval == (200, 400)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chaos_estimate_does_not_move_with_the_horizon(tmp_path, seed):
    """The same simulated run cut at 1,000, 1,500 and 2,000 steps: the chaos estimate is identical (final C and D
    keep changing; where each ghost's separation saturates does not)."""
    reports = []
    for horizon in (1000, 1500, 2000):
        truth = write_synthetic_run(tmp_path / f"h{horizon}", transition=300, seed=seed, horizon=horizon)
        reports.append(analysis.estimate_transition(dynprobe.load_run(truth.root)))
    chaos = [r.get("chaos") for r in reports]
    assert len({(c.step, c.interval, c.quality) for c in chaos}) == 1, [c.summary for c in chaos]
    assert chaos[0].interval == (150, 600) and chaos[0].quality == "high"
    assert all(r.step == 600 and r.interval == (150, 600) for r in reports)


def test_chaos_estimate_reads_the_recorded_separation_curves(tmp_path):
    truth = write_synthetic_run(tmp_path / "run", transition=300, late_rate=0.02)
    run = dynprobe.load_run(truth.root)
    curves = analysis.separation_curves(run)
    assert [c.ghost for c in curves] == [g.ghost_id for g in run.ghosts]
    for c in curves:
        steps, l2 = truth.separation[c.ghost]
        np.testing.assert_array_equal(c.steps, steps)
        np.testing.assert_array_equal(c.l2, l2)
    assert not curves[0].l2.any()  # the ε = 0 control: exactly 0 at every step
    estimate = analysis.estimate_transition(run).get("chaos")
    assert estimate.interval == (150, 600)
    levels = {g["ghost"]: g["level_L2"] for g in estimate.evidence["ghosts"]}
    for c in curves[1:]:  # the level is the median of the recorded curve's last tenth
        life = c.steps[-1] - c.spawn_step
        tail = c.l2[c.steps > c.steps[-1] - math.ceil(0.1 * life)]
        assert levels[c.ghost] == pytest.approx(float(np.median(tail)), rel=1e-12)
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
    early = ghost_verdict(outcome(0, D=0.09, error=0.308, C=2.4e-2, C_scale=1e-4), eval_size=1000)
    late = ghost_verdict(outcome(1000, D=0.001, error=0.308, C=1.8e-4 / 1000, C_scale=1e-4), eval_size=1000)
    assert early.verdict == "diverged" and late.verdict == "close"
    # C is not compared with a threshold: its scale, the main run's last snapshot interval, moves with the horizon.
    assert "C" not in early.checks and ghost_verdict(outcome(0, C=1.0, C_scale=1e-9)).verdict == "close"
    assert early.checks["D"]["threshold"] == pytest.approx(0.25 * 0.308) and early.checks["D"]["above"]
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
    assert ghost_verdict(outcome(0, B_linear=0.07)).verdict == "borderline"
    assert ghost_verdict(outcome(0, B_linear=0.04)).verdict == "close"
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
