"""dynprobe: watch how a PyTorch network learns.

Attach a :class:`Probe` to an unmodified training loop (two lines), and it records the parameter trajectory
and the interval metrics of the two-phase paper — parameter cosine dissimilarity C (eq. 1), eNTK kernel
distance S (eq. 4), loss barrier B (eq. 5), disagreement D (eq. 6) — into a crash-safe run directory that
:func:`load_run` reads back as numpy arrays and ``dynprobe report`` turns into an HTML report.
"""
from . import schedule
from ._version import __version__
from .probe import Probe, ProbeError, WatchedLoss
from .run import Run, load_run
from .store import RunFormatError


__all__ = [
    "Probe",
    "ProbeError",
    "Run",
    "RunFormatError",
    "WatchedLoss",
    "__version__",
    "load_run",
    "schedule",
]
