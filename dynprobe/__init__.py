"""dynprobe: watch how a PyTorch network learns.

Attach a :class:`Probe` to an unmodified training loop (two lines), and it records the parameter trajectory
and the interval metrics of the two-phase paper — parameter cosine dissimilarity C (eq. 1), eNTK kernel
distance S (eq. 4), loss barrier B (eq. 5), disagreement D (eq. 6) — and, with :class:`Ghosts`, the chaos
experiment, into a crash-safe run directory that :func:`load_run` reads back as numpy arrays.
"""
from . import analysis, schedule
from ._version import __version__
from ._estimate import TransitionEstimate, TransitionReport
from .analysis import analyze, estimate_transition
from .barrier import BarrierResult, loss_barrier
from .config import Ghosts, KernelConfig
from .detector import TransitionDetector
from .kernels import NTKEngine, empirical_ntk
from .linear import LinearizedModel, linearize
from .metrics import cosine_dissimilarity, disagreement, kernel_distance
from .perturb import Perturbation, PerturbationReport
from .probe import Probe, WatchedLoss
from .run import Run, load_run
from .store import RunFormatError
from .switching import switching_experiment
from .trajectory import fill_barriers

__all__ = [
    "BarrierResult",
    "Ghosts",
    "KernelConfig",
    "LinearizedModel",
    "NTKEngine",
    "Perturbation",
    "PerturbationReport",
    "Probe",
    "Run",
    "RunFormatError",
    "TransitionDetector",
    "TransitionEstimate",
    "TransitionReport",
    "WatchedLoss",
    "__version__",
    "analysis",
    "analyze",
    "cosine_dissimilarity",
    "disagreement",
    "empirical_ntk",
    "estimate_transition",
    "fill_barriers",
    "kernel_distance",
    "linearize",
    "load_run",
    "loss_barrier",
    "schedule",
    "switching_experiment",
]
