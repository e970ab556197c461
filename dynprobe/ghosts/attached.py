"""What ghosts need of the model and optimizer: checked at attach (:func:`check_attachable`), and the parameters
the ghosts were built for — the model's and the optimizer's as they were when the probe attached.

A ghost is a copy of the model and optimizer, and θ covers the parameters present at attach. A parameter added
later (a new head, ``optimizer.add_param_group``) or removed makes every copy and comparison mismatch, so the ghosts
stop at the first step that sees the change and no ghost spawns afterwards; the main recording goes on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynprobe._util.user_warnings import warn_user
from dynprobe.store.sink import RunSink

from .replica import (
    NONDETERMINISTIC_CAUSE,
    check_optimizer_for_ghosts,
    deterministic_replay_possible,
)

__all__ = ["AttachedLayout", "LayoutChange", "check_attachable"]


def check_attachable(model: nn.Module, optimizer: torch.optim.Optimizer,
                     device: torch.device, writer: RunSink, *, compiled: bool) -> None:
    """Refuse what ghosts cannot follow (a closure optimizer; a model or optimizer that cannot be copied is refused
    by the trainer, which knows how it copies them); warn about what makes the ε = 0 control drift (your training
    ``compiled``; CUDA without deterministic algorithms, also recorded as the ``nondeterministic_device`` event)."""
    check_optimizer_for_ghosts(optimizer)
    if compiled:
        warn_user("dynprobe: the model is compiled (torch.compile). Ghosts replay your training step on eager "
                  "deep copies: fused kernels round differently and compiled dropout draws its own random "
                  "numbers, so the ε=0 control ghost will drift from your run and the chaos maps mix ε with that "
                  "difference. For exact ghosts attach the probe to the uncompiled module and train it eagerly")
    if not deterministic_replay_possible(device):
        writer.event("nondeterministic_device", step=None, device=str(device), cause=NONDETERMINISTIC_CAUSE)
        warn_user(f"dynprobe: ghosts on {device} without deterministic algorithms cannot replay your step "
                  f"exactly, so the ε=0 control will drift and every ghost mixes ε with that drift: "
                  f"{NONDETERMINISTIC_CAUSE}")


@dataclass(frozen=True)
class LayoutChange:
    """How the parameters differ from attach: names of the model's new parameters, counts, and the reason said."""

    added: list[str]
    parameters: int
    attached: int
    optimizer_changed: bool

    @property
    def reason(self) -> str:
        new = "; new: " + ", ".join(repr(a) for a in self.added[:3]) if self.added else ""
        where = "the model's parameters" if not self.optimizer_changed or self.added else "the optimizer's parameters"
        return (f"{where} changed after the probe attached ({self.parameters} parameter tensors now, "
                f"{self.attached} at attach{new}): ghosts copy the model and optimizer as they were and θ covers the "
                "parameters present at attach. Build the whole model (and its optimizer) before attaching the probe")

    def fields(self) -> dict[str, Any]:
        """The ``model_changed`` event's fields."""
        return {"added": self.added[:20], "parameters": self.parameters, "attached": self.attached,
                "optimizer_changed": self.optimizer_changed}


class AttachedLayout:
    """The identities of the model's parameters and of the optimizer's, at attach."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self._model_ids = self._model_now()
        self._optimizer_ids = self._optimizer_now()

    def _model_now(self) -> tuple[int, ...]:
        return tuple(id(p) for p in self.model.parameters())

    def _optimizer_now(self) -> tuple[int, ...]:
        return tuple(id(p) for group in self.optimizer.param_groups for p in group["params"])

    def change(self) -> LayoutChange | None:
        """None while the parameters are those of attach; else how they changed (host-side identities only)."""
        model_changed = self._model_now() != self._model_ids
        optimizer_changed = self._optimizer_now() != self._optimizer_ids
        if not (model_changed or optimizer_changed):
            return None
        before = set(self._model_ids)
        named = list(self.model.named_parameters())
        added = [name for name, p in named if id(p) not in before]
        return LayoutChange(added, len(named), len(before), optimizer_changed)
