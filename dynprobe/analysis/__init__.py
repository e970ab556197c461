"""When did the network leave the chaotic phase, and how tight is the cone? Pure numpy analysis of a run.

* :func:`analyze` / :func:`estimate_transition` — every transition estimate of a run, combined.
* :mod:`.estimators` — each estimate as a pure function of plain arrays; :mod:`.estimate` — the result types.
* :mod:`.cone` — cone numbers and the kernel-trajectory embedding; :mod:`.detector` — the online detector.
"""
from .cone import ConeNumbers, ConeSummary, KernelEmbedding, cone_numbers, cone_summary, kernel_embedding
from .detector import TransitionDetector
from .estimate import METHOD_LABELS, TransitionEstimate, TransitionReport, combine_estimates
from .estimators import (
    GhostOutcome,
    kernel_subset,
    transition_from_chaos,
    transition_from_ghost_C,
    transition_from_kernel_velocity,
    transition_from_trajectory_C,
)
from .run_analysis import RunAnalysis, analyze, checked_matrix, estimate_transition, ghost_outcomes

__all__ = [
    "METHOD_LABELS",
    "ConeNumbers",
    "ConeSummary",
    "GhostOutcome",
    "KernelEmbedding",
    "RunAnalysis",
    "TransitionDetector",
    "TransitionEstimate",
    "TransitionReport",
    "analyze",
    "checked_matrix",
    "combine_estimates",
    "cone_numbers",
    "cone_summary",
    "estimate_transition",
    "ghost_outcomes",
    "kernel_embedding",
    "kernel_subset",
    "transition_from_chaos",
    "transition_from_ghost_C",
    "transition_from_kernel_velocity",
    "transition_from_trajectory_C",
]
