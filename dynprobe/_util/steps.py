"""Pairs of recorded steps a fixed lag apart: the one definition behind every kernel velocity.

The kernel velocity at lag Δ is S(θ_t, θ_{t+Δ}) between snapshots *exactly* Δ optimizer steps apart. Pairs at
other gaps are never used, never rescaled by their gap and never matched to a "nearest" step: S between nearby
snapshots hardly depends on the gap (SGD noise dominates it), so dividing by a varying gap would make the velocity
follow the snapshot grid instead of the training dynamics.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .checks import check_int

__all__ = ["lag_pairs", "most_common_gap"]


def lag_pairs(steps: Sequence[int] | np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)`` with ``steps[j] - steps[i] == lag`` exactly, ordered by ``i``.

    Args:
        steps: recorded steps (integers; any order, duplicates allowed — each index pairs with the first index
            holding ``steps[i] + lag``).
        lag: the lag Δ in optimizer steps, a positive integer.

    Returns:
        two int64 arrays of equal length: the earlier and the later snapshot of each pair.
    """
    check_int("lag", lag, hint="a number of optimizer steps")
    steps = np.asarray(steps)
    if steps.ndim != 1 or (steps.size and not np.issubdtype(steps.dtype, np.integer)):
        raise ValueError(f"steps must be a 1-D array of integer steps; got shape {steps.shape}, dtype {steps.dtype}")
    steps = steps.astype(np.int64)
    first: dict[int, int] = {}
    for index, step in enumerate(steps.tolist()):
        first.setdefault(step, index)
    earlier, later = [], []
    for index, step in enumerate(steps.tolist()):
        match = first.get(step + int(lag))
        if match is not None:
            earlier.append(index)
            later.append(match)
    return np.asarray(earlier, dtype=np.int64), np.asarray(later, dtype=np.int64)


def most_common_gap(steps: Sequence[int] | np.ndarray) -> int | None:
    """The gap that occurs most often between consecutive distinct steps (the smallest on a tie), or None when
    fewer than two distinct steps exist: the default lag of a run recorded without an explicit one."""
    unique = np.unique(np.asarray(steps, dtype=np.int64))
    if unique.size < 2:
        return None
    gaps, counts = np.unique(np.diff(unique), return_counts=True)
    return int(gaps[np.argmax(counts)])  # np.unique sorts: argmax takes the smallest gap among the most frequent
