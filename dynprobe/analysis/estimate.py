"""The result types of the transition estimates and their agreement (see :mod:`dynprobe.analysis`)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CONSENSUS_METHODS", "METHOD_LABELS", "TransitionEstimate", "TransitionReport", "combine_estimates",
           "unavailable"]

QUALITIES = ("high", "medium", "low", "bound", "undetermined", "none", "unavailable")
METHOD_LABELS = {
    "chaos": "sensitivity of ghosts: where amplification of ε over a fixed window drops (Finding II)",
    "kernel_velocity": "kernel velocity: where S(t, t+Δ) at a fixed lag Δ drops (Fig. 5b)",
    "trajectory_C": "C map: where the direction change of θ levels off for most t0 (Finding I)",
    "ghost_C": "main-vs-ghost C: where it levels off for most spawns (Fig. 3a)",
    "online": "online detector (Probe(on_transition=...))",
}
#: Order in which estimators break ties for the consensus (the most direct reading of the transition first).
#: ``"online"`` is the real-time version of ``"kernel_velocity"`` and never votes.
CONSENSUS_METHODS = ("chaos", "kernel_velocity", "trajectory_C", "ghost_C")


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
            every ghost is still sensitive), ``"undetermined"`` (the data do not resolve it — e.g. later ghosts
            have not run long enough; ``interval`` may hold what is known), ``"none"`` (analysed, no transition in
            this run), ``"unavailable"`` (missing data; ``summary`` says what and how to get it).
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
    """All estimates of a run and the answer they give together.

    The consensus is the step of one estimator, never a number made up between them: among the point estimates
    of the voting methods (:data:`CONSENSUS_METHODS`; the online detector does not vote), the one with the
    smallest summed |log ratio| to the others (ties: the order of :data:`CONSENSUS_METHODS`). ``agree`` is True
    when the bracket of every informative estimate (a bound's half-line included) meets the consensus's bracket
    widened by ×``tolerance`` — brackets, not points, so two estimators that each report their uncertainty are
    not declared in conflict by a step that happens to sit at exactly ×``tolerance``; False otherwise (then
    ``step`` is None and ``summary`` lists each estimate); None with fewer than two informative estimates (one
    point estimate is reported as it is). ``method``/``interval``: the
    estimator that gave ``step`` and its bracket; ``common``: the range of the agreeing point estimates.
    """

    estimates: tuple[TransitionEstimate, ...]
    step: int | None
    agree: bool | None
    common: tuple[float, float] | None
    tolerance: float
    summary: str
    method: str | None = None
    interval: tuple[int | None, int | None] | None = None

    def get(self, method: str) -> TransitionEstimate | None:
        return next((e for e in self.estimates if e.method == method), None)

    @property
    def headline(self) -> str:
        """One sentence a practitioner can act on: the transition with its bracket, or why it is undetermined."""
        if self.step is not None:
            low, high = self.interval if self.interval else (None, None)
            bracket = f" (between steps {_side(low)} and {_side(high)})" if self.interval else ""
            others = sum(1 for e in self.estimates if e.informative and e.method in CONSENSUS_METHODS) - 1
            support = (f"; {others} other estimate{'s' if others != 1 else ''} agree{'s' if others == 1 else ''} "
                       f"within ×{self.tolerance:g}" if self.agree and others > 0 else
                       "; the only estimate available" if self.agree is None else "")
            return (f"Training left its chaotic phase at about step {self.step}{bracket}, according to the "
                    f"{METHOD_LABELS.get(self.method or '', self.method).split(':')[0]}{support}.")
        return f"Transition undetermined, because {self.summary}."

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "agree": self.agree, "common": list(self.common) if self.common else None,
                "tolerance": self.tolerance, "summary": self.summary, "method": self.method,
                "interval": list(self.interval) if self.interval else None, "headline": self.headline,
                "estimates": [e.to_dict() for e in self.estimates]}


def _side(value: int | None) -> str:
    return "?" if value is None else str(value)


def _log_gap(a: float, b: float) -> float:
    return abs(math.log(max(a, 1) / max(b, 1)))


def combine_estimates(estimates: Sequence[TransitionEstimate], *, tolerance: float = 2.0) -> TransitionReport:
    """The consensus of ``estimates`` (see :class:`TransitionReport`)."""
    if not tolerance >= 1:
        raise ValueError(f"tolerance must be a step ratio >= 1; got {tolerance}")
    voting = [e for e in estimates if e.informative and e.method in CONSENSUS_METHODS]
    points = [e for e in voting if e.step is not None]
    bounds = [e for e in voting if e.step is None]
    listed = "; ".join(f"{e.method} {e.step if e.step is not None else _bound_text(e.interval)}"
                       + (f" ({_bound_text(e.interval)})" if e.step is not None and e.interval else "")
                       for e in voting)
    if not points:
        reasons = [e.summary for e in estimates if e.method in CONSENSUS_METHODS and e.quality != "unavailable"]
        undetermined = [e for e in estimates if e.method in CONSENSUS_METHODS and e.quality == "undetermined"]
        if bounds:
            summary = f"no estimator located the transition, only bounds: {listed}"
            if undetermined:
                summary += f" ({undetermined[0].method}: {undetermined[0].summary.removeprefix('undetermined: ')})"
        elif reasons:
            summary = "no estimator located it: " + " / ".join(reasons[:2])
        else:
            summary = "no transition estimate is available for this run"
        return TransitionReport(tuple(estimates), None, None if len(voting) < 2 else True, None, tolerance, summary)
    rank = {m: k for k, m in enumerate(CONSENSUS_METHODS)}
    medoid = min(points, key=lambda e: (round(sum(_log_gap(e.step, o.step) for o in points), 9), rank[e.method]))
    step = int(medoid.step)  # type: ignore[arg-type]
    agree = None if len(voting) < 2 else all(_overlap(e, medoid, tolerance) for e in voting)
    if agree is False:
        summary = f"the estimates disagree (their brackets are more than ×{tolerance:g} apart): {listed}"
        return TransitionReport(tuple(estimates), None, False, None, tolerance, summary)
    values = [int(e.step) for e in points]  # type: ignore[arg-type]
    if agree is None:
        summary = f"one estimate only ({listed})"
    else:
        summary = f"the estimates agree (brackets within ×{tolerance:g}): transition near step {step} ({listed})"
    return TransitionReport(tuple(estimates), step, agree, (float(min(values)), float(max(values))), tolerance,
                            summary, medoid.method, medoid.interval)


def _overlap(e: TransitionEstimate, consensus: TransitionEstimate, tolerance: float) -> bool:
    """Whether ``e``'s bracket (its step when it has none) meets the consensus bracket widened by ×tolerance."""
    low, high = e.interval if e.interval else (e.step, e.step)
    c_low, c_high = consensus.interval if consensus.interval else (consensus.step, consensus.step)
    if c_low is None:
        c_low = consensus.step
    if c_high is None:
        c_high = consensus.step
    wide_low, wide_high = (c_low or 0) / tolerance, (c_high or 0) * tolerance
    return (low is None or low < wide_high) and (high is None or high > wide_low)


def _bound_text(interval: tuple[int | None, int | None] | None) -> str:
    if not interval:
        return "?"
    lo, hi = interval
    return f"> {lo}" if hi is None else f"≤ {hi}" if lo is None else f"in ({lo}, {hi}]"
