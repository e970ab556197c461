"""Interval metrics of the two-phase paper as pure functions on tensors.

Every function here is stateless and works on plain tensors (or anything ``torch.as_tensor`` accepts, such as
numpy arrays); the online state objects in :mod:`dynprobe.metrics.interval` call them. Reductions are accumulated in
float64: between nearby checkpoints the quantities of interest are ~1e-4 to 1e-8, below float32's resolution
for sums over many coordinates.

Conventions (the paper's §3):

* C, eq. (1): ``C(θ_i, θ_j) = 1 − ⟨θ_i, θ_j⟩ / (‖θ_i‖₂ ‖θ_j‖₂)`` on flattened parameter vectors, computed as
  the equal ``‖θ_i − s·θ_j‖² / (2‖θ_i‖²)`` with ``s = ‖θ_i‖/‖θ_j‖`` (that is ``½‖θ_i/‖θ_i‖ − θ_j/‖θ_j‖‖²``, no
  cancellation), one pass over the columns on the vectors' device: every value keeps a relative error ≤ 1e-9
  and identical vectors give exactly 0 (the bound is derived in :mod:`dynprobe._util.distances`).
* S, eq. (4): ``S(H_i, H_j) = 1 − ⟨H_i, H_j⟩_F / (‖H_i‖_F ‖H_j‖_F)`` on eNTK matrices of any (equal) shape.
* D, eq. (6): ``D = mean_x 1[argmax f(x; θ_i) ≠ argmax f(x; θ_j)]`` on stored predicted labels.

The loss barrier B, eq. (5), needs the model and data; it lives in :mod:`dynprobe.metrics.barrier`.
"""
from __future__ import annotations

import numpy as np
import torch

from ._blocked import Blocks, cosine_rows, squared_norms

__all__ = [
    "cosine_dissimilarity",
    "cosine_dissimilarity_to_many",
    "disagreement",
    "disagreement_to_many",
    "kernel_distance",
    "kernel_distance_to_many",
    "l2_distance",
    "l2_distance_to_many",
]


def _as_float64(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().to(torch.float64)


def _flat64(x) -> torch.Tensor:
    return _as_float64(x).reshape(-1)


def _rows64(xs, like: torch.Tensor) -> torch.Tensor:  # small row stacks only (L2 distances)
    rows = torch.as_tensor(xs).detach()
    return rows.reshape(rows.shape[0], -1).to(device=like.device, dtype=torch.float64)


def _flat(x) -> torch.Tensor:
    t = torch.as_tensor(x).detach().reshape(-1)
    return t if t.is_floating_point() else t.to(torch.float64)


def _exact_pair(x: torch.Tensor, y: torch.Tensor, what: str, shapes: tuple) -> float:
    if x.numel() != y.numel():
        needs = "kernels of equal shape" if what == "kernel_distance" else "vectors of equal size"
        raise ValueError(f"{what} needs {needs}; got {shapes[0]} and {shapes[1]}")
    y = y.to(x.device)
    blocks = Blocks(x.numel())
    return float(cosine_rows(x, None, y.reshape(1, -1), squared_norms(y, blocks)[None], blocks)[0][0, 0])


def cosine_dissimilarity(a, b) -> float:
    """Parameter cosine dissimilarity, eq. (1) of the two-phase paper.

    ``C(a, b) = 1 − ⟨vec a, vec b⟩ / (‖vec a‖₂ ‖vec b‖₂)``, evaluated in float64 as the algebraically equal
    ``‖a − s·b‖² / (2‖a‖²)``, ``s = ‖a‖/‖b‖`` (:func:`dynprobe._util.distances.cosine_dissimilarity_rows`):
    unlike ``1 − cos`` it has no cancellation, so it is exactly 0 for identical vectors (an ε = 0 control ghost)
    and keeps full relative precision for the tiny values between a ghost and the main run late in training.
    Inputs of any shape are flattened and read chunk by chunk in their own dtype (no float64 copy of either
    vector). Returns NaN when either vector is zero.
    """
    x, y = _flat(a), _flat(b)
    return _exact_pair(x, y, "cosine_dissimilarity", (x.numel(), y.numel()))


def cosine_dissimilarity_to_many(x, ys) -> torch.Tensor:
    """Eq. (1) between one vector ``x`` (any shape, p elements) and each row of ``ys`` (k × p); float64 (k,).

    One pass over ``ys`` (kept in its own dtype, converted chunk by chunk) in the cancellation-free form of
    :func:`cosine_dissimilarity`: every value has a relative error ≤ 1e-9 and identical vectors give exactly 0.
    """
    v = _flat(x)
    rows = torch.as_tensor(ys).detach()
    rows = rows.reshape(rows.shape[0], -1).to(v.device)
    if not rows.is_floating_point():
        rows = rows.to(torch.float64)
    if rows.shape[1] != v.numel():
        raise ValueError(f"cosine_dissimilarity_to_many: x has {v.numel()} elements, rows of ys {rows.shape[1]}")
    blocks = Blocks(v.numel())
    if rows.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=v.device)
    norms = np.stack([squared_norms(row, blocks) for row in rows])
    values = cosine_rows(v, squared_norms(v, blocks), rows, norms, blocks)[0][0]
    return torch.from_numpy(values).to(v.device)


def l2_distance(a, b) -> float:
    """Euclidean distance ``‖vec a − vec b‖₂``, accumulated in float64."""
    x = _flat64(a)
    return float((x - _flat64(b).to(x.device)).norm())


def l2_distance_to_many(x, ys) -> torch.Tensor:
    """``‖x − y_k‖₂`` for each row ``y_k`` of ``ys``; float64 (k,)."""
    x64 = _flat64(x)
    return (_rows64(ys, x64) - x64).norm(dim=1)


def kernel_distance(h1, h2) -> float:
    """Kernel distance, eq. (4) of the two-phase paper (Fort et al. 2020).

    ``S(H₁, H₂) = 1 − ⟨H₁, H₂⟩_F / (‖H₁‖_F ‖H₂‖_F)``, in float64 and in the cancellation-free form of
    :func:`cosine_dissimilarity` (the cosine dissimilarity of the flattened kernels). Scale invariant:
    ``kernel_distance(H, c·H) == 0`` for c > 0, so it does not see whether a kernel was summed or averaged over
    logits. Returns NaN when either kernel is zero.
    """
    x, y = _flat(h1), _flat(h2)
    return _exact_pair(x, y, "kernel_distance",
                       (tuple(torch.as_tensor(h1).shape), tuple(torch.as_tensor(h2).shape)))


def kernel_distance_to_many(h, hs) -> torch.Tensor:
    """Eq. (4) between one kernel ``h`` and each kernel in the stack ``hs`` (k × ...); float64 (k,)."""
    return cosine_dissimilarity_to_many(h, hs)


def disagreement(preds_a, preds_b) -> float:
    """Disagreement rate, eq. (6): the fraction of examples whose predicted labels differ.

    ``preds_a`` and ``preds_b`` are integer label vectors (argmax of the logits) of equal length.
    """
    a, b = torch.as_tensor(preds_a).reshape(-1), torch.as_tensor(preds_b).reshape(-1)
    if a.numel() != b.numel():
        raise ValueError(f"disagreement needs prediction vectors of equal length; got {a.numel()} and {b.numel()}")
    if a.numel() == 0:
        return float("nan")
    return float((a != b.to(a.device)).to(torch.float64).mean())


def disagreement_to_many(preds, many_preds) -> torch.Tensor:
    """Eq. (6) between one prediction vector (n,) and each row of ``many_preds`` (k × n); float64 (k,)."""
    a = torch.as_tensor(preds).reshape(1, -1)
    rows = torch.as_tensor(many_preds).reshape(-1, a.shape[1]).to(a.device)
    return (rows != a).to(torch.float64).mean(dim=1)
