"""The online transition estimate of a probe: fed one row per snapshot, announced once (``Probe(on_transition=)``)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dynprobe.analysis.detector import TransitionDetector
from dynprobe.analysis.estimate import TransitionEstimate
from dynprobe.store.run import Run

__all__ = ["TransitionWatch"]


class TransitionWatch:
    """Wraps :class:`TransitionDetector`: records the estimate in the run (a ``transition`` event) when it becomes
    confident, and calls ``callback`` once — after the optimizer step, outside the probe's fault guard.

    Args:
        event: writes an event into the run (``writer.event``).
        callback: the user's ``on_transition`` (or None).
        lag_steps: the fixed lag of the kernel velocity S(t, t+Δ) (``KernelConfig(lag_steps=)``), or None to use the
            most common gap between snapshots.
    """

    def __init__(self, event: Callable[..., None], callback: Callable[[TransitionEstimate], None] | None, *,
                 lag_steps: int | None = None) -> None:
        self._event, self._callback = event, callback
        self.detector = TransitionDetector(lag_steps=lag_steps)
        self.estimate: TransitionEstimate | None = None
        self._pending = False

    def update(self, step: int, rows: dict[str, np.ndarray],
               filled: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] | None = None) -> None:
        """The rows a snapshot at ``step`` appended (``"C"``, and ``"S"`` with kernels), and the deferred entries the
        same snapshot computed (``{"C": [(row, columns, values)]}``, for earlier rows and this one)."""
        current = len(self.detector.steps)
        latest = {name: None if rows.get(name) is None else np.array(rows[name], dtype=np.float64)
                  for name in ("C", "S")}
        for name, entries in (filled or {}).items():
            for row, columns, values in entries:
                if row == current and latest.get(name) is not None:
                    latest[name][columns] = values
                elif row < current:
                    self.detector.fill(name, row, columns, values)
        estimate = self.detector.update(step, latest["C"], latest["S"])
        if estimate is not None:
            self._announce(estimate)

    def replay(self, run: Run) -> None:
        """A resumed run: feed the committed rows again; announce only what was not announced before."""
        C, S = run.C, run.S if run.has_kernels else None
        for k, step in enumerate(run.steps):
            self.detector.update(int(step), C[k, : k + 1], None if S is None else S[k, : k + 1])
        announced = [e for e in run.events if e.get("event") == "transition"]
        if announced:  # the callback already ran in the interrupted process: never again
            recorded: dict[str, Any] = dict(announced[-1]["estimate"])
            recorded["interval"] = tuple(recorded["interval"]) if recorded.get("interval") else None
            self.estimate = self.detector.estimate or TransitionEstimate(**recorded)
        elif self.detector.estimate is not None:
            self._announce(self.detector.estimate)

    def notify(self) -> None:
        """Call the user's callback if an estimate was announced since the last call."""
        if self._pending and self.estimate is not None:
            self._pending = False
            if self._callback is not None:
                self._callback(self.estimate)

    def _announce(self, estimate: TransitionEstimate) -> None:
        if self.estimate is None:
            self.estimate = estimate
            self._pending = True
            self._event("transition", step=estimate.step, estimate=estimate.to_dict())
