"""When did the network leave the chaotic phase, and how tight is the cone? Pure numpy analysis of a run.

* :func:`analyze` / :func:`estimate_transition` — every transition estimate of a run and the headline.
* :mod:`.saturation` — the ``"chaos"`` estimate: where each ghost's separation saturates, and the first spawn whose
  ghosts end up far below the early ones; :mod:`.sensitivity` — separation curves, amplification A(t0, Δ) and
  growth rate λ(t0, Δ) (evidence); :mod:`.verdicts` — each ghost diverged/close/borderline, with its thresholds;
  :mod:`.learning_rate` — the learning-rate change a transition coincides with.
* :mod:`.estimators` — Finding I on C maps and the kernel velocity on a fixed lag, as pure functions of arrays;
  :mod:`.estimate` — the result types, the headline and the settling line.
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
from .learning_rate import lr_change_note, lr_changes
from .run_analysis import (
    RunAnalysis,
    analyze,
    checked_matrix,
    estimate_transition,
    ghost_outcomes,
    ghost_verdicts,
    separation_curves,
)
from .saturation import GhostPlateau, ghost_plateau, transition_from_saturation
from .sensitivity import (
    SeparationCurve,
    amplification,
    default_windows,
    growth_rate,
    sensitivity_table,
)
from .verdicts import GhostOutcome, GhostVerdict, ghost_verdict

__all__ = [
    "METHOD_LABELS",
    "ConeNumbers",
    "ConeSummary",
    "GhostOutcome",
    "GhostPlateau",
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
    "ghost_plateau",
    "ghost_verdict",
    "ghost_verdicts",
    "growth_rate",
    "kernel_embedding",
    "kernel_lag_series",
    "kernel_subset",
    "layer_view",
    "level_off_step",
    "lr_change_note",
    "lr_changes",
    "sensitivity_table",
    "separation_curves",
    "transition_from_ghost_C",
    "transition_from_kernel_velocity",
    "transition_from_saturation",
    "transition_from_trajectory_C",
]
