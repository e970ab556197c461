"""Heatmaps: the interval maps C/S/D/B (Figs. 3–4), the chaos maps (Fig. 3), per-layer maps (layers × time).

Grey cells: not computed (NaN). Hatched cells: exactly 0 on a log colour scale (the ε = 0 control), with a legend
entry "exactly 0" — a log scale cannot colour a zero, and grey would read as missing data.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.colors import LogNorm

from ._base import (
    StepAxis,
    colormap,
    hatch_zero_cells,
    mark_transition,
    new_figure,
    norm_for,
    plain,
    png,
    zero_legend_handle,
)

__all__ = ["chaos_maps_figure", "heatmap_figure", "layer_heatmap_figure"]


def heatmap_figure(steps: np.ndarray, matrix: np.ndarray, *, title: str, label: str, log_steps: bool = False,
                   log_color: bool | None = None, transition: int | None = None) -> bytes:
    """A T×T interval map (Figs. 3–4 style) with steps on both axes; log colour when values span > 3 decades."""
    axis = StepAxis(steps, log_steps)
    matrix = np.asarray(matrix, dtype=np.float64)
    shown = matrix.copy()
    norm = norm_for(shown[~np.eye(len(shown), dtype=bool)] if shown.size else shown, log_color)
    if isinstance(norm, LogNorm):
        shown[shown <= 0] = np.nan
    figure = new_figure(4.8, 3.9, right=0.65)
    ax = figure.add_subplot()
    edges = axis.edges(steps)
    mesh = ax.pcolormesh(edges, edges, np.ma.masked_invalid(shown), cmap=colormap("viridis"), norm=norm,
                         rasterized=True)
    figure.colorbar(mesh, ax=ax, label=label)
    ax.set_xlabel("step j")
    ax.set_ylabel("step i")
    ax.set_title(title, fontsize=10)
    ax.invert_yaxis()
    axis.format(ax.xaxis)
    axis.format(ax.yaxis)
    mark_transition(ax, axis, transition, horizontal=True)
    return png(figure)


def chaos_maps_figure(steps: np.ndarray, maps: Mapping[str, np.ndarray], row_labels: Sequence[str], *,
                      log_steps: bool = False, transition: int | None = None, title_suffix: str = "") -> bytes:
    """Fig. 3: one panel per metric, rows = ghosts by spawn step (control marked), columns = snapshots t1.

    C and L2 use a log colour scale (they span many decades); their exact zeros (the ε = 0 control of a
    sequential run) are hatched and labelled "exactly 0"."""
    axis = StepAxis(steps, log_steps)
    names = list(maps)
    rows = (len(names) + 1) // 2
    figure = new_figure(5.0 * min(len(names), 2), 0.9 + (0.3 * len(row_labels) + 1.3) * rows, left=1.2, right=0.6,
                        wspace=0.75, hspace=0.6)
    cmap = colormap("magma")
    x_edges = axis.edges(steps)
    y_edges = np.arange(len(row_labels) + 1) - 0.5
    for k, name in enumerate(names):
        ax = figure.add_subplot(rows, min(len(names), 2), k + 1)
        values = np.asarray(maps[name], dtype=np.float64)
        norm = norm_for(values, name in ("C", "L2"))
        shown = values.copy()
        zeros = False
        if isinstance(norm, LogNorm):
            shown[shown <= 0] = np.nan
        mesh = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(shown), cmap=cmap, norm=norm, rasterized=True)
        if isinstance(norm, LogNorm):
            zeros = hatch_zero_cells(ax, x_edges, y_edges, values)
        figure.colorbar(mesh, ax=ax, label=f"{name} (log scale)" if isinstance(norm, LogNorm) else name)
        ax.set_yticks(np.arange(len(row_labels)))
        ax.set_yticklabels([plain(label) for label in row_labels], fontsize=7)
        ax.set_ylim(y_edges[-1], y_edges[0])
        ax.set_xlabel("t1 (step of comparison)")
        ax.set_ylabel("ghost (spawn step t0)")
        finite = values[np.isfinite(values)]
        constant = f" (all {finite[0]:g})" if finite.size and np.all(finite == finite[0]) else ""
        ax.set_title(f"main vs ghost: {name}{constant}{title_suffix}", fontsize=10)
        axis.format(ax.xaxis)
        mark_transition(ax, axis, transition)
        handles = [h for h in ax.get_legend_handles_labels()[0]]
        if zeros:
            handles.append(zero_legend_handle())
        if handles:
            ax.legend(handles=handles, fontsize=7, loc="lower right")
    return png(figure)


def layer_heatmap_figure(steps: Sequence[int] | np.ndarray, values: np.ndarray, layers: Sequence[str], *, title: str,
                         label: str, log_steps: bool = False, transition: int | None = None,
                         log_color: bool | None = None, xlabel: str = "step t") -> bytes:
    """Layers × time: ``values`` (L, T) over ``steps`` (T,), one row per layer (``(root)`` for the root module);
    ``xlabel`` for other columns (ghosts by spawn step)."""
    steps = np.asarray(steps, dtype=np.float64)
    axis = StepAxis(steps, log_steps)
    values = np.asarray(values, dtype=np.float64)
    norm = norm_for(values, log_color)
    shown = values.copy()
    if isinstance(norm, LogNorm):
        shown[shown <= 0] = np.nan
    figure = new_figure(6.4, 0.9 + 0.28 * len(layers) + 0.9, left=1.6, right=0.5)
    ax = figure.add_subplot()
    x_edges, y_edges = axis.edges(steps), np.arange(len(layers) + 1) - 0.5
    mesh = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(shown), cmap=colormap("viridis"), norm=norm,
                         rasterized=True)
    zeros = hatch_zero_cells(ax, x_edges, y_edges, values) if isinstance(norm, LogNorm) else False
    figure.colorbar(mesh, ax=ax, label=label)
    ax.set_yticks(np.arange(len(layers)))
    ax.set_yticklabels([plain(name or "(root)") for name in layers], fontsize=7)
    ax.set_ylim(y_edges[-1], y_edges[0])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    axis.format(ax.xaxis)
    mark_transition(ax, axis, transition)
    handles = ax.get_legend_handles_labels()[0] + ([zero_legend_handle()] if zeros else [])
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="lower right")
    return png(figure)
