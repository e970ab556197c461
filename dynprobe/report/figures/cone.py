"""The cone (the two-phase paper's Fig. 5): S(θ_t, θ_τ) per reference τ, S(θ_t, θ_t+dt) per lag, the kernel
trajectory embedded in 2-D, and the kernel velocity at a fixed lag."""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.colors import ListedColormap

from dynprobe.analysis.changepoint import log_time

from ._base import TRANSITION_STYLE, StepAxis, mark_method, mark_transition, new_figure, png

__all__ = ["cone_curves_figure", "embedding_figure", "lag_curves_figure", "velocity_figure"]


def cone_curves_figure(curves: Sequence[tuple[int, np.ndarray, np.ndarray]], *, log_steps: bool = False,
                       transition: int | None = None) -> bytes:
    """Fig. 5a: S(θ_t, θ_τ) against t, one curve per reference step τ (``(tau, t, values)``)."""
    every = np.concatenate([t for _, t, _ in curves]) if curves else np.zeros(1)
    axis = StepAxis(every, log_steps)
    figure = new_figure(6.0, 3.2)
    ax = figure.add_subplot()
    positive = np.concatenate([v[v > 0] for _, _, v in curves]) if curves else np.zeros(0)
    # Early distances can dwarf the cone's plateau by orders of magnitude: then a log axis shows both.
    log_y = positive.size > 1 and positive.max() / positive.min() > 100
    for tau, t, values in curves:
        keep = values > 0 if log_y else np.isfinite(values)
        line = ax.plot(axis(t[keep]), values[keep], marker=".", markersize=3, linewidth=1.2, label=f"τ = {tau}")
        ax.axvline(axis(tau), color=line[0].get_color(), linewidth=0.6, alpha=0.5)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step t")
    ax.set_ylabel("S(θ_t, θ_τ)" + (" (log scale)" if log_y else ""))
    ax.set_title("Kernel distance to reference kernels (Fig. 5a)", fontsize=10)
    axis.format(ax.xaxis)
    mark_transition(ax, axis, transition)
    ax.legend(fontsize=8)
    return png(figure)


def lag_curves_figure(curves: Sequence[tuple[int, np.ndarray, np.ndarray]], *, log_steps: bool = False,
                      transition: int | None = None) -> bytes:
    """Fig. 5b: S(θ_t, θ_t+dt) against t, one curve per lag dt (``(dt, t, values)``), log y."""
    every = np.concatenate([t for _, t, _ in curves]) if curves else np.zeros(1)
    axis = StepAxis(every, log_steps)
    figure = new_figure(6.0, 3.2)
    ax = figure.add_subplot()
    for dt, t, values in curves:
        positive = values > 0
        ax.plot(axis(t[positive]), values[positive], marker=".", markersize=3, linewidth=1.2, label=f"dt = {dt}")
    ax.set_yscale("log")
    ax.set_xlabel("step t")
    ax.set_ylabel("S(θ_t, θ_t+dt) (log scale)")
    ax.set_title("Kernel distance between nearby kernels (Fig. 5b)", fontsize=10)
    axis.format(ax.xaxis)
    mark_transition(ax, axis, transition)
    ax.legend(fontsize=8)
    return png(figure)


def embedding_figure(steps: np.ndarray, coordinates: np.ndarray, explained: tuple[float, float], *,
                     transition: int | None = None,
                     title: str = "Kernel trajectory, classical MDS on S (Fig. 5c)") -> bytes:
    """Fig. 5c: the kernel trajectory in 2-D, darker = later, the initial kernel a black star."""
    figure = new_figure(4.8, 4.0, right=0.7)
    ax = figure.add_subplot()
    order = np.asarray(steps, dtype=np.float64)
    ax.plot(coordinates[:, 0], coordinates[:, 1], color="#999999", linewidth=0.6, zorder=1)
    # Blues without its near-white start, so early kernels stay visible; darker = later (log-time).
    cmap = ListedColormap(matplotlib.colormaps["Blues"](np.linspace(0.25, 1.0, 256)))
    unit = float(order[order > 0].min()) if (order > 0).any() else 1.0
    points = ax.scatter(coordinates[:, 0], coordinates[:, 1], c=log_time(order, unit), cmap=cmap, s=18,
                        edgecolors="#333333", linewidths=0.3, zorder=2, vmin=0.0)
    ax.scatter(coordinates[:1, 0], coordinates[:1, 1], marker="*", s=160, color="black", zorder=3,
               label=f"H(θ) at step {int(order[0])}")
    if transition is not None:
        k = int(np.argmin(np.abs(order - transition)))
        ax.scatter(coordinates[k:k + 1, 0], coordinates[k:k + 1, 1], marker="D", s=50, facecolors="none",
                   edgecolors=TRANSITION_STYLE["color"], linewidths=1.5, zorder=4,
                   label=f"transition (headline) ≈ {transition}: kernel at step {int(order[k])}")
    colorbar = figure.colorbar(points, ax=ax, label="step")
    ticks = sorted({t for t in (0, 10, 100, 1000, 10000, 100000) if t <= 0.7 * order.max()} | {int(order.max())})
    colorbar.set_ticks(log_time(np.array(ticks, dtype=np.float64), unit))
    colorbar.set_ticklabels([f"{t:,}" for t in ticks])
    ax.set_xlabel(f"axis 1 ({explained[0]:.0%} of variance)")
    ax.set_ylabel(f"axis 2 ({explained[1]:.0%})")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.set_aspect("equal", adjustable="datalim")
    return png(figure)


def velocity_figure(t: np.ndarray, values: np.ndarray, *, lag: int, estimate: int | None,
                    threshold: float | None = None, transition: int | None = None, log_steps: bool = False) -> bytes:
    """The kernel velocity at a fixed lag, S(θ_t, θ_t+Δ) against t (log y), with the estimate's threshold and
    step (labelled as the kernel-velocity estimate) and the run's transition marker."""
    figure = new_figure(6.0, 3.2, left=0.9)
    ax = figure.add_subplot()
    t, values = np.asarray(t, dtype=np.float64), np.asarray(values, dtype=np.float64)
    axis = StepAxis(t, log_steps)
    positive = values > 0
    ax.plot(axis(t[positive]), values[positive], marker=".", markersize=4, linewidth=0.8, color="#1f77b4",
            label=f"S(θ_t, θ_t+{lag})")
    if threshold is not None:
        ax.axhline(threshold, color="#ff7f0e", linewidth=1.0, label=f"threshold {threshold:.2g}")
    mark_method(ax, axis, estimate, "kernel-velocity")
    mark_transition(ax, axis, transition)
    ax.set_yscale("log")
    ax.set_xlabel("step t")
    ax.set_ylabel("S(θ_t, θ_t+Δ) (log scale)")
    ax.set_title(f"Kernel velocity at a fixed lag Δ = {lag} step{'' if lag == 1 else 's'} (Fig. 5b)", fontsize=10)
    axis.format(ax.xaxis)
    ax.legend(fontsize=8)
    return png(figure)
