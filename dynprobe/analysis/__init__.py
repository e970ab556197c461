"""When did the network leave the chaotic phase, and how tight is the cone? Pure numpy analysis of a run.

* :func:`analyze` / :func:`estimate_transition` — every transition estimate of a run and their consensus.
* :mod:`.sensitivity` — ghost separation curves, amplification A(t0, Δ) and growth rate λ(t0, Δ): the ``"chaos"``
  estimate; :mod:`.verdicts` — each ghost diverged/close/borderline, with its thresholds.
* :mod:`.estimators` — Finding I on C maps and the kernel velocity on a fixed lag, as pure functions of arrays;
  :mod:`.estimate` — the result types and the consensus.
* :mod:`.cone` — cone numbers and the kernel-trajectory embedding; :mod:`.detector` — the online detector;
  :mod:`.layers` — per-layer C, S and shares of the ghost separation.
"""
from .cone import ConeNumbers, ConeSummary, KernelEmbedding, cone_numbers, cone_summary, kernel_embedding
from .detector import TransitionDetector
from .estimate import METHOD_LABELS, TransitionEstimate, TransitionReport, combine_estimates
from .estimators import (
    kernel_lag_series,
    kernel_subset,
    level_off_step,
    transition_from_ghost_C,
    transition_from_kernel_velocity,
    transition_from_trajectory_C,
)
from .layers import LayerView, layer_view
from .run_analysis import (
    RunAnalysis,
    analyze,
    checked_matrix,
    estimate_transition,
    ghost_outcomes,
    ghost_verdicts,
    separation_curves,
)
from .sensitivity import (
    SeparationCurve,
    amplification,
    default_windows,
    growth_rate,
    sensitivity_table,
    transition_from_sensitivity,
)
from .verdicts import GhostOutcome, GhostVerdict, ghost_verdict, transition_from_chaos

__all__ = [
    "METHOD_LABELS",
    "ConeNumbers",
    "ConeSummary",
    "GhostOutcome",
    "GhostVerdict",
    "KernelEmbedding",
    "LayerView",
    "RunAnalysis",
    "SeparationCurve",
    "TransitionDetector",
    "TransitionEstimate",
    "TransitionReport",
    "amplification",
    "analyze",
    "checked_matrix",
    "combine_estimates",
    "cone_numbers",
    "cone_summary",
    "default_windows",
    "estimate_transition",
    "ghost_outcomes",
    "ghost_verdict",
    "ghost_verdicts",
    "growth_rate",
    "kernel_embedding",
    "kernel_lag_series",
    "kernel_subset",
    "layer_view",
    "level_off_step",
    "sensitivity_table",
    "separation_curves",
    "transition_from_chaos",
    "transition_from_ghost_C",
    "transition_from_kernel_velocity",
    "transition_from_sensitivity",
    "transition_from_trajectory_C",
]
