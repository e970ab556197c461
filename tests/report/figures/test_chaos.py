"""The ghosts' separation figure read back before rendering (dynprobe.report.figures.chaos): each perturbed ghost
is drawn as δ(t) = l2 / ‖ε‖ at its own steps (zeros left out of the log axis), and an exact ε = 0 control is a
hatched "exactly 0" band rather than a curve."""
from __future__ import annotations

import numpy as np
from matplotlib.patches import Rectangle

from dynprobe.analysis import SeparationCurve
from dynprobe.report.figures._base import capture_figures
from dynprobe.report.figures.chaos import separation_figure


def curve(ghost: int, spawn: int, norm: float, l2: list[float], *, control: bool = False) -> SeparationCurve:
    steps = np.arange(spawn, spawn + len(l2), dtype=np.int64)
    return SeparationCurve(ghost, spawn, norm, steps, np.asarray(l2, dtype=np.float64), control=control)


def test_each_ghost_is_its_separation_over_its_own_perturbation_and_an_exact_control_is_a_band():
    ghosts = [curve(0, 0, 1e-3, [1e-3, 0.0, 4e-3, 1e-1]), curve(1, 5, 2e-3, [2e-3, 3e-3, 5e-3]),
              curve(2, 0, 0.0, [0.0, 0.0, 0.0, 0.0], control=True)]
    with capture_figures() as figures:
        separation_figure(ghosts, transition=2)
    ax = figures[0].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_array_equal(lines["t0 = 0"].get_xdata(), [0, 2, 3])  # δ = 0 cannot sit on a log axis
    np.testing.assert_allclose(lines["t0 = 0"].get_ydata(), [1.0, 4.0, 100.0])
    np.testing.assert_array_equal(lines["t0 = 5"].get_xdata(), [5, 6, 7])
    np.testing.assert_allclose(lines["t0 = 5"].get_ydata(), [1.0, 1.5, 2.5])
    assert not any("control" in label for label in lines)  # an exact control is no curve ...
    bands = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_hatch()]
    assert len(bands) == 1  # ... but a hatched band, named in the legend
    assert "control ε = 0: separation exactly 0" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert ax.get_yscale() == "log"


def test_a_drifting_control_is_drawn_relative_to_the_smallest_perturbation():
    ghosts = [curve(0, 0, 1e-3, [1e-3, 2e-3]), curve(1, 0, 4e-3, [4e-3, 8e-3]),
              curve(2, 0, 0.0, [0.0, 5e-6], control=True)]
    with capture_figures() as figures:
        separation_figure(ghosts)
    lines = {line.get_label(): line for line in figures[0].axes[0].get_lines()}
    control = lines["control ε = 0 (l2 / smallest ‖ε‖)"]
    np.testing.assert_array_equal(control.get_xdata(), [1])
    np.testing.assert_allclose(control.get_ydata(), [5e-3])
