"""``dynprobe compare``: one HTML file comparing two or more runs (seeds, learning rates, architectures).

It shows the runs' curves overlaid (eval loss and accuracy, direction change from θ_0, the kernel velocity at each
run's lag, the growth rate of ghost perturbations against the spawn step), the spread of every transition estimate
across the runs (a figure and a table: a transition that moves ×3 between seeds is not a property of the setting),
and each run's headline and estimates. Every run-provided string is escaped.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dynprobe.analysis.estimate import METHOD_LABELS
from dynprobe.analysis.run_analysis import RunAnalysis, analyze
from dynprobe.report import figures
from dynprobe.report.summary import display_names, spread
from dynprobe.store.run import Run

from ._context import Tick
from ._html import esc, fmt, img, interval_text, note, table
from ._page import nav, page
from ._sections import RunSections

__all__ = ["build_comparison"]


def _short(method: str) -> str:
    return METHOD_LABELS.get(method, method).split(":")[0]


def _overlays(runs: Sequence[Run], results: Sequence[RunAnalysis], names: list[str], *, log_steps: bool,
              log_y: bool | None, tick: Tick) -> list[bytes]:
    tick("overlays")
    pngs = [
        figures.overlay_figure([(f"{n}: eval loss", r.steps, r.eval_loss) for n, r in zip(names, runs)],
                               ylabel="eval loss", title="Eval loss", log_steps=log_steps,
                               log_y=log_y),
        figures.overlay_figure([(f"{n}: eval accuracy", r.steps, r.eval_accuracy) for n, r in zip(names, runs)],
                               ylabel="eval accuracy", title="Eval accuracy", log_steps=log_steps),
        figures.overlay_figure([(f"{n}: C(θ_t, θ_0)", r.steps, r.C[:, 0] if len(r) else np.zeros(0))
                                for n, r in zip(names, runs)],
                               ylabel="C to initialization", title="Direction change since θ_0", log_steps=log_steps),
    ]
    velocities = []
    for n, r in zip(names, runs):
        if r.has_kernels and r.kernel_lag_steps is not None:
            t, values = r.kernel_velocity(r.kernel_lag_steps)
            velocities.append((f"{n}: S(t, t+{r.kernel_lag_steps})", t, values))
    if velocities:
        tick("kernel velocities")
        pngs.append(figures.overlay_figure(velocities, ylabel="S(θ_t, θ_t+Δ) (log scale)",
                                           title="Kernel velocity at each run's lag", log_steps=log_steps,
                                           log_y=True))
    levels = []
    for n, result in zip(names, results):
        chaos = result.transition.get("chaos")
        rows = [g for g in (chaos.evidence.get("ghosts", []) if chaos is not None else [])
                if isinstance(g.get("level_L2"), float)]
        if rows:
            levels.append((f"{n}: plateau level", np.array([g["spawn_step"] for g in rows]),
                           np.array([g["level_L2"] for g in rows])))
    if levels:
        tick("plateau levels")
        pngs.append(figures.overlay_figure(levels, ylabel="plateau level ‖θ' − θ‖₂ (log scale)",
                                           title="Where ghosts end up, by spawn step", log_steps=log_steps,
                                           xlabel="spawn step t0", log_y=True))
    return pngs


def build_comparison(runs: Sequence[Run], *, results: Sequence[RunAnalysis] | None = None,
                     log_steps: bool = False, log_y: bool | None = None, tick: Tick | None = None) -> str:
    """The comparison of ``runs`` (two or more) as one HTML document; ``results``: their analyses if computed."""
    runs = list(runs)
    if len(runs) < 2:
        raise ValueError(f"a comparison needs at least two runs; got {len(runs)}")
    tick = tick or (lambda label: None)
    tick("analysis")
    results = list(results) if results is not None else [analyze(run) for run in runs]
    names = display_names(runs)
    numbers = spread(results)
    tick("spread")
    estimates = {_short(m): v["steps"] for m, v in numbers.items() if m not in ("consensus", "online")}
    spread_png = figures.spread_figure(names, estimates, numbers["consensus"]["steps"])
    header = ["", *[esc(n) for n in names], "spread (max / min)"]
    rows = [["status", *[esc(r.status) for r in runs], ""],
            ["snapshots", *[f"{len(r)} (last step {r.steps[-1]})" if len(r) else "0" for r in runs], ""],
            ["final eval accuracy", *[fmt(r.eval_accuracy[-1], 3) if len(r) else "—" for r in runs], ""],
            ["final eval loss", *[fmt(r.eval_loss[-1]) if len(r) else "—" for r in runs], ""]]
    for method, values in numbers.items():
        label = "transition (headline)" if method == "consensus" else _short(method)
        cells = []
        for result, step in zip(results, values["steps"]):
            e = None if method == "consensus" else result.transition.get(method)
            if method == "consensus":
                cells.append(f"{fmt(step)} ({esc(interval_text(result.transition.interval))})" if step is not None
                             else "undetermined")
            else:
                cells.append("—" if e is None else f'{fmt(e.step)} <span class="q-{esc(e.quality)}">'
                                                   f"({esc(e.quality)})</span>")
        ratio = values["ratio"]
        rows.append([esc(label), *cells, "—" if ratio is None else esc(f"×{ratio:.2g} ({values['min']}–"
                                                                       f"{values['max']})")])
    overlays = _overlays(runs, results, names, log_steps=log_steps, log_y=log_y, tick=tick)
    headlines = "".join(
        f'<div class="box"><h3>{esc(n)}</h3>'
        f"{RunSections(run, result, log_steps=log_steps, tick=tick, log_y=log_y).headline()}</div>"
        for n, run, result in zip(names, runs, results))
    sections = [("table", "Table"), ("spread", "Spread of the estimates"), ("overlays", "Overlaid curves"),
                ("runs", "Each run's answer")]
    body = [f"<h1>Comparison of {len(runs)} runs: {esc(', '.join(names))}</h1>", nav(sections),
            '<section id="table"><h2>Table</h2>' + note(
                "The same numbers for each run side by side. The spread column is the largest over the smallest "
                "step an estimator gave across the runs: near 1, the transition is a property of the setting; ×2 "
                "or more, it varies from run to run (seeds) and a single run's estimate should be read with that "
                "uncertainty.") + table(header, rows) + "</section>",
            f'<section id="spread"><h2>Spread of the estimates</h2>{img(spread_png, "spread of the estimates")}'
            "</section>",
            '<section id="overlays"><h2>Overlaid curves</h2><div class="grid">'
            + "".join(img(png, "overlay") for png in overlays) + "</div></section>",
            f'<section id="runs"><h2>Each run\'s answer</h2>{headlines}</section>']
    return page(f"dynprobe comparison — {', '.join(names)}", "".join(body))
