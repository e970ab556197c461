"""The cone figures read back before rendering (dynprobe.report.figures.cone): one curve per reference step at its
own steps, a log axis exactly when the positive distances span more than 100× (then zeros are left out), and the
kernel trajectory's start and the headline's transition marked on the nearest kernel."""
from __future__ import annotations

import numpy as np

from dynprobe.report.figures._base import capture_figures
from dynprobe.report.figures.cone import cone_curves_figure, embedding_figure


def test_cone_curves_are_the_distances_to_each_reference_and_switch_to_log_beyond_a_hundredfold():
    t = np.array([0, 10, 20, 40])
    narrow = [(10, t, np.array([0.2, 0.0, 0.1, 0.15])), (20, t[1:], np.array([0.1, 0.0, 0.05]))]
    with capture_figures() as figures:
        cone_curves_figure(narrow)
    ax = figures[0].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines() if line.get_label().startswith("τ")}
    np.testing.assert_array_equal(lines["τ = 10"].get_xdata(), t)  # linear axis: the zero stays
    np.testing.assert_array_equal(lines["τ = 20"].get_ydata(), [0.1, 0.0, 0.05])
    assert ax.get_yscale() == "linear"
    wide = [(10, t, np.array([0.5, 0.0, 1e-3, 2e-3]))]
    with capture_figures() as figures:
        cone_curves_figure(wide)
    ax = figures[0].axes[0]
    (line,) = [line for line in ax.get_lines() if line.get_label() == "τ = 10"]
    assert ax.get_yscale() == "log" and ax.get_ylabel().endswith("(log scale)")
    np.testing.assert_array_equal(line.get_xdata(), [0, 20, 40])


def test_the_embedding_marks_the_first_kernel_and_the_kernel_nearest_the_transition():
    steps = np.array([0, 10, 30, 100])
    coordinates = np.array([[0.0, 0.0], [1.0, 0.5], [2.0, 0.4], [2.5, 0.3]])
    with capture_figures() as figures:
        embedding_figure(steps, coordinates, (0.8, 0.15), transition=15)  # nearer 10 than 30
    ax = figures[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["H(θ) at step 0", "transition (headline) ≈ 15: kernel at step 10"]
    marker = [c for c in ax.collections if c.get_label() == labels[1]][0]
    np.testing.assert_array_equal(marker.get_offsets(), [[1.0, 0.5]])
    assert ax.get_xlabel() == "axis 1 (80% of variance)" and ax.get_ylabel() == "axis 2 (15%)"
