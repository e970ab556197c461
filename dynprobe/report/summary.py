"""Terminal summary of a run (rich tables): what ``dynprobe show`` prints and ``dynprobe demo`` ends with.

It opens with the one-sentence answer (the transition with its bracket, or why it is undetermined), then the
overview, the trajectory, the estimates with their evidence, each ghost's plateau level and verdict with the
thresholds they were compared with, the cone numbers, and what is missing. Every string that comes from the run
(paths, names, manifest values, event reasons) is shown through :mod:`dynprobe.report.terminal`: never parsed as
markup, control characters made visible. :func:`summary_data` is the same content as JSON (``--format json``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from dynprobe.analysis.estimate import METHOD_LABELS
from dynprobe.analysis.run_analysis import RunAnalysis, analyze
from dynprobe.store.run import Run

from .terminal import clean, safe_text

__all__ = ["comparison_table", "display_names", "ghost_mode", "kernel_settings", "render_summary", "steps_text",
           "summary_data", "summary_renderables"]


def display_names(runs: Sequence[Run]) -> list[str]:
    """A short name per run for tables and legends: its folder name, with as many parent folders as it takes to
    tell runs apart (``seed0/demo`` and ``seed1/demo``); the folder name and a number when the paths coincide."""
    parts = [Path(run.path).resolve().parts for run in runs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{Path(run.path).name} ({k + 1})" for k, run in enumerate(runs)]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, (float, np.floating)):
        return "—" if not np.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def _bytes(count: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"  # pragma: no cover


def ghost_mode(run: Run) -> str | None:
    """How the ghosts were trained and what they are compared with, and the largest drift of the vectorized
    shadow from the main run (``shadow_drift`` events); None for runs without ghosts."""
    if not run.ghosts:
        return None
    mode = run.manifest.get("ghost_mode") or {}
    name = mode.get("mode", "sequential")
    text = ("sequential: compared with the main model itself" if name == "sequential" else
            f"{clean(name)}: compared with an ε = 0 shadow of the main run")
    drifts = [e for e in run.events if e.get("event") == "shadow_drift" and isinstance(e.get("L2"), (int, float))]
    if drifts:
        worst = max(drifts, key=lambda e: e["L2"])
        text += f"; the shadow drifted up to L2 {worst['L2']:.3g} from the main run (step {clean(worst.get('step'))})"
        if any(e.get("exceeds_ghost_signal") for e in drifts):
            text += ", more than the smallest ghost separation"
    elif name != "sequential":
        text += "; no drift of the shadow recorded"
    return text


def steps_text(count: int) -> str:
    """``"1 step"``, ``"250 steps"``."""
    return f"{count} step" if count == 1 else f"{count} steps"


def kernel_settings(run: Run) -> str | None:
    """How the run's eNTK was measured — mode, probe set, cadence — and the lag of its kernel velocity, saying
    which values the probe chose by default; None for runs without a kernel configuration."""
    kernel = (run.config.get("kernel") or {}) if isinstance(run.config, dict) else {}
    if not kernel:
        return None
    chosen = kernel.get("chosen") or []
    task = ((run.manifest.get("eval") or {}).get("task") or {}).get("name")
    default = f" (the default for {task} outputs)" if task else " (the task's default)"
    mode = f"mode {kernel.get('mode')}" + (default if "mode" in chosen else "")
    every = kernel.get("every_snapshots", 1)
    text = (f"{mode}, n = {kernel.get('n')}, BN {kernel.get('bn')}, at every {every} snapshot(s), probe set from "
            f"the {kernel.get('probe_set', 'eval')} set")
    lag = kernel.get("lag_steps")
    if isinstance(lag, int) and lag > 0:
        how = ("Δ chosen from the schedule and run length; set KernelConfig(lag_steps=Δ) to change it"
               if "lag_steps" in chosen else "KernelConfig(lag_steps=)")
        return text + f"; kernel velocity S(t, t+{lag}) on companion snapshots {steps_text(lag)} later ({how})"
    gap = run.kernel_lag_steps
    if gap is None:
        return text
    return text + (f"; kernel velocity at the most common gap between kernel snapshots, Δ = {steps_text(gap)} (no "
                   "companion snapshots: set KernelConfig(lag_steps=Δ) for a velocity along the whole run)")


def _overview(run: Run) -> Table:
    manifest = run.manifest
    model = manifest.get("model", {}) if isinstance(manifest.get("model"), dict) else {}
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    parameters = model.get("num_parameters")
    parameters = f"{parameters:,}" if isinstance(parameters, int) else "?"
    rows = [
        ("run", run.path), ("status", run.status),
        ("model", f"{model.get('class', '?')} · {parameters} trainable parameters · {model.get('device', '?')}"),
        ("optimizer", (manifest.get("optimizer") or {}).get("class", "?")),
        ("eval set", f"{(manifest.get('eval') or {}).get('n', '?')} examples"),
        ("snapshots", f"{len(run)} (steps {run.steps[0]} … {run.steps[-1]})" if len(run) else "none committed yet"),
    ]
    kernel = kernel_settings(run)
    if kernel is not None:
        rows.append(("eNTK", kernel))
    mode = ghost_mode(run)
    if mode is not None:
        rows.append(("ghosts", mode))
    usage = getattr(run, "disk_usage", None)
    if usage is not None:
        rows.append(("size on disk", f"{_bytes(usage.total_bytes)} ({_bytes(int(usage.bytes_per_snapshot))} per "
                                     "snapshot)"))
    rows.append(("created", manifest.get("created", "?")))
    for label, value in rows:
        table.add_row(label, safe_text(value))
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


_QUALITY_STYLE = {"high": "green", "medium": "yellow", "low": "red", "bound": "red", "undetermined": "red",
                  "none": "dim", "unavailable": "dim"}


def _bracket(interval: tuple[int | None, int | None] | None) -> str:
    if not interval:
        return "—"
    low, high = interval
    return f"{'…' if low is None else low}–{'…' if high is None else high}"


def _transition(result: RunAnalysis) -> Table:
    report = result.transition
    table = Table(title=Text("Phase transition — the chaos estimate decides; trajectory estimates shown apart"),
                  title_justify="left", show_edge=False,
                  caption=safe_text(f"Separately, {report.settles_summary}."), caption_justify="left")
    for column, justify in (("estimate", "left"), ("step", "right"), ("bracket", "right"), ("quality", "left"),
                            ("evidence", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for e in report.estimates:
        role = " (headline)" if e.method == "chaos" else " (trajectory)"
        table.add_row(safe_text(e.label + role), _fmt(e.step), _bracket(e.interval),
                      safe_text(e.quality, _QUALITY_STYLE.get(e.quality, "")), safe_text(e.summary))
    return table


def _ghosts(result: RunAnalysis) -> Table | None:
    chaos = result.transition.get("chaos")
    rows = (chaos.evidence.get("ghosts") if chaos is not None else None) or []
    verdicts = {v.ghost: v for v in result.verdicts}
    if not rows and not verdicts:
        return None
    rule = chaos.evidence.get("rule", {}) if chaos is not None else {}
    table = Table(title=Text("Ghosts: where each one's separation ended up"), title_justify="left", show_edge=False,
                  caption=Text(f"L2 level: median ‖θ' − θ‖ over the last {rule.get('tail_fraction', 0.1):g} of the "
                               f"ghost's life; growth over the last {rule.get('plateau_fraction', 0.5):g} of it "
                               f"(saturated at ≤ ×{rule.get('plateau_factor', 2):g}); class: high = on the chaotic "
                               f"level, low = ≥ ×{rule.get('level_ratio', 10):g} below it. Verdicts compare D and "
                               "B_linear with their thresholds (value / threshold)."), caption_justify="left")
    if any(_by_control(c) for v in verdicts.values() for c in v.checks.values()):
        table.caption.append(" (control): the threshold is the ε = 0 control's own value — the control drifted, and "
                             "a ghost at that threshold is no farther from the main run than the control is.")
    for column in ("ghost", "t0", "L2 level", "growth", "class", "1 − cos", "verdict at t1", "D", "B_linear"):
        table.add_column(column, justify="left" if column in ("class", "verdict at t1") else "right")
    ghosts = sorted({r["ghost"] for r in rows} | set(verdicts), key=lambda g: (g is None, g))
    by_ghost = {r["ghost"]: r for r in rows}
    for ghost in ghosts:
        row, verdict = by_ghost.get(ghost, {}), verdicts.get(ghost)
        checks = verdict.checks if verdict else {}

        def check(name: str) -> str:
            c = checks.get(name)
            if not c:
                return "—"
            return f"{_fmt(c['value'], 3)} / {_fmt(c['threshold'], 3)}" + (" (control)" if _by_control(c) else "")

        growth = row.get("growth")
        growth_text = "—" if growth is None else f"×{_fmt(growth, 3)}" + (" ✓" if row.get("saturated") else "")
        where = f"{verdict.verdict} (step {verdict.final_step})" if verdict else "—"
        t0 = row.get("spawn_step", verdict.spawn_step if verdict else None)
        table.add_row(_fmt(ghost), _fmt(t0), _fmt(row.get("level_L2"), 3), growth_text,
                      safe_text(row.get("class", "—")), _fmt(row.get("C"), 3), safe_text(where), check("D"),
                      check("B_linear"))
    return table


def _by_control(check: dict[str, Any]) -> bool:
    """Whether a verdict's threshold is the ε = 0 control's own value (nonzero only when the control drifted)."""
    return str(check.get("source", "")).startswith("the ε = 0 control")


def _cone(result: RunAnalysis) -> Table | Text:
    cone = result.cone
    if not cone.available:
        return safe_text(f"Cone: {cone.reason}", "dim")
    table = Table(title="Cone (S after reference steps τ)", title_justify="left", show_edge=False)
    for column in ("τ", "plateau S(t, τ)", "max S(t, τ)", "half-angle", "plateaued"):
        table.add_column(column, justify="right")
    for c in cone.cones:
        table.add_row(str(c.tau), _fmt(c.plateau), _fmt(c.max_distance), f"{c.half_angle_deg:.2f}°",
                      {True: "yes", False: "no", None: "—"}[c.plateaued])
    if cone.lag_bound_ratio is not None:
        table.caption = Text(f"upper bounds of S(t, t+dt) for dt = {', '.join(map(str, cone.lag_bounds or {}))}: "
                             f"ratio largest/smallest {cone.lag_bound_ratio:.3g}, {cone.lag_bound_reading}")
        table.caption_justify = "left"
    return table


def summary_renderables(run: Run, result: RunAnalysis | None = None) -> list[Any]:
    """The pieces of the summary, for embedding in other rich layouts (``result``: :func:`analyze` of ``run``,
    computed here when not given)."""
    result = result if result is not None else analyze(run)
    parts: list[Any] = [Panel(_overview(run), title="dynprobe run", expand=False),
                        safe_text(result.transition.headline, "bold"), _trajectory(run), _transition(result)]
    ghosts = _ghosts(result)
    if ghosts is not None:
        parts.append(ghosts)
    parts.append(_cone(result))
    parts += [Text.assemble(("missing: ", "yellow"), safe_text(note)) for note in result.missing]
    return parts


def render_summary(run: Run, console: Console | None = None, result: RunAnalysis | None = None) -> None:
    """Print the run's summary to ``console`` (a new rich Console by default)."""
    console = console or Console()
    console.print(Group(*summary_renderables(run, result)))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def summary_data(run: Run, result: RunAnalysis | None = None) -> dict[str, Any]:
    """The summary as JSON-serializable data (``dynprobe show --format json``): overview, transition with every
    estimate and its evidence, ghost verdicts, cone numbers, missing notes. Non-finite numbers become null."""
    result = result if result is not None else analyze(run)
    usage = getattr(run, "disk_usage", None)
    cone = result.cone
    return _jsonable({
        "run": str(run.path), "name": run.name, "status": run.status, "snapshots": len(run),
        "steps": [int(run.steps[0]), int(run.steps[-1])] if len(run) else None,
        "model": run.manifest.get("model", {}).get("class") if isinstance(run.manifest.get("model"), dict) else None,
        "final_eval_loss": float(run.eval_loss[-1]) if len(run) else None,
        "final_eval_accuracy": float(run.eval_accuracy[-1]) if len(run) else None,
        "ghost_mode": ghost_mode(run), "size_bytes": usage.total_bytes if usage is not None else None,
        "headline": result.transition.headline, "transition": result.transition.to_dict(),
        "ghosts": [v.to_dict() for v in result.verdicts],
        "cone": {"available": cone.available, "reason": cone.reason,
                 "cones": [asdict(c) for c in cone.cones], "lag_bounds": cone.lag_bounds,
                 "lag_bound_ratio": cone.lag_bound_ratio},
        "missing": list(result.missing),
    })


def spread(results: list[RunAnalysis]) -> dict[str, dict[str, Any]]:
    """Per method, the steps the runs' estimates gave (None where a run has none), their range and ratio."""
    out: dict[str, dict[str, Any]] = {}
    for method in [*METHOD_LABELS, "consensus"]:
        steps = [r.transition.step if method == "consensus" else
                 (e.step if (e := r.transition.get(method)) is not None else None) for r in results]
        found = [s for s in steps if s is not None]
        if not any(r.transition.get(method) is not None for r in results) and method != "consensus":
            continue
        out[method] = {"steps": steps, "min": min(found) if found else None, "max": max(found) if found else None,
                       "ratio": (max(found) / max(min(found), 1)) if found else None}
    return out


def comparison_table(runs: list[Run], results: list[RunAnalysis]) -> Table:
    """Key numbers of several runs side by side (``dynprobe compare``), with the spread of each estimate."""
    table = Table(title="Comparison", title_justify="left", show_edge=False)
    table.add_column("")
    for name in display_names(runs):
        table.add_column(safe_text(name), justify="right", overflow="fold")
    table.add_column("spread (max / min)", justify="right")

    def row(label: str, values: list[Any], extra: str = "") -> None:
        table.add_row(safe_text(label), *[v if isinstance(v, Text) else safe_text(v) for v in values], extra)

    row("status", [run.status for run in runs])
    row("snapshots", [f"{len(run)} (last step {run.steps[-1]})" if len(run) else "0" for run in runs])
    row("final eval accuracy", [_fmt(run.eval_accuracy[-1], 3) if len(run) else "—" for run in runs])
    row("final eval loss", [_fmt(run.eval_loss[-1]) if len(run) else "—" for run in runs])
    for method, numbers in spread(results).items():
        label = "transition (headline)" if method == "consensus" else METHOD_LABELS[method].split(":")[0]
        cells = []
        for r, step in zip(results, numbers["steps"]):
            e = None if method == "consensus" else r.transition.get(method)
            quality = "undetermined" if method == "consensus" and step is None else (e.quality if e else "")
            cells.append(f"{_fmt(step)} ({quality})" if quality else _fmt(step))
        ratio = numbers["ratio"]
        row(label, cells, "—" if ratio is None else f"×{ratio:.2g} ({numbers['min']}–{numbers['max']})")
    return table
