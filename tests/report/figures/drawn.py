"""What a figure drew, read back from its matplotlib axes (shared by the figure tests)."""
from __future__ import annotations

from dynprobe.report.figures._base import TRANSITION_STYLE


def transition_lines(ax) -> list[tuple[str, float]]:  # noqa: ANN001
    """("vertical", x) / ("horizontal", y) of each line drawn in the transition's style."""
    marked = []
    for line in ax.get_lines():
        if line.get_color() == TRANSITION_STYLE["color"] and line.get_linestyle() == TRANSITION_STYLE["linestyle"]:
            x, y = line.get_xdata(), line.get_ydata()
            marked.append(("vertical", float(x[0])) if x[0] == x[1] else ("horizontal", float(y[0])))
    return marked
