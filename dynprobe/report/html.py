"""``dynprobe report``: one self-contained HTML file per run.

Figures are embedded as base64 PNG (no network, no JavaScript); every string that comes from a run (paths, model
and optimizer names, configuration values, conventions, event reasons) goes through :func:`html.escape`. The page
opens with one answer (the transition with its bracket, or why it is undetermined), then sections that each start
in plain language: the estimates, loss and accuracy, sensitivity to a tiny perturbation (separation curves,
growth rates, each ghost's verdict, the chaos maps), the trajectory maps, the cone, per-layer dynamics, switching,
the evidence of the Finding-I estimate, a glossary, the reference part (the paper and its equation numbers), and
the run's configuration. Anything missing becomes a note saying what is missing and how to get it.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from dynprobe.analysis.run_analysis import RunAnalysis, analyze
from dynprobe.store.files import atomic_write
from dynprobe.store.run import Run

from . import compare as _compare
from ._context import Tick
from ._html import esc
from ._page import nav, page
from ._sections import RunSections

__all__ = ["SECTIONS", "build_comparison", "build_report", "check_writable", "write_html"]

#: (anchor, title, RunSections method): the report's sections in order.
SECTIONS = (
    ("summary", "Transition estimates", "summary"),
    ("training", "Loss and accuracy", "training"),
    ("chaos", "Sensitivity to a tiny perturbation (the chaos effect)", "chaos"),
    ("trajectory", "How the network differs from itself over time", "trajectory_maps"),
    ("cone", "The cone: the kernel after the transition", "cone"),
    ("layers", "Per-layer dynamics", "layers"),
    ("switching", "Switching to linearized training", "switching"),
    ("evidence", "Evidence of the C-map estimate", "evidence"),
    ("glossary", "Glossary", "glossary"),
    ("reference", "Reference", "reference"),
    ("configuration", "Configuration and conventions", "configuration"),
)


def build_report(run: Run, *, log_steps: bool = False, log_y: bool | None = None, tick: Tick | None = None,
                 result: RunAnalysis | None = None, include_command: bool = False) -> str:
    """The report of ``run`` as one HTML document (a string). ``tick(label)`` is called before each piece of work
    (progress); ``result``: :func:`dynprobe.analysis.analyze` of ``run`` if already computed; ``log_y``: loss axes
    on a log scale (None: automatic, when the losses span more than 100× or spike); ``include_command``: show the
    command line the run recorded (``Probe(record_command=True)``; off by default, a report is shared)."""
    tick = tick or (lambda label: None)
    tick("analysis")
    sections = RunSections(run, result if result is not None else analyze(run), log_steps=log_steps, tick=tick,
                           log_y=log_y, include_command=include_command)
    body = [sections.header(), sections.headline(), nav([(key, title) for key, title, _ in SECTIONS])]
    for key, title, method in SECTIONS:
        body.append(f'<section id="{key}"><h2>{esc(title)}</h2>{getattr(sections, method)()}</section>')
    return page(f"dynprobe report — {run.name}", "".join(body))


def build_comparison(runs: Sequence[Run] | Run, *more: Run, log_steps: bool = False, log_y: bool | None = None,
                     tick: Tick | None = None, results: Sequence[RunAnalysis] | None = None) -> str:
    """Comparison report of two or more runs (see :func:`dynprobe.report.compare.build_comparison`); the former
    two-run spelling ``build_comparison(run_a, run_b)`` still works."""
    from_runs = [runs, *more] if isinstance(runs, Run) else list(runs)
    return _compare.build_comparison(from_runs, log_steps=log_steps, log_y=log_y, tick=tick, results=results)


def check_writable(path: str | os.PathLike) -> Path:
    """Fail fast — before minutes of figure work — when ``path`` cannot be written: ``PermissionError`` (the CLI's
    exit code 4) naming the path and the reason."""
    path = Path(path)
    if path.is_dir():
        raise PermissionError(f"cannot write the report to {path}: it is a directory; pass a file name with -o")
    if not path.parent.is_dir():
        raise PermissionError(f"cannot write the report to {path}: directory {path.parent} does not exist")
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as error:
        raise PermissionError(f"cannot write the report to {path} ({error.strerror or error}); choose another "
                              "location with -o") from error
    return path


def write_html(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file + rename). Raises ``PermissionError`` (the CLI's
    exit code 4) with a message naming the path when it cannot be written."""
    path = check_writable(path)
    try:
        atomic_write(path, text.encode("utf-8"), mode=0o644)  # mkstemp creates 0600; a report is meant to be shared
    except OSError as error:
        raise PermissionError(f"cannot write the report to {path} ({error.strerror or error}); choose another "
                              "location with -o") from error
    return path
