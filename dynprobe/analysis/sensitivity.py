"""How strongly does training amplify a tiny perturbation? Ghost separation curves and amplification over windows.

A ghost is a copy of the model perturbed at its spawn step t0 by ε and trained on the same batches (the two-phase
paper's Fig. 2). Its *separation curve* is l2(t) = ‖θ'_t − θ_t‖₂, recorded after every step it takes (and at its
spawn); ``δ(t) = l2(t) / ‖ε‖`` with ‖ε‖ the perturbation that survived the float add (``realized_norm``).

* amplification over a window of Δ steps after the spawn: ``A(t0, Δ) = δ(t0 + Δ)``;
* finite-time growth rate: ``λ(t0, Δ) = log A(t0, Δ) / Δ`` (per step; > 0 while ε grows).

Both use only the Δ steps after the spawn. They are evidence, not the transition: SGD amplifies ε in both phases,
and over a short window a later spawn caught by a burst of the main run can look more sensitive than an earlier
one. The ``"chaos"`` estimate reads where the separation *saturates* instead (:mod:`.saturation`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SeparationCurve", "amplification", "default_windows", "growth_rate", "sensitivity_table"]


@dataclass(frozen=True)
class SeparationCurve:
    """One ghost's separation from the run it is compared with (``run.separation(ghost)`` plus its ghost info).

    ``steps`` (int64, increasing) and ``l2`` (float64): ‖θ'_t − θ_ref,t‖₂ after each step the ghost took, the
    first pair at its spawn. ``status``: ``"alive"``, ``"finished"``, ``"diverged"`` (it stopped with non-finite
    values or an exploding norm), ``"failed"`` or ``"interrupted"``.
    """

    ghost: int
    spawn_step: int
    realized_norm: float
    steps: np.ndarray
    l2: np.ndarray
    control: bool = False
    status: str = "alive"

    def __post_init__(self) -> None:
        steps = np.asarray(self.steps, dtype=np.int64).reshape(-1)
        l2 = np.asarray(self.l2, dtype=np.float64).reshape(-1)
        if steps.shape != l2.shape:
            raise ValueError(f"steps and l2 must have the same length; got {steps.size} and {l2.size}")
        if steps.size > 1 and not np.all(np.diff(steps) > 0):
            raise ValueError(f"separation steps of ghost {self.ghost} must be strictly increasing")
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "l2", l2)

    @property
    def delta(self) -> np.ndarray:
        """δ(t) = l2(t) / realized ‖ε‖ (NaN for the ε = 0 control or a perturbation lost to rounding)."""
        if not self.realized_norm > 0:
            return np.full(self.l2.shape, np.nan)
        return self.l2 / self.realized_norm

    @property
    def span(self) -> int:
        """Steps from the spawn to the last recorded separation (0 without records)."""
        return int(self.steps[-1] - self.spawn_step) if self.steps.size else 0

    def l2_at(self, step: int) -> float:
        """l2 at ``step``: the recorded value, else log-linear interpolation between the recorded neighbours
        (exact for exponential growth; separation is normally recorded at every step, so this only matters for
        thinned curves); NaN outside the recorded range."""
        steps, l2 = self.steps, self.l2
        if steps.size == 0 or step < steps[0] or step > steps[-1]:
            return math.nan
        k = int(np.searchsorted(steps, step))
        if steps[k] == step:
            return float(l2[k])
        a, b = l2[k - 1], l2[k]
        w = (step - steps[k - 1]) / (steps[k] - steps[k - 1])
        if a > 0 and b > 0:
            return float(math.exp((1 - w) * math.log(a) + w * math.log(b)))
        return float((1 - w) * a + w * b)


def amplification(curve: SeparationCurve, window: int) -> float:
    """A(t0, Δ) = δ(t0 + Δ) of ``curve`` for ``window`` = Δ steps.

    NaN when the ghost has not run Δ steps (the run ended first, or it was interrupted) or its ‖ε‖ is 0;
    ``inf`` when it stopped as diverged before t0 + Δ (it amplified ε beyond what could be measured).
    """
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be a positive number of steps; got {window!r}")
    if not curve.realized_norm > 0:
        return math.nan
    target = curve.spawn_step + int(window)
    if curve.steps.size == 0 or target > curve.steps[-1]:
        return math.inf if curve.status == "diverged" else math.nan
    value = curve.l2_at(target)
    if not math.isfinite(value):
        return math.inf if curve.status == "diverged" else math.nan
    return value / curve.realized_norm


def growth_rate(amplification_value: float, window: int) -> float:
    """λ(t0, Δ) = log A / Δ per step (−inf for A = 0; NaN for NaN)."""
    if math.isnan(amplification_value):
        return math.nan
    if amplification_value <= 0:
        return -math.inf
    return math.log(amplification_value) / window


def default_windows(curves: Sequence[SeparationCurve]) -> list[int]:
    """Windows Δ on a 1-2-5 grid (1, 2, 5, 10, 20, 50, …) up to the longest span of a perturbed ghost: the same
    grid for every run, so estimates of runs cut at different horizons use the same windows."""
    longest = max((c.span for c in curves if not c.control), default=0)
    out, k = [], 0
    while True:
        window = (1, 2, 5)[k % 3] * 10 ** (k // 3)
        if window > longest:
            return out
        out.append(window)
        k += 1


def sensitivity_table(curves: Sequence[SeparationCurve], windows: Sequence[int]) -> np.ndarray:
    """A(t0, Δ) for every curve (rows) and window (columns)."""
    return np.array([[amplification(c, int(w)) for w in windows] for c in curves], dtype=np.float64).reshape(
        len(curves), len(windows))
