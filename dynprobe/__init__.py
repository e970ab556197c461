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

import importlib
import warnings
from typing import Any

from . import analysis, experiments, exporters, kernels, metrics, schedule
from ._version import __version__
from .analysis import analyze
from .config import Barriers, Ghosts, KernelConfig, Perturbation
from .experiments import linearize, switching_experiment
from .experiments.barriers import fill_barriers
from .kernels import empirical_ntk
from .metrics import loss_barrier
from .probe import Probe
from .recording.cost import estimate_cost
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

# Names (and flat modules) of dynprobe 0.1 that moved into namespaces: still reachable as attributes of the
# package for one release, with a DeprecationWarning naming the new place.
_MOVED: dict[str, tuple[str, str | None]] = {
    "BarrierResult": ("dynprobe.metrics", "BarrierResult"),
    "LinearizedModel": ("dynprobe.experiments", "LinearizedModel"),
    "NTKEngine": ("dynprobe.kernels", "NTKEngine"),
    "PerturbationReport": ("dynprobe.ghosts.perturbation", "PerturbationReport"),
    "TransitionDetector": ("dynprobe.analysis", "TransitionDetector"),
    "TransitionEstimate": ("dynprobe.analysis", "TransitionEstimate"),
    "TransitionReport": ("dynprobe.analysis", "TransitionReport"),
    "WatchedLoss": ("dynprobe.capture.watched", "WatchedLoss"),
    "cosine_dissimilarity": ("dynprobe.metrics", "cosine_dissimilarity"),
    "disagreement": ("dynprobe.metrics", "disagreement"),
    "kernel_distance": ("dynprobe.metrics", "kernel_distance"),
    "estimate_transition": ("dynprobe.analysis", "estimate_transition"),
    "barrier": ("dynprobe.metrics.barrier", None),
    "cone": ("dynprobe.analysis.cone", None),
    "detector": ("dynprobe.analysis.detector", None),
    "linear": ("dynprobe.experiments.linear", None),
    "perturb": ("dynprobe.ghosts.perturbation", None),
    "run": ("dynprobe.store.run", None),
    "switching": ("dynprobe.experiments.switching", None),
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module 'dynprobe' has no attribute {name!r}")
    module_name, attribute = _MOVED[name]
    new = module_name if attribute is None else f"{module_name}.{attribute}"
    warnings.warn(f"dynprobe.{name} moved to {new}; the old name will be removed in the next release",
                  DeprecationWarning, stacklevel=2)
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)
