"""The report's figures (matplotlib, Agg), each a pure function of plain arrays returning PNG bytes.

Figures are built on ``matplotlib.figure.Figure`` objects directly — never through ``pyplot`` — and rendered by
the Agg canvas that ``savefig`` picks for PNG, so nothing here touches the user's pyplot state or backend, and no
window can open. Steps are on the axes (the paper plots
iterations); ``log_steps=True`` uses the log-time axis ``log(1 + t/unit)`` with ticks labelled in steps.
NaN cells of heatmaps are drawn light grey ("not computed").
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.colors import ListedColormap, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter

from dynprobe.analysis.changepoint import log_time

__all__ = [
    "chaos_maps_figure", "cone_curves_figure", "curves_figure", "embedding_figure", "heatmap_figure",
    "lag_curves_figure", "overlay_figure", "peaks_figure", "switching_figure", "velocity_figure",
]

DPI = 90
TRANSITION_STYLE = {"color": "#d62728", "linestyle": "--", "linewidth": 1.2}


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _figure(width: float, height: float, *, left: float = 0.8, right: float = 0.25, bottom: float = 0.55,
            top: float = 0.35, wspace: float | None = None, hspace: float | None = None) -> Figure:
    """A figure with fixed margins in inches: half the cost of ``bbox_inches="tight"`` (which draws twice), and
    every label of these layouts fits."""
    figure = Figure(figsize=(width, height))
    figure.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                           wspace=wspace, hspace=hspace)
    return figure


class StepAxis:
    """Maps steps to plot coordinates: identity, or log-time ``log(1 + t/unit)`` with step-labelled ticks."""

    def __init__(self, steps: np.ndarray, log_steps: bool) -> None:
        steps = np.asarray(steps, dtype=np.float64)
        positive = steps[steps > 0]
        self.unit = float(positive.min()) if positive.size else 1.0
        self.log = bool(log_steps)

    def __call__(self, steps: np.ndarray | float) -> np.ndarray:
        steps = np.asarray(steps, dtype=np.float64)
        return log_time(steps, self.unit) if self.log else steps

    def edges(self, steps: np.ndarray) -> np.ndarray:
        """Cell edges around each step (midpoints in plot coordinates) for pcolormesh."""
        x = self(steps)
        if x.size == 1:
            return np.array([x[0] - 0.5, x[0] + 0.5])
        middle = (x[1:] + x[:-1]) / 2
        return np.concatenate([[x[0] - (middle[0] - x[0])], middle, [x[-1] + (x[-1] - middle[-1])]])

    def format(self, axis) -> None:  # noqa: ANN001 - a matplotlib Axis
        if not self.log:
            return
        low, high = axis.get_view_interval()
        top = np.expm1(high) * self.unit
        ticks = [0.0] + [self.unit * 10**k for k in range(0, 12) if self.unit * 10**k <= top * 1.0001]
        axis.set_major_locator(FixedLocator(self([t for t in ticks if self(t) >= low - 1e-9])))
        axis.set_major_formatter(FuncFormatter(lambda x, _: f"{np.expm1(x) * self.unit:,.0f}"))


def plain(text: str) -> str:
    """A run-provided string shown verbatim by matplotlib (``$`` would start mathtext and can fail to parse)."""
    return str(text).replace("$", r"\$")


def _mark_transition(ax, axis: StepAxis, step: int | None, *, horizontal: bool = False) -> None:  # noqa: ANN001
    if step is None:
        return
    ax.axvline(axis(step), **TRANSITION_STYLE, label=f"transition ≈ {step}")
    if horizontal:
        ax.axhline(axis(step), **TRANSITION_STYLE)


def _norm(values: np.ndarray, log_color: bool | None) -> Normalize:
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    if log_color is None:
        log_color = positive.size > 0 and positive.max() / positive.min() > 1e3
    if log_color and positive.size:
        return LogNorm(vmin=positive.min(), vmax=max(positive.max(), positive.min() * 10))
    if finite.size == 0:
        return Normalize(0, 1)
    low, high = float(finite.min()), float(finite.max())
    return Normalize(low, high if high > low else low + 1e-12)


def heatmap_figure(steps: np.ndarray, matrix: np.ndarray, *, title: str, label: str, log_steps: bool = False,
                   log_color: bool | None = None, transition: int | None = None) -> bytes:
    """A T×T interval map (Figs. 3–4 style) with steps on both axes; log colour when values span > 3 decades."""
    axis = StepAxis(steps, log_steps)
    matrix = np.asarray(matrix, dtype=np.float64)
    shown = matrix.copy()
    norm = _norm(shown[~np.eye(len(shown), dtype=bool)] if shown.size else shown, log_color)
    if isinstance(norm, LogNorm):
        shown[shown <= 0] = np.nan
    figure = _figure(4.8, 3.9, right=0.65)
    ax = figure.add_subplot()
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("#e6e6e6")
    edges = axis.edges(steps)
    mesh = ax.pcolormesh(edges, edges, np.ma.masked_invalid(shown), cmap=cmap, norm=norm, rasterized=True)
    figure.colorbar(mesh, ax=ax, label=label)
    ax.set_xlabel("step j")
    ax.set_ylabel("step i")
    ax.set_title(title, fontsize=10)
    ax.invert_yaxis()
    axis.format(ax.xaxis)
    axis.format(ax.yaxis)
    if transition is not None:
        _mark_transition(ax, axis, transition, horizontal=True)
    return _png(figure)


def chaos_maps_figure(steps: np.ndarray, maps: Mapping[str, np.ndarray], row_labels: Sequence[str], *,
                      log_steps: bool = False, transition: int | None = None) -> bytes:
    """Fig. 3: one panel per metric, rows = ghosts by spawn step (control marked), columns = snapshots t1."""
    axis = StepAxis(steps, log_steps)
    names = list(maps)
    rows = (len(names) + 1) // 2
    figure = _figure(5.0 * min(len(names), 2), 0.9 + (0.3 * len(row_labels) + 1.3) * rows, left=1.2, right=0.6,
                     wspace=0.75, hspace=0.55)
    cmap = matplotlib.colormaps["magma"].copy()
    cmap.set_bad("#e6e6e6")
    for k, name in enumerate(names):
        ax = figure.add_subplot(rows, min(len(names), 2), k + 1)
        values = np.asarray(maps[name], dtype=np.float64)
        norm = _norm(values, True if name in ("C", "L2") else False)
        shown = values.copy()
        if isinstance(norm, LogNorm):
            shown[shown <= 0] = np.nan
        y_edges = np.arange(len(row_labels) + 1) - 0.5
        mesh = ax.pcolormesh(axis.edges(steps), y_edges, np.ma.masked_invalid(shown), cmap=cmap, norm=norm,
                             rasterized=True)
        figure.colorbar(mesh, ax=ax, label=name)
        ax.set_yticks(np.arange(len(row_labels)))
        ax.set_yticklabels(row_labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("t1 (step of comparison)")
        ax.set_title(f"main vs ghost: {name}", fontsize=10)
        axis.format(ax.xaxis)
        _mark_transition(ax, axis, transition)
    return _png(figure)


def curves_figure(steps: np.ndarray, series: Mapping[str, np.ndarray], *, ylabel: str, title: str,
                  log_steps: bool = False, log_y: bool = False, transition: int | None = None,
                  secondary: Mapping[str, np.ndarray] | None = None, secondary_label: str = "") -> bytes:
    """Curves against steps (loss/accuracy); ``secondary`` curves on a right-hand axis."""
    axis = StepAxis(steps, log_steps)
    figure = _figure(6.0, 3.2, right=0.9 if secondary else 0.25)
    ax = figure.add_subplot()
    x = axis(steps)
    for name, values in series.items():
        values = np.asarray(values, dtype=np.float64)
        if np.isfinite(values).any():
            ax.plot(x, values, marker=".", markersize=3, linewidth=1.2, label=name)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if secondary:
        right = ax.twinx()
        for name, values in secondary.items():
            right.plot(x, values, linewidth=1.2, color="#2ca02c", label=name)
        right.set_ylabel(secondary_label)
        right.legend(loc="center right", fontsize=8)
    axis.format(ax.xaxis)
    _mark_transition(ax, axis, transition)
    ax.legend(fontsize=8, loc="best")
    return _png(figure)


def overlay_figure(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], *, ylabel: str, title: str,
                   log_steps: bool = False, log_y: bool = False) -> bytes:
    """Curves with their own step arrays on one axis (``dynprobe compare``): ``(label, steps, values)``."""
    every = np.concatenate([np.asarray(s, dtype=np.float64) for _, s, _ in curves]) if curves else np.zeros(1)
    axis = StepAxis(every, log_steps)
    figure = _figure(6.0, 3.2)
    ax = figure.add_subplot()
    for label, steps, values in curves:
        values = np.asarray(values, dtype=np.float64)
        if values.size and np.isfinite(values).any():
            ax.plot(axis(steps), values, marker=".", markersize=3, linewidth=1.2, label=plain(label))
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    axis.format(ax.xaxis)
    ax.legend(fontsize=8)
    return _png(figure)


def cone_curves_figure(curves: Sequence[tuple[int, np.ndarray, np.ndarray]], *, log_steps: bool = False,
                       transition: int | None = None) -> bytes:
    """Fig. 5a: S(θ_t, θ_τ) against t, one curve per reference step τ (``(tau, t, values)``)."""
    every = np.concatenate([t for _, t, _ in curves]) if curves else np.zeros(1)
    axis = StepAxis(every, log_steps)
    figure = _figure(6.0, 3.2)
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
    ax.set_ylabel("S(θ_t, θ_τ)")
    ax.set_title("Kernel distance to reference kernels (Fig. 5a)", fontsize=10)
    axis.format(ax.xaxis)
    _mark_transition(ax, axis, transition)
    ax.legend(fontsize=8)
    return _png(figure)


def lag_curves_figure(curves: Sequence[tuple[int, np.ndarray, np.ndarray]], *, log_steps: bool = False,
                      transition: int | None = None) -> bytes:
    """Fig. 5b: S(θ_t, θ_t+dt) against t, one curve per lag dt (``(dt, t, values)``), log y."""
    every = np.concatenate([t for _, t, _ in curves]) if curves else np.zeros(1)
    axis = StepAxis(every, log_steps)
    figure = _figure(6.0, 3.2)
    ax = figure.add_subplot()
    for dt, t, values in curves:
        positive = values > 0
        ax.plot(axis(t[positive]), values[positive], marker=".", markersize=3, linewidth=1.2, label=f"dt = {dt}")
    ax.set_yscale("log")
    ax.set_xlabel("step t")
    ax.set_ylabel("S(θ_t, θ_t+dt)")
    ax.set_title("Kernel distance between nearby kernels (Fig. 5b)", fontsize=10)
    axis.format(ax.xaxis)
    _mark_transition(ax, axis, transition)
    ax.legend(fontsize=8)
    return _png(figure)


def embedding_figure(steps: np.ndarray, coordinates: np.ndarray, explained: tuple[float, float], *,
                     transition: int | None = None,
                     title: str = "Kernel trajectory, classical MDS on S (Fig. 5c)") -> bytes:
    """Fig. 5c: the kernel trajectory in 2-D, darker = later, the initial kernel a black star."""
    figure = _figure(4.8, 4.0, right=0.7)
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
                   edgecolors=TRANSITION_STYLE["color"], linewidths=1.5, zorder=4, label=f"step {int(order[k])}")
    colorbar = figure.colorbar(points, ax=ax, label="step")
    ticks = sorted({t for t in (0, 10, 100, 1000, 10000, 100000) if t <= 0.7 * order.max()} | {int(order.max())})
    colorbar.set_ticks(log_time(np.array(ticks, dtype=np.float64), unit))
    colorbar.set_ticklabels([f"{t:,}" for t in ticks])
    ax.set_xlabel(f"axis 1 ({explained[0]:.0%} of variance)")
    ax.set_ylabel(f"axis 2 ({explained[1]:.0%})")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.set_aspect("equal", adjustable="datalim")
    return _png(figure)


def velocity_figure(t: np.ndarray, v: np.ndarray, *, split_step: int | None, before: Sequence[float] | None,
                    after: Sequence[float] | None, unit: float, fit_from_step: int | None,
                    log_steps: bool = True) -> bytes:
    """Kernel velocity v(t) (log-log) with the two fitted segments of the change-point estimate."""
    figure = _figure(6.0, 3.2)
    ax = figure.add_subplot()
    t, v = np.asarray(t, dtype=np.float64), np.asarray(v, dtype=np.float64)
    axis = StepAxis(t, log_steps)
    ax.plot(axis(t), v, marker=".", markersize=4, linewidth=0.8, color="#1f77b4", label="v(t) = S(t_k, t_k+1)/Δt")
    if split_step is not None and before is not None and after is not None:
        x = log_time(t, unit)
        first = t >= (fit_from_step if fit_from_step is not None else t[0])
        left, right = first & (t < split_step), t >= split_step
        for mask, (a, b) in ((left, before), (right, after)):
            if mask.any():
                ax.plot(axis(t[mask]), np.exp(a + b * x[mask]), color="#ff7f0e", linewidth=2)
        _mark_transition(ax, axis, split_step)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("kernel velocity")
    ax.set_title("Kernel velocity and its change point", fontsize=10)
    axis.format(ax.xaxis)
    ax.legend(fontsize=8)
    return _png(figure)


def peaks_figure(steps: np.ndarray, rows: Sequence[tuple[str, np.ndarray, np.ndarray, int]], *, title: str,
                 ylabel: str, log_steps: bool = False, transition: int | None = None, log_y: bool = False) -> bytes:
    """Evidence of the C-peak estimates: a few rows ``(label, t, values, peak step)`` with their peaks marked."""
    axis = StepAxis(steps, log_steps)
    figure = _figure(6.0, 3.2)
    ax = figure.add_subplot()
    for label, t, values, peak in rows:
        line = ax.plot(axis(t), values, linewidth=1.1, label=label)
        k = int(np.argmin(np.abs(np.asarray(t) - peak)))
        ax.plot(axis(t[k]), values[k], marker="o", color=line[0].get_color(), markersize=5)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("t1")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    axis.format(ax.xaxis)
    _mark_transition(ax, axis, transition)
    ax.legend(fontsize=7, ncol=2)
    return _png(figure)


def switching_figure(switching: Mapping[str, np.ndarray], *, transition: int | None = None) -> bytes:
    """Fig. 6: eval accuracy and loss of θ_std→lin(T; t) against the switch step t."""
    figure = _figure(6.0, 3.2, right=0.8)
    ax = figure.add_subplot()
    t = np.asarray(switching["switch_step"], dtype=np.float64)
    axis = StepAxis(t, False)
    ax.plot(t, switching["eval_accuracy"], marker="o", color="#1f77b4", label="eval accuracy")
    ax.set_xlabel("switch step t (standard → linearized training)")
    ax.set_ylabel("eval accuracy")
    right = ax.twinx()
    right.plot(t, switching["eval_loss"], marker="s", color="#ff7f0e", label="eval loss")
    right.set_ylabel("eval loss")
    _mark_transition(ax, axis, transition)
    horizon = int(np.max(switching["total_steps"]))
    ax.set_title(f"Switching to linearized training until T = {horizon} (Fig. 6)", fontsize=10)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="center right")
    return _png(figure)
