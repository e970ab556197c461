"""Curve figures read back from the matplotlib objects before rendering (dynprobe.report.figures.curves): the plotted
points are the given values at the given steps, all-NaN series are left out, the log axis switches on as
documented, and the transition is marked at its step."""
from __future__ import annotations

import numpy as np

from dynprobe.report.figures._base import capture_figures
from dynprobe.report.figures.curves import curves_figure, overlay_figure

from .drawn import transition_lines

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_curves_plot_the_values_at_their_steps_and_mark_the_transition():
    steps = np.array([0, 10, 20, 40])
    loss, accuracy = np.array([2.0, 1.5, 1.1, 0.9]), np.array([np.nan] * 4)
    with capture_figures() as figures:
        data = curves_figure(steps, {"loss": loss, "nothing": accuracy}, ylabel="loss", title="t", transition=20)
    assert data.startswith(PNG_SIGNATURE)
    (ax,) = figures[0].axes
    plotted = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("transition")}
    assert list(plotted) == ["loss"]  # an all-NaN series is not drawn
    np.testing.assert_array_equal(plotted["loss"].get_xdata(), steps)
    np.testing.assert_array_equal(plotted["loss"].get_ydata(), loss)
    assert transition_lines(ax) == [("vertical", 20.0)] and ax.get_yscale() == "linear"


def test_a_log_y_axis_is_chosen_when_the_values_span_more_than_a_hundredfold():
    steps = np.arange(5)
    with capture_figures() as figures:
        curves_figure(steps, {"loss": np.array([500.0, 50.0, 5.0, 1.0, 2.0])}, ylabel="loss", title="t", log_y=None)
        curves_figure(steps, {"loss": np.array([50.0, 20.0, 5.0, 1.0, 2.0])}, ylabel="loss", title="t", log_y=None)
    wide, narrow = (f.axes[0] for f in figures)
    assert wide.get_yscale() == "log" and wide.get_ylabel() == "loss (log scale)"
    assert narrow.get_yscale() == "linear" and narrow.get_ylabel() == "loss"


def test_overlays_keep_each_runs_own_steps():
    curves = [("a", np.array([0, 5, 10]), np.array([1.0, 2.0, 3.0])), ("b", np.array([0, 7]), np.array([4.0, 5.0])),
              ("empty", np.array([]), np.array([]))]
    with capture_figures() as figures:
        overlay_figure(curves, ylabel="C", title="t")
    lines = {line.get_label(): line for line in figures[0].axes[0].get_lines()}
    assert set(lines) == {"a", "b"}
    np.testing.assert_array_equal(lines["b"].get_xdata(), [0, 7])
    np.testing.assert_array_equal(lines["b"].get_ydata(), [4.0, 5.0])
