"""Transition estimates, cone numbers and the online detector (dynprobe.analysis, dynprobe.cone,
dynprobe.detector, dynprobe._changepoint): synthetic runs with a planted transition, brute-force references,
and a short real run."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dynprobe
from dynprobe import analysis
from dynprobe.analysis import cone
from dynprobe.analysis.changepoint import log_time, two_segment_fit, weighted_quantile
from dynprobe.analysis.detector import TransitionDetector
from dynprobe.analysis.run_analysis import TransitionEstimate
from dynprobe.store.files import RunFormatError

from ..conftest import mlp_setup, train
from ..synthetic_runs import log_linear_steps, uniform_steps, write_synthetic_run


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


def brute_force_level_off(steps, values, fraction=0.1, per_efold=4, patience=2):
    """The documented level-off rule with loops: resample on log1p(t) at 4 points per e-fold, rate per e-fold,
    first grid point from which the rate stays ≤ fraction × running max for `patience` points, last recorded step
    at or before it. Returns (step or None, rise)."""
    points = [(int(t), float(v)) for t, v in zip(steps, values) if math.isfinite(v)]
    if len(points) < 4:
        return None, 0.0
    xs = [math.log1p(t) for t, _ in points]
    n = int(math.floor((xs[-1] - xs[0]) * per_efold + 1e-9)) + 1
    grid = [xs[0] + i / per_efold for i in range(n)]
    first, rise_to_end = points[0][1], max(v for _, v in points) - points[0][1]
    if len(grid) < patience + 3:
        return None, rise_to_end

    def at(x):
        for k in range(len(xs) - 1):
            if xs[k] <= x <= xs[k + 1]:
                w = (x - xs[k]) / (xs[k + 1] - xs[k])
                return (1 - w) * points[k][1] + w * points[k + 1][1]
        return points[-1][1]

    rates = [(at(grid[i + 1]) - at(grid[i])) * per_efold for i in range(len(grid) - 1)]
    running, best = [], -math.inf
    for r in rates:
        best = max(best, r)
        running.append(best)
    for i in range(1, len(rates) - patience + 1):
        if all(running[j] > 0 and rates[j] <= fraction * running[j] for j in range(i, i + patience)):
            crossing = math.expm1(grid[i])
            t, v = [(t, v) for t, v in points if t <= crossing + 1e-9][-1]
            return t, v - first
    return None, rise_to_end


def brute_force_level_off_estimate(steps: np.ndarray, C: np.ndarray) -> int | None:
    """Rows C(t0, t0:), level-off per row, rows weighted by their rise, still-rising rows left out (a bound when
    they carry half the weight), lower weighted median."""
    onsets, weights = [], []
    for i in range(len(steps) - 3):
        onset, rise = brute_force_level_off(steps[i:], C[i, i:])
        if rise > 0:
            onsets.append(onset)
            weights.append(rise)
    settled = [(o, w) for o, w in zip(onsets, weights) if o is not None]
    if sum(w for _, w in settled) <= 0.5 * sum(weights):
        return None
    settled.sort()
    total, running = sum(w for _, w in settled), 0.0
    for o, w in settled:
        running += w
        if running >= 0.5 * total * (1 - 1e-12):
            return o
    raise AssertionError("no rows")


def test_level_off_step_follows_the_documented_rule():
    rng = np.random.default_rng(11)
    for trial in range(20):
        steps = np.unique(rng.integers(0, 3000, 40))
        knee = int(rng.integers(50, 1500))
        values = np.minimum(steps, knee) ** rng.uniform(0.5, 2) + rng.uniform(0, 3) * steps * 1e-3
        assert analysis.level_off_step(steps, values) == pytest.approx(brute_force_level_off(steps, values))


def test_trajectory_C_estimate_follows_the_documented_rule_on_a_piecewise_linear_map():
    steps = np.arange(0, 1001, 10)
    position = np.minimum(steps, 300) + 0.01 * steps  # rises until 300, then almost flat
    C = np.abs(position[:, None] - position[None, :]) / position.max()
    estimate = analysis.transition_from_trajectory_C(steps, C)
    assert estimate.step == brute_force_level_off_estimate(steps, C)
    assert estimate.quality == "high" and within(estimate.step, 300, 1.15)


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
    assert estimate.step == brute_force_level_off_estimate(run.steps, run.C)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trajectory_C_estimate_does_not_move_with_the_horizon_or_a_spike_at_the_last_snapshot(tmp_path, seed):
    # The same simulated run cut at 800, 1,000 and 1,500 steps (the horizons of the report that found 400 → 500 →
    # 600), and with a spike in C at its last snapshot.
    estimates, last_C = [], {}
    for horizon in (800, 1000, 1500):
        truth = write_synthetic_run(tmp_path / f"h{horizon}", transition=300, kernels=False, ghosts=(), seed=seed,
                                    horizon=horizon)
        run = dynprobe.load_run(truth.root)
        last_C[horizon] = run.C[-1, 0]
        estimates.append(analysis.transition_from_trajectory_C(run.steps, run.C))
    steps = [e.step for e in estimates]
    assert all(e.quality == "high" for e in estimates), [e.summary for e in estimates]
    assert max(steps) / min(steps) <= 1.5 and within(steps[0], 300), steps
    spiked = write_synthetic_run(tmp_path / "spike", transition=300, kernels=False, ghosts=(), seed=seed,
                                 horizon=1000, last_spike=0.5)
    run = dynprobe.load_run(spiked.root)
    assert run.C[-1, 0] == pytest.approx(1.5 * last_C[1000])  # the spike is there
    spike = analysis.transition_from_trajectory_C(run.steps, run.C)
    assert (spike.step, spike.quality) == (estimates[1].step, estimates[1].quality)


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


def test_ghost_C_estimate_finds_where_the_main_vs_ghost_map_levels_off(tmp_path):
    truth = write_synthetic_run(tmp_path / "run", transition=300)
    run = dynprobe.load_run(truth.root)
    perturbed = [i for i, g in enumerate(run.ghosts) if not g.control]
    estimate = analysis.transition_from_ghost_C(run.steps, run.chaos["C"][perturbed],
                                                row_ids=[run.ghosts[i].ghost_id for i in perturbed])
    # Independently: each diverging ghost's row levels off (brute force) near the planted step.
    onsets = [brute_force_level_off(run.steps[np.isfinite(run.chaos["C"][i])],
                                    run.chaos["C"][i][np.isfinite(run.chaos["C"][i])])[0]
              for i in perturbed if run.ghosts[i].spawn_step < 300]
    assert all(within(o, 300) for o in onsets), onsets
    assert estimate.step in onsets and estimate.quality == "high", estimate.summary
    assert analysis.transition_from_ghost_C(run.steps, np.zeros((0, len(run)))).quality == "unavailable"


# --------------------------------------------------------------------------------------------- velocity


def brute_force_lag_series(steps, kernel_vectors, has_kernel, lag):
    """S(t, t+lag) between kernel snapshots exactly `lag` apart, from the simulated kernels (loops)."""
    out = []
    for i, t in enumerate(steps):
        for j, u in enumerate(steps):
            if u - t == lag and has_kernel[i] and has_kernel[j]:
                a, b = kernel_vectors[i], kernel_vectors[j]
                out.append((int(t), 1 - float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))))
    return out


@pytest.mark.parametrize("velocity", ["step", "power"])
@pytest.mark.parametrize("planted,schedule", [(300, "uniform"), (900, "uniform"), (80, "log_companions"),
                                              (300, "log_companions"), (900, "log_companions")])
def test_kernel_velocity_drop_lands_near_the_planted_transition(tmp_path, velocity, planted, schedule):
    steps = uniform_steps(2000, 81) if schedule == "uniform" else log_linear_steps(2000)
    lag = None if schedule == "uniform" else 10
    truth = write_synthetic_run(tmp_path / "run", steps=steps, transition=planted, velocity=velocity, ghosts=(),
                                seed=planted + 7, kernel_lag=lag)
    run = dynprobe.load_run(truth.root)
    estimate = analysis.transition_from_kernel_velocity(run.steps, run.S, lag=lag)
    assert estimate.quality == "high", estimate.summary
    assert within(estimate.step, planted), (estimate.step, planted)
    expected = brute_force_lag_series(run.steps, truth.kernels, np.isfinite(np.diag(run.S)), lag or 25)
    assert estimate.evidence["lag"] == (lag or 25)
    np.testing.assert_allclose(estimate.evidence["t"], [t for t, _ in expected])
    np.testing.assert_allclose(estimate.evidence["S"], [v for _, v in expected], rtol=1e-6)


def kernel_estimate(path, **kwargs):
    truth = write_synthetic_run(path, ghosts=(0, 50, 150, 600, 1200), **kwargs)
    run = dynprobe.load_run(truth.root)
    return analysis.estimate_transition(run).get("kernel_velocity")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kernel_velocity_moves_at_most_1_5x_when_snapshots_are_thinned_or_a_spawn_snapshot_dropped(tmp_path, seed):
    # Uniform grid: thinning ×2 doubles the lag (25 → 50).
    steps = uniform_steps(2000, 81)
    full = kernel_estimate(tmp_path / "full", steps=steps, seed=seed)
    thinned = kernel_estimate(tmp_path / "thin", steps=steps, seed=seed, keep=steps[::2])
    dropped = kernel_estimate(tmp_path / "drop", steps=steps, seed=seed, keep=steps[steps != 150])
    # Log-spaced kernel snapshots with companions 10 steps later (KernelConfig(lag_steps=10)): thinning keeps every
    # other base snapshot with its companion.
    base = log_linear_steps(2000)
    companion = kernel_estimate(tmp_path / "lag", steps=base, seed=seed, kernel_lag=10)
    kept = np.union1d(base[::2], base[::2] + 10)
    companion_thin = kernel_estimate(tmp_path / "lag_thin", steps=base, seed=seed, kernel_lag=10, keep=kept)
    for a, b in ((full, thinned), (full, dropped), (companion, companion_thin)):
        assert a.step is not None and b.step is not None, (a.summary, b.summary)
        assert max(a.step, b.step) / min(a.step, b.step) <= 1.5, (a.step, b.step)
    assert thinned.evidence["lag"] == 2 * full.evidence["lag"] and companion.evidence["lag"] == 10
    assert all(within(e.step, 300) for e in (full, thinned, dropped, companion, companion_thin))


def test_kernel_velocity_uses_only_snapshots_with_kernels(tmp_path):
    truth = write_synthetic_run(tmp_path / "run", transition=300, ghosts=(), kernel_every=2)
    run = dynprobe.load_run(truth.root)
    kernel_steps, _ = analysis.kernel_subset(run.steps, run.S)
    assert np.array_equal(kernel_steps, run.kernel_steps)
    estimate = analysis.transition_from_kernel_velocity(run.steps, run.S)
    assert set(estimate.evidence["t"]) <= set(kernel_steps.tolist())
    assert within(estimate.step, 300)


def test_kernel_velocity_is_unavailable_without_kernels_or_lag_pairs():
    steps = np.arange(10)
    no_kernels = analysis.transition_from_kernel_velocity(steps, np.full((10, 10), np.nan))
    assert no_kernels.quality == "unavailable" and "KernelConfig" in no_kernels.summary
    few = np.full((10, 10), np.nan)
    few[:3, :3] = 0.1 * (1 - np.eye(3))
    assert analysis.transition_from_kernel_velocity(steps, few).quality == "unavailable"
    log_grid = np.array([0, 1, 3, 7, 15, 31, 63, 127, 255])  # no two gaps alike: no lag pairs beyond one
    unpaired = analysis.transition_from_kernel_velocity(log_grid, 0.1 * (1 - np.eye(9)))
    assert unpaired.quality == "unavailable" and "lag_steps" in unpaired.summary


def test_kernel_velocity_without_a_drop_says_so():
    rng = np.random.default_rng(8)
    steps = np.arange(0, 2001, 25)
    kernels = 3.0 + np.cumsum(rng.normal(0, 0.02, (steps.size, 60)), axis=0)  # a steady walk: S(t, t+25) flat
    estimate = analysis.transition_from_kernel_velocity(steps, cosine_distance_matrix(kernels))
    assert estimate.step is None and estimate.quality == "none" and "no drop" in estimate.summary


# ------------------------------------------------------------------------------------- headline and settling line


def estimate(method: str, step: int | None, interval, quality: str | None = None) -> TransitionEstimate:
    return TransitionEstimate(method, step, interval, quality or ("high" if step is not None else "bound"), "")


def test_the_headline_is_the_chaos_estimate_and_trajectory_estimates_settle_on_their_own_line():
    # The audit's case: trajectory estimates at 1,200 and 1,300 are a different event (the trajectory settles),
    # never a vote on the chaos estimate, which alone gives the headline.
    report = analysis.combine_estimates([estimate("chaos", 500, (250, 500)),
                                         estimate("kernel_velocity", 1200, (1100, 1200)),
                                         estimate("trajectory_C", 1300, (1250, 1350)),
                                         estimate("ghost_C", None, (400, None))])
    assert report.step == 500 and report.interval == (250, 500) and report.quality == "high"
    assert report.headline.startswith("Training left its chaotic phase between steps 250 and 500")
    assert report.settles == 1200 and report.settles_agree is True and report.settles_interval == (1100, 1200)
    assert report.settles_summary.startswith("the trajectory settles at about step 1200")
    with_lr = analysis.combine_estimates([estimate("chaos", 500, (250, 500))],
                                         lr_note="coincides with the lr drop ÷10 at step 500")
    assert with_lr.headline.endswith("It coincides with the lr drop ÷10 at step 500.")


def test_a_bound_that_excludes_another_bracket_is_disagreement():
    # "> 2,000" next to 1,300: the ×2 widening must not let a bound meet a bracket it excludes.
    apart = analysis.combine_estimates([estimate("chaos", None, (2000, None), "bound"),
                                        estimate("kernel_velocity", 1300, (1200, 1300)),
                                        estimate("trajectory_C", None, (2000, None), "bound")])
    assert apart.settles_agree is False and apart.settles is None
    assert "disagree" in apart.settles_summary and "> 2000" in apart.settles_summary
    assert apart.step is None and apart.headline.startswith("The chaotic phase lasts beyond step 2000")
    # Two brackets ×2 apart still meet (brackets, not points, decide).
    touching = analysis.combine_estimates([estimate("trajectory_C", 600, (150, 600)),
                                           estimate("kernel_velocity", 300, (250, 300))])
    assert touching.settles_agree is True and touching.settles in (300, 600)
    far = analysis.combine_estimates([estimate("trajectory_C", 100, (90, 110)),
                                      estimate("kernel_velocity", 1000, (900, 1100))])
    assert far.settles_agree is False and "disagree" in far.settles_summary


def test_undetermined_chaos_gives_no_step_whatever_the_trajectory_says():
    nothing = analysis.combine_estimates([TransitionEstimate("chaos", None, None, "undetermined",
                                                             "undetermined: ghosts spawned at 800 still growing"),
                                          estimate("trajectory_C", 100, (90, 110))])
    assert nothing.step is None and nothing.headline.startswith("Transition undetermined, because ghosts spawned")
    assert nothing.settles == 100 and nothing.settles_agree is None
    missing = analysis.combine_estimates([estimate("trajectory_C", 100, (90, 110))])
    assert missing.step is None and missing.quality == "unavailable"
    with pytest.raises(ValueError, match="tolerance"):
        analysis.combine_estimates([], tolerance=0.5)


def test_estimate_transition_on_a_synthetic_run_finds_the_planted_step(tmp_path):
    truth = write_synthetic_run(tmp_path / "run", transition=300)
    report = analysis.estimate_transition(dynprobe.load_run(truth.root))
    assert [e.method for e in report.estimates] == ["chaos", "kernel_velocity", "trajectory_C", "ghost_C"]
    assert all(e.quality in ("high", "medium") for e in report.estimates), [e.summary for e in report.estimates]
    assert report.step == 600 and report.interval == (150, 600) and report.interval[0] < 300 <= report.interval[1]
    assert report.settles_agree is True and within(report.settles, 300, 2.0)


def test_the_lr_change_inside_the_bracket_is_named():
    lr = np.full((1000, 2), 0.1)
    lr[500:, 0] = 0.01  # a drop ÷10 at step 500 in group 0
    lr[:, 1] = np.linspace(0.1, 0.05, 1000)  # a smooth schedule changes every step, never by ×1.5 at once
    changes = analysis.lr_changes(lr)
    assert [(c.step, c.group) for c in changes] == [(500, 0)]
    assert changes[0].before == pytest.approx(0.1) and changes[0].after == pytest.approx(0.01)
    assert analysis.lr_change_note(lr, (250, 500)) == "coincides with the lr drop ÷10 at step 500"
    assert analysis.lr_change_note(lr, (500, 800)) is None and analysis.lr_change_note(lr, None) is None
    lr[:100, 0] = np.nan  # not recorded before the probe attached
    assert [c.step for c in analysis.lr_changes(lr)] == [500]


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


def test_lag_curve_pairs_steps_exactly_dt_apart():
    steps = np.array([0, 1, 2, 3, 5, 8, 10, 20, 30, 40, 50, 61])
    S = np.abs(steps[:, None] - steps[None, :]) / 100.0
    t, values = cone.lag_curve(steps, S, 10)
    expected = [(int(ti), S[i, j]) for i, ti in enumerate(steps) for j, tj in enumerate(steps) if tj - ti == 10]
    assert list(zip(t.tolist(), values.tolist())) == expected and 51 not in t  # 61 is 11 after 50: not a pair
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


def fire(run: dynprobe.Run, with_kernels: bool = True, **kwargs):
    detector = TransitionDetector(**kwargs)
    fired = [(step, e) for step, c, s in stream(run, with_kernels) if (e := detector.update(step, c, s)) is not None]
    return detector, fired


def test_detector_fires_once_near_the_planted_transition(tmp_path):
    truth = write_synthetic_run(tmp_path / "run", steps=uniform_steps(2000, 81), transition=300, ghosts=())
    detector, fired = fire(dynprobe.load_run(truth.root))
    assert len(fired) == 1
    at_step, estimate = fired[0]
    assert estimate.method == "online" and estimate.quality == "high" and within(estimate.step, 300, 1.25)
    assert at_step > estimate.step and detector.fired and detector.estimate is estimate
    assert estimate.evidence["signal"] == "S(t, t+lag)" and estimate.evidence["lag"] == 25
    assert len(estimate.evidence["low_steps"]) >= 3


def test_detector_pairs_are_exactly_lag_apart_and_equal_the_stored_distances(tmp_path):
    truth = write_synthetic_run(tmp_path / "run", steps=log_linear_steps(2000), transition=300, ghosts=(),
                                kernel_lag=10)
    run = dynprobe.load_run(truth.root)
    detector, fired = fire(run, lag_steps=10)
    expected = brute_force_lag_series(run.steps, truth.kernels, np.isfinite(np.diag(run.S)), 10)
    velocity, c_lag = detector.pairs(10)
    assert [t for t, _ in velocity] == [t for t, _ in expected]
    np.testing.assert_allclose([v for _, v in velocity], [v for _, v in expected], rtol=1e-6)
    index = {int(t): k for k, t in enumerate(run.steps)}
    assert c_lag == [(t, run.C[index[t + 10], index[t]]) for t, _ in c_lag]
    assert len(fired) == 1 and within(fired[0][1].step, 300)


def test_detector_falls_back_to_the_parameter_direction_change_without_kernels(tmp_path):
    truth = write_synthetic_run(tmp_path / "run", steps=uniform_steps(2000, 81), transition=300, kernels=False,
                                ghosts=())
    # The planted C(t, t+25) drops 27× at the transition, less than the default factor (30, measured on real
    # runs, where it drops > 100×): the mechanism is tested with a factor the planted drop clears.
    _, fired = fire(dynprobe.load_run(truth.root), with_kernels=False, drop_factor=10)
    assert len(fired) == 1 and fired[0][1].quality == "low" and within(fired[0][1].step, 300, 1.25)
    assert fired[0][1].evidence["signal"] == "C(t, t+lag)"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detector_moves_at_most_1_5x_when_snapshots_are_thinned_or_a_spawn_snapshot_dropped(tmp_path, seed):
    steps = uniform_steps(2000, 81)
    runs = {name: dynprobe.load_run(write_synthetic_run(tmp_path / name, steps=steps, seed=seed,
                                                        keep=keep).root)
            for name, keep in (("full", None), ("thin", steps[::2]), ("drop", steps[steps != 150]))}
    base = log_linear_steps(2000)
    kept = np.union1d(base[::2], base[::2] + 10)
    for name, keep in (("lag", None), ("lag_thin", kept)):
        runs[name] = dynprobe.load_run(write_synthetic_run(tmp_path / name, steps=base, seed=seed, kernel_lag=10,
                                                           keep=keep).root)
    found = {name: fire(run, lag_steps=10 if name.startswith("lag") else None)[1] for name, run in runs.items()}
    assert all(len(f) == 1 for f in found.values()), {n: len(f) for n, f in found.items()}
    step = {name: f[0][1].step for name, f in found.items()}
    for a, b in (("full", "thin"), ("full", "drop"), ("lag", "lag_thin")):
        assert max(step[a], step[b]) / min(step[a], step[b]) <= 1.5, step
    assert all(within(s, 300) for s in step.values()), step


def test_detector_never_fires_on_a_steady_random_walk():
    rng = np.random.default_rng(6)
    steps = log_linear_steps(2000)
    dt = np.diff(steps, prepend=0)[:, None]
    theta = np.cumsum(rng.normal(0, 0.01, (steps.size, 60)) * np.sqrt(dt), axis=0) + 1.0
    kernels = np.cumsum(rng.normal(0, 0.01, (steps.size, 60)) * np.sqrt(dt), axis=0) + 3.0
    C, S = cosine_distance_matrix(theta), cosine_distance_matrix(kernels)
    detector = TransitionDetector()
    assert all(detector.update(int(t), C[k, : k + 1], S[k, : k + 1]) is None for k, t in enumerate(steps))
    assert not detector.fired and detector.lag == 50  # the regular late spacing, not the dense start


def test_detector_rejects_bad_input():
    detector = TransitionDetector()
    detector.update(0, [0.0])
    with pytest.raises(ValueError, match="2 entries"):
        detector.update(1, [0.1, 0.0, 0.0])
    with pytest.raises(ValueError, match="must increase"):
        detector.update(0, [0.1, 0.0])
    with pytest.raises(TypeError, match="step must be an int"):
        detector.update(1.5, [0.1, 0.0])
    for bad in ({"drop_factor": 1.0}, {"patience": 0}, {"c_drop_factor": "3"}, {"min_snapshots": 2.5},
                {"lag_steps": 0}, {"lag_steps": 2.5}):
        with pytest.raises(ValueError):
            TransitionDetector(**bad)


# --------------------------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A short real run: MLP, SGD momentum, eNTK on 16 examples, ghosts at 0, 10, 40, a snapshot every 4 steps."""
    root = tmp_path_factory.mktemp("real") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, optimizer, scheduler, data = mlp_setup()
        probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=root, schedule=4,
                               ghosts=dynprobe.Ghosts(at=[0, 10, 40]), kernel=dynprobe.KernelConfig(n=16))
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
    assert trajectory.step == brute_force_level_off_estimate(run.steps, run.C)
    outcomes = analysis.ghost_outcomes(run)
    perturbed = [g for g in run.ghosts if not g.control]
    assert [o.spawn_step for o in outcomes] == [g.spawn_step for g in perturbed] == [0, 10, 40]
    for o, ghost in zip(outcomes, perturbed):
        row = run.ghosts.index(ghost)
        assert o.D == run.chaos["D"][row, -1] and o.final_step == run.steps[-1]
        assert o.realized_norm == ghost.realized_norm and o.C_scale == run.C[-1, -2]
    for verdict in analysis.ghost_verdicts(run):
        above = [c["value"] > c["threshold"] for c in verdict.checks.values() if c["threshold"] is not None]
        assert (verdict.verdict == "diverged") == any(above)
    # The kernel velocity: S between kernel snapshots exactly 4 steps apart, read from the stored matrix.
    kernel_steps = run.kernel_steps
    rows = {int(t): run.snapshot_index_of(int(t)) for t in kernel_steps}
    expected = [(t, run.S[rows[t], rows[t + 4]]) for t in rows if t + 4 in rows and run.S[rows[t], rows[t + 4]] > 0]
    velocity = report.get("kernel_velocity")
    assert velocity.evidence["lag"] == 4
    assert list(zip(velocity.evidence["t"], velocity.evidence["S"])) == expected
    result = analysis.analyze(run)
    assert result.cone.available and result.cone.cones
    for numbers in result.cone.cones:
        t, values = run.kernel_distance_to(numbers.tau)
        assert numbers.max_distance == pytest.approx(values[t > numbers.tau].max(), rel=1e-12)


def test_detector_reads_only_the_lag_pair_entries_of_each_new_row(real_run):
    """Entries other than the diagonal and the pair Δ steps back are poisoned with NaN: nothing changes."""
    run = real_run
    plain, poisoned = TransitionDetector(patience=2, min_snapshots=3), TransitionDetector(patience=2, min_snapshots=3)
    index = {int(t): k for k, t in enumerate(run.steps)}
    for k, step in enumerate(run.steps):
        c_row, s_row = run.C[k, : k + 1].copy(), run.S[k, : k + 1].copy()
        plain.update(int(step), c_row, s_row)
        gaps_so_far = set(np.diff(run.steps[: k + 1]).tolist())  # the lags the detector can have chosen by now
        keep = [k] + [index[int(step) - lag] for lag in gaps_so_far if int(step) - lag in index]
        mask = np.ones(k + 1, dtype=bool)
        mask[keep] = False
        c_row[mask], s_row[mask] = np.nan, np.nan
        poisoned.update(int(step), c_row, s_row)
    assert plain.steps == poisoned.steps == run.steps.tolist()
    kernel_steps = set(run.kernel_steps.tolist())
    assert plain.pairs(4) == poisoned.pairs(4) and plain.lag == poisoned.lag == 4
    assert len(plain.pairs(4)[0]) == sum(t + 4 in kernel_steps for t in kernel_steps) > 10
    assert [e.to_dict() if e else None for e in (plain.estimate, poisoned.estimate)] == \
        [plain.estimate.to_dict() if plain.estimate else None] * 2


def test_the_online_detector_given_deferred_entries_later_decides_as_with_whole_rows():
    """A probe defers C entries against older snapshots and hands them over when computed (TransitionWatch): the
    lag pairs (here 5 snapshots apart, beyond the 3 given at once) arrive late, and the estimate is the same."""
    from dynprobe.probe.transition import TransitionWatch

    steps = list(range(0, 800, 10))
    level = np.where(np.asarray(steps) < 400, 0.3, 0.001)  # c(t) drops 300× at step 400
    full = np.zeros((len(steps), len(steps)))
    for k in range(len(steps)):
        for p in range(k):
            full[k, p] = level[p] * (1 + 0.01 * ((k - p) % 3))
    whole, deferred = TransitionWatch(lambda *a, **k: None, None, lag_steps=50), \
        TransitionWatch(lambda *a, **k: None, None, lag_steps=50)
    late: dict[int, list] = {}
    for k, step in enumerate(steps):
        whole.update(step, {"C": full[k, : k + 1]})
        row = full[k, : k + 1].copy()
        far = np.arange(0, max(0, k - 3))
        row[far] = np.nan
        if far.size:
            late.setdefault(k + 3, []).append((k, far, full[k, far]))
        deferred.update(step, {"C": row}, {"C": late.pop(k, [])})
    assert whole.estimate is not None and deferred.estimate is not None
    assert deferred.estimate.step == whole.estimate.step
    without = TransitionWatch(lambda *a, **k: None, None, lag_steps=50)
    for k, step in enumerate(steps):  # never given the deferred entries: no lag pairs, no estimate
        row = full[k, : k + 1].copy()
        row[: max(0, k - 3)] = np.nan
        without.update(step, {"C": row})
    assert without.estimate is None
