"""Ghost separation curves: l2(t) = ‖θ'_t − θ_ref,t‖₂ after every training step a ghost takes (and at its spawn).

θ_ref is the ghost's reference: the main model (sequential and distributed ghosts) or the ε = 0 shadow of a
vectorized stack. Dividing by the ghost's realized ‖ε‖ gives the sensitivity δ(t) = l2(t) / ‖ε‖, whose growth over
fixed windows after the spawn (the amplification A(t0, Δ) = δ(t0 + Δ), the finite-time growth rate
λ(t0, Δ) = log A / Δ) depends neither on where the snapshots fall nor on when the run stops.

Values are buffered in memory and handed to the run's sink (``append_separation``: one append-only log of float64
(step, l2) pairs per ghost) at every snapshot and when the ghosts finish: one write per ghost and snapshot. Pairs
after the last committed snapshot may be lost in a crash; a resumed run cuts every log at its resume step anyway.
"""
from __future__ import annotations

import numpy as np

from dynprobe.store.sink import RunSink

__all__ = ["SeparationLog"]


class SeparationLog:
    """Buffered (step, l2) pairs per ghost, appended through ``sink.append_separation`` at :meth:`flush`."""

    def __init__(self, sink: RunSink) -> None:
        self.sink = sink
        self._pending: dict[int, list[tuple[int, float]]] = {}

    def note(self, ghost: int, step: int, l2: float) -> None:
        self._pending.setdefault(ghost, []).append((int(step), float(l2)))

    def flush(self) -> None:
        """Hand every buffered pair to the sink."""
        pending, self._pending = self._pending, {}
        for ghost, pairs in pending.items():
            steps, values = np.array(pairs, dtype=np.float64).T
            self.sink.append_separation(ghost, steps, values)
