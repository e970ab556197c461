"""dynprobe: watch how a PyTorch network learns.

Attach a :class:`Probe` to an unmodified training loop (two lines), and it records the parameter trajectory
and the interval metrics of the two-phase paper — parameter cosine dissimilarity C (eq. 1), eNTK kernel
distance S (eq. 4), loss barrier B (eq. 5), disagreement D (eq. 6) — and, with :class:`Ghosts`, the chaos
experiment, into a crash-safe run directory that :func:`load_run` reads back as numpy arrays.
"""
from . import schedule
from ._version import __version__
from .barrier import BarrierResult, loss_barrier
from .config import Ghosts, KernelConfig
from .linear import LinearizedModel, linearize
from .perturb import Perturbation, PerturbationReport
from .probe import Probe, WatchedLoss
from .run import Run, load_run
from .store import RunFormatError
from .trajectory import fill_barriers

__all__ = [
    "BarrierResult",
    "Ghosts",
    "KernelConfig",
    "LinearizedModel",
    "Perturbation",
    "PerturbationReport",
    "Probe",
    "Run",
    "RunFormatError",
    "WatchedLoss",
    "__version__",
    "fill_barriers",
    "linearize",
    "load_run",
    "loss_barrier",
    "schedule",
]
