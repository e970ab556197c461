"""Small, pure numeric helpers for the transition estimates: log-time, two-segment fits, weighted quantiles.

Everything here works on plain 1-D float arrays (numpy, float64) and knows nothing about runs; the estimators in
:mod:`dynprobe.analysis` and :mod:`dynprobe.analysis.detector` choose what to feed it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TwoSegmentFit", "log_time", "two_segment_fit", "weighted_quantile"]


def log_time(steps: np.ndarray, unit: float | None = None) -> np.ndarray:
    """``log(1 + t / unit)``: a log-time axis on which step 0 is finite.

    ``unit`` defaults to the smallest positive step, so a schedule 0, 1, 2, … and a grid 0, 250, 500, … both map
    their first two snapshots one e-fold apart, and the axis is close to ``log t`` for ``t ≫ unit``.
    """
    steps = np.asarray(steps, dtype=np.float64)
    if unit is None:
        positive = steps[steps > 0]
        unit = float(positive.min()) if positive.size else 1.0
    return np.log1p(steps / unit)


@dataclass(frozen=True)
class TwoSegmentFit:
    """Two straight lines fitted by least squares on either side of a change point (segmented regression).

    The segments are ``x[:index]`` and ``x[index:]``; each has its own intercept and slope, so both a jump (a
    step in ``y``) and a change of slope (a knee) are change points. ``interval``: the lowest and highest
    ``index`` whose residual sum of squares lies within the approximate 95 % profile-likelihood band
    (``ΔSSE ≤ 3.84 σ̂²``, σ̂² = SSE/(n − 5)); ``sse_line``: the residual of one line for the whole series
    (``improvement = 1 − sse/sse_line``).
    """

    index: int
    before: tuple[float, float]  # (intercept, slope) of the first segment
    after: tuple[float, float]
    sse: float
    sse_line: float
    interval: tuple[int, int]

    @property
    def slope_before(self) -> float:
        return self.before[1]

    @property
    def slope_after(self) -> float:
        return self.after[1]

    @property
    def improvement(self) -> float:
        return 0.0 if self.sse_line <= 0 else float(1.0 - self.sse / self.sse_line)


def _segment_sums(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Prefix sums [n, Σx, Σy, Σx², Σxy, Σy²] with a leading zero row: sums over x[a:b] are rows b − a."""
    columns = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)
    return np.vstack([np.zeros((1, 6)), np.cumsum(columns, axis=0)])


def _line_fit(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intercept, slope, SSE) of the least-squares line for each row of segment sums."""
    n, sx, sy, sxx, sxy, syy = sums.T
    sxx_c = sxx - sx * sx / n
    sxy_c = sxy - sx * sy / n
    syy_c = syy - sy * sy / n
    slope = np.where(sxx_c > 0, sxy_c / np.where(sxx_c > 0, sxx_c, 1.0), 0.0)
    sse = np.maximum(syy_c - slope * sxy_c, 0.0)
    intercept = (sy - slope * sx) / n
    return intercept, slope, sse


def two_segment_fit(x: np.ndarray, y: np.ndarray, *, min_size: int = 3) -> TwoSegmentFit | None:
    """Best split of the series ``y(x)`` into two independently fitted lines, each over at least ``min_size``
    points. Exhaustive over all split points with prefix sums (O(n)), so the optimum is global. ``x``
    increasing. None with fewer than ``2·min_size`` points."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = x.size
    if min_size < 2 or n < 2 * min_size:
        return None
    prefix = _segment_sums(x, y)
    splits = np.arange(min_size, n - min_size + 1)
    left = prefix[splits]
    right = prefix[-1][None, :] - left
    a1, b1, e1 = _line_fit(left)
    a2, b2, e2 = _line_fit(right)
    sse = e1 + e2
    best = int(np.argmin(sse))
    _, _, whole = _line_fit(prefix[-1][None, :])
    sigma2 = float(sse[best]) / max(n - 5, 1)
    within = splits[sse - sse[best] <= 3.84 * max(sigma2, 1e-300)]
    return TwoSegmentFit(index=int(splits[best]), before=(float(a1[best]), float(b1[best])),
                         after=(float(a2[best]), float(b2[best])), sse=float(sse[best]), sse_line=float(whole[0]),
                         interval=(int(within.min()), int(within.max())))


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The ``q``-quantile of ``values`` under non-negative ``weights`` (lower weighted quantile: the smallest
    value whose cumulative weight reaches ``q`` of the total)."""
    values, weights = np.asarray(values, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    if values.size == 0 or not np.sum(weights) > 0:
        raise ValueError("weighted_quantile needs at least one value with positive weight")
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    k = int(np.searchsorted(cumulative, q * cumulative[-1] * (1 - 1e-12)))
    return float(values[order][min(k, values.size - 1)])
