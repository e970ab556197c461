"""Pairwise cosine dissimilarity of a few stored vectors, without cancellation (for quantities read back from disk).

The kernel distance S of eq. (4) of the two-phase paper (Zhou, Yang, Sugiyama & Yan, *New Evidence of the
Two-Phase Learning Dynamics of Neural Networks*) is the cosine dissimilarity of two flattened kernels,
``1 − ⟨a, b⟩ / (‖a‖ ‖b‖)``. Written that way it loses all precision for close kernels (1 − 0.9999999…);
the algebraically equal ``½ ‖a/‖a‖ − b/‖b‖‖²`` keeps full relative precision and is exactly 0 for equal ones —
the form the online S rows use (:mod:`dynprobe.metrics.functions`). This is the same quantity for a stack of
vectors already in memory, e.g. the per-layer kernels of a run's snapshots.
"""
from __future__ import annotations

import numpy as np

__all__ = ["pairwise_cosine_dissimilarity"]


def pairwise_cosine_dissimilarity(rows: np.ndarray) -> np.ndarray:
    """``S[i, j] = ½ ‖r_i/‖r_i‖ − r_j/‖r_j‖‖²`` for the rows of ``rows`` (k × p), in float64; (k, k).

    Symmetric with a zero diagonal; NaN in the rows and columns of zero (or non-finite) vectors.
    """
    rows = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    norms = np.linalg.norm(rows, axis=1)
    valid = np.isfinite(norms) & (norms > 0)
    units = rows / np.where(valid, norms, 1.0)[:, None]
    result = np.full((len(rows), len(rows)), np.nan)
    for i in np.flatnonzero(valid):
        others = np.flatnonzero(valid[: i + 1])
        values = 0.5 * np.square(units[others] - units[i]).sum(axis=1)
        result[i, others] = values
        result[others, i] = values
    return result
