"""What every figure shares: the Agg rendering, the step axis, the transition markers, the "exactly 0" band.

Figures are built on ``matplotlib.figure.Figure`` objects directly — never through ``pyplot`` — and rendered by
the Agg canvas that ``savefig`` picks for PNG, so nothing here touches the user's pyplot state or backend, and no
window can open. :func:`capture_figures` lets a test read every figure (its axes, labels, artists) right before
it is rendered.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import matplotlib
import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FixedLocator, FuncFormatter

from dynprobe.analysis.changepoint import log_time

DPI = 90
#: The one marker of the run's transition (the headline's chaos estimate), the same in every figure.
TRANSITION_STYLE = {"color": "#d62728", "linestyle": "--", "linewidth": 1.4}
#: A single method's own estimate, labelled with the method (never mistaken for the headline).
METHOD_STYLE = {"color": "#7f7f7f", "linestyle": ":", "linewidth": 1.3}
#: Cells and bands whose value is exactly 0 (the ε = 0 control): hatched, with a legend entry.
ZERO_HATCH = {"hatch": "////", "edgecolor": "#4a4a4a", "facecolor": "#ffffff", "linewidth": 0.0}
ZERO_LABEL = "exactly 0"

_captured: list[list[Figure]] = []


@contextlib.contextmanager
def capture_figures() -> Iterator[list[Figure]]:
    """Collect every figure this package renders inside the ``with`` block (for tests: axes labels, titles)."""
    figures: list[Figure] = []
    _captured.append(figures)
    try:
        yield figures
    finally:
        _captured.remove(figures)


def png(figure: Figure) -> bytes:
    for figures in _captured:
        figures.append(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def new_figure(width: float, height: float, *, left: float = 0.8, right: float = 0.25, bottom: float = 0.55,
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


def mark_transition(ax, axis: StepAxis, step: int | None, *, horizontal: bool = False,  # noqa: ANN001
                    label: bool = True) -> None:
    """The run's transition (the headline's transition step), drawn the same way in every figure."""
    if step is None:
        return
    ax.axvline(axis(step), **TRANSITION_STYLE, label=f"transition (headline) ≈ {step}" if label else None)
    if horizontal:
        ax.axhline(axis(step), **TRANSITION_STYLE)


def mark_method(ax, axis: StepAxis, step: int | None, method: str) -> None:  # noqa: ANN001
    """One method's own estimate, labelled as such."""
    if step is not None:
        ax.axvline(axis(step), **METHOD_STYLE, label=f"{method} estimate {step}")


def norm_for(values: np.ndarray, log_color: bool | None) -> Normalize:
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    if log_color is None:
        log_color = positive.size > 0 and positive.max() / positive.min() > 1e3
    if log_color and positive.size:
        return LogNorm(vmin=positive.min(), vmax=max(positive.max(), positive.min() * 10))
    if finite.size == 0:
        return Normalize(0, 1)
    low, high = float(finite.min()), float(finite.max())
    if high > low:
        return Normalize(low, high)
    return Normalize(low, low + max(abs(low), 1.0))  # a constant map (all 0): a unit scale, not one of width 1e-12


def colormap(name: str):  # noqa: ANN201 - a matplotlib Colormap
    return matplotlib.colormaps[name].with_extremes(bad="#e6e6e6")


def hatch_zero_cells(ax, x_edges: np.ndarray, y_edges: np.ndarray, values: np.ndarray) -> bool:  # noqa: ANN001
    """Hatch the cells of a log-coloured map whose value is exactly 0 (a log scale cannot colour them; grey would
    read as "not computed"). Returns whether any was drawn."""
    rows, cols = np.nonzero(np.asarray(values) == 0)
    for i, j in zip(rows, cols):
        ax.add_patch(Rectangle((x_edges[j], y_edges[i]), x_edges[j + 1] - x_edges[j], y_edges[i + 1] - y_edges[i],
                               **ZERO_HATCH))
    return rows.size > 0


def zero_legend_handle() -> Patch:
    return Patch(**ZERO_HATCH, label=ZERO_LABEL)


def wants_log_y(values: np.ndarray, log_y: bool | None) -> bool:
    """``log_y`` when given; otherwise a log axis when the positive values span more than 100× or the largest
    is more than 10× the median (a loss spike would flatten every other point on a linear axis)."""
    if log_y is not None:
        return bool(log_y)
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite) & (finite > 0)]
    if finite.size < 2:
        return False
    return bool(finite.max() / finite.min() > 100 or finite.max() > 10 * np.median(finite))
