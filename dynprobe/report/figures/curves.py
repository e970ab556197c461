"""Curves against steps: losses and accuracy, overlays of several runs, the C rows of Finding I, Fig. 6, and the
spread of transition estimates across runs."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ._base import TRANSITION_STYLE, StepAxis, mark_transition, new_figure, plain, png, wants_log_y

__all__ = ["curves_figure", "overlay_figure", "peaks_figure", "spread_figure", "switching_figure"]


def curves_figure(steps: np.ndarray, series: Mapping[str, np.ndarray], *, ylabel: str, title: str,
                  log_steps: bool = False, log_y: bool | None = False, transition: int | None = None,
                  secondary: Mapping[str, np.ndarray] | None = None, secondary_label: str = "") -> bytes:
    """Curves against steps (loss/accuracy); ``secondary`` curves on a right-hand axis. ``log_y=None``: a log
    axis when the values span > 100× or spike (:func:`wants_log_y`)."""
    axis = StepAxis(steps, log_steps)
    figure = new_figure(6.0, 3.2, right=0.9 if secondary else 0.25)
    ax = figure.add_subplot()
    x = axis(steps)
    everything = []
    for name, values in series.items():
        values = np.asarray(values, dtype=np.float64)
        if np.isfinite(values).any():
            ax.plot(x, values, marker=".", markersize=3, linewidth=1.2, label=name)
            everything.append(values)
    if wants_log_y(np.concatenate(everything) if everything else np.zeros(0), log_y):
        ax.set_yscale("log")
        ylabel += " (log scale)"
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
    mark_transition(ax, axis, transition)
    ax.legend(fontsize=8, loc="best")
    return png(figure)


def overlay_figure(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], *, ylabel: str, title: str,
                   log_steps: bool = False, log_y: bool | None = False, xlabel: str = "step") -> bytes:
    """Curves with their own step arrays on one axis (``dynprobe compare``): ``(label, steps, values)``."""
    every = np.concatenate([np.asarray(s, dtype=np.float64) for _, s, _ in curves]) if curves else np.zeros(1)
    axis = StepAxis(every, log_steps)
    figure = new_figure(6.0, 3.2)
    ax = figure.add_subplot()
    shown = []
    for label, steps, values in curves:
        values = np.asarray(values, dtype=np.float64)
        if values.size and np.isfinite(values).any():
            ax.plot(axis(steps), values, marker=".", markersize=3, linewidth=1.2, label=plain(label))
            shown.append(values)
    if wants_log_y(np.concatenate(shown) if shown else np.zeros(0), log_y):
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    axis.format(ax.xaxis)
    if shown:
        ax.legend(fontsize=8)
    return png(figure)


def peaks_figure(steps: np.ndarray, rows: Sequence[tuple[str, np.ndarray, np.ndarray, int | None]], *, title: str,
                 ylabel: str, log_steps: bool = False, transition: int | None = None, log_y: bool = False) -> bytes:
    """Evidence of the Finding-I estimates: a few rows ``(label, t, values, level-off step)``, level-offs marked."""
    axis = StepAxis(steps, log_steps)
    figure = new_figure(6.0, 3.2)
    ax = figure.add_subplot()
    for label, t, values, peak in rows:
        line = ax.plot(axis(t), values, linewidth=1.1, label=label)
        if peak is not None:
            k = int(np.argmin(np.abs(np.asarray(t) - peak)))
            ax.plot(axis(t[k]), values[k], marker="o", color=line[0].get_color(), markersize=5)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("t1 (step)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    axis.format(ax.xaxis)
    mark_transition(ax, axis, transition)
    ax.legend(fontsize=7, ncol=2)
    return png(figure)


def switching_figure(switching: Mapping[str, np.ndarray], *, transition: int | None = None) -> bytes:
    """Fig. 6: eval accuracy and loss of θ_std→lin(T; t) against the switch step t."""
    figure = new_figure(6.0, 3.2, right=0.8)
    ax = figure.add_subplot()
    t = np.asarray(switching["switch_step"], dtype=np.float64)
    axis = StepAxis(t, False)
    ax.plot(t, switching["eval_accuracy"], marker="o", color="#1f77b4", label="eval accuracy")
    ax.set_xlabel("switch step t (standard → linearized training)")
    ax.set_ylabel("eval accuracy")
    right = ax.twinx()
    right.plot(t, switching["eval_loss"], marker="s", color="#ff7f0e", label="eval loss")
    right.set_ylabel("eval loss")
    mark_transition(ax, axis, transition)
    horizon = int(np.max(switching["total_steps"]))
    ax.set_title(f"Switching to linearized training until T = {horizon} (Fig. 6)", fontsize=10)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="center right")
    return png(figure)


def spread_figure(run_names: Sequence[str], estimates: Mapping[str, Sequence[int | None]],
                  consensus: Sequence[int | None]) -> bytes:
    """The transition estimates of several runs: one row per run, one marker per method, the consensus as the
    transition marker; a log step axis (estimates are compared as ratios)."""
    figure = new_figure(6.4, 1.2 + 0.35 * len(run_names), left=1.8, right=0.3)
    ax = figure.add_subplot()
    markers = "osD^v<>"
    every = [s for steps in estimates.values() for s in steps if s is not None] + [c for c in consensus if c]
    for k, (method, steps) in enumerate(estimates.items()):
        y = [i for i, s in enumerate(steps) if s is not None]
        ax.scatter([max(steps[i], 1) for i in y], y, marker=markers[k % len(markers)], s=30, label=method, zorder=3)
    for i, step in enumerate(consensus):
        if step is not None:
            ax.plot([max(step, 1)] * 2, [i - 0.35, i + 0.35], **TRANSITION_STYLE,
                    label="transition (headline)" if i == next(j for j, c in enumerate(consensus) if c) else None)
    ax.set_yticks(np.arange(len(run_names)))
    ax.set_yticklabels([plain(name) for name in run_names], fontsize=8)
    ax.set_ylim(len(run_names) - 0.5, -0.5)
    if every:
        ax.set_xscale("log")
    ax.set_xlabel("step of the estimate (log scale)")
    ax.set_ylabel("run")
    ax.set_title("Transition estimates across runs", fontsize=10)
    if every:
        ax.legend(fontsize=7, loc="best")
    return png(figure)
