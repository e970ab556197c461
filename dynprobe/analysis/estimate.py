"""The result types of the transition estimates and their agreement (see :mod:`dynprobe.analysis`)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["METHOD_LABELS", "TransitionEstimate", "TransitionReport", "combine_estimates", "unavailable"]

QUALITIES = ("high", "medium", "low", "bound", "none", "unavailable")
METHOD_LABELS = {
    "trajectory_C": "C map: step where C(t0, ·) peaks for most t0 (Finding I)",
    "ghost_C": "main-vs-ghost C: step where it peaks for most spawns (Fig. 3a)",
    "chaos": "chaos maps: first spawn whose ghost stays close (Finding II)",
    "kernel_velocity": "kernel velocity: change point in log-time (Fig. 5b)",
    "online": "online detector (Probe(on_transition=...))",
}


@dataclass(frozen=True)
class TransitionEstimate:
    """One estimate of the transition step, with what supports it.

    Attributes:
        method: ``"trajectory_C"``, ``"ghost_C"``, ``"chaos"``, ``"kernel_velocity"`` or ``"online"``.
        step: the estimated step (a recorded snapshot or spawn step), or None when there is only a bound, no
            transition was found, or the data are missing.
        interval: ``(low, high)`` steps bracketing the transition (either may be None: unbounded on that side), or
            None when nothing is known.
        quality: ``"high"``/``"medium"``/``"low"`` (an estimate), ``"bound"`` (only ``interval`` is known, e.g.
            every ghost diverged), ``"none"`` (analysed, no transition in this run), ``"unavailable"`` (missing
            data; ``summary`` says what and how to get it).
        summary: one human sentence.
        evidence: the numbers behind it (JSON-serializable).
    """

    method: str
    step: int | None
    interval: tuple[int | None, int | None] | None
    quality: str
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        """True when the run had the data this method needs (whatever it concluded)."""
        return self.quality != "unavailable"

    @property
    def informative(self) -> bool:
        """True when it constrains the transition step (an estimate or a bound)."""
        return self.interval is not None and self.quality not in ("none", "unavailable")

    @property
    def label(self) -> str:
        return METHOD_LABELS.get(self.method, self.method)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "step": self.step, "interval": list(self.interval) if self.interval else None,
                "quality": self.quality, "summary": self.summary, "evidence": self.evidence}


def unavailable(method: str, reason: str) -> TransitionEstimate:
    return TransitionEstimate(method, None, None, "unavailable", reason)


@dataclass(frozen=True)
class TransitionReport:
    """All estimates of a run and whether they agree.

    ``agree``: the brackets of every informative estimate, each widened by the factor ``tolerance`` (low/tol,
    high·tol), share a common step; None with fewer than two informative estimates. ``step``: the geometric median
    of the point estimates, moved into the common range when they agree. ``common``: that range.
    """

    estimates: tuple[TransitionEstimate, ...]
    step: int | None
    agree: bool | None
    common: tuple[float, float] | None
    tolerance: float
    summary: str

    def get(self, method: str) -> TransitionEstimate | None:
        return next((e for e in self.estimates if e.method == method), None)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "agree": self.agree, "common": list(self.common) if self.common else None,
                "tolerance": self.tolerance, "summary": self.summary,
                "estimates": [e.to_dict() for e in self.estimates]}


def combine_estimates(estimates: Sequence[TransitionEstimate], *, tolerance: float = 2.0) -> TransitionReport:
    """Whether the estimates agree (see :class:`TransitionReport`), and a consensus step."""
    if not tolerance >= 1:
        raise ValueError(f"tolerance must be a step ratio >= 1; got {tolerance}")
    informative = [e for e in estimates if e.informative]
    points = [e.step for e in informative if e.step is not None]
    low, high = 0.0, math.inf
    for e in informative:
        lo, hi = e.interval  # type: ignore[misc]
        if lo is not None:
            low = max(low, lo / tolerance)
        if hi is not None:
            high = min(high, hi * tolerance)
    agree = None if len(informative) < 2 else bool(low <= high)
    step = None
    if points:
        step = int(round(math.exp(float(np.median(np.log(np.maximum(points, 1)))))))
        if agree:
            step = int(min(max(step, math.ceil(low)), math.floor(high)))
    names = ", ".join(f"{e.method} {e.step if e.step is not None else _bound_text(e.interval)}" for e in informative)
    if not informative:
        summary = "no transition estimate is available for this run"
    elif agree is None:
        summary = f"one estimate only ({names})"
    elif agree:
        summary = f"the estimates agree within ×{tolerance:g}: transition near step {step} ({names})"
    else:
        summary = f"the estimates disagree (no common step within ×{tolerance:g}): {names}"
    common = (low, high) if agree else None
    return TransitionReport(tuple(estimates), step, agree, common, tolerance, summary)


def _bound_text(interval: tuple[int | None, int | None] | None) -> str:
    if not interval:
        return "?"
    lo, hi = interval
    return f"> {lo}" if hi is None else f"≤ {hi}" if lo is None else f"in ({lo}, {hi}]"
