"""When did the network leave the chaotic phase? Transition estimates from a run, each with its evidence.

Independent readings of the two-phase paper's transition (Zhou, Yang, Sugiyama & Yan, *New Evidence of the
Two-Phase Learning Dynamics of Neural Networks*, §4–5), each a pure function of plain arrays (so it is testable
without files) with a run-level wrapper in :func:`estimate_transition`:

* ``chaos`` — the headline: Finding I / Conjecture I read off where the ghosts end up: the first spawn step from
  which every ghost's separation saturates far below the early ghosts' level
  (:func:`dynprobe.analysis.saturation.transition_from_saturation`, on ``run.separation``).

The others locate when the main trajectory *settles* — a different event, reported on a line of its own:

* ``kernel_velocity`` — where S(θ_t, θ_t+Δ) (eq. 4) at a lag Δ fixed in steps drops (Fig. 5b).
* ``trajectory_C`` — the single-run map C(θ_t0, θ_t1) (eq. 1): where its rows stop rising.
* ``ghost_C`` — the main-vs-ghost map 1 − cos(θ_t1, θ'_t1) (Fig. 3a): where its rows level off.

Every estimate is a :class:`TransitionEstimate` (step, bracket, quality flag, evidence, one-line summary) and
degrades to ``quality="unavailable"`` with the reason when the run lacks what it needs. :func:`combine_estimates`
gives the :class:`TransitionReport` (the chaos estimate as the headline, the settling line, and the learning-rate
change the transition coincides with, from ``run.lr``). Each ghost's verdict at its last comparison
(:func:`ghost_verdicts`) is evidence, used by the chaos estimate only when no spawn ends up below the others.
Cone numbers are in :mod:`dynprobe.analysis.cone`; the online detector for ``Probe(on_transition=...)`` in
:mod:`dynprobe.analysis.detector`; :func:`analyze` bundles everything the report needs.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dynprobe.store.files import RunFormatError
from dynprobe.store.layout import rows_path
from dynprobe.store.run import Run

from .cone import ConeSummary, cone_summary
from .estimate import METHOD_LABELS, TransitionEstimate, TransitionReport, combine_estimates, unavailable
from .estimators import (
    kernel_subset,
    transition_from_ghost_C,
    transition_from_kernel_velocity,
    transition_from_trajectory_C,
)
from .learning_rate import lr_change_note
from .saturation import transition_from_saturation
from .sensitivity import SeparationCurve
from .verdicts import GhostOutcome, GhostVerdict, ghost_verdict

__all__ = [
    "METHOD_LABELS",
    "GhostOutcome",
    "GhostVerdict",
    "RunAnalysis",
    "TransitionEstimate",
    "TransitionReport",
    "analyze",
    "checked_matrix",
    "combine_estimates",
    "control_drift_note",
    "estimate_transition",
    "ghost_outcomes",
    "ghost_verdicts",
    "kernel_subset",
    "separation_curves",
    "transition_from_ghost_C",
    "transition_from_kernel_velocity",
    "transition_from_saturation",
    "transition_from_trajectory_C",
]


_RANGES = {"C": (0.0, 2.0), "S": (0.0, 2.0), "D": (0.0, 1.0)}


def checked_matrix(name: str, matrix: np.ndarray, steps: np.ndarray, source: str) -> np.ndarray:
    """Validate an interval matrix read from a run: finite or NaN, within its metric's range, zero diagonal.

    A damaged rows file (overwritten bytes) shows up as impossible values; raises :class:`RunFormatError` naming
    the file and the first bad entry, so the CLI can exit with code 3 instead of drawing garbage.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    low, high = _RANGES.get(name, (-math.inf, math.inf))
    slack = 1e-9
    bad = np.isinf(matrix) | (matrix < low - slack) | (matrix > high + slack)
    diagonal = np.diag(matrix)
    bad_diagonal = np.isfinite(diagonal) & (np.abs(diagonal) > 1e-6) & (name in _RANGES)
    if bad.any() or bad_diagonal.any():
        if bad.any():
            i, j = (int(v) for v in np.argwhere(bad)[0])
            what = f"entry [{i}, {j}] (steps {steps[i]}, {steps[j]}) is {matrix[i, j]!r}, outside [{low:g}, {high:g}]"
        else:
            i = int(np.flatnonzero(bad_diagonal)[0])
            what = f"diagonal entry {i} (step {steps[i]}) is {diagonal[i]!r}, not 0"
        raise RunFormatError(f"{source} is damaged: {what}. Restore the file from a backup or re-run the probe")
    return matrix


def _last_finite(row: np.ndarray) -> int | None:
    finite = np.flatnonzero(np.isfinite(row))
    return int(finite[-1]) if finite.size else None


def _chaos_map(run: Run, name: str) -> np.ndarray:
    chaos = run.chaos
    return chaos[name] if name in chaos else np.full((len(run.ghosts), len(run)), np.nan)


def ghost_outcomes(run: Run) -> list[GhostOutcome]:
    """The last comparison of every perturbed ghost of ``run`` (control and failed ghosts excluded), with the
    scales its verdict is measured against (see :class:`dynprobe.analysis.verdicts.GhostOutcome`)."""
    steps = run.steps
    # D's scale: the main run's eval error for labels and tokens; for regression D is a mean squared distance
    # between outputs, compared with the main run's own mean squared error (its eval loss).
    regression = run.manifest.get("eval", {}).get("task", {}).get("name") == "regression"
    error = run.eval_loss if regression else 1.0 - run.eval_accuracy
    D, C, L2 = _chaos_map(run, "D"), _chaos_map(run, "C"), _chaos_map(run, "L2")
    B, B_linear = _chaos_map(run, "B"), _chaos_map(run, "B_linear")
    control_row = next((r for r, g in enumerate(run.ghosts) if g.control and g.status != "failed"), None)
    trajectory_linear = getattr(run, "B_linear", None)
    b_scale = None
    if isinstance(trajectory_linear, np.ndarray) and trajectory_linear.shape == (len(run), len(run)) and len(run) > 1:
        consecutive = np.diag(trajectory_linear, k=-1)
        consecutive = consecutive[np.isfinite(consecutive)]
        b_scale = float(np.median(consecutive[-max(consecutive.size // 4, 1):])) if consecutive.size else None
    outcomes = []
    for row, ghost in enumerate(run.ghosts):
        if ghost.control or ghost.status == "failed":
            continue
        j = _last_finite(D[row])
        stopped = ghost.status == "diverged"
        if j is None and not stopped:
            continue
        if j is None:
            j = min(max(int(np.searchsorted(steps, ghost.spawn_step)), 0), len(steps) - 1)
        jb = _last_finite(B_linear[row])
        jb = jb if jb is not None else _last_finite(B[row])

        def at(matrix: np.ndarray, r: int | None, k: int | None) -> float | None:
            return None if r is None or k is None or not math.isfinite(matrix[r, k]) else float(matrix[r, k])

        outcomes.append(GhostOutcome(
            spawn_step=ghost.spawn_step, final_step=int(steps[j]), D=at(D, row, j) if at(D, row, j) is not None
            else math.nan, error=float(error[j]), B=at(B, row, jb), loss=float(run.eval_loss[jb]) if jb is not None
            else None, C=at(C, row, j), L2=at(L2, row, j), realized_norm=ghost.realized_norm, stopped_diverged=stopped,
            B_linear=at(B_linear, row, jb), C_scale=float(run.C[j, j - 1]) if j >= 1 else None, B_scale=b_scale,
            control_D=at(D, control_row, j), control_C=at(C, control_row, j),
            control_B_linear=at(B_linear, control_row, jb), ghost=ghost.ghost_id, regression=regression))
    return outcomes


def ghost_verdicts(run: Run, *, d_fraction: float = 0.25, b_fraction: float = 0.1,
                   outcomes: Sequence[GhostOutcome] | None = None) -> list[GhostVerdict]:
    """Each perturbed ghost's verdict at its last comparison (:func:`dynprobe.analysis.verdicts.ghost_verdict`);
    ``outcomes``: the run's :func:`ghost_outcomes`, if already read."""
    eval_size = run.manifest.get("eval", {}).get("n")
    return [ghost_verdict(o, d_fraction=d_fraction, b_fraction=b_fraction, eval_size=eval_size)
            for o in (ghost_outcomes(run) if outcomes is None else outcomes)]


def separation_curves(run: Run) -> list[SeparationCurve]:
    """Every ghost's separation curve (``run.separation``) with its spawn step, realized ‖ε‖ and status."""
    reader = getattr(run, "separation", None)
    if reader is None:
        return []
    curves = []
    for ghost in run.ghosts:
        steps, l2 = reader(ghost.ghost_id)
        curves.append(SeparationCurve(ghost.ghost_id, ghost.spawn_step, float(ghost.realized_norm), steps, l2,
                                      control=ghost.control, status=ghost.status))
    return curves


def control_drift_note(run: Run) -> str | None:
    """The sentence every summary of ``run`` carries when its ε = 0 control ghost drifted from the reference it
    should equal bitwise (the first ``control_drift`` event); None when it never did."""
    event = next((e for e in run.events if e.get("event") == "control_drift"), None)
    if event is None:
        return None
    reference = "the ε = 0 shadow of its stack" if event.get("reference") == "shadow" else "the main run"
    diff = event.get("max_abs_diff")
    size = f" (max |Δ| {diff:.3g})" if isinstance(diff, (int, float)) else ""
    causes = [str(c) for c in event.get("likely_causes") or []]
    cause = f"; likely causes: {'; '.join(causes)}" if causes else ""
    return (f"the ε = 0 control ghost drifted from {reference} at step {event.get('step')}{size}, so the ghosts do "
            "not reproduce the training step exactly: every ghost's separation mixes ε with that drift, and a "
            f"threshold set by the control's own value cannot tell a ghost from it{cause}")


def _online_estimate(run: Run) -> TransitionEstimate | None:
    """The estimate the online detector recorded in the run's events (``{"event": "transition", ...}``), if any."""
    record = next((e for e in run.events if e.get("event") == "transition"), None)
    if record is None:
        return None
    data = record.get("estimate") or {}
    interval = data.get("interval")
    return TransitionEstimate("online", data.get("step", record.get("step")),
                              tuple(interval) if interval else None, data.get("quality", "medium"),
                              data.get("summary", f"online detector fired at step {record.get('step')}"),
                              {**data.get("evidence", {}), "fired_at_step": record.get("step")})


def estimate_transition(run: Run, *, tolerance: float = 2.0, curves: Sequence[SeparationCurve] | None = None,
                        verdicts: Sequence[GhostVerdict] | None = None) -> TransitionReport:
    """Every transition estimate of ``run`` (see the module docstring) and the :class:`TransitionReport`.
    ``curves`` and ``verdicts``: the run's :func:`separation_curves` and :func:`ghost_verdicts`, if already read."""
    steps = run.steps
    C = checked_matrix("C", run.C, steps, str(rows_path(run.path, "C")))
    S = checked_matrix("S", run.S, steps, str(rows_path(run.path, "S")))
    curves = separation_curves(run) if curves is None else curves
    if any(not c.control and c.steps.size for c in curves):
        outcomes = ghost_outcomes(run)
        verdicts = ghost_verdicts(run, outcomes=outcomes) if verdicts is None else verdicts
        chaos = transition_from_saturation(
            curves, verdicts={v.ghost: v.verdict for v in verdicts if v.ghost is not None},
            outcomes={o.ghost: {"C": o.C, "D": o.D, "B_linear": o.B_linear} for o in outcomes
                      if o.ghost is not None})
    elif any(not g.control for g in run.ghosts):
        chaos = unavailable("chaos", "the ghosts have no separation curves (a run recorded by an older dynprobe): "
                                     "the chaos estimate needs them — record the run again")
    else:
        chaos = unavailable("chaos", "no perturbed ghosts in this run: pass "
                                     "Probe(..., ghosts=dynprobe.Ghosts(at=[...])) and watch the loss")
    estimates = [chaos, transition_from_kernel_velocity(steps, S, lag=run.kernel_lag_steps),
                 transition_from_trajectory_C(steps, C)]
    perturbed = [i for i, g in enumerate(run.ghosts) if not g.control and g.status != "failed"]
    if perturbed:
        estimates.append(transition_from_ghost_C(steps, run.chaos["C"][perturbed],
                                                 row_ids=[run.ghosts[i].ghost_id for i in perturbed]))
    else:
        estimates.append(unavailable("ghost_C", "no perturbed ghosts in this run: pass "
                                                "Probe(..., ghosts=dynprobe.Ghosts(at=[...]))"))
    online = _online_estimate(run)
    if online is not None:
        estimates.append(online)
    lr_note = lr_change_note(run.lr, chaos.interval) if chaos.step is not None else None
    return combine_estimates(estimates, tolerance=tolerance, lr_note=lr_note, control_note=control_drift_note(run))


@dataclass(frozen=True)
class RunAnalysis:
    """Everything :mod:`dynprobe.report` shows about a run: transition estimates, cone numbers, notes on what is
    missing (each a sentence saying how to get it), each ghost's verdict and separation curve."""

    transition: TransitionReport
    cone: ConeSummary
    missing: tuple[str, ...]
    verdicts: tuple[GhostVerdict, ...] = ()
    separation: tuple[SeparationCurve, ...] = ()


def analyze(run: Run, *, taus: Sequence[int] | None = None, tolerance: float = 2.0) -> RunAnalysis:
    """Transition estimates (:func:`estimate_transition`) and cone numbers
    (:func:`dynprobe.analysis.cone.cone_summary`, with reference steps after the headline transition by default) of
    ``run``; never fails on a run that lacks kernels, ghosts or snapshots — it says what is missing instead."""
    for name in ("D",):
        checked_matrix(name, run.D, run.steps, str(rows_path(run.path, name)))
    curves = separation_curves(run)
    verdicts = ghost_verdicts(run)
    transition = estimate_transition(run, tolerance=tolerance, curves=curves, verdicts=verdicts)
    cone = cone_summary(run.steps, run.S, taus=taus, transition_step=transition.step)
    missing = []
    if len(run) < 2:
        missing.append(f"the run has {len(run)} committed snapshot(s); train longer (or wait) for interval metrics")
    if not run.has_kernels:
        missing.append("no eNTK kernels: S, the cone curves, the kernel velocity and the kernel embedding need "
                       "Probe(..., kernel=dynprobe.KernelConfig())")
    if not any(not g.control for g in run.ghosts):
        missing.append("no ghosts: the chaos maps need Probe(..., ghosts=dynprobe.Ghosts(at=[0, 100, 1000])) and "
                       "criterion = probe.watch(criterion)")
    if run.status in ("running", "interrupted"):
        missing.append(f"the run is {run.status}: this analysis covers the {len(run)} snapshots committed so far")
    return RunAnalysis(transition, cone, tuple(missing), tuple(verdicts), tuple(curves))
