"""Terminal summary of a run (rich tables): what ``dynprobe show`` prints and ``dynprobe demo`` ends with.

Besides the overview, the trajectory and the C/D extremes, it shows the transition estimates and the cone
numbers of :func:`dynprobe.analysis.analyze` — the same summary box as the HTML report — and what is missing.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table

from dynprobe.analysis.run_analysis import RunAnalysis, analyze
from dynprobe.store.run import Run

__all__ = ["comparison_table", "render_summary", "summary_renderables"]


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


_QUALITY_STYLE = {"high": "green", "medium": "yellow", "low": "red", "bound": "red", "none": "dim",
                  "unavailable": "dim"}


def _transition(result: RunAnalysis) -> Table:
    report = result.transition
    verdict = {True: "[green]agree[/green]", False: "[red]disagree[/red]", None: "—"}[report.agree]
    table = Table(title=f"Phase transition — estimates {verdict}", title_justify="left", show_edge=False,
                  caption=report.summary, caption_justify="left")
    for column, justify in (("estimate", "left"), ("step", "right"), ("bracket", "right"), ("quality", "left"),
                            ("evidence", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for e in report.estimates:
        low, high = e.interval if e.interval else (None, None)
        bracket = "—" if not e.interval else f"{'…' if low is None else low}–{'…' if high is None else high}"
        style = _QUALITY_STYLE.get(e.quality, "")
        table.add_row(e.label, _fmt(e.step), bracket, f"[{style}]{e.quality}[/{style}]", e.summary)
    return table


def _cone(result: RunAnalysis) -> Table | str:
    cone = result.cone
    if not cone.available:
        return f"[dim]Cone: {cone.reason}[/dim]"
    table = Table(title="Cone (S after reference steps τ)", title_justify="left", show_edge=False)
    for column in ("τ", "plateau S(t, τ)", "max S(t, τ)", "half-angle", "plateaued"):
        table.add_column(column, justify="right")
    for c in cone.cones:
        table.add_row(str(c.tau), _fmt(c.plateau), _fmt(c.max_distance), f"{c.half_angle_deg:.2f}°",
                      {True: "yes", False: "no", None: "—"}[c.plateaued])
    if cone.lag_bound_ratio is not None:
        table.caption = (f"upper bounds of S(t, t+dt) for dt = {', '.join(map(str, cone.lag_bounds or {}))}: ratio "
                         f"largest/smallest {cone.lag_bound_ratio:.2f} (≈ 1: one shared bound, the cone)")
        table.caption_justify = "left"
    return table


def summary_renderables(run: Run, result: RunAnalysis | None = None) -> list[Any]:
    """The pieces of the summary, for embedding in other rich layouts (``result``: :func:`analyze` of ``run``,
    computed here when not given)."""
    result = result if result is not None else analyze(run)
    parts: list[Any] = [Panel(_overview(run), title="dynprobe run", expand=False), _trajectory(run), _extremes(run),
                        _transition(result), _cone(result)]
    parts += [f"[yellow]missing:[/yellow] {note}" for note in result.missing]
    return parts


def render_summary(run: Run, console: Console | None = None, result: RunAnalysis | None = None) -> None:
    """Print the run's summary to ``console`` (a new rich Console by default)."""
    console = console or Console()
    console.print(Group(*summary_renderables(run, result)))


def comparison_table(runs: list[Run], results: list[RunAnalysis]) -> Table:
    """Key numbers of several runs side by side (``dynprobe compare``)."""
    table = Table(title="Comparison", title_justify="left", show_edge=False)
    table.add_column("")
    for run in runs:
        table.add_column(run.name, justify="right", overflow="fold")

    def row(label: str, values: list[str]) -> None:
        table.add_row(label, *values)

    row("status", [run.status for run in runs])
    row("snapshots", [f"{len(run)} (last step {run.steps[-1]})" if len(run) else "0" for run in runs])
    row("final eval accuracy", [_fmt(run.eval_accuracy[-1], 3) if len(run) else "—" for run in runs])
    row("final eval loss", [_fmt(run.eval_loss[-1]) if len(run) else "—" for run in runs])
    methods = [e.method for e in results[0].transition.estimates]
    for method in methods + [m for r in results[1:] for m in (e.method for e in r.transition.estimates)
                             if m not in methods]:
        estimates = [r.transition.get(method) for r in results]
        label = next(e.label for e in estimates if e is not None)
        row(label, ["—" if e is None else f"{_fmt(e.step)} ({e.quality})" for e in estimates])
    row("consensus transition", [_fmt(r.transition.step) for r in results])
    row("cone half-angle (first τ)", [f"{r.cone.cones[0].half_angle_deg:.2f}° at τ={r.cone.cones[0].tau}"
                                      if r.cone.available and r.cone.cones else "—" for r in results])
    return table
