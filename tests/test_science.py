"""The demo's default configuration shows both effects of the two-phase paper (slow: the full demo per seed).

(a) chaos effect: ghosts spawned early end far from the main run, ghosts spawned late stay close, and the ε=0
    control ends at exactly 0; (b) cone effect: after the transition, S(t, τ) rises and then plateaus; (c) the
    transition estimate lands between the last diverging and the first stable spawn step.

Thresholds come from measured runs of the default configuration (lr 0.1, 1,500 steps, 2 threads; ``measure``):
seed 0 / seed 1: the final main-vs-ghost 1 − cos of the ghosts spawned at steps 0 and 25 was 2.0e-2–2.9e-2 /
1.7e-2–1.1e-1, that of the ghost spawned at 800 9.2e-7 / 5.8e-5 (ratios 2e4 / 290; the test asks for 100); the
ghosts spawned at 250 ended at 7.9e-3 / 9.9e-3, so ``DIVERGED_C`` = 7e-4 is the geometric middle between the largest
"stable" (5.8e-5) and the smallest "diverging" (7.9e-3) value. Transition (trajectory C): 700 / 600, between 250 and
800. Cone: S(t, τ) after τ = 700 / 600 rose to 2.0e-2 / 1.1e-2 and grew 26% / 2% of that over the second half of the
remaining run (the test allows 50%).

Seed 2 is not tested, and why matters: its chaotic phase outlasts the last spawn (the t0 = 800 ghost ended at 9.3e-3,
the trajectory-C estimate is > 1,400), so the run has no stable spawn to bracket the transition. lr 0.05 (seeds
0–2) and lr 0.05 with 2,000 steps and a spawn at 1,000 (seeds 1–2) did not fix it: seed 2 stayed chaotic at 1,000
(2.2e-3). The transition time of this small network is seed dependent; the demo's report says when it is not found.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

import dynprobe
from dynprobe.demo import DemoConfig, run_demo

pytestmark = pytest.mark.slow

DIVERGED_C = 7e-4  # final 1 − cos separating diverging from stable ghosts (measured gap: 5.8e-5 … 7.9e-3)


def measure(run: dynprobe.Run) -> dict:
    """The numbers the science checks read: final ghost metrics, the transition, the cone growth."""
    final = {name: run.chaos[name][:, -1] for name in ("C", "L2", "D", "B")}
    ghosts = run.ghosts
    control = [i for i, g in enumerate(ghosts) if g.control]
    perturbed = sorted((i for i, g in enumerate(ghosts) if not g.control), key=lambda i: ghosts[i].spawn_step)
    spawn = {i: ghosts[i].spawn_step for i in perturbed}
    diverging = [spawn[i] for i in perturbed if final["C"][i] > DIVERGED_C]
    stable = [spawn[i] for i in perturbed if final["C"][i] <= DIVERGED_C]
    report = dynprobe.analysis.estimate_transition(run)
    transition = report.get("trajectory_C").step if report.get("trajectory_C").informative else report.step
    # Cone: S(t, τ) for the first kernel step τ at or after the transition.
    kernel_steps = run.kernel_steps
    tau = int(kernel_steps[np.searchsorted(kernel_steps, transition)]) if transition is not None else None
    cone = None
    if tau is not None and tau < kernel_steps[-1]:
        steps, values = run.kernel_distance_to(tau)
        after = steps > tau
        t, s = steps[after], values[after]
        end = run.steps[-1]
        late = t >= tau + 0.5 * (end - tau)  # second half of the remaining run
        cone = {"tau": tau, "rise": float(s[-1]), "late_growth": float(s[-1] - s[late][0]), "max": float(s.max())}
    return {
        "final_C": {spawn[i]: float(final["C"][i]) for i in perturbed},
        "final_B": {spawn[i]: float(final["B"][i]) for i in perturbed},
        "control": {name: final[name][control].tolist() for name in final},
        "diverging": diverging, "stable": stable, "transition": transition,
        "consensus": report.step, "summary": report.summary, "cone": cone,
    }


@pytest.fixture(scope="module", params=[0, 1], ids=lambda s: f"seed{s}")
def demo_run(request, tmp_path_factory) -> tuple[dynprobe.Run, dict]:
    out: Path = tmp_path_factory.mktemp(f"science{request.param}") / "demo"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_demo(DemoConfig(out=out, seed=request.param), console=None)
    run = dynprobe.load_run(out)
    numbers = measure(run)
    print(f"seed {request.param}: {numbers}")
    return run, numbers


def test_chaos_effect_early_ghosts_diverge_late_ghosts_stay_and_control_is_exactly_zero(demo_run):
    run, m = demo_run
    final_C, final_B = m["final_C"], m["final_B"]
    steps = sorted(final_C)
    early, late = steps[:2], steps[-1]
    assert min(final_C[s] for s in early) > 100 * final_C[late], final_C
    assert min(final_B[s] for s in early) > final_B[late], final_B
    for name, values in m["control"].items():
        assert values and all(v == 0.0 for v in values), (name, values)
    assert all(g.status != "diverged" for g in run.ghosts)


def test_transition_lands_between_the_last_diverging_and_the_first_stable_spawn(demo_run):
    _, m = demo_run
    assert m["diverging"] and m["stable"], m
    last_diverging, first_stable = max(m["diverging"]), min(m["stable"])
    assert last_diverging < first_stable, m  # the spawn steps split cleanly into two phases
    assert last_diverging <= m["transition"] <= first_stable, m


def test_cone_effect_kernel_distance_rises_then_plateaus(demo_run):
    _, m = demo_run
    cone = m["cone"]
    assert cone is not None, m
    assert cone["rise"] > 1e-4, cone  # the kernel keeps moving after the transition ...
    assert cone["late_growth"] < 0.5 * cone["rise"], cone  # ... but half of the remaining run adds < half the rise
    assert cone["max"] < 0.5, cone  # and stays inside a cone: S ≤ 1 − cos(angle); 0.5 is a 60° half-angle
