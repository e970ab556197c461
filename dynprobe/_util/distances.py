"""Cosine dissimilarity without cancellation, on the vectors' own device: the one owner of its formula.

C of eq. (1) and S of eq. (4) of the two-phase paper (Zhou, Yang, Sugiyama & Yan, *New Evidence of the Two-Phase
Learning Dynamics of Neural Networks*) are the cosine dissimilarity ``1 − ⟨x, y⟩ / (‖x‖ ‖y‖)`` of two flattened
vectors (parameters, or kernels). Written that way it loses every digit for close vectors (1 − 0.9999999…). It is
computed here, for one vector ``x`` against each row ``y`` of a stack, as ::

    C(x, y) = ‖t‖² / (2‖x‖²),    t = x − s·y,    s = ‖x‖ / ‖y‖

(``t = ‖x‖·(x/‖x‖ − y/‖y‖)``: this is ``½‖x/‖x‖ − y/‖y‖‖²``), with the squared norms given (computed once per
vector and kept). Nothing cancels: the coordinates of ``t`` are differences of nearby numbers, and ``‖t‖²`` is a
sum of positive terms; so one pass over the columns gives every value, large or tiny, with no switch between two
forms and no second pass, and identical vectors (bit-equal norms, s = 1) give exactly 0.

**Error bound** (``u = 2⁻⁵³``, float64 arithmetic; vectors held with at most 24 significant bits: float32,
bfloat16, float16). The scale is split as ``s = s₁ + s₂`` with ``s₁ = fl32(s)`` (24 bits) and ``s₂ = s − s₁``
(exact, at most 29 bits, ``|s₂| ≤ 2⁻²⁴s``), and ``t_i = (x_i − s₁y_i) − s₂y_i``: both products are exact
(24 + 24 and 29 + 24 ≤ 53 bits), and each subtraction rounds once, so the computed ``t̂ = t + e`` has
``|e_i| ≤ u|t_i + s₂y_i| + u|t_i| ≤ 2u|t_i| + 2⁻²⁴u·s|y_i|``, i.e. ``‖e‖ ≤ 2u‖t‖ + 2⁻²⁴u‖x‖``. Relative to
``‖t‖ = √(2C)·‖x‖`` ::

    |‖t̂‖² − ‖t‖²| / ‖t‖²  ≤  4u + 2⁻²³u / √(2C) + O(u²)          (< 1e-15 for C ≥ 1e-20)

The squares are summed per block of ``width`` columns (any order), the block norms squared back (2u) and the
block sums added in a balanced tree: a summation tree of height ``n ≤ width + ⌈log₂ M⌉`` over positive terms,
relative error ``γ_n = nu/(1 − nu)`` (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1). The norms,
with relative errors ≤ η (a few γ), enter through the division by ``2‖x‖²`` (2η) and through ``s``: an error
``Δ = εs`` in the scale moves ``t`` along ``y``, and as ``⟨t, y⟩ = −‖x‖‖y‖·C`` exactly,
``‖t − Δy‖² = ‖t‖²(1 + ε) + ε²‖x‖²`` — first order ε ≤ 2η, second order ``ε²/(2C) ≤ 2η²/C``. In all ::

    |Ĉ − C| / C  ≤  γ_n + 7u + 2⁻²³u/√(2C) + 4η + 2η²/C

below 1e-12 for every C ≥ 1e-14 (η ≈ 3e-14 for 256-column blocks), and below the interval rows' 1e-9 for
C ≥ 2e-18 (two float32 vectors that differ at all are at least ~1e-22 apart only when a single coordinate moves
by one ulp). Inputs with more significant bits (float64 kernels for S) make ``s₁y_i`` inexact: ``‖e‖`` gains
``u‖x‖``, i.e. ``2u/√(2C)`` relative (≤ 1e-9 for C ≥ 2.5e-14), as the unit-vector form ``½‖x̂ − ŷ‖²`` had.

**Determinism.** The products with the split scale are exact, so FMA contraction cannot change their bits (the
per-layer shift below is the one rounded product); each block sum is one reduction of ``width`` numbers per
output, and the tree is explicit: the values depend on the inputs, the column ranges and
``width`` only (not on the column chunking, the thread count, or where the vectors sit in memory); on a GPU the
block reductions are the device's own, deterministic run to run.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["BLOCK", "channel_block_sums", "cosine_dissimilarity_rows", "cosine_from_sums",
           "pairwise_cosine_dissimilarity", "pairwise_sum", "scales", "squared_norm_sums"]

BLOCK = 256  # columns per block sum: the summation error bound (module docstring)
_CPU_CHUNK_BYTES = 2**21  # float64 temporaries per chunk on the CPU: they stay in cache
_CPU_CHUNK_COLUMNS = 2**15
_DEVICE_CHUNK_BYTES = 2**28  # on an accelerator: few, large kernels


def pairwise_sum(a):
    """Sum the last axis in a balanced tree (each term takes part in at most ⌈log₂ m⌉ additions); numpy or torch."""
    cat = np.concatenate if isinstance(a, np.ndarray) else torch.cat
    while a.shape[-1] > 1:
        m = a.shape[-1]
        half = a[..., : m // 2] + a[..., m // 2 : 2 * (m // 2)]
        a = half if m % 2 == 0 else cat([half, a[..., 2 * (m // 2) :]], -1)
    return a[..., 0]


def _chunk_columns(rows: int, width: int, device: torch.device) -> int:
    """Columns per chunk: a multiple of ``width`` with ``rows × columns`` float64 temporaries within the budget (on
    the CPU also at most ``_CPU_CHUNK_COLUMNS``: the vector's own chunk stays in cache too)."""
    if device.type != "cpu":
        return max(1, _DEVICE_CHUNK_BYTES // (8 * max(1, rows) * width)) * width
    return max(1, min(_CPU_CHUNK_BYTES // (8 * max(1, rows)), _CPU_CHUNK_COLUMNS) // width) * width


def _block_sums_of_squares(t: torch.Tensor, width: int) -> torch.Tensor:
    """``(rows, c)`` float64 → the sums of squares of its blocks of ``width`` columns (the last one partial), as
    squared block norms (one fused reduction per block)."""
    full = t.shape[1] // width * width
    parts = [torch.linalg.vector_norm(t[:, :full].unflatten(1, (-1, width)), dim=-1)] if full else []
    if full < t.shape[1] or not t.shape[1]:
        parts.append(torch.linalg.vector_norm(t[:, full:], dim=-1, keepdim=True))
    norms = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    return norms.mul_(norms)


def _split(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = s₁ + s₂`` with ``s₁ = fl32(s)`` (24 bits) and ``s₂ = s − s₁`` (exact, ≤ 29 bits): columns (n, 1)."""
    high = scale.to(torch.float32).to(torch.float64)
    return high[:, None], (scale - high)[:, None]


def channel_block_sums(x: torch.Tensor, stack: torch.Tensor, scales: torch.Tensor,
                       layers: Sequence[tuple[int, int]], per_layer: bool, start: int, stop: int, *,
                       rows: torch.Tensor | None = None, width: int = BLOCK) -> list[torch.Tensor]:
    """The block sums of ``‖x − s_c·y_k‖²`` over the columns ``start:stop`` for each row ``y_k`` of ``stack`` and
    each channel ``c`` (the whole vector, then each layer when ``per_layer``): float64 (n, blocks) per channel, on
    the stack's device.

    ``x`` (columns,) and ``stack`` (n × columns, e.g. a view of a buffer: never copied whole) hold the columns
    ``start:stop``, which begin and end on block boundaries of ``layers`` (the slices tiling the vector; blocks of
    ``width`` columns start at each layer's first column). ``rows`` (optional): the rows of ``stack`` to use (n of
    them), gathered one column chunk at a time. ``scales`` (n, channels) is ``s = ‖x‖/‖y‖`` per channel.
    Each column chunk is converted to float64 once: within layer ``l``, ``t_l = (x − s₁y) − s₂y`` with the layer's
    split scale (exact products, module docstring), and the whole-vector channel from it as
    ``t₀ = t_l + (s_l − s₀)·y`` (errors ``u|(s_l − s₀)y_i| + u|t₀_i|``, at most a few u relative to ``‖t₀‖`` since
    ``‖t₀‖² = 2s₀‖x‖‖y‖C_l + (s_l − s₀)²‖y‖²`` over the layer). Without layers, ``t₀`` directly.
    """
    scales = scales.to(device=stack.device, dtype=torch.float64)
    channels = 1 + len(layers) if per_layer else 1
    n = stack.shape[0] if rows is None else rows.numel()
    sums: list[list[torch.Tensor]] = [[] for _ in range(channels)]
    chunk = _chunk_columns(n, width, stack.device)
    # Two float64 work areas allocated once per call and reused for every chunk: allocating them per chunk
    # fragments the CPU heap (measured: the address space grew by up to 280 MiB during one row of a 1 M-parameter
    # model, which failed the row under an RLIMIT_AS that the history itself fitted in).
    room = n * min(chunk, max(1, stop - start))
    y_area = torch.empty(room, dtype=torch.float64, device=stack.device)
    t_area = torch.empty(room, dtype=torch.float64, device=stack.device)
    for layer, (first, last) in enumerate(layers):
        low_column, high_column = max(first, start), min(last, stop)
        if low_column >= high_column:  # outside the columns, or an empty layer (its channel comes out NaN)
            continue
        if (low_column - first) % width:
            raise ValueError(f"columns {start}:{stop} do not start on a block of the layer {first}:{last}")
        own = layer + 1 if per_layer else 0
        high, low = _split(scales[:, own])
        shift = (scales[:, own] - scales[:, 0])[:, None] if per_layer else None
        for a in range(low_column, max(high_column, low_column + 1), chunk):
            b = min(high_column, a + chunk)
            y32 = stack[:, a - start : b - start]
            y = y_area[: n * (b - a)].view(n, b - a)
            y.copy_(y32 if rows is None else y32.index_select(0, rows))
            t = t_area[: n * (b - a)].view(n, b - a)
            t.copy_(x[a - start : b - start].expand(n, b - a))
            t.addcmul_(y, high, value=-1).addcmul_(y, low, value=-1)
            sums[own].append(_block_sums_of_squares(t, width))
            if shift is not None:
                sums[0].append(_block_sums_of_squares(t.addcmul_(y, shift), width))
    return [torch.cat(parts, 1) if parts else torch.zeros((n, 0), dtype=torch.float64, device=stack.device)
            for parts in sums]


def cosine_from_sums(sums: Sequence[torch.Tensor], x_norm2: torch.Tensor, stack_norm2: torch.Tensor) -> torch.Tensor:
    """``C_c = Σ_blocks / (2‖x‖²_c)`` per channel from :func:`channel_block_sums` (the block sums of every column,
    in column order), summed in a balanced tree: float64 (channels, n); NaN where a norm is zero or not finite."""
    out = torch.stack([pairwise_sum(block_sums) if block_sums.shape[1] else block_sums.sum(1)
                       for block_sums in sums])
    valid = (x_norm2[:, None] > 0) & (stack_norm2.T > 0) & torch.isfinite(x_norm2[:, None] * stack_norm2.T)
    return torch.where(valid, out / (2 * x_norm2[:, None]), torch.nan)


def scales(x_norm2: torch.Tensor, stack_norm2: torch.Tensor) -> torch.Tensor:
    """``s = ‖x‖/‖y‖`` per row and channel (n, channels), 1 where undefined (those values come out NaN)."""
    return torch.nan_to_num((x_norm2[None, :] / stack_norm2).sqrt(), nan=1.0, posinf=1.0, neginf=1.0)


def squared_norm_sums(v: torch.Tensor, start: int, stop: int, *, width: int = BLOCK) -> torch.Tensor:
    """``‖v[start:stop]‖²`` in float64 (0-d, on ``v``'s device): block sums of ``width`` squares, then a balanced
    tree (relative error ``γ_n``, ``n ≤ width + ⌈log₂ M⌉``)."""
    chunk = _chunk_columns(1, width, v.device)
    sums = [_block_sums_of_squares(v[None, a : min(stop, a + chunk)].to(torch.float64), width)
            for a in range(start, max(stop, start + 1), chunk)]
    return pairwise_sum(torch.cat(sums, 1))[0]


def cosine_dissimilarity_rows(x: torch.Tensor, x_norm2: torch.Tensor, stack: torch.Tensor,
                              stack_norm2: torch.Tensor, layers: Sequence[tuple[int, int]] | None = None,
                              per_layer: bool = False, *, width: int = BLOCK) -> torch.Tensor:
    """C (eq. 1) or S (eq. 4) between ``x`` and each row of ``stack``, per channel: float64 (channels, n) on the
    stack's device.

    Args:
        x: the new vector (p,), any floating dtype, on the stack's device.
        x_norm2: ``‖x‖²`` per channel (channels,), float64.
        stack: the earlier vectors (n × p), e.g. a view of a history buffer (read in place, never copied whole).
        stack_norm2: their squared norms per channel (n, channels), float64.
        layers: the slices tiling the vector (default: one); the channels are the whole vector, then each layer
            when ``per_layer``.

    ``C = ‖x − s·y‖² / (2‖x‖²)`` with ``s = ‖x‖/‖y‖``, in one pass over the columns (module docstring: relative
    error ≤ ``γ_n + 7u + 2⁻²³u/√(2C) + 4η + 2η²/C`` for inputs of ≤ 24 bits; exactly 0 for identical vectors).
    """
    device = stack.device
    p = stack.shape[1]
    x_norm2 = torch.as_tensor(x_norm2, dtype=torch.float64).to(device).reshape(-1)
    stack_norm2 = torch.as_tensor(stack_norm2, dtype=torch.float64).to(device).reshape(stack.shape[0], -1)
    sums = channel_block_sums(x.reshape(-1).to(device), stack, scales(x_norm2, stack_norm2),
                              list(layers) if layers else [(0, p)], per_layer, 0, p, width=width)
    return cosine_from_sums(sums, x_norm2, stack_norm2)


def pairwise_cosine_dissimilarity(rows: np.ndarray | torch.Tensor) -> np.ndarray:
    """``S[i, j] = C(r_i, r_j)`` (:func:`cosine_dissimilarity_rows`) for the rows of ``rows`` (k × p); float64
    (k, k), symmetric (each pair computed once, as row ``max(i, j)`` against the earlier one) with a zero diagonal;
    NaN in the rows and columns of zero (or non-finite) vectors."""
    stack = torch.as_tensor(rows)
    stack = stack.reshape(stack.shape[0], -1)
    if not stack.is_floating_point():
        stack = stack.to(torch.float64)
    norms = torch.stack([squared_norm_sums(row, 0, stack.shape[1]) for row in stack]) if len(stack) else None
    result = np.full((len(stack), len(stack)), np.nan)
    for i in range(len(stack)):
        assert norms is not None
        values = cosine_dissimilarity_rows(stack[i], norms[i : i + 1], stack[: i + 1],
                                           norms[: i + 1, None])[0].cpu().numpy()
        result[i, : i + 1] = values
        result[: i + 1, i] = values
    return result
