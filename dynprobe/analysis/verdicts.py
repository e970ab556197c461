"""Where each ghost stands at its last comparison: diverged, close, or too near a threshold to say.

A verdict describes one ghost at one step t1 (its last comparison); it is not a transition estimate, because a
still-chaotic ghost that looks close at t1 can diverge later (the ``"chaos"`` estimate in :mod:`.saturation`
reads where each ghost's separation saturates instead, and uses these verdicts only when no spawn ends up below the
others). Each metric is compared with a threshold taken from a measured
scale where one exists, and every threshold travels with the value it was compared with:

* ``D`` (eq. 6): ``d_fraction`` (¼) of the main run's eval error — the disagreement of two independently trained
  networks (Jiang et al. 2022) — and at least two eval examples and the ε = 0 control's D; for regression, where
  D is the mean squared distance between the two models' outputs, ``d_fraction`` of the main run's eval MSE;
* ``B_linear``, the loss barrier with the linear reference of linear mode connectivity (Frankle et al. 2020),
  max_α [L(θ_α) − (α L_a + (1 − α) L_b)]: ``b_fraction`` (10 %) of the main eval loss, and at least the barrier
  that SGD itself makes between consecutive snapshots of the main run and the control's. Eq. 5's barrier (mean
  reference) is never used: it is at least ½|L_a − L_b|, the endpoint loss gap, even with no barrier on the path.

C (eq. 1) is not compared with a threshold: its only scale on the main run, the direction change over the last
snapshot interval, depends on where the snapshots fall, so a verdict based on it would flip when the run is
extended; 1 − cos travels with the chaos estimate's evidence instead.

A ghost *diverged* when a metric exceeds its threshold (or it stopped with non-finite values), is *close* when
every measured metric is at most half its threshold, and is *borderline* otherwise — no verdict hangs on a value
that sits at a threshold by accident.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GhostOutcome", "GhostVerdict", "ghost_verdict"]


@dataclass(frozen=True)
class GhostOutcome:
    """Where one perturbed ghost ended up relative to the main run (inputs of :func:`ghost_verdict`).

    ``D``, ``C``, ``L2`` and ``error`` (the main run's eval error) at ``final_step``, the ghost's last comparison;
    ``B`` (eq. 5), ``B_linear`` and ``loss`` (main eval loss) at the last step with a barrier. Scales measured on
    the run: ``C_scale`` (main-run C between its last two snapshots), ``B_scale`` (main-run B_linear between
    consecutive snapshots), ``control_D``/``control_C``/``control_B_linear`` (the ε = 0 control at the same step;
    0 for an exact control). ``stopped_diverged``: the ghost stopped with non-finite values or an exploding norm.
    """

    spawn_step: int
    final_step: int
    D: float
    error: float  # the main run's eval error (regression: its eval MSE, the scale of D there)
    B: float | None = None
    loss: float | None = None
    C: float | None = None
    L2: float | None = None
    realized_norm: float | None = None
    stopped_diverged: bool = False
    B_linear: float | None = None
    C_scale: float | None = None
    B_scale: float | None = None
    control_D: float | None = None
    control_C: float | None = None
    control_B_linear: float | None = None
    ghost: int | None = None
    regression: bool = False  # D is a mean squared output distance, ``error`` the main run's eval MSE


@dataclass(frozen=True)
class GhostVerdict:
    """``verdict`` (``"diverged"``, ``"close"``, ``"borderline"``) and, per metric, the value, its threshold and
    how the threshold was set (``checks``: name → {value, threshold, source, above})."""

    spawn_step: int
    final_step: int
    verdict: str
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    ghost: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"ghost": self.ghost, "spawn_step": self.spawn_step, "final_step": self.final_step,
                "verdict": self.verdict, "checks": self.checks}


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _largest(*candidates: tuple[float | None, str]) -> tuple[float, str]:
    usable = [(float(v), s) for v, s in candidates if _finite(v)]
    return max(usable, key=lambda c: c[0]) if usable else (math.nan, "no scale measured")


def ghost_verdict(outcome: GhostOutcome, *, d_fraction: float = 0.25, b_fraction: float = 0.1,
                  eval_size: int | None = None) -> GhostVerdict:
    """The verdict on one ghost (see the module docstring)."""
    if not 0 < d_fraction < 1 or not b_fraction > 0:
        raise ValueError(f"d_fraction must be in (0, 1) and b_fraction > 0; got {d_fraction}, {b_fraction}")
    g = outcome
    thresholds = {
        "D": (g.D, _largest((d_fraction * g.error if _finite(g.error) else None,
                             f"{d_fraction:g} × main eval error"),
                            (2.0 / eval_size if eval_size and not g.regression else None, "two eval examples"),
                            (g.control_D, "the ε = 0 control's D"))),
        "B_linear": (g.B_linear, _largest((b_fraction * g.loss if _finite(g.loss) and g.loss > 0 else None,
                                           f"{b_fraction:g} × main eval loss"),
                                          (g.B_scale, "B_linear between consecutive main-run snapshots"),
                                          (g.control_B_linear, "the ε = 0 control's B_linear"))),
    }
    checks: dict[str, dict[str, Any]] = {}
    above_any, all_low = False, True
    for name, (value, (threshold, source)) in thresholds.items():
        if not _finite(value) or not math.isfinite(threshold):
            continue
        above = bool(value > threshold)
        low = bool(value <= threshold / 2)
        checks[name] = {"value": float(value), "threshold": threshold, "source": source, "above": above}
        above_any |= above
        all_low &= low
    if g.stopped_diverged:
        verdict = "diverged"
        checks["stopped"] = {"value": None, "threshold": None, "source": "non-finite values or exploding norm",
                             "above": True}
    elif not checks:
        verdict = "borderline"
    else:
        verdict = "diverged" if above_any else "close" if all_low else "borderline"
    return GhostVerdict(g.spawn_step, g.final_step, verdict, checks, g.ghost)
