"""The sequential ghost trainer: each ghost a deep copy of the model and optimizer, compared with the main model.

This is the exact path (``Ghosts(vectorize=False)``, the default): a replica runs the same plain kernels as the
main model on the same captured batches, RNG and autocast states, so the ε = 0 control stays bitwise equal to the
main run and every ghost is compared with the main run itself.
"""
from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping

import torch
from torch import nn

from dynprobe.capture.step import MicroBatch

from .comparison import compare_ghost
from .perturbation import Perturbation, PerturbationReport, perturb_
from .replica import (
    Replica,
    group_by_scale,
    losses_finite,
    named_tensors,
    separation,
    tensor_differences,
    train_replica,
)
from .trainer import Fault, Ghost, MainSnapshot, Reference, TrainerContext

__all__ = ["SequentialTrainer"]


class SequentialTrainer:
    """Ghosts as deep copies (:class:`dynprobe.ghosts.replica.Replica`), trained one after the other.

    ``reason``: why this mode, recorded as the ``ghost_mode`` event at construction (None: record nothing, for a
    trainer used inside another).
    """

    mode = "sequential"
    comparer = staticmethod(compare_ghost)

    def __init__(self, context: TrainerContext, *, reason: str | None = "requested: Ghosts(vectorize=False)") -> None:
        self.context = context
        Replica.clone(context.model, context.optimizer, context.no_copy)  # fails at attach if they cannot be copied
        if reason is not None:
            context.on_mode("sequential", 0, reason, requested=context.config.vectorize)

    def spawn(self, ghost: Ghost, perturbation: Perturbation) -> PerturbationReport:
        context = self.context
        ghost.replica = Replica.clone(context.model, context.optimizer, context.no_copy, context.config.scaler,
                                      context.replay)
        return perturb_(ghost.replica.params, perturbation)

    def train_step(self, ghosts: list[Ghost], micro_batches: list[MicroBatch], step: int
                   ) -> list[tuple[int, Fault]]:
        context, config = self.context, self.context.config
        groups = group_by_scale(micro_batches) if config.scaler is not None else [micro_batches]
        faults: list[tuple[int, Fault]] = []
        for ghost in ghosts:
            assert ghost.replica is not None
            try:
                losses = train_replica(ghost.replica, groups, context.optimizer, context.main_params, context.replay,
                                       clip_grad_norm=config.clip_grad_norm, clip_grad_value=config.clip_grad_value)
            except Exception as error:  # noqa: BLE001 - a ghost fault never reaches the user's loop
                faults.append((ghost.ghost_id, Fault("failed", f"{type(error).__name__}: {error}",
                                                  traceback.format_exc(), error)))
                continue
            faults.append((ghost.ghost_id, Fault("diverged", "non-finite loss", when=~losses_finite(losses))))
        return faults

    def release(self, ghost: Ghost) -> None:
        ghost.replica = None

    def separations(self, ghosts: list[Ghost]) -> dict[int, torch.Tensor]:
        main = self.context.main_params
        return {g.ghost_id: separation(g.replica.params, main) for g in ghosts if g.replica is not None}

    def control_drift(self, control: Ghost) -> tuple[str, list[str], torch.Tensor] | None:
        assert control.replica is not None
        return "main", *tensor_differences(named_tensors(self.context.model), named_tensors(control.replica.model))

    def reference(self, main: MainSnapshot, *, kernel_of: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None
                  ) -> Reference:
        return Reference("main", main.params, main.preds, main.kernel, main.state, evaluation=main.evaluation)

    def module_of(self, ghost: Ghost) -> tuple[nn.Module, list[torch.Tensor]]:
        assert ghost.replica is not None
        return ghost.replica.model, ghost.replica.params

    def state_of(self, ghost: Ghost) -> dict[str, torch.Tensor]:
        assert ghost.replica is not None
        return named_tensors(ghost.replica.model)

    def reference_state(self) -> dict[str, torch.Tensor]:
        return named_tensors(self.context.model)
