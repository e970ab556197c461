"""The result types of the transition estimates and their agreement (see :mod:`dynprobe.analysis`)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["METHOD_LABELS", "SETTLING_METHODS", "TransitionEstimate", "TransitionReport", "combine_estimates",
           "unavailable"]

QUALITIES = ("high", "medium", "low", "bound", "undetermined", "none", "unavailable")
METHOD_LABELS = {
    "chaos": "ghost outcomes: the first spawn whose ghosts saturate far below the early ghosts' level (Finding I)",
    "kernel_velocity": "kernel velocity: where S(t, t+Δ) at a fixed lag Δ drops (Fig. 5b)",
    "trajectory_C": "C map: where the direction change of θ levels off for most t0",
    "ghost_C": "main-vs-ghost C: where it levels off for most spawns (Fig. 3a)",
    "online": "online detector (Probe(on_transition=...))",
}
#: The estimates that locate when the main trajectory *settles* (a different event from the end of chaos, often
#: later): reported on a line of their own, never a vote on the chaos estimate. Ties break in this order.
SETTLING_METHODS = ("kernel_velocity", "trajectory_C", "ghost_C", "online")


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
    """The answer to "when did training leave its chaotic phase?" and the estimates behind it.

    The headline is the ``"chaos"`` estimate alone (:func:`dynprobe.analysis.transition_from_saturation`: does a
    tiny perturbation change where training ends up?): ``step``, ``interval`` and ``quality`` are its own, and when
    it locates nothing the headline says why. The trajectory estimates (:data:`SETTLING_METHODS`) locate when the
    main trajectory settles, a different event: ``settles`` is the step of one of them (the one with the smallest
    summed |log ratio| to the others), ``settles_agree`` whether every informative one meets its bracket widened
    by ×``tolerance`` (a bound's half-line is compared with the unwidened bracket: a bound that excludes it is
    disagreement), None with fewer than two. ``lr_note``: the learning-rate change the transition coincides with.
    ``control_note``: why the ghosts' readings are not exact (the ε = 0 control drifted), closing the headline.
    """

    estimates: tuple[TransitionEstimate, ...]
    step: int | None
    interval: tuple[int | None, int | None] | None
    quality: str
    summary: str
    settles: int | None = None
    settles_interval: tuple[int | None, int | None] | None = None
    settles_agree: bool | None = None
    settles_summary: str = ""
    tolerance: float = 2.0
    lr_note: str | None = None
    control_note: str | None = None

    def get(self, method: str) -> TransitionEstimate | None:
        return next((e for e in self.estimates if e.method == method), None)

    @property
    def headline(self) -> str:
        """One sentence a practitioner can act on: the transition with its bracket, or why it is undetermined;
        followed by the control's drift when it happened."""
        control = f" Caution: {self.control_note}." if self.control_note else ""
        return self._answer() + control

    def _answer(self) -> str:
        lr = f" It {self.lr_note}." if self.lr_note else ""
        if self.step is not None:
            low, high = self.interval if self.interval else (None, None)
            return (f"Training left its chaotic phase between steps {_side(low)} and {_side(high)}: a perturbation "
                    f"of the weights before then changes where training ends up, one after it does not "
                    f"({self.quality} quality).{lr}")
        chaos = self.get("chaos")
        if chaos is not None and chaos.quality == "bound" and chaos.interval is not None:
            low, high = chaos.interval
            where = f"lasts beyond step {low}" if high is None else f"ended before step {high}"
            return f"The chaotic phase {where}: {chaos.summary}."
        return f"Transition undetermined, because {self.summary}."

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "interval": list(self.interval) if self.interval else None,
                "quality": self.quality, "summary": self.summary, "headline": self.headline,
                "settles": self.settles, "settles_interval": list(self.settles_interval)
                if self.settles_interval else None, "settles_agree": self.settles_agree,
                "settles_summary": self.settles_summary, "tolerance": self.tolerance, "lr_note": self.lr_note,
                "control_note": self.control_note,
                "estimates": [e.to_dict() for e in self.estimates]}


def _side(value: int | None) -> str:
    return "?" if value is None else str(value)


def _log_gap(a: float, b: float) -> float:
    return abs(math.log(max(a, 1) / max(b, 1)))


def combine_estimates(estimates: Sequence[TransitionEstimate], *, tolerance: float = 2.0,
                      lr_note: str | None = None, control_note: str | None = None) -> TransitionReport:
    """The :class:`TransitionReport` of ``estimates``: the chaos estimate as the headline, the trajectory estimates
    on their own line."""
    if not tolerance >= 1:
        raise ValueError(f"tolerance must be a step ratio >= 1; got {tolerance}")
    chaos = next((e for e in estimates if e.method == "chaos"), None)
    settling = _settling(estimates, tolerance)
    if chaos is None:
        step, interval, quality, summary = None, None, "unavailable", "the run has no chaos estimate"
    elif chaos.step is not None:
        step, interval, quality, summary = chaos.step, chaos.interval, chaos.quality, chaos.summary
    else:
        step, interval, quality = None, chaos.interval, chaos.quality
        summary = chaos.summary.removeprefix("undetermined: ")
    return TransitionReport(tuple(estimates), step, interval, quality, summary, *settling, tolerance=tolerance,
                            lr_note=lr_note if step is not None else None, control_note=control_note)


def _settling(estimates: Sequence[TransitionEstimate], tolerance: float
              ) -> tuple[int | None, tuple[int | None, int | None] | None, bool | None, str]:
    """(step, bracket, agree, line) of the trajectory estimates."""
    voting = [e for e in estimates if e.informative and e.method in SETTLING_METHODS]
    points = [e for e in voting if e.step is not None]
    listed = "; ".join(f"{METHOD_LABELS[e.method].split(':')[0]} "
                       f"{e.step if e.step is not None else _bound_text(e.interval)}" for e in voting)
    if not points:
        if voting:
            return None, None, None, f"the trajectory has not settled by the end of the run ({listed})"
        return None, None, None, "no trajectory estimate is available"
    rank = {m: k for k, m in enumerate(SETTLING_METHODS)}
    medoid = min(points, key=lambda e: (round(sum(_log_gap(e.step, o.step) for o in points), 9), rank[e.method]))
    agree = None if len(voting) < 2 else all(_overlap(e, medoid, tolerance) for e in voting)
    if agree is False:
        return None, None, False, (f"the trajectory estimates disagree (brackets more than ×{tolerance:g} apart): "
                                   f"{listed}")
    return int(medoid.step), medoid.interval, agree, f"the trajectory settles at about step {medoid.step} ({listed})"


def _overlap(e: TransitionEstimate, consensus: TransitionEstimate, tolerance: float) -> bool:
    """Whether ``e``'s bracket meets the consensus bracket: widened by ×tolerance for a bracket or point, unwidened
    for a bound (a half-line that excludes the consensus bracket is disagreement, however close its end)."""
    low, high = e.interval if e.interval else (e.step, e.step)
    c_low, c_high = consensus.interval if consensus.interval else (consensus.step, consensus.step)
    c_low = consensus.step if c_low is None else c_low
    c_high = consensus.step if c_high is None else c_high
    if e.step is None:  # a bound
        return (low is None or low < c_high) and (high is None or high > c_low)
    wide_low, wide_high = (c_low or 0) / tolerance, (c_high or 0) * tolerance
    return (low is None or low < wide_high) and (high is None or high > wide_low)


def _bound_text(interval: tuple[int | None, int | None] | None) -> str:
    if not interval:
        return "?"
    lo, hi = interval
    return f"> {lo}" if hi is None else f"≤ {hi}" if lo is None else f"in ({lo}, {hi}]"
