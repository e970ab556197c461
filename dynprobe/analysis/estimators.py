"""Transition estimators on plain arrays: Finding I on C maps, and the kernel velocity on a fixed lag.

Each takes snapshot steps and interval matrices as numpy arrays and returns a
:class:`dynprobe.analysis.TransitionEstimate`; none reads files, so each is testable on synthetic arrays. The
ghost-sensitivity estimate is in :mod:`.sensitivity`, ghost verdicts in :mod:`.verdicts`.

Both rules here are built to give the same answer when the run is cut earlier or later, or its snapshot grid is
thinned: they look for the first time a rate drops (which depends only on data up to shortly after the drop), on
axes that do not depend on the snapshot spacing (log1p of the step in optimizer steps; a lag fixed in steps).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from dynprobe._util.steps import lag_pairs, most_common_gap

from .changepoint import weighted_quantile
from .estimate import TransitionEstimate, unavailable
from .verdicts import GhostOutcome, transition_from_chaos

__all__ = ["GhostOutcome", "kernel_lag_series", "kernel_subset", "level_off_step", "transition_from_chaos",
           "transition_from_ghost_C", "transition_from_kernel_velocity", "transition_from_trajectory_C"]

#: Resampling density of a C row on the log-time axis log(1 + t): points per e-fold of time.
PER_EFOLD = 4


# ------------------------------------------------------------------------------------------ Finding I: C levels off


def _running_median(values: np.ndarray) -> np.ndarray:
    """Median of each value and its two neighbours (one neighbour at the ends): removes single spikes."""
    return np.array([np.median(values[max(i - 1, 0):i + 2]) for i in range(values.size)], dtype=np.float64)


def level_off_step(steps: np.ndarray, values: np.ndarray, *, fraction: float = 0.1, patience: int = 2
                   ) -> tuple[int | None, float]:
    """Where a rising curve levels off: ``(step, rise up to it)``, or ``(None, rise to the end)`` while it rises.

    The curve (a row C(t0, ·)) is resampled by linear interpolation onto a grid of :data:`PER_EFOLD` points per
    e-fold of log(1 + t) — an axis in optimizer steps, so thinning the snapshots changes only the interpolation —
    and its rate per e-fold is r = ΔC / Δlog(1 + t) (not smoothed further: a real transition can put the whole
    rise into one grid interval, which a running median would erase). The level-off point
    is the first grid point from which r stays at or below ``fraction`` of its running maximum (the largest rate
    seen so far, not over the whole run) for ``patience`` consecutive grid points; it is reported as the last
    recorded step at or before it (interpolation spreads a rise over the snapshot interval that holds it, so the
    grid crosses at or after that interval's end). Only data up to shortly after that point are read, so cutting
    the run later does
    not move it, and a spike after it (at the last snapshot, say) cannot either. A power-law rise, C ∝ t^a, has
    a rate that grows with C: it levels off only when C saturates.
    """
    steps = np.asarray(steps, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(values)
    steps, values = steps[keep], values[keep]
    if steps.size < 4:
        return None, 0.0
    x = np.log1p(steps)
    grid = np.arange(x[0], x[-1] + 1e-12, 1.0 / PER_EFOLD)
    if grid.size < patience + 3:
        return None, float(values.max() - values[0])
    curve = np.interp(grid, x, values)
    rate = np.diff(curve) * PER_EFOLD
    running_max = np.maximum.accumulate(rate)
    low = (rate <= fraction * running_max) & (running_max > 0)
    for i in range(1, rate.size - patience + 1):
        if low[i:i + patience].all():
            crossing = float(np.expm1(grid[i]))
            k = max(int(np.searchsorted(steps, crossing + 1e-9, side="right")) - 1, 0)
            return int(steps[k]), float(values[k] - values[0])
    return None, float(values.max() - values[0])


def _level_off_rows(x_steps: np.ndarray, rows: Sequence[np.ndarray], starts: Sequence[int], ids: Sequence[int],
                    fraction: float) -> dict[str, np.ndarray]:
    """:func:`level_off_step` for each row (values at ``x_steps[start:]``); rows that do not rise are dropped."""
    out: dict[str, list] = {"ids": [], "starts": [], "onsets": [], "weights": []}
    for row_id, start, row in zip(ids, starts, rows):
        row = np.asarray(row, dtype=np.float64)
        steps = x_steps[start:start + row.size]
        onset, rise = level_off_step(steps, row, fraction=fraction)
        if not rise > 0:
            continue
        out["ids"].append(int(row_id))
        out["starts"].append(int(steps[0]))
        out["onsets"].append(-1 if onset is None else onset)
        out["weights"].append(rise)
    return {"ids": np.array(out["ids"], dtype=np.int64), "starts": np.array(out["starts"], dtype=np.int64),
            "onsets": np.array(out["onsets"], dtype=np.int64), "weights": np.array(out["weights"], dtype=np.float64)}


def _level_off_estimate(method: str, what: str, found: dict[str, np.ndarray], last_step: int,
                        fraction: float) -> TransitionEstimate:
    onsets, weights = found["onsets"], found["weights"]
    if onsets.size == 0:
        return TransitionEstimate(method, None, None, "none", f"no {what} rises above its starting value")
    rising = onsets < 0
    still_rising = float(weights[rising].sum() / weights.sum())
    evidence: dict[str, Any] = {
        "rows": int(onsets.size), "still_rising_share": still_rising, "rate_fraction": fraction,
        "row_ids": found["ids"].tolist(), "row_starts": found["starts"].tolist(),
        "row_peaks": [None if o < 0 else int(o) for o in onsets.tolist()], "row_amplitudes": weights.tolist(),
    }
    if still_rising >= 0.5 or rising.all():
        settled = onsets[~rising]
        low = int(settled.max()) if settled.size else int(found["starts"].min())
        return TransitionEstimate(
            method, None, (low, None), "bound",
            f"{what} is still rising at the end of the run (step {last_step}) for {still_rising:.0%} of the weight: "
            "the direction is still changing — the transition, if any, is later; train longer", evidence)
    voting, w = onsets[~rising], weights[~rising]
    step = int(weighted_quantile(voting, w, 0.5))
    low, high = (int(weighted_quantile(voting, w, q)) for q in (0.25, 0.75))
    near = np.abs(np.log(np.maximum(voting, 1) / max(step, 1))) <= math.log(1.5)
    agreement = float(w[near].sum() / weights.sum())
    evidence["agreement"] = agreement
    quality = "high" if agreement >= 0.6 else "medium" if agreement >= 0.4 else "low"
    return TransitionEstimate(
        method, step, (low, high), quality,
        f"{what} levels off at step {step}: its rise per e-fold of time falls below {fraction:.0%} of its peak there "
        f"({agreement:.0%} of the rows, weighted by their rise, within ×1.5; interquartile steps {low}–{high})",
        evidence)


def transition_from_trajectory_C(steps: np.ndarray, C: np.ndarray, *, rate_fraction: float = 0.1,
                                 plateau_fraction: float | None = None) -> TransitionEstimate:
    """Finding I on the trajectory map: the step t1 at which C(t0, t1) (eq. 1) stops rising, for most t0.

    The two-phase paper reads the inflection point as the t1 where C(t0, t1) reaches its high for every t0. Each
    row C(t0, ·), t1 ≥ t0, rises while the direction of θ changes and then flattens; its level-off step is
    :func:`level_off_step` (the first step from which its rise per e-fold of time stays below ``rate_fraction`` of
    the fastest rise so far). A rule based on the row's maximum over the whole run moves with the horizon (a slow
    late drift raises the maximum), so it is not used. Rows are combined by their median weighted by their rise
    up to the level-off (the contrast they show on the heatmap); rows still rising at the end of the run do not
    vote, and when they carry half the weight or more the result is a lower bound (``quality="bound"``).
    ``agreement`` is the weighted share of the rows within a factor 1.5 of the estimate (quality high ≥ 60 %,
    medium ≥ 40 %, else low); the interval is the weighted interquartile range of the voting rows.

    Args: ``steps`` (T,) increasing snapshot steps; ``C`` (T, T), NaN where not computed. ``plateau_fraction``
    (the former rule's parameter) is accepted and ignored.
    """
    steps, C = _check_square("C", steps, C)
    if steps.size < 6:
        return unavailable("trajectory_C", f"needs at least 6 snapshots; the run has {steps.size}")
    indices = range(steps.size - 3)
    found = _level_off_rows(steps, [C[i, i:] for i in indices], indices, indices, rate_fraction)
    return _level_off_estimate("trajectory_C", "C(t0, ·)", found, int(steps[-1]), rate_fraction)


def transition_from_ghost_C(steps: np.ndarray, chaos_C: np.ndarray, *, rate_fraction: float = 0.1,
                            row_ids: Sequence[int] | None = None,
                            plateau_fraction: float | None = None) -> TransitionEstimate:
    """Finding I on the main-vs-ghost map C(t0, t1) = 1 − cos(θ_t1, θ'_t1) of ghosts spawned at t0 (Fig. 3a read
    as the perturbation experiment): the t1 at which it levels off for most spawns, with the rule and weighting of
    :func:`transition_from_trajectory_C` (ghosts that stay close hardly rise, so they carry no weight).
    ``chaos_C``: (G, T) over ``steps``, NaN before a spawn; pass perturbed ghosts only. ``row_ids`` (default
    0..G−1) label the rows in the evidence (``run.ghosts[i].index``)."""
    steps = np.asarray(steps, dtype=np.int64)
    chaos_C = np.asarray(chaos_C, dtype=np.float64).reshape(-1, steps.size)
    if chaos_C.shape[0] == 0:
        return unavailable("ghost_C", "no perturbed ghosts in this run: pass "
                                      "Probe(..., ghosts=dynprobe.Ghosts(at=[...]))")
    row_ids = list(range(chaos_C.shape[0])) if row_ids is None else list(row_ids)
    rows, starts, ids = [], [], []
    for row_id, row in zip(row_ids, chaos_C):
        finite = np.flatnonzero(np.isfinite(row))
        if finite.size:
            starts.append(int(finite[0]))
            rows.append(row[finite[0]:])
            ids.append(row_id)
    found = _level_off_rows(steps, rows, starts, ids, rate_fraction)
    if found["onsets"].size == 0:
        return TransitionEstimate("ghost_C", None, None, "none",
                                  "no ghost's C rose after its spawn (fewer than 4 comparisons, or all stayed at ε)")
    return _level_off_estimate("ghost_C", "main-vs-ghost C", found, int(steps[-1]), rate_fraction)


# ------------------------------------------------------------------------------------------ kernel velocity


def kernel_subset(steps: np.ndarray, S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The snapshots that have a kernel (diagonal of S not NaN): ``(steps, S restricted to them)``."""
    steps, S = _check_square("S", steps, S)
    have = np.isfinite(np.diag(S)) if S.size else np.zeros(0, dtype=bool)
    return steps[have], S[np.ix_(have, have)]


def kernel_lag_series(steps: np.ndarray, S: np.ndarray, lag: int | None = None
                      ) -> tuple[int | None, np.ndarray, np.ndarray]:
    """``(lag, t, S(θ_t, θ_t+lag))`` over kernel snapshots exactly ``lag`` steps apart
    (:func:`dynprobe._util.steps.lag_pairs`). ``lag=None``: the most common gap between consecutive kernel
    snapshots (:func:`dynprobe._util.steps.most_common_gap`)."""
    kernel_steps, K = kernel_subset(steps, S)
    lag = most_common_gap(kernel_steps) if lag is None else int(lag)
    if lag is None:
        return None, np.zeros(0, dtype=np.int64), np.zeros(0)
    i, j = lag_pairs(kernel_steps, lag)
    values = K[i, j] if i.size else np.zeros(0)
    keep = np.isfinite(values)
    return lag, kernel_steps[i][keep], values[keep]


def transition_from_kernel_velocity(steps: np.ndarray, S: np.ndarray, *, lag: int | None = None,
                                    min_pairs: int = 6, min_drop: float = 3.0) -> TransitionEstimate:
    """Where the eNTK stops moving fast: the drop of s(t) = S(θ_t, θ_t+Δ) (eq. 4) at a lag Δ fixed in steps.

    The two-phase paper's Fig. 5b: S between iterates a fixed dt apart is large in the early phase and drops to
    a low floor. ``log s`` is smoothed by a running median of three; its *peak* is the largest smoothed value,
    its *floor* the median over the last third of the pairs after the peak, and the threshold the geometric
    midpoint of the two. The estimate is the first t from which s stays below the threshold (the start of the
    first window [t, t + Δ] over which the kernel moved little); the bracket is (previous pair, t]. No drop of at
    least ``min_drop``× from peak to floor: ``quality="none"``. Quality ``high`` for a drop ≥ 10× with every
    smoothed value between the peak and the estimate above the threshold, ``medium`` for a drop ≥ 10× or a clean
    crossing, ``low`` otherwise.

    The lag Δ is the run's ``KernelConfig(lag_steps=)`` when it placed companion snapshots, else the most common
    gap between kernel snapshots. S is never divided by the gap: between nearby snapshots it hardly depends on
    the gap (SGD noise), so S/Δt would follow the snapshot grid, not the dynamics.
    """
    kernel_steps, _ = kernel_subset(steps, S)
    if kernel_steps.size == 0:
        return unavailable("kernel_velocity", "no eNTK kernels in this run: pass "
                                              "Probe(..., kernel=dynprobe.KernelConfig())")
    lag, t, s = kernel_lag_series(steps, S, lag)
    positive = s > 0
    t, s = t[positive], s[positive]
    if t.size < min_pairs:
        return unavailable("kernel_velocity", f"needs at least {min_pairs} pairs of kernel snapshots exactly Δ = "
                                              f"{lag} steps apart; the run has {t.size}: pass Probe(..., kernel="
                                              "dynprobe.KernelConfig(lag_steps=Δ)) to place companion snapshots")
    y = _running_median(np.log(s))
    peak_index = int(np.argmax(y))
    after = y[peak_index:]
    evidence: dict[str, Any] = {"lag": lag, "t": t.tolist(), "S": s.tolist(), "min_drop": min_drop}
    if after.size < 4:
        return TransitionEstimate("kernel_velocity", None, (int(t[peak_index]), None), "bound",
                                  f"S(t, t+{lag}) peaks at step {int(t[peak_index])}, too late to see a drop after "
                                  "it (fewer than 4 pairs from there): the transition, if any, is later", evidence)
    floor = float(np.median(after[-max(after.size // 3, 3):]))
    peak = float(y[peak_index])
    threshold = (peak + floor) / 2
    evidence.update(peak=math.exp(peak), peak_step=int(t[peak_index]), floor=math.exp(floor),
                    threshold=math.exp(threshold), drop=math.exp(peak - floor))
    if peak - floor < math.log(min_drop):
        return TransitionEstimate("kernel_velocity", None, None, "none",
                                  f"S(t, t+{lag}) falls only ×{math.exp(peak - floor):.2g} from its peak (step "
                                  f"{int(t[peak_index])}) to its late level (< ×{min_drop:g}): no drop to locate",
                                  evidence)
    above = np.flatnonzero(y > threshold)
    first_low = int(above[-1]) + 1
    if first_low >= t.size:
        return TransitionEstimate("kernel_velocity", None, (int(t[-1]), None), "bound",
                                  f"S(t, t+{lag}) is back above its midpoint at the last pair: undecided", evidence)
    step, low = int(t[first_low]), int(t[first_low - 1])
    clean = bool(np.all(y[peak_index:first_low] > threshold))
    drop = math.exp(peak - floor)
    quality = ("high" if drop >= 10 and clean else "medium" if drop >= 10 or clean else "low")
    evidence.update(split_step=step, clean=clean)
    return TransitionEstimate(
        "kernel_velocity", step, (low, step), quality,
        f"S(t, t+{lag}) drops ×{drop:.2g} from its peak (step {int(t[peak_index])}) to its late level and stays "
        f"below the midpoint {math.exp(threshold):.3g} from step {step} on"
        + ("" if clean else " (it crosses the midpoint more than once)"), evidence)


def _check_square(name: str, steps: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    steps = np.asarray(steps, dtype=np.int64).reshape(-1)
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (steps.size, steps.size):
        raise ValueError(f"{name} must be a (T, T) matrix over the T = {steps.size} steps; got shape {matrix.shape}")
    if steps.size > 1 and not np.all(np.diff(steps) > 0):
        raise ValueError("steps must be strictly increasing")
    return steps, matrix
