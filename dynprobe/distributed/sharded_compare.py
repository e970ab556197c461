"""One FSDP2 ghost compared with the main run at a snapshot, from all-reduced partial sums.

The same record as :func:`dynprobe.ghosts.comparison.compare_ghost` (C of eq. 1, L2, per-layer L2, D of eq. 6,
the ghost's eval loss and accuracy), for a ghost whose parameters are shards (:mod:`.sharded_ghosts`). With
``x_r`` and ``g_r`` rank r's pieces of the main θ and the ghost's θ' (local shards in parameter order)::

    ‖θ‖² = Σ_r ‖x_r‖²,   ‖θ − θ'‖²_layer = Σ_r ‖x_r − g_r‖²_layer,   C = Σ_r ‖x_r − s·g_r‖² / (2‖θ‖²)

with ``s = ‖θ‖/‖θ'‖`` (the cancellation-free form of eq. 1 of :mod:`dynprobe._util.distances`, through
:func:`~dynprobe.distributed.sharded_rows.local_row_sums` as the C rows: C keeps its relative accuracy however
small it is, and is exactly 0 for a ghost equal to the main run). Two SUM all-reduces of float64 vectors: (1) the
norms, the squared differences per layer, the non-finite count and a "differs from the main run here" flag; (2) C's
sum, which needs the global norms of (1). Each carries a failure flag, so a rank that failed before them still takes
part and every rank raises alike. Every rank receives the same sums, so every rank takes the same decisions after
them — stop (non-finite, diverged), evaluate or reuse the main run's evaluation — and the evaluation, a collective
FSDP forward, runs on every rank or on none. The ghost is evaluated in the main model
(:class:`~dynprobe.distributed.sharded_slot.MainModelSlot`).

S (eq. 4), where the kernel is due: the ghost's parameters are gathered whole (one all-gather per tensor, the
same on every rank) and handed to the run's eNTK (:mod:`.sharded_kernel`, which holds the whole θ for each
measurement anyway). ``L2_active`` (the separation without the inert tensors and parts, once the inert check found some:
:mod:`.sharded_inert`) is a third partial sum of round (1). ``Ghosts(save_params=True)``: each rank writes its
shards of the ghost with ``torch.distributed.checkpoint`` next to the snapshot's θ (``ghost_001.params.dcp/``);
``run.ghost_params`` reads them back whole.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dynprobe.ghosts.comparison import Comparison
from dynprobe.ghosts.trainer import Reference
from dynprobe.metrics import functions as metrics
from dynprobe.store.layout import PREDS, ghost_array
from dynprobe.store.sharded import save_sharded_params

from .sharded import Collectives, local_numel, local_piece, local_tensor, same_local_tensors
from .sharded_inert import local_ranges
from .sharded_rows import cosine_from_partial_sums, local_row_sums, square_difference_sum
from .sharded_slot import MainModelSlot
from .sharded_snapshot import local_layer_bounds

__all__ = ["compare_sharded_ghost", "local_separation_squares", "local_sums", "whole_state"]


class ShardedCompareError(RuntimeError):
    """A rank failed while comparing a ghost: raised on every rank alike."""


def local_separation_squares(params: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> torch.Tensor:
    """``‖θ'_r − θ_r‖²`` over this rank's shards, a 0-d float64 device tensor (no synchronisation): differences in
    the parameters' dtype (exact within a factor 2, Sterbenz), squares summed in float64 — as
    :func:`dynprobe.ghosts.replica.separation` does for whole tensors."""
    mine = [local_tensor(p).detach() for p in params]
    theirs = [local_tensor(r).detach() for r in reference]
    if not mine:
        return torch.zeros((), dtype=torch.float64)
    norms = torch._foreach_norm(torch._foreach_sub(mine, theirs), 2, dtype=torch.float64)
    return torch.stack([n.to(norms[0].device) for n in norms]).square().sum()


def local_sums(x: torch.Tensor, g: torch.Tensor, bounds: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Round (1)'s local part: ``[‖x_r‖², ‖g_r‖², ‖x_r − g_r‖² per layer…, non-finite entries of g_r]``, float64.

    Each sum is :func:`~dynprobe.distributed.sharded_rows.square_difference_sum` (float64 terms, chunks summed
    pairwise): terms ≥ 0, relative error ≤ γ_n whatever the order."""
    sums = [square_difference_sum(x, 0.0, x, 1.0), square_difference_sum(g, 0.0, g, 1.0)]
    sums += [square_difference_sum(g[a:b], 1.0, x[a:b], 1.0) for a, b in bounds]
    sums.append(float((~torch.isfinite(g)).sum()))
    return torch.tensor(sums, dtype=torch.float64)


def compare_sharded_ghost(
    ghost_id: int,
    module: nn.Module,
    params: list[torch.Tensor],
    reference: Reference,
    *,
    step: int,
    storage_dtype: torch.dtype,
    divergence_ratio: float,
    evaluate: Callable[[nn.Module], Any],
    disagreement: Callable[[Any, Any], float],
    preds_dtype: Callable[[int], Any],
    layers: list[tuple[str, slice]],
    kernel_of: Any,
    state: Callable[[], Mapping[str, torch.Tensor]],
    save_params: bool,
    active: list[slice] | None = None,
    run: Collectives,
    slot: MainModelSlot,
    root: Path | None = None,
) -> Comparison:
    """:func:`dynprobe.ghosts.comparison.compare_ghost` for a sharded ghost (module docstring): the same
    arguments (``module`` is the main model, ``params`` the ghost's DTensors, ``reference.params`` this rank's
    piece of the main θ, ``layers`` the global layer slices), plus the run's collectives and the main model slot."""
    x = reference.params
    bounds = local_layer_bounds([p.numel() for p in params], [local_numel(p) for p in params], layers)
    device = x.device
    error, first = None, torch.zeros(len(bounds) + 5)
    try:
        g = local_piece(params, x.dtype).to(device)
        active_squares = 0.0 if active is None else sum(  # L2_active: the active slices' columns here
            square_difference_sum(g[a:b], 1.0, x[a:b], 1.0) for a, b in local_ranges(params, active))
        first = torch.cat([local_sums(x, g, bounds), torch.tensor(
            [float(not same_local_tensors(state(), reference.state)), active_squares], dtype=torch.float64)])
    except Exception as failure:  # noqa: BLE001 - every rank must reach the all-reduce
        error = f"{type(failure).__name__}: {failure}"
        first = torch.zeros(len(bounds) + 5, dtype=torch.float64)
    totals = _all_reduce(run, first, error, device)
    x_norm2, g_norm2, layer_squares = totals[0], totals[1], totals[2:-3]
    nonfinite, differs, active_squares = totals[-3], totals[-2], totals[-1]
    if nonfinite:
        return Comparison(stop="non-finite parameters")
    ghost_norm, reference_norm = math.sqrt(g_norm2), math.sqrt(x_norm2)
    if ghost_norm > divergence_ratio * reference_norm:
        return Comparison(stop=f"‖θ'‖ = {ghost_norm:.3g} exceeds {divergence_ratio:g}·‖θ‖ = {reference_norm:.3g}")
    error, second = None, torch.zeros(1, dtype=torch.float64)
    try:
        norms = torch.tensor([x_norm2], dtype=torch.float64), torch.tensor([[g_norm2]], dtype=torch.float64)
        second = local_row_sums(x, g[None], *norms, [(0, x.numel())], per_layer=False).reshape(1).cpu()
    except Exception as failure:  # noqa: BLE001
        error = f"{type(failure).__name__}: {failure}"
    cosine = float(cosine_from_partial_sums(_all_reduce(run, second, error, device)[None], [x_norm2],
                                            [[g_norm2]])[0, 0])
    identical = reference.evaluation is not None and not differs
    if identical:
        evaluation = reference.evaluation
    else:
        named = state()
        with slot.holding(params, {name: named[name] for name, _ in slot.buffers}, train=False):
            evaluation = evaluate(module)
    record: dict[str, Any] = {
        "ghost": ghost_id, "step": step, "reference": reference.name, "C": cosine,
        "L2": math.sqrt(float(np.sum(layer_squares))), "L2_layers": [math.sqrt(v) for v in layer_squares],
        "D": disagreement(reference.preds, evaluation.preds), "eval_loss": evaluation.loss,
        "eval_accuracy": evaluation.accuracy,
    }
    record["L2_active"] = record["L2"] if active is None else math.sqrt(float(active_squares))
    if identical:
        record["evaluation"] = "the reference's (bitwise equal parameters and buffers)"
    if kernel_of is not None and reference.kernel is not None:  # the eNTK takes whole values: gather (collective)
        record["S"] = metrics.kernel_distance(reference.kernel, kernel_of(whole_state(state())))
    if save_params:  # each rank its shards of the ghost, as the main run's θ (collective: DCP's save)
        assert root is not None, "Ghosts(save_params=True) under FSDP needs the run directory"
        mine = {id(p) for p in params}
        save_sharded_params(root, step, {name: t.detach() for name, t in state().items() if id(t) in mine},
                            ghost=ghost_id)
    arrays = {ghost_array(ghost_id, PREDS): evaluation.preds.cpu().numpy().astype(preds_dtype(evaluation.num_classes))}
    return Comparison(record, arrays)


def whole_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every DTensor gathered whole (``full_tensor()``: one all-gather each, in the state's order,
    the same on every rank); plain tensors as they are."""
    return {name: t.full_tensor() if hasattr(t, "full_tensor") else t for name, t in state.items()}


def _all_reduce(run: Collectives, values: torch.Tensor, error: str | None, device: torch.device) -> np.ndarray:
    payload = torch.cat([values.to(torch.float64), torch.tensor([0.0 if error is None else 1.0],
                                                                dtype=torch.float64)]).to(device)
    run.all_reduce(payload)
    totals = payload.cpu().numpy()
    if totals[-1]:
        mine = f" (here: {error})" if error else ""
        raise ShardedCompareError(f"comparing a ghost failed on {int(totals[-1])} rank(s){mine}")
    return totals[:-1]
