"""What the demo claims holds when the same run is made longer or its curves are thinned (slow: full demos).

For each of seeds 0, 1 and 2 — none excluded — the demo (MNIST-1D, an MLP 40-128-128-10 without normalisation,
SGD with momentum 0.9 at a **constant** lr 0.1; ghosts spawned at 0, 25, 50, 100, 200, 400, 600, 800, 1,000 with
three perturbation directions each, plus the ε = 0 control) runs at its horizon of 2,000 steps and, separately, at
twice that (4,000 steps; the same run for its first 2,000 steps). The checks:

* the chaos estimate (where each ghost's separation saturates) at twice the horizon gives the independent
  lock-step truth's bracket for the seed (``tests/science/ground_truth.json``: 600–800, 400–600, 600–800), at
  the horizon the same or "undetermined" (seed 2: a deciding ghost still grows), and the same with its
  separation curves thinned ×2 — under a constant learning rate (the headline names no learning-rate change);
* the early spawns' plateau levels are at least ``LEVEL_MARGIN`` times the late spawns' at both horizons;
* the kernel-velocity estimate and the online detector move by at most ×1.5 when the kernel snapshots are thinned
  ×2 (every other reference step t, with its companion t + Δ) or when the snapshot at a ghost's spawn step is
  dropped;
* the ε = 0 control is exactly 0 in every chaos map and along its whole separation curve.

The demo's seed 0 is ``tests/science/settings.py``'s ``mlp_sgdm`` exactly (same init, data and batch order), whose
independent lock-step ground truth (``tests/science``) brackets the transition between spawns 600 and 800.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import dynprobe
from dynprobe.analysis import TransitionDetector, analyze, transition_from_kernel_velocity, transition_from_saturation
from dynprobe.demo import DemoConfig, run_demo

pytestmark = pytest.mark.slow

HORIZON = 2000
LAG = 100
LEVEL_MARGIN = 10.0  # the chaos estimate's K; measured: ×285 to ×1,167 (seeds 0–2, both horizons)
GROUND_TRUTH = json.loads((Path(__file__).parent / "ground_truth.json").read_text())["settings"]


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


def _thinned_curves(run: dynprobe.Run) -> list:
    out = []
    for c in analyze(run).separation:
        keep = (c.steps - c.spawn_step) % 2 == 0
        keep[-1] = True
        out.append(replace(c, steps=c.steps[keep], l2=c.l2[keep]))
    return out


def test_chaos_estimate_holds_at_twice_the_horizon_and_with_thinned_curves(runs, request):
    short, long = runs
    at_1x, at_2x = analyze(short).transition, analyze(long).transition
    print("headline", at_1x.headline, "|", at_2x.headline)
    # At twice the horizon every seed locates the transition, in the independent lock-step truth's bracket (the
    # demo is tests/science's mlp_sgdm exactly); at the horizon the same bracket, or "undetermined" while a
    # deciding ghost still grows (seed 2: a ghost spawned at 800 grows ×8 over its last 600 steps) — never another.
    seed = request.node.callspec.params["runs"]
    truth = GROUND_TRUTH["mlp_sgdm" if seed == 0 else f"mlp_sgdm@seed{seed}"]["bracket"]["at_2H"]
    assert at_2x.interval == (truth["last_chaotic"], truth["first_stable"]), at_2x.summary
    assert at_1x.interval == at_2x.interval or (at_1x.step is None and at_1x.quality == "undetermined"), \
        at_1x.summary
    for run, report in ((short, at_1x), (long, at_2x)):
        thinned = transition_from_saturation(_thinned_curves(run))
        assert (thinned.interval, thinned.quality) == (report.interval, report.quality), thinned.summary
    assert at_1x.lr_note is None and at_2x.lr_note is None  # a constant learning rate: no lr change to blame


def test_early_spawns_end_up_far_above_late_spawns(runs):
    for run in runs:
        levels: dict[int, list[float]] = {}
        for g in analyze(run).transition.get("chaos").evidence["ghosts"]:
            levels.setdefault(g["spawn_step"], []).append(float(g["level_L2"]))
        print({t0: [f"{v:.3g}" for v in vs] for t0, vs in sorted(levels.items())})
        early = [v for t0 in (0, 25, 50) for v in levels[t0]]
        late = [v for t0 in (800, 1000) for v in levels[t0]]
        assert min(early) >= LEVEL_MARGIN * max(late), levels


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
    print("online detector", detected, detected_thinned)
    assert _ratio(detected, detected_thinned) <= 1.5


def test_the_control_is_exactly_zero_everywhere(runs):
    for run in runs:
        control = [i for i, g in enumerate(run.ghosts) if g.control]
        assert len(control) == 1
        for name in ("C", "L2", "D", "B", "B_linear"):
            row = run.chaos[name][control[0]]
            values = row[np.isfinite(row)]
            assert values.size and np.all(values == 0.0), (name, values)
        steps, l2 = run.separation(run.ghosts[control[0]].ghost_id)
        assert steps.size > HORIZON // 2 and np.all(l2 == 0.0)
