"""Online transition detector: fed one snapshot at a time, it fires once when it is confident.

Used by ``Probe(..., on_transition=callback)``; usable on its own::

    detector = TransitionDetector()
    for step, c_row, s_row in snapshots:              # rows of the online C and S matrices, as they are appended
        estimate = detector.update(step, c_row, s_row)
        if estimate is not None:                      # returned exactly once
            start_weight_averaging()

Signal (Fort et al. 2020; the two-phase paper's Fig. 5b): the kernel velocity v(t_k) = S(t_k, t_p)/(t_k − t_p)
between consecutive kernel snapshots p < k is large in the chaotic phase and drops to a low floor after the
transition. The detector fires when v has stayed at or below ``peak / drop_factor`` for ``patience`` consecutive
kernel snapshots, and the parameter direction-change rate r(t_k) = C(t_k, t_k−1)/(t_k − t_k−1) (eq. 1) has
dropped too — its median over that stretch is at most ``peak r / c_drop_factor`` — so that one noisy kernel cannot
trigger it alone. The estimate is the first step of the low stretch. Runs without kernels fall back to r alone
(quality ``"low"``). Each update reads two entries of the new rows and re-scans the velocity history: O(T).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .estimate import TransitionEstimate

__all__ = ["TransitionDetector"]


class TransitionDetector:
    """Online estimate of the transition step (see the module docstring).

    Args:
        drop_factor: v (or r, without kernels) must fall to ``1/drop_factor`` of its running peak.
        patience: for this many consecutive kernel snapshots (snapshots, without kernels).
        c_drop_factor: the median r over that stretch must be at most ``1/c_drop_factor`` of r's peak.
        min_snapshots: no decision before this many velocity values (the peak must have been seen).
    """

    def __init__(self, *, drop_factor: float = 10.0, patience: int = 3, c_drop_factor: float = 3.0,
                 min_snapshots: int = 5) -> None:
        for name, value in (("drop_factor", drop_factor), ("c_drop_factor", c_drop_factor)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 1:
                raise ValueError(f"{name} must be a number > 1; got {value!r}")
        for name, value in (("patience", patience), ("min_snapshots", min_snapshots)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        self.drop_factor, self.patience = float(drop_factor), patience
        self.c_drop_factor, self.min_snapshots = float(c_drop_factor), min_snapshots
        self.steps: list[int] = []
        self._kernel_index: int | None = None  # index of the previous snapshot with a kernel
        self._velocity: list[tuple[int, float]] = []  # (step, v)
        self._c_rate: list[tuple[int, float]] = []  # (step, r)
        self.estimate: TransitionEstimate | None = None

    @property
    def fired(self) -> bool:
        return self.estimate is not None

    def update(self, step: int, c_row: Any, s_row: Any = None) -> TransitionEstimate | None:
        """Take snapshot ``step`` with its new rows ``c_row = C[k, 0..k]`` and ``s_row = S[k, 0..k]`` (NaN where
        a kernel is missing; None for runs without kernels). Returns the estimate the one time it fires."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"step must be an int; got {type(step).__name__}")
        step, k = int(step), len(self.steps)
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"steps must increase; got {step} after {self.steps[-1]}")
        c_row = self._row("c_row", c_row, k)
        s_row = None if s_row is None else self._row("s_row", s_row, k)
        self.steps.append(step)
        if k >= 1 and math.isfinite(c_row[k - 1]):
            self._c_rate.append((step, float(c_row[k - 1]) / (step - self.steps[k - 1])))
        if s_row is not None and math.isfinite(s_row[k]):
            p = self._kernel_index
            if p is not None and math.isfinite(s_row[p]):
                self._velocity.append((step, float(s_row[p]) / (step - self.steps[p])))
            self._kernel_index = k
        if self.estimate is not None:
            return None
        self.estimate = self._decide(step)
        return self.estimate

    @staticmethod
    def _row(name: str, row: Any, k: int) -> np.ndarray:
        row = np.asarray(row, dtype=np.float64).reshape(-1)
        if row.size != k + 1:
            raise ValueError(f"{name} must hold the new snapshot's row of the matrix, {k + 1} entries (to the {k} "
                             f"earlier snapshots and itself); got {row.size}")
        return row

    def _decide(self, step: int) -> TransitionEstimate | None:
        kernel_mode = bool(self._velocity)
        series = self._velocity if kernel_mode else self._c_rate
        if len(series) < self.min_snapshots:
            return None
        values = np.array([v for _, v in series])
        peak_index = int(np.argmax(values))
        threshold = values[peak_index] / self.drop_factor
        low = values <= threshold
        run = 0
        while run < low.size and low[low.size - 1 - run]:
            run += 1
        if run < self.patience or low.size - run <= peak_index:
            return None
        first = low.size - run
        start_step = series[first][0]
        evidence: dict[str, Any] = {
            "signal": "kernel_velocity" if kernel_mode else "C_rate",
            "peak_step": series[peak_index][0], "peak": float(values[peak_index]), "threshold": float(threshold),
            "low_steps": [s for s, _ in series[first:]], "low_values": values[first:].tolist(),
            "drop_factor": self.drop_factor, "patience": self.patience, "fired_at_step": step,
        }
        quality = "low"
        if kernel_mode:
            rates = [(s, r) for s, r in self._c_rate]
            if rates:
                peak_rate = max(r for _, r in rates)
                stretch = [r for s, r in rates if s >= start_step]
                median_rate = float(np.median(stretch)) if stretch else math.nan
                evidence.update(c_rate_peak=peak_rate, c_rate_median_after=median_rate,
                                c_drop_factor=self.c_drop_factor)
                if not median_rate <= peak_rate / self.c_drop_factor:
                    return None  # the parameters still turn as fast as ever: wait
                quality = "high"
            else:
                quality = "medium"
        previous = series[first - 1][0]
        signal = "kernel velocity" if kernel_mode else "parameter direction-change rate (no kernels)"
        return TransitionEstimate(
            "online", start_step, (previous, start_step), quality,
            f"{signal} fell below 1/{self.drop_factor:g} of its peak (step {series[peak_index][0]}) at step "
            f"{start_step} and stayed there for {run} snapshots", evidence)
