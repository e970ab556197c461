"""One ghost compared with its reference at a snapshot: the chaos maps' entries (the two-phase paper's §4).

For a ghost with flat parameters θ' and its reference θ (the main run, or the ε = 0 shadow of a vectorized stack):
C = 1 − cos(θ, θ') (eq. 1), L2 = ‖θ − θ'‖₂, L2_active = the same without the inert tensors and tensor parts
(:mod:`dynprobe.recording.inert`, once found; until then, and in a run without any, L2_active = L2: without inert
tensors the active separation is the separation), per layer L2 over each layer's slice of vec θ (a layer is the module
owning a parameter tensor, in first-appearance order: ``run.layers``), D = the task's disagreement of eval
predictions (eq. 6), the ghost's eval loss and accuracy, and — at the snapshots where the kernel is due — S = the
kernel distance (eq. 4) between H(θ) and H(θ'). A ghost whose parameters and buffers equal the reference's bit for
bit (the ε = 0 control while the replay is exact) is not evaluated again: evaluation is deterministic given the
tensors, so its outputs are the reference's (its record says so); its kernel is still computed (under DDP the
kernel is a collective every rank must join). Loss barriers between ghost and reference are not computed here:
they are scheduled with the probe's other barriers (:meth:`dynprobe.ghosts.ghost_set.GhostSet.comparison_states`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from dynprobe._util.modules import flatten_parameters, parse_part_name, same_tensors
from dynprobe.metrics import functions as metrics
from dynprobe.store.layout import PARAMS, PREDS, ghost_array

from .trainer import Reference

__all__ = ["Comparison", "active_slices", "compare_ghost", "per_layer_l2"]


@dataclass
class Comparison:
    """A ghost's ``ghost_compare`` record and arrays for the snapshot; or ``stop``, why it must stop (diverged)."""

    record: dict[str, Any] | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    stop: str | None = None


def per_layer_l2(a: torch.Tensor, b: torch.Tensor, layers: list[tuple[str, slice]]) -> list[float]:
    """‖a − b‖₂ over each layer's slice of vec θ (float64), in the order of ``layers``
    (:func:`dynprobe._util.modules.layer_slices`)."""
    if not layers:
        return []
    norms = [torch.linalg.vector_norm(a[part].double() - b[part].double()) for _, part in layers]
    return torch.stack([n.to(norms[0].device) for n in norms]).tolist()  # one host read for all layers


def active_slices(model: nn.Module, inert: list[str]) -> list[slice]:
    """The slices of vec θ (the trainable parameters in order) without the inert tensors and parts named in
    ``inert`` (a tensor's name, or ``name[start:stop]`` for elements of it: :func:`dynprobe._util.modules.part_name`);
    an inert name that is no trainable parameter is a ``ValueError``."""
    excluded: dict[str, list[slice]] = {}
    for text in inert:
        name, part = parse_part_name(text)
        excluded.setdefault(name, []).append(part if part is not None else slice(0, None))
    slices, offset = [], 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            start = offset
            for part in sorted(excluded.pop(name, []), key=lambda part: part.start):
                stop = offset + min(part.stop if part.stop is not None else p.numel(), p.numel())
                if offset + part.start > start:
                    slices.append(slice(start, offset + part.start))
                start = max(start, stop)
            if offset + p.numel() > start:
                slices.append(slice(start, offset + p.numel()))
            offset += p.numel()
    if excluded:
        raise ValueError(f"inert parameter names {sorted(excluded)} are not trainable parameters of the model")
    return slices


def compare_ghost(
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
    kernel_of: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None,
    state: Callable[[], Mapping[str, torch.Tensor]],
    save_params: bool,
    active: list[slice] | None = None,
) -> Comparison:
    """Compare ghost ``ghost_id`` (``module`` holding its parameters ``params``) with ``reference`` at ``step``.

    ``kernel_of`` is given when S is due for this ghost at this snapshot (and the reference has a kernel); ``state``
    returns the ghost's parameters and buffers by name for it. ``active``: the slices of vec θ without the inert
    tensors and parts (:func:`active_slices`), when some were found: ``L2_active`` is the L2 over them; without
    (None) it equals ``L2``.
    """
    flat = flatten_parameters(params, storage_dtype)
    finite, reference_norm, ghost_norm = torch.stack([  # one host read
        torch.isfinite(flat).all().double(), reference.params.double().norm().to(flat.device), flat.double().norm()
    ]).tolist()
    if not finite:
        return Comparison(stop="non-finite parameters")
    if ghost_norm > divergence_ratio * reference_norm:
        return Comparison(stop=f"‖θ'‖ = {ghost_norm:.3g} exceeds {divergence_ratio:g}·‖θ‖ = {reference_norm:.3g}")
    # A ghost equal to its reference bit for bit (the ε = 0 control; a perturbation lost to rounding) gives the
    # reference's outputs exactly: its evaluation is the reference's, not a second pass over the eval set.
    identical = reference.evaluation is not None and same_tensors(state(), reference.state)
    evaluation = reference.evaluation if identical else evaluate(module)
    record: dict[str, Any] = {
        "ghost": ghost_id,
        "step": step,
        "reference": reference.name,
        "C": metrics.cosine_dissimilarity(reference.params, flat),
        "L2": metrics.l2_distance(reference.params, flat),
        "L2_layers": per_layer_l2(reference.params, flat, layers),
        "D": disagreement(reference.preds, evaluation.preds),
        "eval_loss": evaluation.loss,
        "eval_accuracy": evaluation.accuracy,
    }
    if active is None:
        record["L2_active"] = record["L2"]
    else:
        kept = active or [slice(0, 0)]  # every tensor inert: nothing left, the active separation is 0
        reference_active = torch.cat([reference.params[part] for part in kept])
        record["L2_active"] = metrics.l2_distance(reference_active, torch.cat([flat[part] for part in kept]))
    if identical:
        record["evaluation"] = "the reference's (bitwise equal parameters and buffers)"
    if reference.drift is not None:  # the shadow's own distance from the main run, next to the ghost signal
        record["reference_L2"] = reference.drift["L2"]
    if kernel_of is not None and reference.kernel is not None:
        record["S"] = metrics.kernel_distance(reference.kernel, kernel_of(state()))
    arrays = {ghost_array(ghost_id, PREDS): evaluation.preds.cpu().numpy().astype(preds_dtype(evaluation.num_classes))}
    if save_params:
        arrays[ghost_array(ghost_id, PARAMS)] = flat.cpu().numpy()
    return Comparison(record, arrays)

