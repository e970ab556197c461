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
"""
from __future__ import annotations

from typing import Any

import torch

from dynprobe._util.user_warnings import warn_user
from dynprobe.store.sink import RunSink

__all__ = ["INERT_RATIO", "SECOND_MOMENTS", "InertWatch", "inert_parameters"]

# Gradient rms of a tensor relative to the whole gradient's rms below which it is inert: an exactly-zero gradient
# computed in float32 lands at ~1e-7 (measured 2e-7 to 8e-7 for conv biases before BatchNorm), while a live tensor's
# ratio is of order 0.1 to 10; 1e-5 leaves two orders of magnitude on each side.
INERT_RATIO = 1e-5
# Optimizer state entries that hold a per-coordinate second-moment estimate (an adaptive step size).
SECOND_MOMENTS = ("exp_avg_sq", "square_avg", "sum", "exp_inf", "acc_delta")


def inert_parameters(named_params: list[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer
                     ) -> dict[str, float] | None:
    """``{name: gradient rms / whole gradient rms}`` of the inert tensors (module docstring), in parameter order
    (empty for an optimizer without second moments); None when there is no gradient to judge. One host read."""
    with_grad = [(name, p) for name, p in named_params if p.grad is not None]
    if not with_grad:
        return None
    squares = torch.stack([p.grad.detach().double().square().mean().to(with_grad[0][1].device)
                           for _, p in with_grad]).cpu()
    sizes = torch.tensor([float(p.numel()) for _, p in with_grad], dtype=torch.float64)
    whole = float((squares * sizes).sum() / sizes.sum()) ** 0.5
    if not whole > 0:
        return None
    ratios = (squares.sqrt() / whole).tolist()
    return {name: ratio for (name, p), ratio in zip(with_grad, ratios)
            if 0 < ratio < INERT_RATIO and any(key in optimizer.state.get(p, {}) for key in SECOND_MOMENTS)}


class InertWatch:
    """Checks for inert tensors once, at the first snapshot after an optimizer step (module docstring).

    Args:
        named_params: the probe's trainable parameters, in ``vec(θ)`` order.
        optimizer: the main optimizer.
        sink: the run's sink (``inert_parameters`` event and manifest field).
    """

    def __init__(self, named_params: list[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
                 sink: RunSink) -> None:
        self.named_params, self.optimizer, self.sink = named_params, optimizer, sink
        self.done = False

    def check(self, step: int) -> list[str]:
        """At a snapshot: judge the current gradients once they exist (step ≥ 1); returns the inert tensors' names
        found at this check (empty at every other)."""
        if self.done or step < 1:
            return []
        found = inert_parameters(self.named_params, self.optimizer)
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
                  "Build those layers with bias=False. Ghost comparisons also report L2_active, the separation "
                  "without these tensors")
        return list(found)
