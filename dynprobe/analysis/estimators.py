"""The four transition estimators on plain arrays (see :mod:`dynprobe.analysis` for the overview).

Each takes snapshot steps and interval matrices (or ghost outcomes) as numpy arrays and returns a
:class:`dynprobe.analysis.TransitionEstimate`; none reads files, so each is testable on synthetic arrays.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .changepoint import log_time, two_segment_fit, weighted_quantile
from .estimate import TransitionEstimate, unavailable

__all__ = ["GhostOutcome", "kernel_subset", "transition_from_chaos", "transition_from_ghost_C",
           "transition_from_kernel_velocity", "transition_from_trajectory_C"]


# ------------------------------------------------------------------------------------------ Finding I: C peaks


def _plateau_onsets(x_steps: np.ndarray, rows: Sequence[np.ndarray], starts: Sequence[int], fraction: float,
                    ids: Sequence[int]) -> tuple[np.ndarray, ...]:
    """For each row (values at ``x_steps[start:]``), the first step where it reaches ``fraction`` of its max.

    Returns (row ids, row start steps, onset steps, amplitudes, onset-is-last-column flags) over rows with ≥ 3
    finite points after the start and a positive rise."""
    ids_out, starts_out, onsets, amplitudes, at_end = [], [], [], [], []
    for row_id, start, row in zip(ids, starts, rows):
        row = np.asarray(row, dtype=np.float64)
        steps = x_steps[start:start + row.size]
        finite = np.isfinite(row)
        if finite.sum() < 4:
            continue
        values, where = row[finite], steps[finite]
        amplitude = float(values.max() - values[0])
        if not amplitude > 0:
            continue
        k = int(np.argmax(values - values[0] >= fraction * amplitude))
        ids_out.append(int(row_id))
        starts_out.append(int(steps[0]))
        onsets.append(int(where[k]))
        amplitudes.append(amplitude)
        # Still rising: the plateau after the onset is shorter than a quarter of the rise before it (in steps),
        # so the row has not shown that it flattened within the run.
        at_end.append(where[-1] - where[k] < 0.25 * (where[k] - where[0]))
    return (np.array(ids_out, dtype=np.int64), np.array(starts_out, dtype=np.int64), np.array(onsets, dtype=np.int64),
            np.array(amplitudes, dtype=np.float64), np.array(at_end, dtype=bool))


def _peak_estimate(method: str, what: str, ids: np.ndarray, starts: np.ndarray, onsets: np.ndarray,
                   amplitudes: np.ndarray,
                   at_end: np.ndarray, last_step: int, fraction: float) -> TransitionEstimate:
    if onsets.size == 0:
        return TransitionEstimate(method, None, None, "none", f"no {what} rises above its starting value")
    weights = amplitudes
    still_rising = float(weights[at_end].sum() / weights.sum())
    # Rows still rising at the end of the run do not peak within it: they cannot vote for a peak step (they
    # count against the agreement instead).
    voting = ~at_end if still_rising < 0.5 else np.ones_like(at_end)
    step = int(weighted_quantile(onsets[voting], weights[voting], 0.5))
    low, high = (int(weighted_quantile(onsets[voting], weights[voting], q)) for q in (0.25, 0.75))
    near = np.abs(np.log(np.maximum(onsets, 1) / max(step, 1))) <= math.log(1.5)
    agreement = float(weights[near & ~at_end].sum() / weights.sum())
    evidence = {
        "rows": int(onsets.size), "agreement": agreement, "still_rising_share": still_rising,
        "plateau_fraction": fraction, "row_ids": ids.tolist(), "row_starts": starts.tolist(), "row_peaks": onsets.tolist(),
        "row_amplitudes": amplitudes.tolist(),
    }
    if still_rising >= 0.5:
        return TransitionEstimate(
            method, None, (step, None), "bound",
            f"{what} is still rising at the end of the run (step {last_step}) for {still_rising:.0%} of the weight: "
            "the transition, if any, is later — train longer", evidence)
    quality = "high" if agreement >= 0.6 else "medium" if agreement >= 0.4 else "low"
    return TransitionEstimate(
        method, step, (low, high), quality,
        f"{what} peaks at step {step} ({agreement:.0%} of the rows, weighted by their rise, within ×1.5; "
        f"interquartile steps {low}–{high})", evidence)


def transition_from_trajectory_C(steps: np.ndarray, C: np.ndarray, *, plateau_fraction: float = 0.95,
                                 ) -> TransitionEstimate:
    """Finding I on the trajectory map: the step t1 at which C(t0, t1) (eq. 1) peaks for most t0.

    On a real map a row C(t0, ·), t1 ≥ t0, rarely has a sharp interior maximum: it rises while the direction of
    θ changes and then flattens (or dips slightly) once the direction has settled — the paper's inflection point.
    "Peaks" is therefore read robustly as the *plateau onset*: for each row, the first t1 with
    ``C(t0, t1) − C(t0, t0) ≥ plateau_fraction · (max_t1 C(t0, t1) − C(t0, t0))`` — the arg-max for a peaked row,
    the start of the plateau for a flat one, and insensitive to noise along a plateau (a plain arg-max jumps
    between near-equal values there). Knee/curvature criteria were tried and rejected: they depend on the time
    axis (linear vs log) and real rows have two bends (end of the fast rise, then full settling).

    "For most t0": rows are combined by their median weighted by each row's rise (its visible contrast on the
    heatmap), so rows after the transition — which hardly rise — do not dilute the vote. Rows whose plateau
    (onset to last snapshot) is shorter than a quarter of their rise (start to onset) are still rising and do
    not vote; when they carry half the weight or more the result
    is a lower bound (``quality="bound"``): the direction is still changing at the end of the run.
    ``agreement`` is the weighted share of all rows within a factor 1.5 of the estimate (quality high ≥ 60 %,
    medium ≥ 40 %, else low); the interval is the weighted interquartile range of the voting rows.

    Args: ``steps`` (T,) increasing snapshot steps; ``C`` (T, T), NaN where not computed.
    """
    steps, C = _check_square("C", steps, C)
    if steps.size < 6:
        return unavailable("trajectory_C", f"needs at least 6 snapshots; the run has {steps.size}")
    rows = [C[i, i:] for i in range(steps.size - 3)]
    indices = range(steps.size - 3)
    found = _plateau_onsets(steps, rows, indices, plateau_fraction, indices)
    return _peak_estimate("trajectory_C", "C(t0, ·)", *found, int(steps[-1]), plateau_fraction)


def transition_from_ghost_C(steps: np.ndarray, chaos_C: np.ndarray, *, plateau_fraction: float = 0.95,
                            row_ids: Sequence[int] | None = None) -> TransitionEstimate:
    """Finding I on the main-vs-ghost map C(t0, t1) = 1 − cos(θ_t1, θ'_t1) of ghosts spawned at t0 (Fig. 3a read
    as the perturbation experiment): the t1 at which it peaks for most spawns, with the same plateau-onset rule
    and rise weighting as :func:`transition_from_trajectory_C` (ghosts that stay close hardly rise, so they carry
    no weight). ``chaos_C``: (G, T) over ``steps``, NaN before a spawn; pass perturbed ghosts only. ``row_ids``
    (default 0..G−1) label the rows in the evidence (``run.ghosts[i].index``)."""
    steps = np.asarray(steps, dtype=np.int64)
    chaos_C = np.asarray(chaos_C, dtype=np.float64).reshape(-1, steps.size)
    if chaos_C.shape[0] == 0:
        return unavailable("ghost_C", "no perturbed ghosts in this run: pass Probe(..., ghosts=dynprobe.Ghosts(at=[...]))")
    row_ids = list(range(chaos_C.shape[0])) if row_ids is None else list(row_ids)
    rows, starts, ids = [], [], []
    for row_id, row in zip(row_ids, chaos_C):
        finite = np.flatnonzero(np.isfinite(row))
        if finite.size:
            starts.append(int(finite[0]))
            rows.append(row[finite[0]:])
            ids.append(row_id)
    found = _plateau_onsets(steps, rows, starts, plateau_fraction, ids)
    if found[2].size == 0:
        return TransitionEstimate("ghost_C", None, None, "none",
                                  "no ghost's C rose after its spawn (fewer than 4 comparisons, or all stayed at ε)")
    return _peak_estimate("ghost_C", "main-vs-ghost C", *found, int(steps[-1]), plateau_fraction)


# ------------------------------------------------------------------------------------------ Finding II: chaos


@dataclass(frozen=True)
class GhostOutcome:
    """Where one perturbed ghost ended up relative to the main run (inputs of :func:`transition_from_chaos`).

    ``D`` and ``error`` (the main run's eval error, the disagreement of two independent runs per Jiang et al.
    2022) at ``final_step``, the ghost's last comparison; ``B`` and ``loss`` (main eval loss) at the last step
    with a barrier; ``C``, ``L2`` and ``realized_norm`` (‖ε‖ after the float add) as supporting evidence;
    ``stopped_diverged``: the ghost stopped with non-finite values or an exploding norm.
    """

    spawn_step: int
    final_step: int
    D: float
    error: float
    B: float | None = None
    loss: float | None = None
    C: float | None = None
    L2: float | None = None
    realized_norm: float | None = None
    stopped_diverged: bool = False


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def transition_from_chaos(outcomes: Sequence[GhostOutcome], *, d_fraction: float = 0.25, b_fraction: float = 0.1,
                          eval_size: int | None = None) -> TransitionEstimate:
    """Finding II / Conjecture I: the first spawn step whose ghost stays close, after the last one that diverges.

    A ghost *diverged* when its final disagreement exceeds ``d_fraction`` of the independent-run ceiling (the main
    run's eval error, Jiang et al. 2022; at least 1.5 examples of an eval set of ``eval_size``), or its last loss
    barrier B (eq. 5) exceeds ``b_fraction`` of the main eval loss, or it stopped diverged. Otherwise it stayed
    *close*. With ghosts sorted by spawn step, the estimate is the earliest spawn from which every later ghost
    stays close (``interval = (last diverged spawn before it, it)``). Quality: ``high`` when every earlier ghost
    diverged and the final C of the diverged ones is ≥ 100× that of the close ones (orders of magnitude apart, as
    in the paper), ``medium`` when only the first holds, ``low`` when a close ghost precedes a diverged one.
    All diverged → a lower bound (spawn later ghosts); all close → an upper bound (spawn earlier ones).

    Limitation: later ghosts have had fewer steps to amplify ε; the rule compares final values as the paper does.
    """
    if not 0 < d_fraction < 1 or not b_fraction > 0:
        raise ValueError(f"d_fraction must be in (0, 1) and b_fraction > 0; got {d_fraction}, {b_fraction}")
    ghosts = sorted(outcomes, key=lambda g: g.spawn_step)
    if not ghosts:
        return unavailable("chaos", "no perturbed ghost was compared with the main run: pass "
                                    "Probe(..., ghosts=dynprobe.Ghosts(at=[...])) and watch the loss")
    floor = 1.5 / eval_size if eval_size else 0.0
    verdicts, rows = [], []
    for g in ghosts:
        d_threshold = max(d_fraction * g.error, floor) if _finite(g.error) else floor
        b_threshold = b_fraction * g.loss if _finite(g.loss) and g.loss > 0 else None
        by_d = _finite(g.D) and g.D > d_threshold
        by_b = b_threshold is not None and _finite(g.B) and g.B > b_threshold
        diverged = bool(g.stopped_diverged or by_d or by_b)
        verdicts.append(diverged)
        rows.append({"spawn_step": g.spawn_step, "final_step": g.final_step, "D": g.D, "D_threshold": d_threshold,
                     "B": g.B, "B_threshold": b_threshold, "C": g.C, "L2": g.L2, "realized_norm": g.realized_norm,
                     "amplification": (g.L2 / g.realized_norm if _finite(g.L2) and _finite(g.realized_norm)
                                       and g.realized_norm > 0 else None),
                     "diverged": diverged, "stopped_diverged": g.stopped_diverged})
    evidence: dict[str, Any] = {"ghosts": rows, "d_fraction": d_fraction, "b_fraction": b_fraction}
    spawns = [g.spawn_step for g in ghosts]
    first_close = next(k for k in range(len(ghosts) + 1) if not any(verdicts[k:]))
    if first_close == len(ghosts):
        return TransitionEstimate("chaos", None, (spawns[-1], None), "bound",
                                  f"every ghost diverged, the last spawned at step {spawns[-1]}: the chaotic phase "
                                  "lasts beyond it — spawn later ghosts to find its end", evidence)
    if first_close == 0:
        return TransitionEstimate("chaos", None, (None, spawns[0]), "bound",
                                  f"every ghost stayed close, the first spawned at step {spawns[0]}: the transition "
                                  "(if any) is earlier — spawn earlier ghosts", evidence)
    monotone = all(verdicts[:first_close])
    diverged_C = [g.C for g, v in zip(ghosts, verdicts) if v and _finite(g.C)]
    close_C = [g.C for g, v in zip(ghosts, verdicts) if not v and _finite(g.C)]
    separation = (min(diverged_C) / max(max(close_C), 1e-300)) if diverged_C and close_C else None
    evidence["C_separation"] = separation
    quality = ("high" if monotone and separation is not None and separation >= 100
               else "medium" if monotone else "low")
    low, high = spawns[first_close - 1], spawns[first_close]
    return TransitionEstimate(
        "chaos", high, (low, high), quality,
        f"ghosts spawned at step ≤ {low} diverge and from step {high} on stay close"
        + (f" (final C {separation:.0e}× apart)" if separation else ""), evidence)


# ------------------------------------------------------------------------------------------ kernel velocity


def kernel_subset(steps: np.ndarray, S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The snapshots that have a kernel (diagonal of S not NaN): ``(steps, S restricted to them)``."""
    steps, S = _check_square("S", steps, S)
    have = np.isfinite(np.diag(S)) if S.size else np.zeros(0, dtype=bool)
    return steps[have], S[np.ix_(have, have)]


def transition_from_kernel_velocity(steps: np.ndarray, S: np.ndarray, *, min_size: int = 3) -> TransitionEstimate:
    """The change point of the kernel velocity v(t) = S(t_k, t_k+1)/(t_k+1 − t_k) (eq. 4; Fort et al. 2020).

    v is taken between consecutive kernel snapshots and placed at the later one. ``log v`` against log-time
    ``log(1 + t/unit)`` is split into two independently fitted lines (segmented regression,
    :func:`dynprobe._changepoint.two_segment_fit`, global optimum, ≥ ``min_size`` points per side): a jump of v
    and a change of its log-log slope are both change points — a continuous hinge was rejected because it cannot
    follow the sharp drop of a real transition and lands mid-way. The fit starts ``min_size`` points before the
    peak of v (running median of 3), so an initial rise while momentum builds up is ignored. The estimate is the
    first step of the second segment; its interval, the approximate 95 % profile-likelihood range of split points.
    Quality: ``high`` when two segments cut the residual of one line by ≥ 50 % and the interval spans ≤ ×2 in
    steps, ``medium`` at ≥ 25 %, else ``low``; ``low`` too when v is higher after the change than before.

    Caveat: with a schedule whose spacing grows (log-spaced), v over a long interval underestimates the local
    velocity once S saturates within it (the cone) — which happens only after the transition.
    """
    kernel_steps, K = kernel_subset(steps, S)
    if kernel_steps.size == 0:
        return unavailable("kernel_velocity", "no eNTK kernels in this run: pass Probe(..., kernel=dynprobe.KernelConfig())")
    t = kernel_steps[1:]
    v = np.diag(K, k=1) / np.diff(kernel_steps)
    keep = np.isfinite(v) & (v > 0)
    t, v = t[keep], v[keep]
    if t.size < 2 * min_size:
        return unavailable("kernel_velocity", f"needs at least {2 * min_size + 1} kernel snapshots with distinct "
                                              f"kernels; the run has {kernel_steps.size}")
    x, y = log_time(t, unit=float(t.min())), np.log(v)
    smooth = np.array([np.median(y[max(i - 1, 0):i + 2]) for i in range(y.size)])
    start = max(int(np.argmax(smooth)) - min_size, 0)
    fit = two_segment_fit(x[start:], y[start:], min_size=min_size)
    if fit is None:
        return TransitionEstimate("kernel_velocity", None, None, "none",
                                  f"the kernel velocity peaks at step {int(t[start + min_size])}, too late to see a "
                                  f"change after it (fewer than {2 * min_size} kernel snapshots from there)",
                                  {"t": t.tolist(), "v": v.tolist()})
    split = start + fit.index
    step = int(t[split])
    low, high = int(t[start + fit.interval[0] - 1]), int(t[start + fit.interval[1]])
    ratio = float(np.median(v[split:]) / np.median(v[start:split]))
    width = high / max(low, 1)
    quality = ("high" if fit.improvement >= 0.5 and width <= 2 else "medium" if fit.improvement >= 0.25 else "low")
    if ratio >= 1:
        quality = "low"
    trend = "drops" if ratio < 1 else "rises"
    evidence = {"t": t.tolist(), "v": v.tolist(), "fit_from_step": int(t[start]), "split_step": step,
                "before": list(fit.before), "after": list(fit.after), "improvement": fit.improvement,
                "median_velocity_ratio": ratio, "unit": float(t.min())}
    return TransitionEstimate(
        "kernel_velocity", step, (low, high), quality,
        f"kernel velocity changes regime at step {step}: its median {trend} ×{ratio:.2g} (log-log slope "
        f"{fit.slope_before:.2f} before, {fit.slope_after:.2f} after; fit improves on one line by "
        f"{fit.improvement:.0%})", evidence)


def _check_square(name: str, steps: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    steps = np.asarray(steps, dtype=np.int64).reshape(-1)
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (steps.size, steps.size):
        raise ValueError(f"{name} must be a (T, T) matrix over the T = {steps.size} steps; got shape {matrix.shape}")
    if steps.size > 1 and not np.all(np.diff(steps) > 0):
        raise ValueError("steps must be strictly increasing")
    return steps, matrix
