"""Memory planning and the float64-accumulated Gram contraction of the eNTK engine (private).

The engine fills a *slab*: per-sample, per-output-row gradients of a group of parameters for **all** n probe
samples, ``(n, R, P_group)``, then contracts it, ``H += X Xᵀ``. This module decides how big the pieces are
(:func:`plan_chunks`) so that the extra memory stays under ``max_memory``, and does the contraction
(:func:`accumulate_gram`).

Why a slab over all samples: H is quadratic in the samples, so with the Jacobian of only some samples in
memory, the cross-sample blocks would need the other samples' Jacobian again (recomputation). Rows
(output logits) and parameters, by contrast, are *additive*: ``H = Σ_rows Σ_params``, so slabs are cut along
those — at the price of one backward pass per parameter group (partially repeated: only down to the group's
first layer) and, when the probe set's forward graph does not fit in memory at once, one forward per slab.

The contraction multiplies float32 blocks with BLAS and accumulates each block product into a float64 H: every
float32 partial sum covers at most :data:`K_BLOCK` products, so the result keeps ~float32-epsilon *relative*
accuracy whatever the parameter count (a single float32 GEMM over 10⁷ terms would not), at full float32 GEMM
speed (a float64 GEMM is several times slower on CPUs). Row blocks exploit symmetry: only blocks on and above the
diagonal are multiplied (about (b+1)/2b of the work for b blocks), the others are their transposes.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

__all__ = ["ACCUMULATION", "K_BLOCK", "ChunkPlan", "accumulate_gram", "blocked_product", "plan_chunks"]

K_BLOCK = 32768  # products per float32 partial sum before it is added into the float64 accumulator
STAGING_COLUMNS = 8192  # direct plans gather narrow gradient blocks (norm layers, biases) up to this width
_MIN_BLOCK_ROWS = 256  # below this many rows one GEMM beats symmetric blocking (bench_entk.py measures it)
#: The stored convention of every contraction of the engine (slab Grams and the structured units' factor Grams).
ACCUMULATION = f"float64, over partial sums of at most {K_BLOCK} products in the Jacobian dtype"


def blocked_product(x: torch.Tensor, y: torch.Tensor, *, k_block: int = K_BLOCK) -> torch.Tensor:
    """``x @ yᵀ`` in float64 for ``x`` (N, K) and ``y`` (M, K) by the engine's convention (:data:`ACCUMULATION`):
    each product of at most ``k_block`` columns in the inputs' dtype, the partial products added in float64."""
    out = torch.zeros(x.shape[0], y.shape[0], dtype=torch.float64, device=x.device)
    for k0 in range(0, x.shape[1], k_block):
        out += (x[:, k0 : k0 + k_block] @ y[:, k0 : k0 + k_block].T).double()
    return out


def accumulate_gram(out: torch.Tensor, x: torch.Tensor, *, k_block: int = K_BLOCK) -> None:
    """``out += x @ xᵀ`` for ``x`` of shape (N, K), ``out`` (N, N) float64, symmetric blocked.

    Rows are split into b ≈ N/256 blocks; the b(b+1)/2 blocks on and above the diagonal are multiplied (in
    ``x``'s dtype, over at most ``k_block`` columns at a time) and added in float64, the blocks below are
    filled by transposition. Diagonal blocks are left as BLAS returns them (symmetric up to rounding);
    callers symmetrize once at the end.
    """
    n_rows, width = x.shape
    if n_rows == 0 or width == 0:
        return
    blocks = max(1, min(8, n_rows // _MIN_BLOCK_ROWS))
    size = math.ceil(n_rows / blocks)
    bounds = [(start, min(start + size, n_rows)) for start in range(0, n_rows, size)]
    for k0 in range(0, width, k_block):
        columns = x[:, k0 : k0 + k_block]
        for a, (a0, a1) in enumerate(bounds):
            left = columns[a0:a1]
            for b0, b1 in bounds[a:]:
                product = left @ columns[b0:b1].T
                out[a0:a1, b0:b1] += product
                if b0 != a0:
                    out[b0:b1, a0:a1] += product.T


@dataclass
class UnitCost:
    """What the planner needs to know about one structured unit (a layer, or a channel block of one)."""

    columns: int  # slab columns (0 for units contracted through factor Grams)
    delta_bytes: int  # its output-gradient bytes per sample and row (channel blocks of one module share it)
    module_id: int  # units of one module share a tap
    form_bytes: int  # formation temporaries per sample and row
    factor_bytes_fixed: int  # Gram factors per sample, independent of rows (e.g. a Linear layer's input)
    factor_bytes_row: int  # Gram factors per sample and row (e.g. a Linear layer's output gradient)
    depth: float  # fraction of the forward cost between this unit and the output (how far its backward reaches)
    split: Callable[[int], list] | None = None  # splits the unit into k output-channel blocks (units), or None
    cache_bytes: int = 0  # row-independent intermediates per sample, kept while a forward is in use


@dataclass(frozen=True)
class ChunkPlan:
    """How one call of the engine is cut: sample chunks, row chunks, parameter groups.

    ``units`` are the structured units after output-channel splitting, ``structured_groups`` lists of indices
    into them (one slab each), ``generic_groups`` lists of generic parameter names. ``retained``: the forward
    graph of all n samples is built once per call and kept for every backward pass.
    """

    sample_chunk: int
    row_chunks: list[list[int]]
    units: list = field(default_factory=list)
    structured_groups: list[list[int]] = field(default_factory=list)
    generic_groups: list[list[str]] = field(default_factory=list)
    generic_chunk: int = 1
    retained: bool = True
    direct: bool = False  # sum modes, all samples at once: each layer's gradients are contracted as formed, no slab
    estimated_bytes: int = 0
    fits: bool = True

    def describe(self) -> str:
        if self.direct:
            return (f"direct: {len(self.units)} structured unit(s) contracted as formed (no slab), all "
                    f"{self.sample_chunk} samples at once, row by row; {len(self.generic_groups)} generic group(s), "
                    f"generic chunk {self.generic_chunk}; estimated peak extra memory "
                    f"{self.estimated_bytes / 2**20:.0f} MiB")
        return (f"{len(self.structured_groups)} structured group(s) over {len(self.units)} unit(s), "
                f"{len(self.generic_groups)} generic group(s); samples in chunks of {self.sample_chunk} "
                f"({'forward graph retained' if self.retained else 'forward recomputed per slab'}), "
                f"rows in {len(self.row_chunks)} chunk(s); generic chunk {self.generic_chunk}; "
                f"estimated peak extra memory {self.estimated_bytes / 2**20:.0f} MiB")


def _pack(units: list, capacity_columns: int, capacity_factor: int, n: int, rows: int) -> tuple[list, list] | None:
    """Greedy packing (in the given order: output side first) of units into groups whose slab and factors fit.

    A unit wider than the slab is split into output-channel blocks; None when some unit cannot fit.
    """
    pieces: list = []
    for unit in units:
        cost = unit.cost
        if cost.columns > capacity_columns:
            if cost.split is None or capacity_columns <= 0:
                return None
            parts = cost.split(math.ceil(cost.columns / capacity_columns))
            if any(part.cost.columns > capacity_columns for part in parts):
                return None
            pieces.extend(parts)
        else:
            pieces.append(unit)
    groups: list[list[int]] = []
    used_columns = used_factor = 0
    for index, unit in enumerate(pieces):
        factor = n * (unit.cost.factor_bytes_fixed + rows * unit.cost.factor_bytes_row)
        if factor > capacity_factor:
            return None
        if groups and used_columns + unit.cost.columns <= capacity_columns and used_factor + factor <= capacity_factor:
            groups[-1].append(index)
            used_columns += unit.cost.columns
            used_factor += factor
        else:
            groups.append([index])
            used_columns, used_factor = unit.cost.columns, factor
    return pieces, groups


def _row_chunks(rows: int, per_chunk: int) -> list[list[int]]:
    return [list(range(start, min(start + per_chunk, rows))) for start in range(0, rows, per_chunk)]


def plan_chunks(*, n: int, rows: int, full: bool, itemsize: int, budget: int, fixed_bytes: int, graph_bytes: int,
                activation_bytes: int, units: list, generic: Sequence[tuple[str, int]],
                generic_graph_bytes: int) -> ChunkPlan:
    """Choose the cheapest plan whose estimated peak extra memory is under ``budget`` bytes.

    Args:
        n, rows: probe samples and output rows per sample (c for ``trace``/``full``, 1 otherwise).
        full: rows are kept apart (``full`` mode), so a slab holds all rows at once.
        fixed_bytes: memory needed whatever the plan (H, cotangents, our copy of the inputs, Gram temporaries).
        graph_bytes: forward-graph bytes per sample of the structured pass (saved tensors and taps).
        activation_bytes: the largest activation per sample (backward temporaries).
        units: structured units, output side first, each with a ``cost`` (:class:`UnitCost`).
        generic: ``(name, numel)`` of the parameters without a structured rule.
        generic_graph_bytes: per-sample forward-graph bytes when every parameter requires grad.

    Cost model, in units of one forward pass over the n samples: ``forwards + Σ_groups rows · depth(group)``
    (an input-gradient backward costs about one forward; a group's backward reaches down to its deepest unit);
    ties go to the smaller memory estimate. When no plan fits, the smallest is returned with ``fits=False``.
    """
    row_options = [rows] if full else sorted({rows, *[math.ceil(rows / k) for k in (2, 4, 8)], 1}, reverse=True)
    sample_options = sorted({n, *[math.ceil(n / 2**k) for k in range(1, 16)], 1}, reverse=True)
    delta_by_module = {unit.cost.module_id: unit.cost.delta_bytes for unit in units}
    cache_by_module = {unit.cost.module_id: unit.cost.cache_bytes for unit in units}
    graph_bytes += sum(cache_by_module.values())
    backward_per_sample = sum(delta_by_module.values()) + 3 * activation_bytes
    form_per_sample = max([unit.cost.form_bytes for unit in units], default=0)
    best: tuple[tuple[float, int], ChunkPlan] | None = None
    if units and not full:
        # Direct: with the whole probe set's forward graph in memory, each row's per-sample gradients are
        # contracted layer by layer as they are formed (hot in cache), with no slab to write and read back.
        factors = n * sum(u.cost.factor_bytes_fixed + u.cost.factor_bytes_row for u in units)
        staging = n * STAGING_COLUMNS * itemsize
        estimate = fixed_bytes + (graph_bytes + backward_per_sample + form_per_sample) * n + factors + staging
        if estimate <= budget:
            plan = ChunkPlan(sample_chunk=n, row_chunks=_row_chunks(rows, 1), units=list(units),
                             structured_groups=[list(range(len(units)))], retained=True, direct=True,
                             estimated_bytes=int(estimate))
            best = ((-1.0, int(estimate)), plan)
    for m in (sample_options if units else [n]) if best is None else []:
        transient = (graph_bytes + backward_per_sample + form_per_sample) * m
        room = budget - fixed_bytes - transient
        for rows_per_slab in row_options:
            if units and room <= 0:
                break
            capacity_columns = max(0, int(room * 0.85)) // max(1, n * rows_per_slab * itemsize)
            packed = _pack(units, capacity_columns, int(room * 0.15) + 1, n, rows_per_slab)
            if packed is None:
                continue
            pieces, groups = packed
            retained = m >= n
            row_chunks = _row_chunks(rows, rows_per_slab)
            depth = sum(max(pieces[i].cost.depth for i in group) for group in groups)
            forwards = 1.0 if retained else len(groups) * len(row_chunks)
            cost = forwards + rows * depth + 0.01 * len(groups) * len(row_chunks) * math.ceil(n / m)
            slab = max([sum(pieces[i].cost.columns for i in group) for group in groups], default=0)
            estimate = fixed_bytes + transient + n * rows_per_slab * slab * itemsize
            plan = ChunkPlan(sample_chunk=m, row_chunks=row_chunks, units=pieces, structured_groups=groups,
                             retained=retained, estimated_bytes=int(estimate))
            if best is None or (cost, estimate) < best[0]:
                best = ((cost, estimate), plan)
    if best is not None:
        plan = best[1]
    else:  # nothing fits: the smallest pieces there are, and say so
        pieces = []
        for unit in units:
            pieces.extend(unit.cost.split(unit.cost.columns) if unit.cost.split else [unit])
        estimate = int(fixed_bytes + graph_bytes + backward_per_sample + form_per_sample + n * (
            rows if full else 1) * max([p.cost.columns for p in pieces], default=0) * itemsize)
        plan = ChunkPlan(sample_chunk=1, row_chunks=_row_chunks(rows, rows if full else 1), units=pieces,
                         structured_groups=[[i] for i in range(len(pieces))], retained=n <= 1, fits=False,
                         estimated_bytes=estimate)
    return _plan_generic(plan, n=n, rows=rows, itemsize=itemsize, budget=budget, fixed_bytes=fixed_bytes,
                  generic=generic, graph_bytes=generic_graph_bytes, activation_bytes=activation_bytes)


def _plan_generic(plan: ChunkPlan, *, n: int, rows: int, itemsize: int, budget: int, fixed_bytes: int,
                  generic: Sequence[tuple[str, int]], graph_bytes: int, activation_bytes: int) -> ChunkPlan:
    """``plan`` with groups of generic parameters (one slab ``(n, rows, P_group)`` each) and the sample chunk
    of the generic pass."""
    if not generic:
        return plan
    largest = max(numel for _, numel in generic)

    def per_sample(group_numel: int) -> int:  # forward graph, `rows` vmapped backward activations, Jacobian
        return graph_bytes + 3 * rows * activation_bytes + 2 * rows * group_numel * itemsize

    room = budget - fixed_bytes
    group_numel = sum(numel for _, numel in generic)
    while group_numel > largest and n * rows * group_numel * itemsize + per_sample(group_numel) > room:
        group_numel = max(largest, group_numel // 2)
    chunk = max(1, min(n, int((room - n * rows * group_numel * itemsize) // max(1, per_sample(group_numel)))))
    groups: list[list[str]] = []
    used = 0
    for name, numel in generic:
        if groups and used + numel <= group_numel:
            groups[-1].append(name)
            used += numel
        else:
            groups.append([name])
            used = numel
    estimate = fixed_bytes + n * rows * group_numel * itemsize + chunk * per_sample(group_numel)
    return replace(plan, generic_groups=groups, generic_chunk=chunk,
                   estimated_bytes=max(plan.estimated_bytes, int(estimate)), fits=plan.fits and estimate <= budget)
