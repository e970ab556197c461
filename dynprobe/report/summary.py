"""Terminal summary of a run (rich tables): what ``dynprobe show`` prints and ``dynprobe demo`` ends with."""
from __future__ import annotations

from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table

from ..run import Run

__all__ = ["render_summary", "summary_renderables"]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return "—"
        return f"{value:.{digits}g}"
    return str(value)


def _overview(run: Run) -> Table:
    manifest = run.manifest
    model = manifest.get("model", {})
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("run", str(run.path))
    table.add_row("status", run.status)
    table.add_row("model", f"{model.get('class', '?')} · {model.get('num_parameters', 0):,} trainable parameters "
                           f"· {model.get('device', '?')}")
    table.add_row("optimizer", manifest.get("optimizer", {}).get("class", "?"))
    eval_info = manifest.get("eval", {})
    table.add_row("eval set", f"{eval_info.get('n', '?')} examples · {eval_info.get('num_classes', '?')} classes")
    if len(run):
        table.add_row("snapshots", f"{len(run)} (steps {run.steps[0]} … {run.steps[-1]})")
    else:
        table.add_row("snapshots", "none committed yet")
    table.add_row("created", manifest.get("created", "?"))
    return table


def _trajectory(run: Run) -> Table:
    table = Table(title="Trajectory", title_justify="left", show_edge=False)
    for column in ("step", "eval loss", "eval acc", "train loss", "C to init", "C to prev", "D to prev"):
        table.add_column(column, justify="right")
    T = len(run)
    if T == 0:
        return table
    picks = sorted({int(i) for i in np.unique(np.geomspace(1, T, num=min(T, 8)).astype(int) - 1)} | {0, T - 1})
    C, D = run.C, run.D
    for i in picks:
        table.add_row(
            str(run.steps[i]), _fmt(run.eval_loss[i]), _fmt(run.eval_accuracy[i], 3), _fmt(run.train_loss[i]),
            _fmt(C[i, 0]), _fmt(C[i, i - 1] if i else None), _fmt(D[i, i - 1] if i else None, 3),
        )
    return table


def _extremes(run: Run) -> Table:
    table = Table(title="Interval metrics", title_justify="left", show_edge=False)
    table.add_column("metric")
    table.add_column("largest between consecutive snapshots", justify="right")
    table.add_column("first → last", justify="right")
    if len(run) < 2:
        return table
    for name, matrix in (("C  (1 − cos θ, eq. 1)", run.C), ("D  (disagreement, eq. 6)", run.D)):
        consecutive = np.diag(matrix, k=-1)
        if np.all(np.isnan(consecutive)):
            continue
        k = int(np.nanargmax(consecutive))
        table.add_row(name, f"{_fmt(consecutive[k])} (steps {run.steps[k]}→{run.steps[k + 1]})",
                      _fmt(matrix[-1, 0]))
    return table


def summary_renderables(run: Run) -> list[Any]:
    """The pieces of the summary, for embedding in other rich layouts."""
    return [Panel(_overview(run), title="dynprobe run", expand=False), _trajectory(run), _extremes(run)]


def render_summary(run: Run, console: Console | None = None) -> None:
    """Print the run's summary to ``console`` (a new rich Console by default)."""
    console = console or Console()
    console.print(Group(*summary_renderables(run)))
