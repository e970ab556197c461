"""Interval metrics of the two-phase paper as pure functions, their online matrices, and the loss barrier.

* :mod:`.functions` — C (eq. 1), S (eq. 4), D (eq. 6) and the L2 distance between two points, and one point
  against many (one row of an interval matrix).
* :mod:`.interval` — :class:`PairwiseMatrix`, the online state object that computes one row per snapshot (no I/O).
* :mod:`.barrier` — :func:`loss_barrier`, B (eq. 5) along the straight line between two parameter vectors.
"""
from .barrier import BarrierResult, loss_barrier
from .functions import (
    cosine_dissimilarity,
    cosine_dissimilarity_to_many,
    disagreement,
    disagreement_to_many,
    kernel_distance,
    kernel_distance_to_many,
    l2_distance,
    l2_distance_to_many,
)

__all__ = [
    "BarrierResult",
    "cosine_dissimilarity",
    "cosine_dissimilarity_to_many",
    "disagreement",
    "disagreement_to_many",
    "kernel_distance",
    "kernel_distance_to_many",
    "l2_distance",
    "l2_distance_to_many",
    "loss_barrier",
]
