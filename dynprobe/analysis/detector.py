"""Online transition detector: fed one snapshot at a time, it fires once when it is confident.

Used by ``Probe(..., on_transition=callback)``; usable on its own::

    detector = TransitionDetector(lag_steps=50)
    for step, c_row, s_row in snapshots:              # rows of the online C and S matrices, as they are appended
        estimate = detector.update(step, c_row, s_row)
        if estimate is not None:                      # returned exactly once
            start_weight_averaging()

Signal (the two-phase paper's Fig. 5b, on a lag Δ fixed in optimizer steps): s(t) = S(θ_t, θ_t+Δ) (eq. 4), known
once the snapshot at t + Δ arrives, is large in the chaotic phase and drops to a low floor after the transition.
The detector fires when the running median of three of s has stayed at or below ``peak / drop_factor`` for
``patience`` consecutive pairs, and the direction change of θ over the same lag, c(t) = C(θ_t, θ_t+Δ) (eq. 1),
has dropped too — its median over that stretch is at most ``peak c / c_drop_factor`` — so one quiet kernel pair
cannot trigger it alone. The estimate is the first t of the low stretch (the pairs come from
:func:`dynprobe._util.steps.lag_pairs`, the one definition shared with the offline estimate). Runs without kernels
fall back to c alone (quality ``"low"``).

The lag is ``lag_steps`` when given (a probe with ``KernelConfig(lag_steps=Δ)`` places a companion snapshot Δ
steps after each kernel snapshot); otherwise the most common gap between consecutive snapshots so far (so the
regular part of a schedule, once it dominates, fixes it). The detector keeps the rows it was given, so a lag chosen
later still finds its pairs among earlier snapshots.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from dynprobe._util.steps import lag_pairs

from .estimate import TransitionEstimate

__all__ = ["TransitionDetector"]


class TransitionDetector:
    """Online estimate of the transition step (see the module docstring).

    Args:
        drop_factor: s (or c, without kernels) must fall to ``1/drop_factor`` of its running peak. The default, 30,
            is measured: on the demo (seeds 0 and 1) a factor of 5 fired at steps 75 and 133, inside the early
            fast kernel motion and far before every offline estimate (400–500); 20 fired at 500 and 300; 30 at
            500 and 500. The held-out seed 2 gave 500 with 30 (300 with 20), and the answer did not move when the
            kernel snapshots were thinned ×2 or a spawn snapshot was dropped (``tests/science/test_demo.py``). A run
            whose kernel velocity never drops 30× gets no online estimate (the offline estimate needs 3×).
        patience: for this many consecutive lag pairs.
        c_drop_factor: the median c over that stretch must be at most ``1/c_drop_factor`` of c's peak.
        min_snapshots: no decision before this many pairs (the peak must have been seen).
        lag_steps: the lag Δ in optimizer steps (None: chosen from the snapshot gaps, see the module docstring).
    """

    def __init__(self, *, drop_factor: float = 30.0, patience: int = 3, c_drop_factor: float = 3.0,
                 min_snapshots: int = 5, lag_steps: int | None = None) -> None:
        for name, value in (("drop_factor", drop_factor), ("c_drop_factor", c_drop_factor)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 1:
                raise ValueError(f"{name} must be a number > 1; got {value!r}")
        for name, value in (("patience", patience), ("min_snapshots", min_snapshots)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if lag_steps is not None and (isinstance(lag_steps, bool) or not isinstance(lag_steps, int)
                                      or lag_steps < 1):
            raise ValueError(f"lag_steps must be a positive int or None; got {lag_steps!r}")
        self.drop_factor, self.patience = float(drop_factor), patience
        self.c_drop_factor, self.min_snapshots = float(c_drop_factor), min_snapshots
        self.lag_steps = lag_steps
        self.steps: list[int] = []
        self._kernel: set[int] = set()  # indices of snapshots with a kernel
        self._gaps: dict[int, int] = {}  # gap between consecutive snapshots → count
        # The rows received: a lag chosen later still finds its pairs among earlier snapshots (T²/2 numbers each,
        # like the probe's own interval matrices).
        self._c_rows: list[np.ndarray] = []
        self._s_rows: list[np.ndarray | None] = []
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
        if s_row is not None and math.isfinite(s_row[k]):
            self._kernel.add(k)
        if k >= 1:
            gap = step - self.steps[k - 1]
            self._gaps[gap] = self._gaps.get(gap, 0) + 1
        self._c_rows.append(c_row)
        self._s_rows.append(s_row)
        if self.estimate is not None:
            return None
        self.estimate = self._decide(step)
        return self.estimate

    def fill(self, name: str, k: int, columns: Any, values: Any) -> None:
        """Entries of an earlier row computed after it was given (a probe defers C and S entries against older
        snapshots, module :mod:`dynprobe.metrics.interval`): ``name`` is ``"C"`` or ``"S"``, row ``k``."""
        if name not in ("C", "S"):
            raise ValueError(f"name must be 'C' or 'S'; got {name!r}")
        row = (self._c_rows if name == "C" else self._s_rows)[k]
        if row is not None:
            row[np.asarray(columns, dtype=np.int64)] = np.asarray(values, dtype=np.float64)

    def pairs(self, lag: int) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        """``([(t, S(t, t+lag))], [(t, C(t, t+lag))])`` over the snapshots received so far, pairs exactly ``lag``
        steps apart (:func:`dynprobe._util.steps.lag_pairs`); S only between snapshots that both have a kernel."""
        earlier, later = lag_pairs(np.asarray(self.steps, dtype=np.int64), int(lag))
        velocity, c_lag = [], []
        for p, k in zip(earlier.tolist(), later.tolist()):
            c, row = self._c_rows[k][p], self._s_rows[k]
            if math.isfinite(c):
                c_lag.append((self.steps[p], float(c)))
            if row is not None and k in self._kernel and p in self._kernel and math.isfinite(row[p]):
                velocity.append((self.steps[p], float(row[p])))
        return velocity, c_lag

    @property
    def lag(self) -> int | None:
        """The lag in use: ``lag_steps``, else the most common gap between consecutive snapshots so far (the
        larger on a tie: a schedule's regular late spacing outlasts its dense start)."""
        if self.lag_steps is not None:
            return self.lag_steps
        if not self._gaps:
            return None
        return max(self._gaps, key=lambda g: (self._gaps[g], g))

    @staticmethod
    def _row(name: str, row: Any, k: int) -> np.ndarray:
        row = np.array(row, dtype=np.float64).reshape(-1)  # a copy: the detector keeps it
        if row.size != k + 1:
            raise ValueError(f"{name} must hold the new snapshot's row of the matrix, {k + 1} entries (to the {k} "
                             f"earlier snapshots and itself); got {row.size}")
        return row

    def _decide(self, step: int) -> TransitionEstimate | None:
        lag = self.lag
        velocity, c_lag = self.pairs(lag) if lag is not None else ([], [])
        kernel_mode = bool(velocity)
        series = velocity if kernel_mode else c_lag
        if len(series) < self.min_snapshots:
            return None
        raw = np.array([v for _, v in series])
        values = np.array([np.median(raw[max(i - 1, 0):i + 2]) for i in range(raw.size)])
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
            "signal": "S(t, t+lag)" if kernel_mode else "C(t, t+lag)", "lag": lag,
            "peak_step": series[peak_index][0], "peak": float(values[peak_index]), "threshold": float(threshold),
            "low_steps": [s for s, _ in series[first:]], "low_values": values[first:].tolist(),
            "drop_factor": self.drop_factor, "patience": self.patience, "fired_at_step": step,
        }
        quality = "low"
        if kernel_mode:
            if c_lag:
                peak_c = max(c for _, c in c_lag)
                stretch = [c for t, c in c_lag if t >= start_step]
                median_c = float(np.median(stretch)) if stretch else math.nan
                evidence.update(c_peak=peak_c, c_median_after=median_c, c_drop_factor=self.c_drop_factor)
                if not median_c <= peak_c / self.c_drop_factor:
                    return None  # the parameters still turn as fast as ever: wait
                quality = "high"
            else:
                quality = "medium"
        previous = series[first - 1][0]
        signal = f"S(t, t+{lag})" if kernel_mode else f"the direction change C(t, t+{lag}) (no kernels)"
        return TransitionEstimate(
            "online", start_step, (previous, start_step), quality,
            f"{signal} fell below 1/{self.drop_factor:g} of its peak (step {series[peak_index][0]}) at step "
            f"{start_step} and stayed there for {run} pairs", evidence)
