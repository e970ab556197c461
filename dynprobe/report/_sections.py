"""The sections of a run's HTML report (:class:`RunSections`), each an HTML fragment; shared by ``dynprobe report``
and ``dynprobe compare`` (:mod:`dynprobe.report.html` assembles the page). Every run-provided string is escaped
with :func:`esc`; figures are embedded as base64 PNG by :func:`img`."""
from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from dynprobe.analysis.cone import kernel_embedding, lag_curve
from dynprobe.analysis.run_analysis import RunAnalysis, TransitionEstimate
from dynprobe.report import figures
from dynprobe.store.run import Run

__all__ = ["RunSections", "esc", "fmt", "img", "table"]

Tick = Callable[[str], None]


def esc(value: Any) -> str:
    """HTML-escape anything (quotes included), after ``str``."""
    return html.escape(str(value), quote=True)


def img(png: bytes, alt: str, caption: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}">{cap}</figure>'


def _missing(text: str) -> str:
    return f'<div class="missing">{text}</div>'


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, (float, np.floating)):
        return "—" if not np.isfinite(value) else f"{value:.{digits}g}"
    return esc(value)


def table(header: list[str] | None, rows: list[list[str]]) -> str:
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _interval_text(interval: tuple[int | None, int | None] | None) -> str:
    if not interval:
        return "—"
    low, high = interval
    return f"{'…' if low is None else low} – {'…' if high is None else high}"


# ------------------------------------------------------------------------------------------ sections


class RunSections:
    """The HTML of each report section for one run (shared by ``report`` and ``compare``)."""

    def __init__(self, run: Run, result: RunAnalysis, *, log_steps: bool, tick: Tick) -> None:
        self.run, self.result, self.log_steps, self.tick = run, result, log_steps, tick
        self.steps = run.steps
        self.transition = result.transition.step

    def header(self) -> str:
        run, model = self.run, self.run.manifest.get("model", {})
        status = run.status
        last = f", last step {run.steps[-1]}" if len(run) else ""
        out = [f"<h1>{esc(run.name)}</h1>",
               f'<p class="sub"><span class="badge {esc(status)}">{esc(status)}</span> · {esc(run.path)} · '
               f"{esc(model.get('class', '?'))} ({fmt(model.get('num_parameters'))} parameters) · "
               f"{len(run)} snapshots{esc(last)}</p>"]
        if status == "running":
            out.append('<div class="banner">This run is still <b>running</b>: the report covers the '
                       f"{len(run)} snapshots committed so far. Run <code>dynprobe report</code> again later.</div>")
        elif status == "interrupted":
            out.append('<div class="banner">This run was <b>interrupted</b> (its manifest says running but the '
                       "writing process is gone): the report covers every committed snapshot. Continue it with "
                       "<code>Probe(..., resume=True)</code>.</div>")
        elif status in ("failed", "probe_failed"):
            reason = run.manifest.get("status_reason")
            out.append(f'<div class="banner">The run ended with status <b>{esc(status)}</b>'
                       f"{': ' + esc(reason) if reason else ''}.</div>")
        return "".join(out)

    def summary(self) -> str:
        report = self.result.transition
        agree = {True: "agree", False: "disagree", None: "—"}[report.agree]
        rows = []
        for e in report.estimates:
            rows.append([esc(e.label), fmt(e.step), esc(_interval_text(e.interval)),
                         f'<span class="q-{esc(e.quality)}">{esc(e.quality)}</span>', esc(e.summary)])
        parts = [f"<h3>Transition</h3><p><b>{esc(report.summary)}</b> (estimates {agree}; tolerance "
                 f"×{report.tolerance:g})</p>",
                 table(["estimate", "step", "bracket", "quality", "evidence"], rows)]
        cone = self.result.cone
        parts.append("<h3>Cone</h3>")
        if not cone.available:
            parts.append(_missing(esc(cone.reason)))
        else:
            rows = [[fmt(c.tau), fmt(c.plateau), fmt(c.max_distance), f"{c.half_angle_deg:.2f}°",
                     f"{c.plateau_angle_deg:.2f}°", {True: "yes", False: "no", None: "—"}[c.plateaued],
                     fmt(c.points)] for c in cone.cones]
            parts.append(table(["τ", "plateau of S(t, τ)", "max S(t, τ)", "half-angle arccos(1 − max)",
                                 "plateau angle", "plateaued", "points after τ"], rows))
            if cone.lag_bounds:
                bounds = ", ".join(f"dt = {dt}: {value:.3g}" for dt, value in cone.lag_bounds.items())
                ratio = f"; largest / smallest = {cone.lag_bound_ratio:.2f}" if cone.lag_bound_ratio else ""
                start = f"t ≥ {self.transition}" if self.transition is not None else "all t"
                parts.append(f"<p>Upper bound of S(t, t + dt) over {esc(start)}: {esc(bounds)}{esc(ratio)} "
                             "(≈ 1 when curves of different dt share one bound — the cone; ≈ the lag ratio for a "
                             "random walk).</p>")
        if self.result.missing:
            parts.append("<h3>Missing from this run</h3>" + "".join(_missing(esc(m)) for m in self.result.missing))
        return '<div class="box">' + "".join(parts) + "</div>"

    def training(self) -> str:
        run = self.run
        if len(run) < 1:
            return _missing("No snapshot has been committed yet.")
        self.tick("loss and accuracy")
        loss = figures.curves_figure(self.steps, {"eval loss": run.eval_loss, "train loss": run.train_loss},
                                     ylabel="loss", title="Loss", log_steps=self.log_steps,
                                     transition=self.transition)
        accuracy = figures.curves_figure(self.steps, {"eval accuracy": run.eval_accuracy}, ylabel="accuracy",
                                         title="Eval accuracy (and learning rate)", log_steps=self.log_steps,
                                         transition=self.transition,
                                         secondary={"lr": run.lr} if np.isfinite(run.lr).any() else None,
                                         secondary_label="learning rate")
        return f'<div class="grid">{img(loss, "loss curves")}{img(accuracy, "accuracy curve")}</div>'

    def trajectory_maps(self) -> str:
        run = self.run
        if len(run) < 2:
            return _missing("Interval maps need at least two snapshots.")
        specs = [("C", run.C, "1 − cos(θ_i, θ_j)", "Parameter dissimilarity C (eq. 1)", False),
                 ("S", run.S, "S", "Kernel distance S (eq. 4, Fig. 4)", False),
                 ("D", run.D, "disagreement", "Disagreement D (eq. 6)", False),
                 ("B", run.B, "loss barrier", "Loss barrier B (eq. 5)", False)]
        out, notes = [], []
        for name, matrix, label, title, log_color in specs:
            off_diagonal = matrix[~np.eye(len(matrix), dtype=bool)]
            if not np.isfinite(off_diagonal).any():
                notes.append(_missing(_MISSING_MAP[name]))
                continue
            self.tick(f"{name} map")
            coverage = float(np.isfinite(off_diagonal).mean())
            caption = "" if coverage > 0.99 else f"computed for {coverage:.0%} of the pairs (grey: not computed)"
            png = figures.heatmap_figure(self.steps, matrix, title=title, label=label, log_steps=self.log_steps,
                                         log_color=log_color, transition=self.transition)
            out.append(img(png, f"{name} map", esc(caption)))
        return f'<div class="grid">{"".join(out)}</div>' + "".join(notes)

    def chaos(self) -> str:
        run = self.run
        ghosts = run.ghosts
        if not ghosts:
            return _missing(_MISSING_MAP["ghosts"])
        chaos = run.chaos
        labels = [f"{'control ε=0' if g.control else 't0=' + str(g.spawn_step)} (#{g.index})" for g in ghosts]
        maps = {name: chaos[name] for name in ("D", "B", "C", "L2", "S") if np.isfinite(chaos[name]).any()}
        parts = []
        if maps and len(run):
            self.tick("chaos maps")
            png = figures.chaos_maps_figure(self.steps, maps, labels, log_steps=self.log_steps,
                                            transition=self.transition)
            parts.append(img(png, "chaos maps", "Rows: ghosts by spawn step t0 (the ε = 0 control marked); "
                                                 "columns: snapshots t1. Grey: before the spawn or not computed."))
        else:
            parts.append(_missing("No ghost has been compared with the main run yet (comparisons happen at "
                                  "snapshots after the spawn)."))
        rows = []
        for row, g in enumerate(ghosts):
            compared = np.flatnonzero(np.isfinite(chaos["D"][row]))
            last = int(compared[-1]) if compared.size else None
            final = (lambda name: fmt(chaos[name][row, last]) if last is not None else "—")  # noqa: E731
            rows.append([fmt(g.index), fmt(g.spawn_step), "yes" if g.control else "", esc(g.kind),
                         fmt(g.nominal_norm), fmt(g.realized_norm), f"{g.changed:,} / {g.total:,}",
                         esc(g.status) + (f" ({esc(g.reason)})" if g.reason else ""), final("D"), final("B"),
                         final("C"), final("L2")])
        parts.append(table(["ghost", "spawn t0", "control", "ε kind", "nominal ‖ε‖", "realized ‖ε‖",
                             "coordinates changed", "status", "final D", "final B", "final C", "final L2"], rows))
        drift = [e for e in run.events if e.get("event") == "control_drift"]
        if drift:
            parts.append(f'<div class="banner">The ε = 0 control ghost drifted from the main run at step '
                         f"{esc(drift[0].get('step'))}: chaos maps mix ε with that difference. Likely causes: "
                         f"{esc('; '.join(drift[0].get('likely_causes', [])))}</div>")
        estimate = self.result.transition.get("ghost_C")
        if estimate is not None and estimate.quality not in ("unavailable", "none"):
            parts.append(self._peaks(estimate, "Main-vs-ghost C per spawn, peaks marked (Finding I on Fig. 3a)",
                                     "1 − cos(θ_t1, θ'_t1)", log_y=True))
        return "".join(parts)

    def _peaks(self, estimate: TransitionEstimate, title: str, ylabel: str, *, log_y: bool = False) -> str:
        evidence = estimate.evidence
        ids, starts = evidence.get("row_ids", []), evidence.get("row_starts", [])
        peaks = evidence.get("row_peaks", [])
        if not starts:
            return ""
        ghost_rows = {g.index: r for r, g in enumerate(self.run.ghosts)}
        rows = []
        # Up to 8 rows spread over the ones the estimate used (they are ordered by their start step).
        for k in np.unique(np.linspace(0, len(starts) - 1, min(len(starts), 8)).round().astype(int)):
            t0, row_id = starts[k], ids[k]
            if estimate.method == "trajectory_C":
                t, values = self.steps[row_id:], self.run.C[row_id, row_id:]
            else:
                row = self.run.chaos["C"][ghost_rows[row_id]]
                keep = np.isfinite(row)
                t, values = self.steps[keep], row[keep]
            rows.append((f"t0 = {t0}", t, values, peaks[k]))
        self.tick("C peaks")
        png = figures.peaks_figure(self.steps, rows, title=title, ylabel=ylabel, log_steps=self.log_steps,
                                   transition=self.transition, log_y=log_y)
        return img(png, title, esc(estimate.summary))

    def cone(self) -> str:
        run, result = self.run, self.result
        if not result.cone.available:
            return _missing(esc(result.cone.reason) + ". The cone curves (Fig. 5), the kernel velocity and the kernel "
                            "embedding need them.")
        steps, S = self.steps, run.S
        parts = []
        curves = []
        for c in result.cone.cones:
            t, values = run.kernel_distance_to(c.tau)
            curves.append((c.tau, t, values))
        if curves:
            self.tick("Fig. 5a")
            parts.append(img(figures.cone_curves_figure(curves, log_steps=self.log_steps,
                                                         transition=self.transition), "cone curves"))
        lags = [(dt, *lag_curve(steps, S, dt)) for dt in result.cone.lags]
        if lags:
            self.tick("Fig. 5b")
            parts.append(img(figures.lag_curves_figure(lags, log_steps=self.log_steps, transition=self.transition),
                              "lag curves", "Pairs within 10 % of t + dt."))
        embedding = result.cone.embedding
        if embedding is not None:
            self.tick("Fig. 5c")
            parts.append(img(figures.embedding_figure(embedding.steps, embedding.coordinates, embedding.explained,
                                                       transition=self.transition), "kernel embedding",
                              "Classical MDS on the chordal distance √(2S) = PCA of Frobenius-normalized kernels."))
        if self.transition is not None:
            # The early, chaotic kernels dominate the embedding's scale: zoom into the kernels after the transition.
            keep = steps >= self.transition
            late = kernel_embedding(steps[keep], S[np.ix_(keep, keep)])
            if late is not None:
                self.tick("Fig. 5c (zoom)")
                parts.append(img(figures.embedding_figure(late.steps, late.coordinates, late.explained,
                                                           title=f"Kernels from step {self.transition} on (Fig. 5c, "
                                                                 "zoom)"),
                                  "kernel embedding after the transition",
                                  f"The same embedding of the kernels from step {self.transition} on only."))
        velocity = result.transition.get("kernel_velocity")
        if velocity is not None and "t" in velocity.evidence:
            e = velocity.evidence
            self.tick("kernel velocity")
            parts.append(img(figures.velocity_figure(np.array(e["t"]), np.array(e["v"]), split_step=velocity.step,
                                                      before=e.get("before"), after=e.get("after"),
                                                      unit=e.get("unit", 1.0), fit_from_step=e.get("fit_from_step")),
                              "kernel velocity", esc(velocity.summary)))
        return f'<div class="grid">{"".join(parts)}</div>'

    def switching(self) -> str:
        switching = self.run.switching
        if switching is None:
            return _missing(_MISSING_MAP["switching"])
        self.tick("Fig. 6")
        return img(figures.switching_figure(switching, transition=self.transition), "switching curve")

    def evidence(self) -> str:
        estimate = self.result.transition.get("trajectory_C")
        if estimate is None or estimate.quality in ("unavailable", "none"):
            return _missing(esc(estimate.summary if estimate else "no estimate"))
        return self._peaks(estimate, "Rows C(t0, ·) with the largest rise, plateau onsets marked (Finding I)",
                           "C(t0, t1)")

    def configuration(self) -> str:
        run, manifest = self.run, self.run.manifest
        config, model = run.config, manifest.get("model", {})
        kernel, ghosts = config.get("kernel"), config.get("ghosts")
        rows = [
            ["run directory", esc(run.path)], ["status", esc(run.status)],
            ["created / updated", f"{esc(manifest.get('created', '?'))} / {esc(manifest.get('updated', '?'))}"],
            ["versions", esc(f"dynprobe {manifest.get('dynprobe_version', '?')}, torch "
                             f"{manifest.get('torch_version', '?')}, numpy {manifest.get('numpy_version', '?')}, "
                             f"python {manifest.get('python_version', '?')}")],
            ["command", f"<code>{esc(manifest.get('command', '?'))}</code>"],
            ["model", esc(f"{model.get('class', '?')} · {model.get('num_parameters', '?')} trainable parameters · "
                          f"stored as {model.get('storage_dtype', '?')} · {model.get('device', '?')}")],
            ["optimizer", esc(f"{manifest.get('optimizer', {}).get('class', '?')} "
                              f"{_json(manifest.get('optimizer', {}).get('defaults', {}))}")],
            ["eval set", esc(f"{manifest.get('eval', {}).get('n', '?')} examples, "
                             f"{manifest.get('eval', {}).get('num_classes', '?')} classes")],
            ["schedule", f"<code>{esc(_json(config.get('schedule')))}</code>"],
            ["eNTK", esc(f"mode {kernel.get('mode')}, n = {kernel.get('n')}, BN {kernel.get('bn')}, every "
                         f"{kernel.get('every')} snapshot(s)") if isinstance(kernel, dict) else "not measured"],
            ["loss barriers", esc(f"α grid of {config.get('barrier_alphas', '?')} points on [0, 1]; "
                                  f"{config.get('trajectory_barriers', 0)} preceding snapshot(s) per snapshot")],
        ]
        if isinstance(ghosts, dict):
            perturbation = ghosts.get("perturbation", {})
            rows.append(["ghosts", esc(f"spawn {_json(ghosts.get('at'))}; ε kind {perturbation.get('kind')}, "
                                       f"nominal norm {perturbation.get('norm')}, seed {perturbation.get('seed')}; "
                                       f"control {ghosts.get('control')}; barrier α grid "
                                       f"{ghosts.get('barrier_alphas')} points; B and S every "
                                       f"{ghosts.get('costly_every', ghosts.get('barrier_every', 1))} "
                                       "snapshot(s) of a ghost")])
            rows.append(["ghosts compared with", esc(run.conventions.get("ghosts", "the main model"))])
        else:
            rows.append(["ghosts", "none"])
        conventions = [[f"<code>{esc(k)}</code>", esc(v if isinstance(v, str) else _json(v))]
                       for k, v in run.conventions.items()]
        counts: dict[str, int] = {}
        for event in run.events:
            counts[str(event.get("event"))] = counts.get(str(event.get("event")), 0) + 1
        notable = [[esc(e.get("event")), fmt(e.get("step")), esc(e.get("error") or e.get("reason") or "")]
                   for e in run.events if e.get("event") in ("probe_error", "control_drift", "grad_edit_detected",
                                                             "transition")][:20]
        return ("<h3>Run</h3>" + table(None, rows) + "<h3>Conventions</h3>" + table(["quantity", "convention"],
                                                                                       conventions)
                + "<h3>Events</h3><p>" + esc(", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))) + "</p>"
                + (table(["event", "step", "detail"], notable) if notable else ""))


_MISSING_MAP = {
    "C": "No parameter dissimilarity C was recorded (the metric rows are missing).",
    "S": "No eNTK kernels in this run, so no kernel distance S: pass <code>Probe(..., kernel=dynprobe.KernelConfig())"
         "</code>.",
    "D": "No disagreement D was recorded.",
    "B": "No loss barriers between snapshots: pass <code>Probe(..., trajectory_barriers=k)</code>, or compute them "
         "afterwards with <code>dynprobe.fill_barriers(run, model, eval_data)</code>.",
    "ghosts": "No ghosts in this run, so no chaos maps (Fig. 3): pass <code>Probe(..., ghosts=dynprobe.Ghosts(at=[0, "
              "100, 1000]))</code> and watch the loss (<code>criterion = probe.watch(criterion)</code>).",
    "switching": "No switching results (Fig. 6): run <code>dynprobe.switching_experiment(...)</code> on this run.",
}

def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)
