"""Inert parameter tensors: a gradient at rounding level that an adaptive optimizer still moves by lr-sized steps.

A bias in front of a normalization layer (a conv bias before BatchNorm, an attention key bias before the softmax)
has an exactly-zero gradient; computed in floating point it is rounding noise, ~1e-7 of the other tensors'
gradients. SGD moves such a tensor by lr · noise: nothing. An adaptive optimizer divides by the gradient's own
running scale — Adam's step is lr · m̂ / (√v̂ + eps) — so it moves the tensor by about lr per step, in a direction
set by the rounding. A ghost's perturbation ε changes that rounding, so its next step differs from the main run's by
~lr on every such coordinate: the ghost "amplifies" ε by orders of magnitude in one step (measured on a small CNN:
×1e4, ×1.1 with ``bias=False``), which is rounding noise fed through Adam, not chaos of the training dynamics.

:func:`inert_parameters` finds them from the gradients and the optimizer state: a tensor is inert when its gradient
is nonzero with a root mean square below :data:`INERT_RATIO` of the whole gradient's, and the optimizer keeps a
second-moment estimate for it (Adam, AdamW, NAdam, RAdam, Adamax, RMSprop, Adagrad, Adadelta: any state entry in
:data:`SECOND_MOMENTS`). :class:`InertWatch` checks once, at the first snapshot after an optimizer step, records
the ``inert_parameters`` event and manifest field, warns naming the tensors and the fix, and returns them for the
ghosts, whose comparisons then also report the separation without those tensors (``L2_active``).

**Fused projections.** An attention key bias is often not a tensor of its own: ``nn.MultiheadAttention`` keeps
q, k and v biases in one ``in_proj_bias``, and a fused ``qkv`` Linear (timm's ``Attention``, nanoGPT's ``c_attn``)
in its bias. Softmax is invariant to a shift shared by all keys of a query, and the key bias adds q·b_k to every
logit of the row, so the key third's gradient is rounding noise while the tensor's is not (measured on the ViT of
tests/benchmarks/bench_everyday.py: key third 3.6e-8 of the whole gradient's rms, the tensor 1.36).
:func:`fused_parts` names the parts judged on their own from the module structure only — no guess from names or
from the gradients: the three equal thirds of ``nn.MultiheadAttention.in_proj_bias``, and of the bias of an
``nn.Linear`` with ``out_features == 3 · in_features`` (the q/k/v layout of the fused qkv convention; a live bias
of that shape has no third at 1e-5 of the whole gradient, so the check cannot fire on it by mistake). Any other
fused layout is not split. A part is inert by the same rule as a tensor and is named ``name[start:stop]``
(:func:`dynprobe._util.modules.part_name`, offsets into the flattened tensor); a tensor inert as a whole is
named whole.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dynprobe._util.modules import parse_part_name, part_name
from dynprobe._util.user_warnings import warn_user
from dynprobe.store.sink import RunSink

__all__ = ["INERT_RATIO", "SECOND_MOMENTS", "InertWatch", "MeanSquares", "fused_parts", "inert_parameters",
           "mean_squares"]

# Gradient rms of a tensor relative to the whole gradient's rms below which it is inert: an exactly-zero gradient
# computed in float32 lands at ~1e-7 (measured 2e-7 to 8e-7 for conv biases before BatchNorm), while a live tensor's
# ratio is of order 0.1 to 10; 1e-5 leaves two orders of magnitude on each side.
INERT_RATIO = 1e-5
# Optimizer state entries that hold a per-coordinate second-moment estimate (an adaptive step size).
SECOND_MOMENTS = ("exp_avg_sq", "square_avg", "sum", "exp_inf", "acc_delta")


def fused_parts(model: nn.Module, named_params: list[tuple[str, torch.Tensor]]) -> dict[str, list[tuple[int, int]]]:
    """``{parameter name: [(start, stop), ...]}``: the q, k, v thirds of each fused attention bias among
    ``named_params`` (module docstring, "Fused projections"), found by module type and shape; names are those of
    ``named_params`` (matched by identity, so a wrapper's prefix does not matter)."""
    name_of = {id(p): name for name, p in named_params}
    parts: dict[str, list[tuple[int, int]]] = {}
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            bias = module.in_proj_bias
        elif isinstance(module, nn.Linear) and module.out_features == 3 * module.in_features:
            bias = module.bias
        else:
            continue
        if bias is not None and id(bias) in name_of and bias.numel() % 3 == 0:
            third = bias.numel() // 3
            parts[name_of[id(bias)]] = [(i * third, (i + 1) * third) for i in range(3)]
    return parts


# The gradient's mean square over each piece — ``(name, tensor, part or None)``: a whole tensor, or the part
# ``(start, stop)`` of its flattened entries — as a float64 CPU vector. One process: :func:`mean_squares`; FSDP2
# (each rank a shard of every gradient): dynprobe.distributed.sharded_inert.
MeanSquares = Callable[[list[tuple[str, torch.Tensor, "tuple[int, int] | None"]]], torch.Tensor]


def mean_squares(pieces: list[tuple[str, torch.Tensor, tuple[int, int] | None]]) -> torch.Tensor:
    """The gradient's mean square over each piece (one host read for all of them)."""
    device = pieces[0][1].device
    flat = {id(p): p.grad.detach().reshape(-1).double() for _, p, _ in pieces}
    return torch.stack([(flat[id(p)] if part is None else flat[id(p)][part[0]:part[1]]).square().mean().to(device)
                        for _, p, part in pieces]).cpu()


def inert_parameters(named_params: list[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
                     parts: dict[str, list[tuple[int, int]]] | None = None, *,
                     squares_of: MeanSquares = mean_squares) -> dict[str, float] | None:
    """``{name: gradient rms / whole gradient rms}`` of the inert tensors (module docstring), in parameter order
    (empty for an optimizer without second moments); None when there is no gradient to judge. ``parts``
    (:func:`fused_parts`): tensors whose parts are also judged one by one; an inert part of a tensor that is not
    inert as a whole is named ``name[start:stop]``. ``squares_of``: the gradient's mean square over each piece
    (:func:`mean_squares`, one host read)."""
    with_grad = [(name, p) for name, p in named_params if p.grad is not None]
    if not with_grad:
        return None
    parts = parts or {}
    pieces = [(name, p, None) for name, p in with_grad]  # (name, tensor, part or None); whole tensors first
    pieces += [(name, p, part) for name, p in with_grad for part in parts.get(name, [])]
    squares = squares_of(pieces)
    sizes = torch.tensor([float(p.numel()) for _, p in with_grad], dtype=torch.float64)
    whole = float((squares[:len(with_grad)] * sizes).sum() / sizes.sum()) ** 0.5
    if not whole > 0:
        return None
    ratios = (squares.sqrt() / whole).tolist()
    adaptive = {name for name, p in with_grad if any(key in optimizer.state.get(p, {}) for key in SECOND_MOMENTS)}
    inert_whole = {name for (name, _, part), ratio in zip(pieces, ratios) if part is None and 0 < ratio < INERT_RATIO}
    found = {}
    for (name, _, part), ratio in zip(pieces, ratios):
        if name not in adaptive or not 0 < ratio < INERT_RATIO:
            continue
        if part is None:
            found[name] = ratio
        elif name not in inert_whole:
            found[part_name(name, *part)] = ratio
    order = {name: i for i, (name, _) in enumerate(with_grad)}
    return dict(sorted(found.items(), key=lambda item: order[parse_part_name(item[0])[0]]))


class InertWatch:
    """Checks for inert tensors once, at the first snapshot after an optimizer step (module docstring).

    Args:
        model: the model whose fused attention biases are judged by parts (:func:`fused_parts`).
        named_params: the probe's trainable parameters, in ``vec(θ)`` order.
        optimizer: the main optimizer.
        sink: the run's sink (``inert_parameters`` event and manifest field).
        squares_of: the gradient's mean square over each piece (default :func:`mean_squares`; under FSDP2 every
            rank calls the check at the same snapshots and the sums are all-reduced).
    """

    def __init__(self, model: nn.Module, named_params: list[tuple[str, torch.Tensor]],
                 optimizer: torch.optim.Optimizer, sink: RunSink, *, squares_of: MeanSquares = mean_squares) -> None:
        self.named_params, self.optimizer, self.sink = named_params, optimizer, sink
        self.parts = fused_parts(model, named_params)
        self.squares_of = squares_of
        self.done = False

    def check(self, step: int) -> list[str]:
        """At a snapshot: judge the current gradients once they exist (step ≥ 1); returns the inert tensors' and
        parts' names (``name`` or ``name[start:stop]``) found at this check (empty at every other)."""
        if self.done or step < 1:
            return []
        found = inert_parameters(self.named_params, self.optimizer, self.parts, squares_of=self.squares_of)
        if found is None:
            return []
        self.done = True
        optimizer = type(self.optimizer).__name__
        record: dict[str, Any] = {"step": step, "tensors": list(found), "optimizer": optimizer,
                                  "threshold": INERT_RATIO}
        self.sink.event("inert_parameters", **record, gradient_ratio=found)
        self.sink.update_manifest(inert_parameters=record)
        if not found:
            return []
        shown = ", ".join(f"{name} ({ratio:.1e})" for name, ratio in list(found.items())[:4])
        more = f" and {len(found) - 4} more" if len(found) > 4 else ""
        warn_user(f"dynprobe: {optimizer} moves {len(found)} parameter tensors whose gradient is at rounding level "
                  f"({shown}{more}: gradient rms relative to the whole gradient's). Typically a bias in front of "
                  "BatchNorm or another normalization: its gradient is exactly zero up to rounding, and an adaptive "
                  "optimizer turns that noise into lr-sized steps, so ghosts show a spurious amplification of ε. "
                  "Build those layers with bias=False (a key bias inside a fused q/k/v bias, name[start:stop], has no "
                  "such switch; it is harmless to training). Ghost comparisons also report L2_active, the separation "
                  "without these tensors and parts")
        return list(found)
