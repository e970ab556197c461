"""Sensitivity to a tiny perturbation: each ghost's separation curve and its growth rate against the spawn step.

Separation is drawn on a log axis, as δ(t) = l2(t) / ‖ε‖ (1 at the spawn). The ε = 0 control has no δ (its ‖ε‖ is
0); when its separation is exactly 0 it is drawn as a hatched band labelled "exactly 0" at the bottom of the axis,
otherwise as its l2 relative to the smallest perturbation (the noise floor of a vectorized shadow).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.patches import Rectangle

from dynprobe.analysis.sensitivity import SeparationCurve

from ._base import (
    ZERO_HATCH,
    StepAxis,
    mark_transition,
    new_figure,
    png,
    zero_legend_handle,
)

__all__ = ["plateau_figure", "separation_figure"]


def separation_figure(curves: Sequence[SeparationCurve], *, transition: int | None = None, log_steps: bool = False,
                      title_suffix: str = "") -> bytes:
    """δ(t) = ‖θ'_t − θ_t‖ / ‖ε‖ of every perturbed ghost against t (log y), and the control's separation."""
    perturbed = [c for c in curves if not c.control and c.realized_norm > 0 and c.steps.size]
    control = next((c for c in curves if c.control), None)
    every = np.concatenate([c.steps for c in curves if c.steps.size]) if curves else np.zeros(1)
    axis = StepAxis(every, log_steps)
    figure = new_figure(6.4, 3.6, right=0.3)
    ax = figure.add_subplot()
    lowest = min((float(np.min(c.delta[c.delta > 0])) for c in perturbed if np.any(c.delta > 0)), default=1.0)
    for c in perturbed:
        positive = c.delta > 0
        ax.plot(axis(c.steps[positive]), c.delta[positive], linewidth=1.1, label=f"t0 = {c.spawn_step}")
    zero_band = False
    if control is not None and control.steps.size:
        if np.all(control.l2 == 0):
            zero_band = True
        else:
            smallest = min((c.realized_norm for c in perturbed), default=1.0)
            positive = control.l2 > 0
            ax.plot(axis(control.steps[positive]), control.l2[positive] / smallest, color="#555555", linewidth=1.0,
                    linestyle="-.", label="control ε = 0 (l2 / smallest ‖ε‖)")
    ax.set_yscale("log")
    if zero_band:
        low, high = ax.get_ylim()
        bottom = min(low, lowest / 10)
        band_top = bottom * 3
        ax.set_ylim(bottom, max(high, band_top * 10))
        x0, x1 = axis(control.steps[0]), axis(control.steps[-1])
        ax.add_patch(Rectangle((x0, bottom), x1 - x0, band_top - bottom, **ZERO_HATCH))
    mark_transition(ax, axis, transition)
    ax.set_xlabel("step t")
    ax.set_ylabel("δ(t) = ‖θ'_t − θ_t‖ / ‖ε‖ (log scale)")
    ax.set_title(f"How much each ghost's perturbation has grown{title_suffix}", fontsize=10)
    axis.format(ax.xaxis)
    handles, labels = ax.get_legend_handles_labels()
    if zero_band:
        handles.append(zero_legend_handle())
        handles[-1].set_label("control ε = 0: separation exactly 0")
    ax.legend(handles=handles, fontsize=7, ncol=2, loc="best")
    return png(figure)


def plateau_figure(ghosts: Sequence[Mapping[str, object]], *, chaotic_level: float | None,
                   threshold: float | None, bracket: tuple[int | None, int | None] | None,
                   transition: int | None = None, log_steps: bool = False) -> bytes:
    """Each ghost's plateau level (median ‖θ' − θ‖ at the end of its life) against its spawn step t0: filled when
    saturated, open while still growing; the chaotic level, the threshold K× below it and the chaos estimate's
    bracket marked (the ``"chaos"`` estimate's evidence rows, :mod:`dynprobe.analysis.saturation`)."""
    rows = [g for g in ghosts if isinstance(g.get("level_L2"), (int, float))]
    spawns = np.asarray([float(g["spawn_step"]) for g in rows] or [0.0])
    axis = StepAxis(spawns, log_steps)
    figure = new_figure(6.4, 3.4, right=0.3)
    ax = figure.add_subplot()
    for saturated, style in ((True, {"marker": "o"}), (False, {"marker": "o", "markerfacecolor": "none"})):
        chosen = [g for g in rows if bool(g.get("saturated")) == saturated and float(g["level_L2"]) > 0]
        if chosen:
            ax.plot(axis(np.array([float(g["spawn_step"]) for g in chosen])),
                    [float(g["level_L2"]) for g in chosen], linestyle="none", color="#1f77b4", **style,
                    label="saturated" if saturated else "still growing at the end")
    if chaotic_level:
        ax.axhline(chaotic_level, color="#d62728", linewidth=1.0, label=f"chaotic level {chaotic_level:.3g}")
    if threshold:
        ax.axhline(threshold, color="#ff7f0e", linewidth=1.0, linestyle="--", label=f"threshold {threshold:.3g}")
    if bracket is not None and bracket[0] is not None and bracket[1] is not None:
        ax.axvspan(axis(bracket[0]), axis(bracket[1]), color="#9e9e9e", alpha=0.2,
                   label=f"chaos estimate: ({bracket[0]}, {bracket[1]}]")
    mark_transition(ax, axis, transition)
    ax.set_yscale("log")
    ax.set_xlabel("spawn step t0")
    ax.set_ylabel("plateau level ‖θ' − θ‖₂")
    ax.set_title("Where each ghost's separation ends up, by spawn step", fontsize=10)
    axis.format(ax.xaxis)
    ax.legend(fontsize=7, loc="best")
    return png(figure)
