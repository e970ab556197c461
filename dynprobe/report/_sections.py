"""The sections of a run's HTML report (:class:`RunSections`), each an HTML fragment that opens with a sentence a
practitioner understands. Shared by ``dynprobe report`` and ``dynprobe compare`` (:mod:`dynprobe.report.html`
assembles the page). Every run-provided string is escaped with :func:`esc`; figures are embedded as base64 PNG.
The chaos, cone and per-layer sections live in their own modules."""
from __future__ import annotations

from typing import Any

import numpy as np

from dynprobe.analysis.estimate import TransitionEstimate
from dynprobe.analysis.learning_rate import lr_changes
from dynprobe.analysis.run_analysis import control_drift_note
from dynprobe.report import figures
from dynprobe.report.summary import kernel_settings

from . import _chaos, _cone, _layers
from ._context import SectionContext
from ._evidence import level_offs
from ._html import esc, fmt, img, interval_text, json_text, missing, note, table
from ._text import GLOSSARY, INTROS, REFERENCE, WHAT_IS_THE_TRANSITION

__all__ = ["MISSING", "RunSections"]

MISSING = {
    "C": "No parameter dissimilarity C was recorded (the metric rows are missing).",
    "S": "No eNTK kernels in this run, so no kernel distance S: pass <code>Probe(..., kernel=dynprobe.KernelConfig())"
         "</code>.",
    "D": "No disagreement D was recorded.",
    "B": "No loss barriers between snapshots: pass <code>Probe(..., barriers=dynprobe.Barriers(previous_snapshots=1))"
         "</code>, or compute them afterwards with <code>dynprobe.fill_barriers(run, model, eval_data)</code>.",
    "ghosts": "No ghosts in this run, so no sensitivity or chaos maps: pass <code>Probe(..., ghosts=dynprobe.Ghosts("
              "at=[0, 100, 1000]))</code> and watch the loss (<code>criterion = probe.watch(criterion)</code>).",
    "switching": "No switching results (Fig. 6): run <code>dynprobe.switching_experiment(...)</code> on this run.",
}


class RunSections(SectionContext):
    """The HTML of each report section for one run (shared by ``report`` and ``compare``)."""

    # ------------------------------------------------------------------------------------------ top of the page

    def header(self) -> str:
        run, model = self.run, self.run.manifest.get("model", {})
        model = model if isinstance(model, dict) else {}
        status = run.status
        last = f", last step {run.steps[-1]}" if len(run) else ""
        out = [f"<h1>Training dynamics of {esc(run.name)}</h1>",
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
        damage = getattr(run, "damage", None)
        if damage:
            out.append('<div class="banner">Part of this run is <b>damaged</b>; the report covers the intact part: '
                       f"{esc('; '.join(map(str, damage)))}.</div>")
        return "".join(out)

    def headline(self) -> str:
        """The one answer, above every detail: the transition with its bracket, or why it is undetermined."""
        report = self.result.transition
        return (f'<div class="headline" id="headline"><p class="answer">{esc(report.headline)}</p>'
                f"<p>{WHAT_IS_THE_TRANSITION}</p></div>")

    # ------------------------------------------------------------------------------------------ sections

    def summary(self) -> str:
        report = self.result.transition
        rows = []
        for e in report.estimates:
            role = " <b>(headline)</b>" if e.method == "chaos" else " (trajectory)"
            rows.append([esc(e.label) + role, fmt(e.step), esc(interval_text(e.interval)),
                         f'<span class="q-{esc(e.quality)}">{esc(e.quality)}</span>', esc(e.summary),
                         _thresholds(e)])
        parts = [note(INTROS["summary"]),
                 f"<h3>Transition estimates</h3><p>{esc(report.headline)}</p>"
                 f"<p>Separately, {esc(report.settles_summary)} — when the main trajectory settles is a different "
                 "event from the end of the chaotic phase, and these estimates do not vote on it.</p>",
                 table(["estimate", "step", "bracket", "quality", "evidence", "thresholds (value compared)"], rows)]
        cone = self.result.cone
        parts.append("<h3>Cone</h3>")
        if not cone.available:
            parts.append(missing(esc(cone.reason)))
        else:
            rows = [[fmt(c.tau), fmt(c.plateau), fmt(c.max_distance), f"{c.half_angle_deg:.2f}°",
                     f"{c.plateau_angle_deg:.2f}°", {True: "yes", False: "no", None: "—"}[c.plateaued],
                     fmt(c.points)] for c in cone.cones]
            parts.append(table(["τ", "plateau of S(t, τ)", "max S(t, τ)", "half-angle arccos(1 − max)",
                                 "plateau angle", "plateaued (growth ≤ 0.2)", "points after τ"], rows))
            if cone.lag_bounds:
                bounds = ", ".join(f"dt = {dt}: {value:.3g}" for dt, value in cone.lag_bounds.items())
                ratio = (f"; largest / smallest = {cone.lag_bound_ratio:.3g}, {cone.lag_bound_reading}"
                         if cone.lag_bound_ratio else "")
                start = f"t ≥ {self.transition}" if self.transition is not None else "all t"
                parts.append(f"<p>Upper bound of S(t, t + dt) over {esc(start)}: {esc(bounds)}{esc(ratio)} "
                             "(≈ 1 when curves of different dt share one bound — the cone; ≈ the lag ratio for a "
                             "random walk).</p>")
        if self.result.missing:
            parts.append("<h3>Missing from this run</h3>" + "".join(missing(esc(m)) for m in self.result.missing))
        return '<div class="box">' + "".join(parts) + "</div>"

    def training(self) -> str:
        run = self.run
        if len(run) < 1:
            return missing("No snapshot has been committed yet.")
        self.tick("loss and accuracy")
        rates = run.lr
        # the rate of the update after each snapshot (the last snapshot: the rate of the update that reached it)
        lr = (rates[np.clip(run.steps, 0, rates.shape[0] - 1), 0] if rates.shape[0] and rates.shape[1]
              else np.full(len(run), np.nan))
        loss = figures.curves_figure(self.steps, {"eval loss": run.eval_loss, "train loss": run.train_loss},
                                     ylabel="loss", title="Loss", log_steps=self.log_steps, log_y=self.log_y,
                                     transition=self.transition)
        accuracy = figures.curves_figure(self.steps, {"eval accuracy": run.eval_accuracy}, ylabel="accuracy",
                                         title="Eval accuracy (and learning rate)", log_steps=self.log_steps,
                                         transition=self.transition,
                                         secondary={"lr": lr} if np.isfinite(lr).any() else None,
                                         secondary_label="learning rate")
        return (note(INTROS["training"]) +
                f'<div class="grid">{img(loss, "loss curves")}{img(accuracy, "accuracy curve")}</div>')

    def trajectory_maps(self) -> str:
        run = self.run
        if len(run) < 2:
            return missing("Interval maps need at least two snapshots.")
        specs = [("C", run.C, "1 − cos(θ_i, θ_j)", "Parameter dissimilarity C"),
                 ("S", run.S, "S", "Kernel distance S"),
                 ("D", run.D, "disagreement", "Disagreement D"),
                 ("B", run.B, "loss barrier", "Loss barrier B (mean reference)"),
                 ("B_linear", run.B_linear, "loss barrier", "Loss barrier B_linear (linear reference)")]
        out, notes = [], []
        for name, matrix, label, title in specs:
            off_diagonal = matrix[~np.eye(len(matrix), dtype=bool)]
            if not np.isfinite(off_diagonal).any():
                if name != "B_linear":
                    notes.append(missing(MISSING[name]))
                continue
            self.tick(f"{name} map")
            coverage = float(np.isfinite(off_diagonal).mean())
            caption = "" if coverage > 0.99 else f"computed for {coverage:.0%} of the pairs (grey: not computed)"
            png = figures.heatmap_figure(self.steps, matrix, title=title, label=label, log_steps=self.log_steps,
                                         transition=self.transition)
            out.append(img(png, f"{name} map", esc(caption)))
        rates = run.lr
        if rates.size and np.isfinite(rates).any():  # the schedule under the maps: same step axis
            self.tick("learning rate")
            png = figures.curves_figure(np.arange(rates.shape[0]), {f"group {g}": rates[:, g]
                                                                    for g in range(rates.shape[1])},
                                        ylabel="learning rate", title="Learning rate of every optimizer step",
                                        log_steps=self.log_steps, log_y=None, transition=self.transition)
            changes = lr_changes(rates)
            caption = ("step changes: " + "; ".join(c.text for c in changes[:6]) if changes else
                       "no step change of ×1.5 or more")
            out.append(img(png, "learning rate", esc(caption)))
        return note(INTROS["trajectory"]) + f'<div class="grid">{"".join(out)}</div>' + "".join(notes)

    def chaos(self) -> str:
        return _chaos.chaos_section(self)

    def cone(self) -> str:
        return _cone.cone_section(self)

    def layers(self) -> str:
        return _layers.layers_section(self)

    def switching(self) -> str:
        switching = self.run.switching
        if switching is None:
            return missing(MISSING["switching"])
        self.tick("Fig. 6")
        config = switching.get("config_id")
        caption = (f"Configuration {esc(config)}: {esc(json_text(switching.get('config')))}" if config else "")
        return note(INTROS["switching"]) + img(figures.switching_figure(switching, transition=self.transition),
                                                "switching curve", caption)

    def evidence(self) -> str:
        estimate = self.result.transition.get("trajectory_C")
        if estimate is None or estimate.quality in ("unavailable", "none"):
            return missing(esc(estimate.summary if estimate else "no estimate"))
        return note(INTROS["evidence"]) + level_offs(
            self, estimate, "Rows C(t0, ·) with the largest rise, level-off steps marked", "C(t0, t1)")

    def configuration(self) -> str:
        run, manifest = self.run, self.run.manifest
        config, model = run.config, manifest.get("model", {})
        model = model if isinstance(model, dict) else {}
        ghosts = config.get("ghosts")
        rows = [
            ["run directory", esc(run.path)], ["status", esc(run.status)],
            ["created / updated", f"{esc(manifest.get('created', '?'))} / {esc(manifest.get('updated', '?'))}"],
            ["versions", esc(f"dynprobe {manifest.get('dynprobe_version', '?')}, torch "
                             f"{manifest.get('torch_version', '?')}, numpy {manifest.get('numpy_version', '?')}, "
                             f"python {manifest.get('python_version', '?')}")],
            *([["command", f"<code>{esc(manifest['command'])}</code>"]]
              if self.include_command and isinstance(manifest.get("command"), str) else []),
            ["model", esc(f"{model.get('class', '?')} · {model.get('num_parameters', '?')} trainable parameters · "
                          f"stored as {model.get('storage_dtype', '?')} · {model.get('device', '?')}")],
            ["optimizer", esc(f"{(manifest.get('optimizer') or {}).get('class', '?')} "
                              f"{json_text((manifest.get('optimizer') or {}).get('defaults', {}))}")],
            ["eval set", esc(f"{(manifest.get('eval') or {}).get('n', '?')} examples")],
            ["schedule", f"<code>{esc(json_text(config.get('schedule')))}</code>"],
            ["eNTK", esc(kernel_settings(run) or "not measured")],
            ["loss barriers", esc(_barriers_text(config))],
        ]
        usage = getattr(run, "disk_usage", None)
        if usage is not None:
            rows.append(["size on disk", esc(f"{usage.total_bytes / 1e6:.1f} MB "
                                             f"({usage.bytes_per_snapshot / 1e6:.2f} MB per snapshot)")])
        if isinstance(ghosts, dict):
            perturbation = ghosts.get("perturbation", {}) or {}
            rows.append(["ghosts", esc(f"spawn {json_text(ghosts.get('at'))}; ε kind {perturbation.get('kind')}, "
                                       f"nominal norm {perturbation.get('norm')}, seed {perturbation.get('seed')}; "
                                       f"control {ghosts.get('control')}")])
            compared = str(run.conventions.get("ghosts", "the main model"))
            drift = control_drift_note(run)
            rows.append(["ghosts compared with", esc(f"{compared}. In this run, {drift}" if drift else compared)])
        else:
            rows.append(["ghosts", "none"])
        conventions = [[f"<code>{esc(k)}</code>", esc(v if isinstance(v, str) else json_text(v))]
                       for k, v in run.conventions.items()]
        counts: dict[str, int] = {}
        for event in run.events:
            counts[str(event.get("event"))] = counts.get(str(event.get("event")), 0) + 1
        notable = [[esc(e.get("event")), fmt(e.get("step")), esc(_event_detail(e))] for e in run.events
                   if e.get("event") in ("probe_error", "control_drift", "shadow_drift", "grad_edit_detected",
                                         "transition", "ghost_mode", "ghost_status")][:30]
        return (note(INTROS["configuration"]) + "<h3>Run</h3>" + table(None, rows) + "<h3>Conventions</h3>"
                + table(["quantity", "convention"], conventions)
                + "<h3>Events</h3><p>" + esc(", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))) + "</p>"
                + (table(["event", "step", "detail"], notable) if notable else ""))

    def glossary(self) -> str:
        items = "".join(f"<dt>{esc(term)}</dt><dd>{text}</dd>" for term, text in GLOSSARY)
        return f'<dl class="glossary" id="glossary-terms">{items}</dl>'

    def reference(self) -> str:
        return REFERENCE


def _barriers_text(config: dict[str, Any]) -> str:
    barriers = config.get("barriers") or {}
    return (f"α grid of {barriers.get('alphas', '?')} points on [0, 1]; ghosts {barriers.get('ghosts')}; "
            f"{barriers.get('previous_snapshots', 0)} preceding snapshot(s) every "
            f"{barriers.get('every_snapshots', 1)} snapshot(s); both references (mean, eq. 5; linear)")


def _event_detail(event: dict[str, Any]) -> str:
    """A readable detail for a notable event: its estimate, reason, error or causes, else its other fields."""
    if isinstance(event.get("estimate"), dict):
        return str(event["estimate"].get("summary", ""))
    for key in ("error", "reason", "status_reason"):
        if event.get(key):
            prefix = f"{event['status']}: " if event.get("status") and key == "reason" else ""
            return prefix + str(event[key])
    if event.get("likely_causes"):
        return "likely causes: " + "; ".join(map(str, event["likely_causes"]))
    rest = {k: v for k, v in event.items() if k not in ("event", "step", "time")}
    return json_text(rest) if rest else ""


def _thresholds(e: TransitionEstimate) -> str:
    """Each estimator's deciding threshold next to the value it was compared with."""
    ev = e.evidence
    if e.method == "chaos" and "rule" in ev:
        rule = ev["rule"]
        contrast = f"; the estimate's spawn ×{ev['contrast']:.3g} below" if isinstance(ev.get("contrast"), float) \
            else ""
        level = ev.get("chaotic_level")
        return esc(f"chaotic level L2 {fmt(level, 3)} (largest spawn median); low at ≥ ×{rule['level_ratio']:g} "
                   f"below it ({fmt(ev.get('threshold_L2'), 3)}){contrast}; saturated when L2 grew ≤ "
                   f"×{rule['plateau_factor']:g} over the last {rule['plateau_fraction']:g} of a ghost's life")
    if e.method == "kernel_velocity" and "threshold" in ev:
        return esc(f"lag Δ = {ev['lag']}; threshold {ev['threshold']:.3g}, {ev['fraction']:g} of the way in log S "
                   f"from the early level {ev['early_level']:.3g} (step {ev['early_step']}) to the late floor "
                   f"{ev['floor']:.3g} (drop ×{ev['drop']:.3g}, needs ≥ ×{ev['min_drop']:g})")
    if e.method in ("trajectory_C", "ghost_C") and "rate_fraction" in ev:
        agreement = f"; agreement {ev['agreement']:.0%} (high ≥ 60 %)" if "agreement" in ev else ""
        return esc(f"rise per e-fold of time ≤ {ev['rate_fraction']:.0%} of its peak; still rising "
                   f"{ev['still_rising_share']:.0%} of the weight (a bound at ≥ 50 %){agreement}")
    if e.method == "online" and "threshold" in ev:
        return esc(f"peak/{ev.get('drop_factor', '?')} = {ev['threshold']:.3g} for {ev.get('patience', '?')} pairs")
    return "—"
