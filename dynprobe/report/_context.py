"""What every report section reads: the run, its analysis, the display options, the progress callback."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dynprobe.analysis.run_analysis import RunAnalysis
from dynprobe.store.run import Run

__all__ = ["SectionContext", "Tick"]

Tick = Callable[[str], None]


class SectionContext:
    """``run`` and its ``result`` (:func:`dynprobe.analysis.analyze`), ``log_steps``/``log_y`` (axes), ``tick``
    (called before each piece of work), ``steps`` and ``transition`` (the headline's transition step, the one
    transition marker of every figure), ``include_command`` (show the recorded command line: off, since a report is
    shared)."""

    def __init__(self, run: Run, result: RunAnalysis, *, log_steps: bool, tick: Tick,
                 log_y: bool | None = None, include_command: bool = False) -> None:
        self.run, self.result, self.log_steps, self.tick, self.log_y = run, result, log_steps, tick, log_y
        self.include_command = include_command  # the recorded command line goes into the page only when asked
        self.steps: np.ndarray = run.steps
        self.transition: int | None = result.transition.step
