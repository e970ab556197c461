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

__all__ = ["kernel_lag_series", "kernel_subset", "level_off_step",
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
    0..G−1) label the rows in the evidence (``run.ghosts[i].ghost_id``)."""
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
                                    min_pairs: int = 6, min_drop: float = 3.0, fraction: float = 0.5
                                    ) -> TransitionEstimate:
    """Where the eNTK stops moving fast: the drop of s(t) = S(θ_t, θ_t+Δ) (eq. 4) at a lag Δ fixed in steps.

    The two-phase paper's Fig. 5b: S between iterates a fixed Δ apart is large in the early phase and drops to a
    low floor. The *early level* is the largest s(t) over the first window of references, t ≤ t_first + Δ (the
    kernel's motion over the first Δ steps of the record), the *floor* the median of the last third of the pairs,
    and the threshold lies ``fraction`` of the way from the early level to the floor in log s (the geometric
    midpoint by default). The estimate is where s(t) crosses the threshold for the last time — interpolated
    linearly in (log(t + Δ), log s) between the last reference above it and the next one, so it does not snap to
    the snapshot grid — and the bracket is those two references. The early level and the floor are a maximum over
    a window fixed in steps and a median, which a thinned grid hardly changes; a longer run lowers the floor only
    where the kernel keeps slowing down, and the threshold moves by ``fraction`` of that.

    The drop from the early level to the floor decides the quality: none below ``min_drop``×, ``high`` for ≥ 10×
    with a single crossing, ``medium`` for ≥ 10× or a single crossing (of a running median of three), ``low``
    otherwise. S is never divided by the gap: between
    nearby snapshots it hardly depends on the gap (SGD noise), so S/Δt would follow the snapshot grid, not the
    dynamics.

    The lag Δ is the run's ``KernelConfig(lag_steps=)`` when it placed companion snapshots, else the most common
    gap between kernel snapshots. Pairs that end in the first half of the kernel record give no estimate: their
    "late level" would still be early (a 1-step gap of a log-spaced start gave a spurious vote at step 2).
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
    middle = (int(kernel_steps[0]) + int(kernel_steps[-1])) / 2
    if t[-1] + lag < middle:  # e.g. a 1-step lag read off a log-spaced start: pairs at its first steps only
        return unavailable("kernel_velocity", f"S(t, t+{lag}) exists only up to step {int(t[-1])}, in the first half "
                                              f"of the kernel record (steps {int(kernel_steps[0])}–"
                                              f"{int(kernel_steps[-1])}): no late level to compare with. Pass "
                                              "Probe(..., kernel=dynprobe.KernelConfig(lag_steps=Δ)) to place "
                                              "companion snapshots Δ steps after every kernel snapshot")
    y = np.log(s)
    early = t <= t[0] + lag
    level = float(y[early].max())
    level_step = int(t[early][int(np.argmax(y[early]))])
    tail = y[~early] if (~early).any() else y
    floor = float(np.median(tail[-max(tail.size // 3, 3):]))
    drop = math.exp(level - floor)
    threshold = level + fraction * (floor - level)
    evidence: dict[str, Any] = {"lag": lag, "t": t.tolist(), "S": s.tolist(), "min_drop": min_drop,
                                "fraction": fraction, "early_level": math.exp(level), "early_step": level_step,
                                "floor": math.exp(floor), "threshold": math.exp(threshold), "drop": drop}
    if drop < min_drop:
        return TransitionEstimate("kernel_velocity", None, None, "none",
                                  f"S(t, t+{lag}) falls only ×{drop:.2g} from its early level (step {level_step}) "
                                  f"to its late level (< ×{min_drop:g}): no drop to locate", evidence)
    above = np.flatnonzero(y > threshold)
    last_above = int(above[-1]) if above.size else 0
    if last_above + 1 >= t.size:
        return TransitionEstimate("kernel_velocity", None, (int(t[-1]), None), "bound",
                                  f"S(t, t+{lag}) is still above {math.exp(threshold):.3g} at the last pair: the "
                                  "drop, if any, is later", evidence)
    low, high = int(t[last_above]), int(t[last_above + 1])
    x0, x1 = math.log(low + lag), math.log(high + lag)
    y0, y1 = float(y[last_above]), float(y[last_above + 1])
    share = (y0 - threshold) / (y0 - y1) if y0 > y1 else 1.0
    step = int(round(math.exp(x0 + min(max(share, 0.0), 1.0) * (x1 - x0)) - lag))
    step = min(max(step, low + 1), high)
    # noise around the threshold is not a second crossing: count them on a running median of three
    crossings = int(np.count_nonzero(np.diff((_running_median(y) > threshold).astype(int)) != 0))
    single = crossings <= 1
    quality = ("high" if drop >= 10 and single else "medium" if drop >= 10 or single else "low")
    evidence.update(split_step=step, crossings=crossings)
    return TransitionEstimate(
        "kernel_velocity", step, (low, high), quality,
        f"S(t, t+{lag}) falls below {math.exp(threshold):.3g}, between its early level {math.exp(level):.3g} (step "
        f"{level_step}) and its late floor {math.exp(floor):.3g}, at step {step} (between references {low} and "
        f"{high}) and stays there; ×{drop:.2g} from early to late"
        + ("" if single else f" (it crosses that level {crossings} times)"), evidence)


def _check_square(name: str, steps: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    steps = np.asarray(steps, dtype=np.int64).reshape(-1)
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (steps.size, steps.size):
        raise ValueError(f"{name} must be a (T, T) matrix over the T = {steps.size} steps; got shape {matrix.shape}")
    if steps.size > 1 and not np.all(np.diff(steps) > 0):
        raise ValueError("steps must be strictly increasing")
    return steps, matrix
