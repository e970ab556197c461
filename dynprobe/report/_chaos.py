"""The report's sensitivity section: separation curves, growth rates, each ghost's verdict, the chaos maps."""
from __future__ import annotations

import numpy as np

from dynprobe.report import figures
from dynprobe.report.summary import ghost_mode

from ._context import SectionContext
from ._evidence import level_offs
from ._html import esc, fmt, img, missing, note, table
from ._text import INTROS

__all__ = ["chaos_section"]

_PLATEAU_CAPTION = ("Each ghost's plateau level: the median separation over the last tenth of its life (filled: "
                    "saturated, changing less than the plateau factor over the last half of its life). The chaos "
                    "estimate brackets the transition between the last spawn on the chaotic level and the first "
                    "whose every ghost saturates K× below it.")

_MISSING_GHOSTS = ("No ghosts in this run, so no sensitivity or chaos maps: pass <code>Probe(..., "
                   "ghosts=dynprobe.Ghosts(at=[0, 100, 1000]))</code> and watch the loss (<code>criterion = "
                   "probe.watch(criterion)</code>).")


def chaos_section(s: SectionContext) -> str:
    run = s.run
    if not run.ghosts:
        return missing(_MISSING_GHOSTS)
    mode = ghost_mode(run) or ""
    parts = [note(INTROS["chaos"]), f'<p class="sub">Ghosts: {esc(mode)}.</p>']
    parts += _drift_banners(s)
    parts.append(_sensitivity(s))
    parts.append(_ghost_table(s))
    parts.append(_maps(s, mode))
    estimate = s.result.transition.get("ghost_C")
    if estimate is not None and estimate.quality not in ("unavailable", "none"):
        parts.append(level_offs(s, estimate, "Main-vs-ghost C per spawn, level-off steps marked (Fig. 3a)",
                                  "1 − cos(θ_t1, θ'_t1)", log_y=True))
    return "".join(parts)


def _drift_banners(s: SectionContext) -> list[str]:
    out = []
    drift = [e for e in s.run.events if e.get("event") == "control_drift"]
    if drift:
        out.append(f'<div class="banner">The ε = 0 control ghost drifted from the main run at step '
                   f"{esc(drift[0].get('step'))}: chaos maps mix ε with that difference. Likely causes: "
                   f"{esc('; '.join(map(str, drift[0].get('likely_causes', []))))}</div>")
    shadow = [e for e in s.run.events if e.get("event") == "shadow_drift" and e.get("exceeds_ghost_signal")]
    if shadow:
        out.append(f'<div class="banner">At step {esc(shadow[0].get("step"))} the ε = 0 shadow that vectorized '
                   "ghosts are compared with was farther from the main run than the smallest ghost separation: those "
                   "comparisons measure rounding of the vectorized kernels as much as ε. Use "
                   "<code>Ghosts(vectorize=False)</code> for an exact reference.</div>")
    return out


def _sensitivity(s: SectionContext) -> str:
    curves = s.result.separation
    chaos = s.result.transition.get("chaos")
    if not any(not c.control and c.steps.size for c in curves):
        return missing("No separation curves in this run (recorded by newer dynprobe versions after every ghost "
                       "step): the sensitivity estimate and its figures need them.")
    evidence = chaos.evidence if chaos is not None else {}
    s.tick("separation curves")
    mode = (s.run.manifest.get("ghost_mode") or {}).get("mode")
    suffix = f" ({mode} ghosts)" if mode and mode != "sequential" else ""
    separation = figures.separation_figure(curves, transition=s.transition, log_steps=s.log_steps,
                                           title_suffix=suffix)
    s.tick("plateau levels")

    def number(key: str) -> float | None:
        value = evidence.get(key)
        return float(value) if isinstance(value, (int, float)) else None

    plateau = figures.plateau_figure(evidence.get("ghosts", []), chaotic_level=number("chaotic_level"),
                                     threshold=number("threshold_L2"),
                                     bracket=chaos.interval if chaos is not None else None, transition=s.transition,
                                     log_steps=s.log_steps)
    caption = esc(chaos.summary) if chaos is not None else ""
    return (f'<div class="grid">{img(separation, "separation curves", caption)}'
            f'{img(plateau, "plateau level against spawn step", _PLATEAU_CAPTION)}</div>')


def _ghost_table(s: SectionContext) -> str:
    run, chaos = s.run, s.run.chaos
    estimate = s.result.transition.get("chaos")
    sensitivity = {g["ghost"]: g for g in (estimate.evidence.get("ghosts", []) if estimate is not None else [])}
    verdicts = {v.ghost: v for v in s.result.verdicts}
    rows = []
    for row, g in enumerate(run.ghosts):
        compared = np.flatnonzero(np.isfinite(chaos["D"][row]))
        last = int(compared[-1]) if compared.size else None
        sens, verdict = sensitivity.get(g.ghost_id, {}), verdicts.get(g.ghost_id)

        def check(name: str) -> str:
            c = verdict.checks.get(name) if verdict else None
            if not c or c.get("threshold") is None:
                return "—"
            mark = "&gt;" if c["above"] else "≤"
            by_control = " (the drifted control's own value)" if str(c.get("source", "")).startswith(
                "the ε = 0 control") else ""
            return f"{fmt(c['value'], 3)} {mark} {fmt(c['threshold'], 3)}{by_control}"

        where = (f"{esc(verdict.verdict)} at step {verdict.final_step}" if verdict else
                 "control" if g.control else "—")
        rows.append([fmt(g.ghost_id), fmt(g.spawn_step), "yes" if g.control else "", esc(g.kind), fmt(g.realized_norm),
                     esc(g.status) + (f" ({esc(g.reason)})" if g.reason else ""), _number(sens.get("level_L2")),
                     _number(sens.get("growth")), esc(sens.get("class", "—")), where, check("D"), check("B_linear"),
                     fmt(chaos["C"][row, last] if last is not None else None, 3),
                     fmt(chaos["B"][row, last] if last is not None else None, 3)])
    head = ["ghost", "spawn t0", "control", "ε kind", "realized ‖ε‖", "status", "plateau level L2",
            "growth over the last half of its life", "class", "verdict at its last comparison", "D vs threshold",
            "B_linear vs threshold", "1 − cos (C)", "B (eq. 5, not used)"]
    sources = sorted({c["source"] for v in s.result.verdicts for c in v.checks.values() if c.get("source")})
    return ("<h3>Every ghost</h3>" + table(head, rows) +
            "<p>A verdict compares each value with its threshold: <b>diverged</b> when one exceeds it, <b>close</b> "
            "when every one is at most half of it, <b>borderline</b> in between (no decision hangs on a value that "
            "sits at a threshold). A verdict describes the ghost at its last comparison only — a still-chaotic ghost "
            "can look close until it has had time to diverge — so the transition is read from where each ghost's "
            f"separation saturates, not from verdicts. Thresholds from: {esc('; '.join(sources)) or '—'}.</p>")


def _number(value: object) -> str:
    return fmt(float(value), 3) if isinstance(value, (int, float)) else esc(str(value)) if value else "—"


def _maps(s: SectionContext, mode: str) -> str:
    run = s.run
    chaos = run.chaos
    labels = [f"{'control ε=0' if g.control else 't0=' + str(g.spawn_step)} (#{g.ghost_id})" for g in run.ghosts]
    maps = {name: chaos[name] for name in ("D", "B_linear", "C", "L2", "S", "B")
            if name in chaos and np.isfinite(chaos[name]).any()}
    if not maps or not len(run):
        return missing("No ghost has been compared with the main run yet (comparisons happen at snapshots after "
                       "the spawn).")
    s.tick("chaos maps")
    short = mode.split(":")[0] if mode else ""
    png = figures.chaos_maps_figure(s.steps, maps, labels, log_steps=s.log_steps, transition=s.transition,
                                    title_suffix=f" ({short})" if short and short != "sequential" else "")
    return img(png, "chaos maps", "Rows: ghosts by spawn step t0 (the ε = 0 control marked); columns: snapshots t1. "
                                  "Grey: before the spawn or not computed; hatched: exactly 0 (a log colour scale "
                                  "cannot show 0).")
