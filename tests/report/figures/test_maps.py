"""Heatmaps read back from the matplotlib objects before rendering (dynprobe.report.figures.maps): the cells hold the
matrix, a log colour scale when it spans decades (zeros left out, not coloured), and the transition marked on both
axes."""
from __future__ import annotations

import numpy as np
from matplotlib.colors import LogNorm

from dynprobe.report.figures._base import capture_figures
from dynprobe.report.figures.maps import heatmap_figure

from .drawn import transition_lines


def test_a_heatmap_shows_the_matrix_in_its_cells_on_a_log_scale_when_it_spans_decades():
    steps = np.array([0, 10, 30])
    matrix = np.array([[0.0, 1e-6, 1e-2], [1e-6, 0.0, 1e-4], [1e-2, 1e-4, 0.0]])
    with capture_figures() as figures:
        heatmap_figure(steps, matrix, title="C", label="C", transition=10)
    ax = figures[0].axes[0]
    mesh = ax.collections[0]
    cells = np.ma.filled(mesh.get_array(), np.nan).reshape(3, 3)
    off_diagonal = ~np.eye(3, dtype=bool)
    np.testing.assert_allclose(cells[off_diagonal], matrix[off_diagonal])
    assert np.isnan(cells[~off_diagonal]).all()  # zeros cannot be coloured on a log scale: left out
    assert isinstance(mesh.norm, LogNorm)
    assert transition_lines(ax) == [("vertical", 10.0), ("horizontal", 10.0)]
    flat = np.array([[0.0, 0.2, 0.3], [0.2, 0.0, 0.25], [0.3, 0.25, 0.0]])
    with capture_figures() as figures:
        heatmap_figure(steps, flat, title="D", label="D")
    assert not isinstance(figures[0].axes[0].collections[0].norm, LogNorm)
