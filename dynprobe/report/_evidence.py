"""Evidence figures of the Finding-I estimates: a few rows of a C map with their level-off steps marked."""
from __future__ import annotations

import numpy as np

from dynprobe.analysis.estimate import TransitionEstimate
from dynprobe.report import figures

from ._context import SectionContext
from ._html import esc, img

__all__ = ["level_offs"]


def level_offs(s: SectionContext, estimate: TransitionEstimate, title: str, ylabel: str, *, log_y: bool = False
               ) -> str:
    """A figure of up to 8 rows the estimate used, each with its level-off step marked."""
    evidence = estimate.evidence
    ids, starts, peaks = evidence.get("row_ids", []), evidence.get("row_starts", []), evidence.get("row_peaks", [])
    if not starts:
        return ""
    ghost_rows = {g.ghost_id: r for r, g in enumerate(s.run.ghosts)}
    rows = []
    for k in np.unique(np.linspace(0, len(starts) - 1, min(len(starts), 8)).round().astype(int)):
        t0, row_id = starts[k], ids[k]
        if estimate.method == "trajectory_C":
            t, values = s.steps[row_id:], s.run.C[row_id, row_id:]
        else:
            row = s.run.chaos["C"][ghost_rows[row_id]]
            keep = np.isfinite(row)
            t, values = s.steps[keep], row[keep]
        rows.append((f"t0 = {t0}", t, values, peaks[k]))
    s.tick("C level-offs")
    png = figures.peaks_figure(s.steps, rows, title=title, ylabel=ylabel, log_steps=s.log_steps,
                               transition=s.transition, log_y=log_y)
    return img(png, title, esc(estimate.summary))
