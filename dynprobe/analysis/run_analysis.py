"""When did the network leave the chaotic phase? Transition estimates from a run, each with its evidence.

Four independent readings of the two-phase paper's transition (§4–5), each a pure function of plain arrays (so it
is testable without files) with a run-level wrapper in :func:`estimate_transition`:

* ``trajectory_C`` — Finding I on the single-run map C(θ_t0, θ_t1) (eq. 1): the step t1 at which C(t0, ·) reaches
  its peak (or plateau) for most t0. See :func:`transition_from_trajectory_C`.
* ``ghost_C`` — Finding I on the main-vs-ghost map 1 − cos(θ_t1, θ'_t1) (the other reading of Fig. 3a).
* ``chaos`` — Finding II / Conjecture I: the first spawn step t0 whose ghost stays close to the main run (final
  D and B below thresholds) after the last one that diverges. See :func:`transition_from_chaos`.
* ``kernel_velocity`` — the change point of the eNTK velocity v(t) = S(t_k, t_k+1)/(t_k+1 − t_k) in log-time
  (Fort et al. 2020; §5). See :func:`transition_from_kernel_velocity`.

Every estimate is a :class:`TransitionEstimate` (step, bracket, quality flag, evidence, one-line summary) and
degrades to ``quality="unavailable"`` with the reason when the run lacks what it needs. :func:`combine_estimates`
says whether they agree. Cone numbers and the kernel embedding are in :mod:`dynprobe.cone`; the online detector
for ``Probe(on_transition=...)`` in :mod:`dynprobe.detector`; :func:`analyze` bundles everything the report needs.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dynprobe.store.files import RunFormatError
from dynprobe.store.run import Run

from .cone import ConeSummary, cone_summary
from .estimate import METHOD_LABELS, TransitionEstimate, TransitionReport, combine_estimates, unavailable
from .estimators import (
    GhostOutcome,
    kernel_subset,
    transition_from_chaos,
    transition_from_ghost_C,
    transition_from_kernel_velocity,
    transition_from_trajectory_C,
)

__all__ = [
    "METHOD_LABELS",
    "GhostOutcome",
    "RunAnalysis",
    "TransitionEstimate",
    "TransitionReport",
    "analyze",
    "checked_matrix",
    "combine_estimates",
    "estimate_transition",
    "ghost_outcomes",
    "kernel_subset",
    "transition_from_chaos",
    "transition_from_ghost_C",
    "transition_from_kernel_velocity",
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


def ghost_outcomes(run: Run) -> list[GhostOutcome]:
    """The final comparison of every perturbed ghost of ``run`` (control and failed ghosts excluded)."""
    chaos, steps = run.chaos, run.steps
    error = 1.0 - run.eval_accuracy
    outcomes = []
    for row, ghost in enumerate(run.ghosts):
        if ghost.control or ghost.status == "failed":
            continue
        compared = np.flatnonzero(np.isfinite(chaos["D"][row]))
        stopped = ghost.status == "diverged"
        if compared.size == 0 and not stopped:
            continue
        j = int(compared[-1]) if compared.size else max(int(np.searchsorted(steps, ghost.spawn_step)), 0)
        j = min(j, len(steps) - 1)
        with_b = np.flatnonzero(np.isfinite(chaos["B"][row]))
        jb = int(with_b[-1]) if with_b.size else None
        outcomes.append(GhostOutcome(
            spawn_step=ghost.spawn_step, final_step=int(steps[j]),
            D=float(chaos["D"][row, j]) if compared.size else math.nan, error=float(error[j]),
            B=float(chaos["B"][row, jb]) if jb is not None else None,
            loss=float(run.eval_loss[jb]) if jb is not None else None,
            C=float(chaos["C"][row, j]) if compared.size else None,
            L2=float(chaos["L2"][row, j]) if compared.size else None,
            realized_norm=ghost.realized_norm, stopped_diverged=stopped))
    return outcomes


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


def estimate_transition(run: Run, *, tolerance: float = 2.0, d_fraction: float = 0.25, b_fraction: float = 0.1,
                        plateau_fraction: float = 0.95) -> TransitionReport:
    """Every transition estimate of ``run`` (see the module docstring) and their agreement."""
    steps = run.steps
    C = checked_matrix("C", run.C, steps, f"{run.path}/metrics/C.rows")
    S = checked_matrix("S", run.S, steps, f"{run.path}/metrics/S.rows")
    estimates = [transition_from_trajectory_C(steps, C, plateau_fraction=plateau_fraction)]
    perturbed = [i for i, g in enumerate(run.ghosts) if not g.control and g.status != "failed"]
    if perturbed:
        estimates.append(transition_from_ghost_C(steps, run.chaos["C"][perturbed], plateau_fraction=plateau_fraction,
                                                 row_ids=[run.ghosts[i].index for i in perturbed]))
    else:
        estimates.append(unavailable("ghost_C", "no perturbed ghosts in this run: pass "
                                                "Probe(..., ghosts=dynprobe.Ghosts(at=[...]))"))
    estimates.append(transition_from_chaos(ghost_outcomes(run), d_fraction=d_fraction, b_fraction=b_fraction,
                                           eval_size=run.manifest.get("eval", {}).get("n")))
    estimates.append(transition_from_kernel_velocity(steps, S))
    online = _online_estimate(run)
    if online is not None:
        estimates.append(online)
    return combine_estimates(estimates, tolerance=tolerance)


@dataclass(frozen=True)
class RunAnalysis:
    """Everything :mod:`dynprobe.report` shows about a run: transition estimates, cone numbers, and notes on what
    is missing (each a sentence saying how to get it)."""

    transition: TransitionReport
    cone: ConeSummary
    missing: tuple[str, ...]


def analyze(run: Run, *, taus: Sequence[int] | None = None, tolerance: float = 2.0) -> RunAnalysis:
    """Transition estimates (:func:`estimate_transition`) and cone numbers (:func:`dynprobe.cone.cone_summary`,
    with reference steps after the consensus transition by default) of ``run``; never fails on a run that lacks
    kernels, ghosts or snapshots — it says what is missing instead."""
    for name in ("D",):
        checked_matrix(name, run.D, run.steps, f"{run.path}/metrics/{name}.rows")
    transition = estimate_transition(run, tolerance=tolerance)
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
    return RunAnalysis(transition, cone, tuple(missing))
