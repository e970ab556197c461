"""The report's figures (matplotlib, Agg), each a pure function of plain arrays returning PNG bytes.

Steps are on the axes (the paper plots iterations); ``log_steps=True`` uses the log-time axis ``log(1 + t/unit)``
with ticks labelled in steps. Every figure marks the run's transition (the headline) with the same red
dashed line; a single method's estimate is a grey dotted line labelled with the method. NaN cells of heatmaps are
light grey ("not computed"); exact zeros on log scales are hatched and labelled "exactly 0".
"""
from ._base import DPI, METHOD_STYLE, TRANSITION_STYLE, StepAxis, capture_figures, plain, wants_log_y
from .chaos import plateau_figure, separation_figure
from .cone import cone_curves_figure, embedding_figure, lag_curves_figure, velocity_figure
from .curves import curves_figure, overlay_figure, peaks_figure, spread_figure, switching_figure
from .maps import chaos_maps_figure, heatmap_figure, layer_heatmap_figure

__all__ = [
    "DPI", "METHOD_STYLE", "TRANSITION_STYLE", "StepAxis", "capture_figures", "chaos_maps_figure",
    "cone_curves_figure", "curves_figure", "embedding_figure", "heatmap_figure",
    "lag_curves_figure", "layer_heatmap_figure", "overlay_figure", "peaks_figure", "plain", "plateau_figure",
    "separation_figure",
    "spread_figure", "switching_figure", "velocity_figure", "wants_log_y",
]
