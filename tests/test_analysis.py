"""Transition estimates, cone numbers and the online detector (dynprobe.analysis, dynprobe.cone,
dynprobe.detector, dynprobe._changepoint): synthetic runs with a planted transition, brute-force references,
and a short real run."""
from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

import dynprobe
from dynprobe.analysis import cone
from dynprobe.analysis import run_analysis as analysis
from dynprobe.analysis.changepoint import log_time, two_segment_fit, weighted_quantile
from dynprobe.analysis.detector import TransitionDetector
from dynprobe.analysis.run_analysis import GhostOutcome, TransitionEstimate
from dynprobe.store.files import RunFormatError

from .conftest import mlp_setup, train
from .synthetic_runs import log_linear_steps, uniform_steps, write_synthetic_run


def within(estimate: int | None, planted: int, factor: float = 1.5) -> bool:
    return estimate is not None and abs(math.log(estimate / planted)) <= math.log(factor)


def cosine_distance_matrix(vectors: np.ndarray) -> np.ndarray:
    """1 − cos between rows, with an explicit double loop (independent of the code under test)."""
    n = len(vectors)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            out[i, j] = 1 - float(np.dot(vectors[i], vectors[j])) / (
                np.linalg.norm(vectors[i]) * np.linalg.norm(vectors[j]))
    return out


# --------------------------------------------------------------------------------------------- helpers


def test_two_segment_fit_matches_brute_force_polyfit_over_every_split():
    rng = np.random.default_rng(1)
    x = np.sort(rng.uniform(0, 5, 40))
    y = np.where(x < 2.2, 1.0 - 0.2 * x, -3.0 - 1.5 * x) + rng.normal(0, 0.05, x.size)
    best = None
    for split in range(3, x.size - 3 + 1):
        sse = 0.0
        for part in (slice(0, split), slice(split, None)):
            coefficients = np.polyfit(x[part], y[part], 1)
            sse += float(np.sum((y[part] - np.polyval(coefficients, x[part])) ** 2))
        if best is None or sse < best[1]:
            best = (split, sse)
    fit = two_segment_fit(x, y, min_size=3)
    assert fit.index == best[0]
    assert fit.sse == pytest.approx(best[1], rel=1e-8)
    assert fit.slope_after == pytest.approx(np.polyfit(x[best[0]:], y[best[0]:], 1)[0], rel=1e-8)
    assert fit.interval[0] <= fit.index <= fit.interval[1]
    assert x[fit.index - 1] < 2.2 <= x[fit.index] + 0.3
    assert two_segment_fit(x[:5], y[:5], min_size=3) is None


def test_weighted_quantile_equals_the_quantile_of_repeated_values():
    rng = np.random.default_rng(2)
    values = rng.integers(0, 100, 30).astype(float)
    weights = rng.integers(1, 5, 30)
    expanded = np.sort(np.repeat(values, weights))
    for q in (0.25, 0.5, 0.75):
        rank = int(math.ceil(q * expanded.size)) - 1
        assert weighted_quantile(values, weights, q) == expanded[max(rank, 0)]
    with pytest.raises(ValueError, match="positive weight"):
        weighted_quantile(values, np.zeros(30), 0.5)


def test_log_time_is_log1p_in_units_of_the_smallest_positive_step():
    np.testing.assert_allclose(log_time(np.array([0, 250, 500])), np.log1p([0, 1, 2]))
    np.testing.assert_allclose(log_time(np.array([0, 1, 10])), np.log1p([0, 1, 10]))


# --------------------------------------------------------------------------------------------- Finding I


def brute_force_plateau_onset_estimate(steps: np.ndarray, C: np.ndarray, fraction: float = 0.95) -> int:
    """The documented rule, written out with loops: per row, first t1 reaching `fraction` of the rise; rows
    weighted by their rise; rows whose plateau is < 1/4 of their rise left out; lower weighted median."""
    onsets, weights, rising = [], [], []
    for i in range(len(steps) - 3):
        row = [(int(steps[j]), float(C[i, j])) for j in range(i, len(steps)) if np.isfinite(C[i, j])]
        if len(row) < 4:
            continue
        rise = max(v for _, v in row) - row[0][1]
        if rise <= 0:
            continue
        onset_column = next(k for k, (_, v) in enumerate(row) if v - row[0][1] >= fraction * rise)
        onsets.append(row[onset_column][0])
        weights.append(rise)
        rising.append(row[-1][0] - row[onset_column][0] < 0.25 * (row[onset_column][0] - row[0][0]))
    if sum(w for w, r in zip(weights, rising) if r) < 0.5 * sum(weights):  # still-rising rows do not vote
        onsets = [o for o, r in zip(onsets, rising) if not r]
        weights = [w for w, r in zip(weights, rising) if not r]
    order = sorted(range(len(onsets)), key=lambda k: onsets[k])
    total, running = sum(weights), 0.0
    for k in order:
        running += weights[k]
        if running >= 0.5 * total * (1 - 1e-12):
            return onsets[k]
    raise AssertionError("no rows")


def test_trajectory_C_estimate_follows_the_documented_rule_on_a_piecewise_linear_map():
    steps = np.arange(0, 1001, 10)
    position = np.minimum(steps, 300) + 0.01 * steps  # rises until 300, then almost flat
    C = np.abs(position[:, None] - position[None, :]) / position.max()
    estimate = analysis.transition_from_trajectory_C(steps, C)
    assert estimate.step == brute_force_plateau_onset_estimate(steps, C)
    assert estimate.quality == "high" and within(estimate.step, 300, 1.1)


@pytest.mark.parametrize("shape", ["plateau", "peak"])
@pytest.mark.parametrize("planted", [80, 300, 900])
@pytest.mark.parametrize("schedule", ["log_linear", "uniform"])
def test_trajectory_C_estimate_lands_near_the_planted_transition(tmp_path, shape, planted, schedule):
    steps = log_linear_steps(2000) if schedule == "log_linear" else uniform_steps(2000, 81)
    truth = write_synthetic_run(tmp_path / "run", steps=steps, transition=planted, c_shape=shape, kernels=False,
                                ghosts=(), seed=planted)
    run = dynprobe.load_run(truth.root)
    np.testing.assert_allclose(run.C, cosine_distance_matrix(truth.theta), atol=1e-9)
    estimate = analysis.transition_from_trajectory_C(run.steps, run.C)
    assert estimate.quality in ("high", "medium"), estimate.summary
    assert within(estimate.step, planted), (estimate.step, planted)
    assert estimate.step == brute_force_plateau_onset_estimate(run.steps, run.C)


def test_trajectory_C_without_a_transition_is_a_bound_not_an_estimate():
    rng = np.random.default_rng(3)
    steps = np.arange(0, 2001, 25)
    theta = np.cumsum(rng.normal(0, 0.1, (steps.size, 50)), axis=0) + 1.0  # one steady random walk
    estimate = analysis.transition_from_trajectory_C(steps, cosine_distance_matrix(theta))
    assert estimate.step is None and estimate.quality == "bound" and estimate.interval[1] is None
    assert "still rising" in estimate.summary


def test_trajectory_C_degrades_gracefully_and_rejects_bad_input():
    short = analysis.transition_from_trajectory_C(np.arange(4), np.zeros((4, 4)))
    assert short.quality == "unavailable" and "at least 6 snapshots" in short.summary
    flat = analysis.transition_from_trajectory_C(np.arange(8), np.zeros((8, 8)))
    assert flat.quality == "none" and flat.step is None
    with pytest.raises(ValueError, match=r"\(T, T\)"):
        analysis.transition_from_trajectory_C(np.arange(5), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="strictly increasing"):
        analysis.transition_from_trajectory_C(np.array([0, 2, 1, 3, 4, 5]), np.zeros((6, 6)))


def test_ghost_C_estimate_finds_the_peak_of_the_main_vs_ghost_map(tmp_path):
    truth = write_synthetic_run(tmp_path / "run", transition=300)
    run = dynprobe.load_run(truth.root)
    perturbed = [i for i, g in enumerate(run.ghosts) if not g.control]
    estimate = analysis.transition_from_ghost_C(run.steps, run.chaos["C"][perturbed],
                                                row_ids=[run.ghosts[i].index for i in perturbed])
    # Independently: the column of each diverging ghost's maximum.
    peaks = [int(run.steps[np.nanargmax(run.chaos["C"][i])]) for i in perturbed
             if run.ghosts[i].spawn_step < 300]
    assert set(peaks) == {300} and estimate.step == 300 and estimate.quality == "high"
    assert analysis.transition_from_ghost_C(run.steps, np.zeros((0, len(run)))).quality == "unavailable"


# --------------------------------------------------------------------------------------------- chaos


def outcome(spawn: int, D: float, *, error: float = 0.1, B: float | None = None, C: float | None = None,
            loss: float | None = 1.0, stopped: bool = False) -> GhostOutcome:
    return GhostOutcome(spawn_step=spawn, final_step=1000, D=D, error=error, B=B, loss=loss, C=C, L2=None,
                        realized_norm=1e-7, stopped_diverged=stopped)


def test_chaos_estimate_brackets_the_planted_transition_on_a_synthetic_run(tmp_path):
    truth = write_synthetic_run(tmp_path / "run", transition=300, ghosts=(0, 50, 150, 600, 1200))
    run = dynprobe.load_run(truth.root)
    outcomes = analysis.ghost_outcomes(run)
    assert [o.spawn_step for o in outcomes] == [0, 50, 150, 600, 1200]  # control excluded
    for o, ghost in zip(outcomes, [g for g in run.ghosts if not g.control]):
        row = run.ghosts.index(ghost)
        assert o.D == run.chaos["D"][row, -1] and o.B == run.chaos["B"][row, -1]
        assert o.error == pytest.approx(1 - run.eval_accuracy[-1])
    estimate = analysis.transition_from_chaos(outcomes, eval_size=1000)
    assert estimate.interval == (150, 600) and estimate.step == 600 and estimate.quality == "high"
    assert [g["diverged"] for g in estimate.evidence["ghosts"]] == truth.diverging


def test_chaos_thresholds_are_relative_to_the_independent_run_ceiling():
    # d_fraction 0.25 of error 0.1 -> 0.025; 1.5 examples of 1000 -> 0.0015 floor.
    estimate = analysis.transition_from_chaos([outcome(0, 0.0251), outcome(100, 0.0249)], eval_size=1000)
    assert estimate.interval == (0, 100)
    floor = analysis.transition_from_chaos([outcome(0, 0.004, error=0.0), outcome(100, 0.001, error=0.0)],
                                           eval_size=1000)
    assert floor.interval == (0, 100)
    by_barrier = analysis.transition_from_chaos([outcome(0, 0.0, B=0.2), outcome(100, 0.0, B=0.05)])
    assert by_barrier.interval == (0, 100)
    stopped = analysis.transition_from_chaos([outcome(0, math.nan, stopped=True), outcome(100, 0.0)])
    assert stopped.interval == (0, 100)


def test_chaos_quality_and_bounds():
    separated = [outcome(0, 0.09, C=1e-2), outcome(100, 0.0, C=1e-9)]
    assert analysis.transition_from_chaos(separated).quality == "high"
    close_C = [outcome(0, 0.09, C=1e-2), outcome(100, 0.0, C=1e-3)]
    assert analysis.transition_from_chaos(close_C).quality == "medium"
    non_monotone = [outcome(0, 0.0), outcome(50, 0.09), outcome(100, 0.0)]
    estimate = analysis.transition_from_chaos(non_monotone)
    assert estimate.quality == "low" and estimate.interval == (50, 100)
    all_diverged = analysis.transition_from_chaos([outcome(0, 0.09), outcome(600, 0.05)])
    assert all_diverged.quality == "bound" and all_diverged.interval == (600, None) and all_diverged.step is None
    all_close = analysis.transition_from_chaos([outcome(100, 0.0), outcome(600, 0.0)])
    assert all_close.quality == "bound" and all_close.interval == (None, 100)
    assert analysis.transition_from_chaos([]).quality == "unavailable"
    with pytest.raises(ValueError, match="d_fraction"):
        analysis.transition_from_chaos(separated, d_fraction=1.5)


# --------------------------------------------------------------------------------------------- velocity


@pytest.mark.parametrize("velocity", ["step", "power"])
@pytest.mark.parametrize("planted,schedule", [(80, "log_linear"), (300, "log_linear"), (900, "log_linear"),
                                              (300, "uniform"), (900, "uniform")])
def test_kernel_velocity_change_point_lands_near_the_planted_transition(tmp_path, velocity, planted, schedule):
    steps = log_linear_steps(2000) if schedule == "log_linear" else uniform_steps(2000, 61)
    truth = write_synthetic_run(tmp_path / "run", steps=steps, transition=planted, velocity=velocity, ghosts=(),
                                seed=planted + 7)
    run = dynprobe.load_run(truth.root)
    estimate = analysis.transition_from_kernel_velocity(run.steps, run.S)
    assert estimate.quality == "high", estimate.summary
    assert within(estimate.step, planted), (estimate.step, planted)
    # The velocities it fitted, recomputed from the simulated kernels.
    distances = cosine_distance_matrix(truth.kernels)
    expected = [distances[k, k - 1] / (steps[k] - steps[k - 1]) for k in range(1, steps.size)]
    np.testing.assert_allclose(estimate.evidence["v"], expected, rtol=1e-6)


def test_kernel_velocity_uses_only_snapshots_with_kernels(tmp_path):
    truth = write_synthetic_run(tmp_path / "run", transition=300, ghosts=(), kernel_every=2)
    run = dynprobe.load_run(truth.root)
    kernel_steps, _ = analysis.kernel_subset(run.steps, run.S)
    assert np.array_equal(kernel_steps, run.kernel_steps)
    estimate = analysis.transition_from_kernel_velocity(run.steps, run.S)
    assert set(estimate.evidence["t"]) <= set(kernel_steps.tolist())
    assert within(estimate.step, 300)


def test_kernel_velocity_is_unavailable_without_kernels():
    steps = np.arange(10)
    no_kernels = analysis.transition_from_kernel_velocity(steps, np.full((10, 10), np.nan))
    assert no_kernels.quality == "unavailable" and "KernelConfig" in no_kernels.summary
    few = np.full((10, 10), np.nan)
    few[:3, :3] = 0.1 * (1 - np.eye(3))
    assert analysis.transition_from_kernel_velocity(steps, few).quality == "unavailable"


# --------------------------------------------------------------------------------------------- agreement


def estimate(method: str, step: int | None, interval) -> TransitionEstimate:
    return TransitionEstimate(method, step, interval, "high" if step is not None else "bound", "")


def test_estimates_agree_when_their_widened_brackets_share_a_step():
    report = analysis.combine_estimates([estimate("a", 300, (250, 350)), estimate("b", 600, (500, 700)),
                                         estimate("c", None, (200, None))], tolerance=2.0)
    assert report.agree is True
    assert report.common == (pytest.approx(250), pytest.approx(700))
    assert report.step == round(math.exp(np.median(np.log([300, 600]))))
    apart = analysis.combine_estimates([estimate("a", 100, (90, 110)), estimate("b", 1000, (900, 1100))])
    assert apart.agree is False and "disagree" in apart.summary
    bound_conflict = analysis.combine_estimates([estimate("a", 100, (90, 110)), estimate("b", None, (600, None))])
    assert bound_conflict.agree is False
    single = analysis.combine_estimates([estimate("a", 100, (90, 110)),
                                         TransitionEstimate("b", None, None, "unavailable", "no data")])
    assert single.agree is None and single.step == 100
    with pytest.raises(ValueError, match="tolerance"):
        analysis.combine_estimates([], tolerance=0.5)


def test_estimate_transition_on_a_synthetic_run_agrees_on_the_planted_step(tmp_path):
    truth = write_synthetic_run(tmp_path / "run", transition=300)
    report = analysis.estimate_transition(dynprobe.load_run(truth.root))
    assert [e.method for e in report.estimates] == ["trajectory_C", "ghost_C", "chaos", "kernel_velocity"]
    assert all(e.quality == "high" for e in report.estimates)
    assert report.agree is True and within(report.step, 300)


def test_analysis_of_a_run_without_kernels_or_ghosts_says_what_is_missing(tmp_path):
    truth = write_synthetic_run(tmp_path / "run", transition=300, kernels=False, ghosts=())
    result = analysis.analyze(dynprobe.load_run(truth.root))
    by_method = {e.method: e for e in result.transition.estimates}
    assert by_method["trajectory_C"].quality == "high"
    for method in ("ghost_C", "chaos", "kernel_velocity"):
        assert by_method[method].quality == "unavailable"
    assert not result.cone.available and "KernelConfig" in result.cone.reason
    assert any("Ghosts" in note for note in result.missing) and any("KernelConfig" in note for note in result.missing)


def test_damaged_metric_rows_raise_run_format_error_naming_the_file(tmp_path):
    truth = write_synthetic_run(tmp_path / "run", transition=300, ghosts=())
    path = truth.root / "metrics" / "C.rows"
    data = bytearray(path.read_bytes())
    data[8 * 5: 8 * 6] = np.array([1e300]).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(RunFormatError, match=r"C\.rows is damaged.*outside \[0, 2\]"):
        analysis.analyze(dynprobe.load_run(truth.root))


def test_the_online_estimate_recorded_in_events_is_read_back(tmp_path):
    truth = write_synthetic_run(tmp_path / "run", transition=300, ghosts=(), status="running")
    from dynprobe.store.files import append_jsonl

    detected = TransitionEstimate("online", 350, (300, 350), "high", "fired", {"signal": "kernel_velocity"})
    append_jsonl(truth.root / "events.jsonl", {"event": "transition", "step": 400, "estimate": detected.to_dict()})
    report = analysis.estimate_transition(dynprobe.load_run(truth.root))
    online = report.get("online")
    assert online.step == 350 and online.interval == (300, 350) and online.evidence["fired_at_step"] == 400


# --------------------------------------------------------------------------------------------- cone


def test_cone_numbers_match_angles_computed_from_the_kernels(tmp_path):
    truth = write_synthetic_run(tmp_path / "run", transition=300, ghosts=())
    run = dynprobe.load_run(truth.root)
    h = truth.kernels
    for tau in (300, 800, 1500):
        j = int(np.flatnonzero(run.steps == tau)[0])
        later = [np.degrees(np.arccos(np.dot(h[k], h[j]) / np.linalg.norm(h[k]) / np.linalg.norm(h[j])))
                 for k in range(j + 1, len(h))]
        distances = [1 - np.cos(np.radians(a)) for a in later]
        numbers = cone.cone_numbers(run.steps, run.S, tau)
        assert numbers.points == len(later)
        assert numbers.half_angle_deg == pytest.approx(max(later), rel=1e-6)
        assert numbers.max_distance == pytest.approx(max(distances), rel=1e-6)
        assert numbers.plateau == pytest.approx(np.median(distances[len(distances) // 2:]), rel=1e-6)
        if tau < 1500:  # enough later kernels to see the plateau
            assert numbers.plateaued
    with pytest.raises(ValueError, match="not a step with a kernel"):
        cone.cone_numbers(run.steps, run.S, 301)
    with pytest.raises(ValueError, match="no later kernel"):
        cone.cone_numbers(run.steps, run.S, int(run.steps[-1]))


def test_kernel_embedding_equals_pca_of_frobenius_normalized_kernels():
    rng = np.random.default_rng(4)
    kernels = rng.normal(size=(12, 30)) + np.linspace(0, 3, 12)[:, None]
    unit = kernels / np.linalg.norm(kernels, axis=1, keepdims=True)
    centred = unit - unit.mean(axis=0)
    u, sigma, _ = np.linalg.svd(centred, full_matrices=False)
    pca = u[:, :2] * sigma[:2]
    embedding = cone.kernel_embedding(np.arange(12) * 10, cosine_distance_matrix(kernels))
    for axis in range(2):
        assert np.allclose(embedding.coordinates[:, axis], pca[:, axis], atol=1e-8) or \
            np.allclose(embedding.coordinates[:, axis], -pca[:, axis], atol=1e-8)
    assert embedding.explained[0] == pytest.approx(sigma[0] ** 2 / np.sum(sigma**2), rel=1e-8)
    assert (embedding.coordinates[-1] >= 0).all()
    assert cone.kernel_embedding(np.arange(2), np.zeros((2, 2))) is None


def test_lag_curve_pairs_each_step_with_the_nearest_step_near_t_plus_dt():
    steps = np.array([0, 1, 2, 3, 5, 8, 10, 20, 30, 40, 50])
    S = np.abs(steps[:, None] - steps[None, :]) / 100.0
    t, values = cone.lag_curve(steps, S, 10)
    expected = []
    for i, ti in enumerate(steps):
        later = [(abs(tj - ti - 10), j) for j, tj in enumerate(steps) if tj > ti]
        if later and min(later)[0] <= 1.0:
            expected.append((ti, S[i, min(later)[1]]))
    assert list(zip(t.tolist(), values.tolist())) == expected
    with pytest.raises(ValueError, match="dt must be a positive"):
        cone.lag_curve(steps, S, 0)


def test_lag_bound_ratio_separates_a_cone_from_a_random_walk():
    rng = np.random.default_rng(5)
    steps = np.arange(0, 2001, 25)
    walk = np.cumsum(rng.normal(0, 0.02, (steps.size, 80)), axis=0) + 2.0
    anchor = rng.normal(size=80) + 2.0
    confined = anchor + 0.05 * rng.normal(size=(steps.size, 80))  # independent draws around one kernel
    walk_summary = cone.cone_summary(steps, cosine_distance_matrix(walk))
    cone_summary = cone.cone_summary(steps, cosine_distance_matrix(confined))
    assert walk_summary.lags == cone_summary.lags == (25, 50, 100, 200)
    assert walk_summary.lag_bound_ratio > 3 and cone_summary.lag_bound_ratio < 1.5


def test_default_reference_steps_follow_the_transition_and_leave_later_kernels():
    kernel_steps = np.arange(0, 2001, 50)
    taus = cone.default_taus(kernel_steps, transition_step=300)
    assert taus[0] == 300 and taus[-1] == 1600 and len(taus) == 4
    assert cone.default_taus(kernel_steps)[0] == 400
    assert cone.default_taus(np.array([0, 10, 20])) == []
    assert cone.default_lags(kernel_steps) == [50, 100, 200, 400]


def test_estimators_never_write_to_their_inputs(tmp_path):
    truth = write_synthetic_run(tmp_path / "run", transition=300)
    run = dynprobe.load_run(truth.root)
    steps, C, S, chaos_C = (np.array(a) for a in (run.steps, run.C, run.S, run.chaos["C"]))
    copies = [a.copy() for a in (steps, C, S, chaos_C)]
    for array in (steps, C, S, chaos_C):
        array.setflags(write=False)  # any in-place write raises
    analysis.transition_from_trajectory_C(steps, C)
    analysis.transition_from_ghost_C(steps, chaos_C)
    analysis.transition_from_kernel_velocity(steps, S)
    cone.cone_summary(steps, S, transition_step=300)
    cone.lag_curve(steps, S, 100)
    for array, copy in zip((steps, C, S, chaos_C), copies):
        np.testing.assert_array_equal(array, copy)


# --------------------------------------------------------------------------------------------- detector


def stream(run: dynprobe.Run, with_kernels: bool = True):
    for k, step in enumerate(run.steps):
        yield int(step), run.C[k, : k + 1], (run.S[k, : k + 1] if with_kernels else None)


def test_detector_fires_once_near_the_planted_transition(tmp_path):
    truth = write_synthetic_run(tmp_path / "run", transition=300, ghosts=())
    run = dynprobe.load_run(truth.root)
    detector = TransitionDetector()
    fired = [(step, e) for step, c, s in stream(run) if (e := detector.update(step, c, s)) is not None]
    assert len(fired) == 1
    at_step, estimate = fired[0]
    assert estimate.method == "online" and estimate.quality == "high" and within(estimate.step, 300, 1.25)
    assert at_step > estimate.step and detector.fired and detector.estimate is estimate
    assert estimate.evidence["signal"] == "kernel_velocity"
    assert len(estimate.evidence["low_steps"]) >= 3


def test_detector_falls_back_to_the_parameter_direction_rate_without_kernels(tmp_path):
    truth = write_synthetic_run(tmp_path / "run", transition=300, kernels=False, ghosts=())
    run = dynprobe.load_run(truth.root)
    detector = TransitionDetector()
    fired = [e for step, c, s in stream(run, with_kernels=False) if (e := detector.update(step, c, s))]
    assert len(fired) == 1 and fired[0].quality == "low" and within(fired[0].step, 300, 1.25)
    assert fired[0].evidence["signal"] == "C_rate"


def test_detector_never_fires_on_a_steady_random_walk():
    rng = np.random.default_rng(6)
    steps = log_linear_steps(2000)
    dt = np.diff(steps, prepend=0)[:, None]
    theta = np.cumsum(rng.normal(0, 0.01, (steps.size, 60)) * np.sqrt(dt), axis=0) + 1.0
    kernels = np.cumsum(rng.normal(0, 0.01, (steps.size, 60)) * np.sqrt(dt), axis=0) + 3.0
    C, S = cosine_distance_matrix(theta), cosine_distance_matrix(kernels)
    detector = TransitionDetector()
    assert all(detector.update(int(t), C[k, : k + 1], S[k, : k + 1]) is None for k, t in enumerate(steps))
    assert not detector.fired


def test_detector_rejects_bad_input():
    detector = TransitionDetector()
    detector.update(0, [0.0])
    with pytest.raises(ValueError, match="2 entries"):
        detector.update(1, [0.1, 0.0, 0.0])
    with pytest.raises(ValueError, match="must increase"):
        detector.update(0, [0.1, 0.0])
    with pytest.raises(TypeError, match="step must be an int"):
        detector.update(1.5, [0.1, 0.0])
    for bad in ({"drop_factor": 1.0}, {"patience": 0}, {"c_drop_factor": "3"}, {"min_snapshots": 2.5}):
        with pytest.raises(ValueError):
            TransitionDetector(**bad)


# --------------------------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A short real run: MLP, SGD momentum, ghosts at 0, 10, 40 with barriers, a snapshot every 4 steps."""
    root = tmp_path_factory.mktemp("real") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, optimizer, scheduler, data = mlp_setup()
        kwargs = {}
        if "kernel" in inspect.signature(dynprobe.Probe).parameters:
            kwargs["kernel"] = dynprobe.KernelConfig(n=16)
        probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=root, schedule=4,
                               ghosts=dynprobe.Ghosts(at=[0, 10, 40], costly_every=4), **kwargs)
        criterion = probe.watch(torch.nn.CrossEntropyLoss())
        train(model, optimizer, scheduler, data, 80, criterion=criterion)
        probe.close()
    finally:
        torch.set_num_threads(threads)
    return dynprobe.load_run(root)


def test_analysis_of_a_real_run_matches_brute_force_on_its_arrays(real_run):
    run = real_run
    report = analysis.estimate_transition(run)
    trajectory = report.get("trajectory_C")
    assert trajectory.available
    if trajectory.step is not None:
        assert trajectory.step == brute_force_plateau_onset_estimate(run.steps, run.C)
    outcomes = analysis.ghost_outcomes(run)
    perturbed = [g for g in run.ghosts if not g.control]
    assert [o.spawn_step for o in outcomes] == [g.spawn_step for g in perturbed] == [0, 10, 40]
    for o, ghost in zip(outcomes, perturbed):
        row = run.ghosts.index(ghost)
        assert o.D == run.chaos["D"][row, -1] and o.final_step == run.steps[-1]
        assert o.realized_norm == ghost.realized_norm
    chaos = report.get("chaos")
    assert chaos.available and chaos.informative
    verdicts = [g["diverged"] for g in chaos.evidence["ghosts"]]
    for verdict, row in zip(verdicts, chaos.evidence["ghosts"]):
        assert verdict == (row["D"] > row["D_threshold"] or (row["B"] is not None and row["B_threshold"] is not None
                                                             and row["B"] > row["B_threshold"]))
    if run.has_kernels:  # the probe measured the eNTK (Probe(kernel=...))
        kernel_steps = run.kernel_steps
        rows = [run.index_of(int(t)) for t in kernel_steps]
        expected = np.array([run.S[rows[k], rows[k - 1]] / (kernel_steps[k] - kernel_steps[k - 1])
                             for k in range(1, len(rows))])
        velocity = report.get("kernel_velocity")
        assert velocity.available
        if "v" in velocity.evidence:
            np.testing.assert_allclose(velocity.evidence["v"], expected[expected > 0], rtol=1e-12)
        result = analysis.analyze(run)
        assert result.cone.available and result.cone.cones
        for numbers in result.cone.cones:
            t, values = run.kernel_distance_to(numbers.tau)
            assert numbers.max_distance == pytest.approx(values[t > numbers.tau].max(), rel=1e-12)


def test_detector_runs_on_a_real_stream_with_o1_reads(real_run):
    detector = TransitionDetector(patience=2, min_snapshots=3)
    for k, step in enumerate(real_run.steps):
        detector.update(int(step), real_run.C[k, : k + 1], real_run.S[k, : k + 1])
    assert detector.steps == real_run.steps.tolist()
    if detector.fired:
        assert detector.estimate.step in real_run.steps
