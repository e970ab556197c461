"""Learning-rate changes, and the one a transition coincides with.

``run.lr`` holds the learning rate of every optimizer step and param group: row t is the rate the update from θ_t
to θ_t+1 used (NaN where the probe was not attached). A learning-rate drop moves training into another regime by
itself, so a transition found right at one may show the schedule rather than the two-phase phenomenon; the report
says so when a step change of at least ``min_ratio`` lies inside the transition's bracket.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["LrChange", "lr_change_note", "lr_changes"]

#: A learning-rate change counts as a step change of the schedule when one update multiplies it by at least this
#: factor (or divides it): step decays (÷10, ÷2) and restarts, not the small per-step changes of a smooth schedule.
MIN_RATIO = 1.5


@dataclass(frozen=True)
class LrChange:
    """The learning rate of ``group`` changed at optimizer step ``step`` from ``before`` to ``after``."""

    step: int
    group: int
    before: float
    after: float

    @property
    def text(self) -> str:
        ratio = self.after / self.before if self.before > 0 else math.inf
        change = f"drop ÷{1 / ratio:.3g}" if ratio < 1 else f"rise ×{ratio:.3g}"
        return f"the lr {change} at step {self.step}" + (f" (param group {self.group})" if self.group else "")


def lr_changes(lr: np.ndarray, *, min_ratio: float = MIN_RATIO) -> list[LrChange]:
    """Every step change of the learning rate by at least ``min_ratio`` in ``lr`` (steps × groups, as ``run.lr``)."""
    if not min_ratio > 1:
        raise ValueError(f"min_ratio must be > 1; got {min_ratio}")
    lr = np.asarray(lr, dtype=np.float64)
    lr = lr.reshape(lr.shape[0], -1) if lr.ndim else lr.reshape(0, 1)
    out = []
    for group in range(lr.shape[1]):
        values = lr[:, group]
        known = np.flatnonzero(np.isfinite(values))
        if known.size < 2:
            continue
        before, after = values[known[:-1]], values[known[1:]]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(before > 0, after / before, np.where(after > 0, np.inf, 1.0))
        for k in np.flatnonzero((ratio >= min_ratio) | (ratio <= 1 / min_ratio)):
            out.append(LrChange(int(known[k + 1]), group, float(before[k]), float(after[k])))
    return sorted(out, key=lambda c: (c.step, c.group))


def lr_change_note(lr: np.ndarray, interval: tuple[int | None, int | None] | None, *,
                   min_ratio: float = MIN_RATIO) -> str | None:
    """"coincides with the lr drop ÷10 at step 500" when a step change lies in the bracket ``(low, high]`` (the
    spawn interval that holds the transition), the largest one if several; None otherwise."""
    if interval is None:
        return None
    low, high = interval
    inside = [c for c in lr_changes(lr, min_ratio=min_ratio)
              if (low is None or c.step > low) and (high is None or c.step <= high)]
    if not inside:
        return None
    largest = max(inside, key=lambda c: abs(math.log(c.after / c.before)) if c.before > 0 and c.after > 0
                  else math.inf)
    return f"coincides with {largest.text}"
