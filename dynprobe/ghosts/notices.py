"""What the ghosts tell the user: the texts of their warnings, each built once here from plain values.

The ghost set decides *when* to warn (once per kind, at the user's line); these functions say *what*.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from dynprobe.capture.step import UnmatchedLoss

from .perturbation import PerturbationReport
from .replica import likely_drift_causes

__all__ = ["VISIBLE_SHARE", "control_drift_notice", "precision_notice", "realized_norm_notice", "replay_notice",
           "shadow_drift_notice"]

# Below this share of coordinates that differ after rounding to the autocast compute dtype, a perturbation is
# reported as below that dtype's resolution.
VISIBLE_SHARE = 0.01
# One ulp of each lower-precision dtype, in float32 ulps (2**(24 - significand bits)).
_FLOAT32_ULPS = {torch.bfloat16: 2**16, torch.float16: 2**13}


def precision_notice(reports: dict[int, PerturbationReport], dtype: torch.dtype) -> tuple[list[int], str] | None:
    """The ghosts (by ghost id) whose perturbation is below the resolution of the autocast compute ``dtype`` — fewer
    than :data:`VISIBLE_SHARE` of their coordinates round to a different value of it — and the message that says
    which magnitude survives; None when every perturbation is visible."""
    name = str(dtype).removeprefix("torch.")
    hidden = {ghost_id: report for ghost_id, report in reports.items()
              if report.changed_at.get(name, report.total) < VISIBLE_SHARE * report.total}
    if not hidden:
        return None
    shares = ", ".join(f"ghost {ghost_id}: {report.changed_at.get(name, 0)} of {report.total}"
                       for ghost_id, report in hidden.items())
    message = (f"dynprobe: the ghosts' perturbation is below the resolution of {name}, the autocast compute dtype of "
               f"your training step: only {shares} coordinates round to a different {name} value, so the forward "
               "pass sees (almost) the unperturbed weights and the ghosts measure rounding rather than the chaos "
               f"effect. Use a perturbation that survives {name}: Perturbation(norm={_FLOAT32_ULPS[dtype]}, "
               f"kind='ulp') (one {name} ulp per float32 coordinate) or Perturbation(norm="
               f"{torch.finfo(dtype).eps:.2g}, kind='relative')")
    return list(hidden), message


def realized_norm_notice(reports: dict[int, PerturbationReport], step: int) -> str | None:
    """One message for the ghosts spawned at ``step`` whose perturbation lost part of its norm to rounding."""
    messages = {ghost_id: report.warning() for ghost_id, report in reports.items()}
    messages = {ghost_id: message for ghost_id, message in messages.items() if message}
    if not messages:
        return None
    ghosts = ", ".join(str(ghost_id) for ghost_id in messages)
    return (f"dynprobe: ghost{'s' if len(messages) > 1 else ''} {ghosts} (spawned at step {step}): "
            f"{next(iter(messages.values()))}. Every ghost's realized norm is in its ghost_spawn record; later spawns "
            "are not warned about again")


def control_drift_notice(reference: str, step: int, drifted: dict[str, float], *, grad_edit_detected: bool,
                         compiled: bool, nondeterministic: bool = False) -> tuple[list[str], str]:
    """The likely causes and the message of an ε = 0 control that drifted from its ``reference`` at ``step``."""
    diff = max(drifted.values())
    if reference == "shadow":
        causes = ["nondeterministic kernels (run with torch.use_deterministic_algorithms)"]
        return causes, (f"dynprobe: the ε=0 control ghost drifted from the ε=0 shadow of its vectorized stack at step "
                        f"{step} (max |Δ| {diff:.3g}): rows of one stack should be computed identically. Use "
                        "Ghosts(vectorize=False) for a bit-exact reference")
    causes = likely_drift_causes(grad_edit_detected=grad_edit_detected, compiled=compiled,
                                 nondeterministic=nondeterministic)
    names = list(drifted)
    return causes, (f"dynprobe: the ε=0 control ghost drifted from the main run at step {step} ({len(names)} tensors, "
                    f"max |Δ| {diff:.3g}, e.g. {names[0]!r}): the ghosts do not reproduce your training step exactly, "
                    f"so chaos maps mix ε with that difference. Likely causes: {'; '.join(causes)}")


def shadow_drift_notice(step: int, drift: dict[str, Any], separations: list[float]
                        ) -> tuple[dict[str, Any], str | None]:
    """The ``shadow_drift`` event's fields (the drift of a vectorized stack's ε = 0 shadow from the main run, next to
    the smallest perturbed ghost's L2 ``separations``) and a warning when the drift exceeds that signal."""
    smallest = min(separations, default=math.nan)
    exceeds = bool(separations) and drift["L2"] > smallest
    fields = {**drift, "smallest_ghost_L2": smallest, "exceeds_ghost_signal": exceeds}
    if not exceeds:
        return fields, None
    return fields, (f"dynprobe: at step {step} the ε=0 shadow that vectorized ghosts are compared with is L2 "
                    f"{drift['L2']:.3g} away from your run, more than the smallest ghost separation ({smallest:.3g}): "
                    "the chaos maps measure the vectorized kernels' rounding as much as ε. Use "
                    "Ghosts(vectorize=False) (the default) for an exact reference")


def replay_notice(captured: bool, unmatched: Sequence[UnmatchedLoss]) -> tuple[str, str, str] | None:
    """Why the ghosts cannot replay an optimizer step, as (warning kind, warning, status reason); None when they can.

    A backpropagated watched-loss call with an argument computed from the model's output stops them with its own
    reason (replaying without it would train them on another loss). With nothing ``captured``: the watched loss was
    backpropagated but none of its arguments was the output, a part of it or a view of it (``unmatched`` holds
    those calls), or no watched loss was backpropagated at all.
    """
    blocking = next((u for u in unmatched if u.from_output), None)
    if blocking is not None:
        return ("loss-from-output", f"dynprobe: the ghosts cannot replay the watched loss: {blocking.reason}",
                blocking.reason)
    if captured:
        return None
    if unmatched:
        message = (f"dynprobe: the optimizer stepped, and the watched loss was backpropagated {len(unmatched)} "
                   "time(s), but none of its arguments was the model's output, a part of it or a view of it, so the "
                   "ghosts cannot put their own output in its place. Pass the model's output (or a view: reshape, "
                   "view, slicing) to the watched loss, pass Probe(loss_from_output=...) for a model that computes "
                   "its own loss, or call probe.step(x, y) explicitly with Ghosts(loss_fn=...)")
    else:
        message = ("dynprobe: the optimizer stepped but the ghosts saw no (forward, loss, backward) to replay. Wrap "
                   "the loss with criterion = probe.watch(criterion), pass loss_from_output= for models that compute "
                   "their own loss, or call probe.step(x, y) explicitly")
    return "no-capture", message, "no captured batch to replay"
