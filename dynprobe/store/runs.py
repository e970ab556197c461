"""``load_runs``: every run directory matching a glob, for notebooks that compare seeds or settings.

>>> runs = dynprobe.load_runs("runs/sweep-*")
>>> [run.name for run in runs]
"""
from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path

from .files import RunFormatError, RunFormatWarning
from .layout import MANIFEST
from .run import Run

__all__ = ["load_runs"]


def load_runs(pattern: str | os.PathLike, *, errors: str = "raise") -> list[Run]:
    """Every run directory matching the glob ``pattern`` (``"runs/sweep-*"``, ``"runs/*/seed-?"``), sorted by path:
    for notebooks comparing seeds or settings. Matches that are not run directories (no manifest) are skipped.

    Args:
        errors: ``"raise"`` (default): a damaged or unreadable run raises :class:`RunFormatError` naming it;
            ``"skip"``: it is left out with a :class:`RunFormatWarning`.

    Raises ``FileNotFoundError`` when no run matches.
    """
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip'; got {errors!r}")
    matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(os.fspath(pattern))))
    candidates = [path for path in matches if os.path.lexists(path / MANIFEST)]  # a FIFO or link here: damage
    if not candidates:
        raise FileNotFoundError(f"no dynprobe run matches {os.fspath(pattern)!r} (a glob of run directories, e.g. "
                                "'runs/sweep-*')")
    runs = []
    for path in candidates:
        try:
            runs.append(Run(path))
        except RunFormatError as error:
            if errors == "raise":
                raise
            warnings.warn(f"load_runs: skipped {path}: {error}", RunFormatWarning, stacklevel=2)
    return runs
