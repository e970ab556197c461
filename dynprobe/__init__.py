"""dynprobe: watch how a PyTorch network learns.

Attach a :class:`Probe` to an unmodified training loop (two lines), and it records the parameter trajectory
and the interval metrics of the two-phase paper — parameter cosine dissimilarity C (eq. 1), eNTK kernel
distance S (eq. 4), loss barrier B (eq. 5), disagreement D (eq. 6) — and, with :class:`Ghosts`, the chaos
experiment, into a crash-safe run directory that :func:`load_run` reads back as numpy arrays.

The top level holds what a training script and a notebook need; everything else lives in namespaces that are
importable after ``import dynprobe``: :mod:`dynprobe.schedule`, :mod:`dynprobe.metrics`, :mod:`dynprobe.analysis`,
:mod:`dynprobe.exporters`, :mod:`dynprobe.kernels`, :mod:`dynprobe.experiments`.
"""
from __future__ import annotations

from . import analysis, experiments, exporters, kernels, metrics, schedule
from ._version import __version__
from .analysis import analyze
from .config import Barriers, Ghosts, KernelConfig, Perturbation
from .experiments import linearize, switching_experiment
from .experiments.barriers import fill_barriers
from .kernels import empirical_ntk
from .metrics import loss_barrier
from .probe import Probe
from .probe.cost import estimate_cost
from .store import Run, RunFormatError, RunInUseError, load_run, load_runs

__all__ = [
    "Barriers",
    "Ghosts",
    "KernelConfig",
    "Perturbation",
    "Probe",
    "Run",
    "RunFormatError",
    "RunInUseError",
    "__version__",
    "analysis",
    "analyze",
    "empirical_ntk",
    "estimate_cost",
    "experiments",
    "exporters",
    "fill_barriers",
    "kernels",
    "linearize",
    "load_run",
    "load_runs",
    "loss_barrier",
    "metrics",
    "schedule",
    "switching_experiment",
]
