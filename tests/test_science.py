"""What the demo claims holds when the same run is made longer or its snapshot grid is thinned (slow: full demos).

For each of seeds 0, 1 and 2 — none excluded — the demo (MNIST-1D, Conv1dNet, SGD lr 0.1 divided by 10 at steps
500 and 1,000, ghosts spawned at 0, 25, 80, 250, 500, 800 plus the ε = 0 control) runs at its horizon of 1,500
steps and, separately, at twice that (3,000 steps; the same run for its first 1,500 steps). The checks:

* the chaos estimate (from the ghosts' sensitivity over fixed windows after their spawn) and the consensus
  transition move by at most ×1.5 between the two horizons;
* the kernel-velocity estimate (S(t, t + Δ) at the fixed lag Δ = 100) and the online detector move by at most
  ×1.5 when the kernel snapshots are thinned ×2 (every other reference step t, with its companion t + Δ) or when
  the snapshot at a ghost's spawn step is dropped, and the online detector lands within ×1.5 of the report's
  headline (its drop factor, 30, was chosen on seeds 0 and 1; seed 2 was held out);
* the ε = 0 control is exactly 0 in every chaos map and along its whole separation curve;
* early spawns are far more sensitive than late ones: over Δ = 400 steps after their spawn, the ghosts spawned at
  0, 25 and 80 amplify ε at least ``SENSITIVITY_MARGIN`` times more than those spawned at 500 and 800;
* at twice the horizon, the ghosts spawned at 500 and 800 are still judged close (not diverged).

The margin comes from measured runs of this configuration (exploration runs without the probe, seeds 0–2, 3,000
steps): over Δ = 400 the early ghosts (t0 ≤ 250) amplified ε by 6.7e6 to 7.2e7, the late ones (t0 ≥ 500) by 19 to
5.3e3 (seed 0's ghost spawned at 800 jumps ×500 in one burst around step 1,000; the others stay below 230), a
ratio of at least 1.2e3; ``SENSITIVITY_MARGIN`` = 100 leaves an order of magnitude for other machines' rounding.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest

import dynprobe
from dynprobe.analysis import TransitionDetector, analyze, transition_from_kernel_velocity
from dynprobe.analysis.sensitivity import amplification
from dynprobe.demo import DemoConfig, run_demo

pytestmark = pytest.mark.slow

HORIZON = 1500
LAG = 100
SENSITIVITY_MARGIN = 100.0
SENSITIVITY_WINDOW = 400


def _ratio(a: int | None, b: int | None) -> float:
    assert a is not None and b is not None, (a, b)
    return max(a, b) / max(1, min(a, b))


@pytest.fixture(scope="module", params=[0, 1, 2], ids=lambda s: f"seed{s}")
def runs(request, tmp_path_factory) -> tuple[dynprobe.Run, dynprobe.Run]:
    seed = request.param
    base: Path = tmp_path_factory.mktemp(f"science{seed}")
    result = []
    for steps in (HORIZON, 2 * HORIZON):
        out = base / f"demo{steps}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_demo(DemoConfig(out=out, seed=seed, steps=steps), console=None)
        result.append(dynprobe.load_run(out))
    return result[0], result[1]


def test_chaos_estimate_and_consensus_hold_at_twice_the_horizon(runs):
    short, long = runs
    at_1x, at_2x = analyze(short).transition, analyze(long).transition
    chaos_1x, chaos_2x = at_1x.get("chaos"), at_2x.get("chaos")
    print("chaos", chaos_1x.summary, "|", chaos_2x.summary)
    print("consensus", at_1x.summary, "|", at_2x.summary)
    assert chaos_1x.step is not None and chaos_2x.step is not None, (chaos_1x.summary, chaos_2x.summary)
    assert _ratio(chaos_1x.step, chaos_2x.step) <= 1.5
    assert _ratio(at_1x.step, at_2x.step) <= 1.5


def _kernel_series(run: dynprobe.Run) -> tuple[np.ndarray, np.ndarray]:
    have = np.array([bool(s.get("kernel")) for s in run.snapshots])
    return run.steps[have], run.S[np.ix_(have, have)]


def _thinned(steps: np.ndarray, keep_every: int) -> np.ndarray:
    """Indices of every ``keep_every``-th reference step t (those with a companion t + LAG) and its companion."""
    position = {int(t): i for i, t in enumerate(steps)}
    references = [i for i, t in enumerate(steps) if int(t) + LAG in position]
    kept = set(references[::keep_every])
    kept |= {position[int(steps[i]) + LAG] for i in list(kept)}
    return np.array(sorted(kept))


def _detector_step(steps: np.ndarray, C: np.ndarray, S: np.ndarray, keep: np.ndarray) -> int | None:
    detector = TransitionDetector(lag_steps=LAG)
    for position, k in enumerate(keep):
        columns = keep[: position + 1]
        detector.update(int(steps[k]), C[k, columns], S[k, columns])
    return None if detector.estimate is None else detector.estimate.step


def test_kernel_estimate_and_detector_hold_under_thinning_and_a_dropped_spawn_snapshot(runs):
    short, _ = runs
    steps, S = _kernel_series(short)
    full = transition_from_kernel_velocity(steps, S, lag=LAG)
    thinned_index = _thinned(steps, 2)
    thinned = transition_from_kernel_velocity(steps[thinned_index], S[np.ix_(thinned_index, thinned_index)], lag=LAG)
    spawn = np.array([i for i, t in enumerate(steps) if int(t) != 25])  # the snapshot at a spawn step, dropped
    dropped = transition_from_kernel_velocity(steps[spawn], S[np.ix_(spawn, spawn)], lag=LAG)
    print("kernel velocity", full.step, thinned.step, dropped.step)
    assert _ratio(full.step, thinned.step) <= 1.5 and _ratio(full.step, dropped.step) <= 1.5

    all_steps, C = short.steps, short.C
    S_all = short.S
    have = np.array([bool(s.get("kernel")) for s in short.snapshots])
    index = np.flatnonzero(have)
    detected = _detector_step(all_steps, C, S_all, index)
    detected_thinned = _detector_step(all_steps, C, S_all, index[_thinned(all_steps[index], 2)])
    headline = analyze(short).transition.step
    print("online detector", detected, detected_thinned, "headline", headline)
    assert _ratio(detected, detected_thinned) <= 1.5
    assert _ratio(detected, headline) <= 1.5  # the online estimate fires at the transition the report finds


def test_the_control_is_exactly_zero_everywhere(runs):
    for run in runs:
        control = [i for i, g in enumerate(run.ghosts) if g.control]
        assert len(control) == 1
        for name in ("C", "L2", "D", "B", "B_linear"):
            row = run.chaos[name][control[0]]
            values = row[np.isfinite(row)]
            assert values.size and np.all(values == 0.0), (name, values)
        steps, l2 = run.separation(run.ghosts[control[0]].index)
        assert steps.size > HORIZON // 2 and np.all(l2 == 0.0)


def _amplifications(run: dynprobe.Run) -> dict[int, float]:
    controls = {g.index for g in run.ghosts if g.control}
    return {curve.spawn_step: amplification(curve, SENSITIVITY_WINDOW) for curve in analyze(run).separation
            if curve.ghost not in controls}


def test_early_spawns_amplify_far_more_than_late_spawns(runs):
    _, long = runs
    amplified = _amplifications(long)
    print("A(t0, 400)", {t0: f"{a:.3g}" for t0, a in sorted(amplified.items())})
    early = [amplified[t0] for t0 in (0, 25, 80)]
    late = [amplified[t0] for t0 in (500, 800)]
    assert all(math.isfinite(a) for a in early + late), amplified
    assert min(early) >= SENSITIVITY_MARGIN * max(late), amplified


def test_late_ghosts_are_still_close_at_twice_the_horizon(runs):
    _, long = runs
    controls = {g.index for g in long.ghosts if g.control}
    verdicts = {v.spawn_step: v for v in analyze(long).verdicts if v.ghost not in controls}
    print({t0: v.verdict for t0, v in sorted(verdicts.items())})
    for t0 in (500, 800):
        assert verdicts[t0].verdict == "close", verdicts[t0].to_dict()
    for t0 in (0, 25):
        assert verdicts[t0].verdict == "diverged", verdicts[t0].to_dict()
