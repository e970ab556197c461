"""Ghosts under FSDP2 (``fully_shard``): :class:`ShardedGhostTrainer`, replicas that are shards, trained through the
main model's own FSDP modules.

An FSDP2 model cannot be deep-copied (PyTorch refuses), and a ghost must be sharded as the main run is, so a ghost
here is *state*, not a module: its own parameters (DTensors with the main parameters' mesh and placements: every
rank holds its shards), its own buffers, its own optimizer (``deepcopy(optimizer, memo={id(p_main): p_ghost})``,
its state sharded alike) and its own copy of the watched loss. To run it, a
:class:`~dynprobe.distributed.sharded_slot.MainModelSlot` writes the ghost's
shards and buffers into the main model's (in place, under ``no_grad``: what an optimizer step does, so the next
all-gather reads them), runs the forwards and backwards — FSDP's own all-gathers and reduce-scatters, with the
main run's mesh, mixed precision and reduction — moves the resulting gradients to the ghost's parameters, and
writes the main values, buffers and gradient tensors back bit for bit. The ε = 0 control therefore takes exactly
the main run's step (bitwise, on the CPU): the same kernels on the same values in the same collectives.

**Spawn.** ε is drawn for the whole θ on every rank, one tensor at a time, and each rank keeps its part
(:class:`dynprobe.ghosts.perturbation.Shards`): rank r's shards of a ghost equal rank r's part of the ghost one
process would have made from the same θ and seed; the report's sums are all-reduced.

**One collective per step** for all ghosts together, after their steps: a float64 SUM all-reduce of each ghost's
exception flag, non-finite-loss flag and local ``‖θ'_r − θ_r‖²``, and the control's local max |Δ| per tensor. The
exception counts are read on the host (one synchronisation per step, as under DDP): every rank must stop a ghost
that failed on any rank before the next step, or the ranks would disagree on which ghosts run collectives. The
non-finite flags and separations stay on the device and are read in batches like every ghost value
(:mod:`dynprobe.ghosts.readings`). The control's drift is the sum over ranks of each rank's max |Δ| per tensor:
0 exactly when the control equals the main run bit for bit on every rank.

Comparisons at snapshots: :mod:`dynprobe.distributed.sharded_compare`.
"""
from __future__ import annotations

import copy
import functools
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dynprobe._util.modules import max_abs_differences
from dynprobe.capture.loss_state import module_memo
from dynprobe.capture.step import MicroBatch
from dynprobe.ghosts.perturbation import Perturbation, PerturbationReport, Shards, perturb_
from dynprobe.ghosts.replica import (
    Replica,
    check_optimizer_for_ghosts,
    losses_finite,
    match_grad_presence,
    replay_gradients,
    step_optimizer,
    sync_hyperparameters,
)
from dynprobe.ghosts.trainer import Fault, Ghost, MainSnapshot, Reference, TrainerContext

from .ghost_trainer import agreed_failure
from .sharded import Collectives, local_tensor, whole_to_local
from .sharded_compare import compare_sharded_ghost, local_separation_squares
from .sharded_slot import MainModelSlot

__all__ = ["SHARDED_REASON", "ShardedGhostTrainer", "ShardedReplica"]

SHARDED_REASON = ("FSDP2 (fully_shard): sequential ghosts holding their own shards, trained through the main "
                  "model's FSDP modules with one extra collective per step")


@dataclass
class ShardedReplica(Replica):
    """A ghost under FSDP2: ``model`` is the *main* model (the ghost runs in it: ``MainModelSlot``);
    ``params`` the ghost's own DTensor parameters, ``buffers`` its own buffers by name."""

    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The ghost's parameters and buffers by the main model's names (parameters and buffers of ``model``)."""
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        return {**dict(zip(names, self.params)), **self.buffers}


class ShardedGhostTrainer:
    """The :class:`~dynprobe.ghosts.trainer.GhostTrainer` of an FSDP2 run (module docstring); ``run`` is the
    :class:`~dynprobe.distributed.runtime.DistributedRun` of this process, ``root`` the shared run directory
    (``Ghosts(save_params=True)`` writes each rank's ghost shards into its snapshots)."""

    mode = "sequential"

    def __init__(self, run: Collectives, context: TrainerContext, *, root: Path | None = None) -> None:
        self.run, self.context = run, context
        check_optimizer_for_ghosts(context.optimizer)
        self.slot = MainModelSlot(context.model, context.main_params)
        self._names = [name for name, p in context.model.named_parameters() if p.requires_grad]
        self._drift_names = self._names + [name for name, _ in self.slot.buffers]
        self._separations: dict[int, torch.Tensor] = {}  # this step's, all-reduced (read by the ghost set)
        self._nonfinite = torch.zeros(0, dtype=torch.float64)
        self._drift: torch.Tensor | None = None
        self.comparer = functools.partial(compare_sharded_ghost, run=run, slot=self.slot, root=root)
        self._trial_copy()
        context.on_mode("sequential", 0, SHARDED_REASON, requested=context.config.vectorize)

    def _trial_copy(self) -> None:
        """Fail at attach when the optimizer cannot be copied for a ghost."""
        model = self.context.model
        outside = {id(p) for p in model.parameters()}
        if any(id(p) not in outside for group in self.context.optimizer.param_groups for p in group["params"]):
            raise ValueError("ghosts need an optimizer over the model's parameters only (this one also holds "
                             "tensors that are not parameters of the model)")
        self._clone_optimizer({id(p): p for p in model.parameters()})

    def _clone_optimizer(self, mapping: Mapping[int, torch.Tensor]) -> torch.optim.Optimizer:
        return copy.deepcopy(self.context.optimizer, {**self.context.no_copy, **mapping})

    # ------------------------------------------------------------------------------------------ replicas

    def spawn(self, ghost: Ghost, perturbation: Perturbation) -> PerturbationReport:
        context, model = self.context, self.context.model
        copies = {id(p): nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in model.parameters()}
        params = [copies[id(p)] for p in context.main_params]
        buffers = {name: b.detach().clone() for name, b in self.slot.buffers}
        memo = module_memo(model, model)  # the ghost runs in the main model: its loss copy refers to it
        ghost.replica = ShardedReplica(model, self._clone_optimizer(copies), params,
                                       loss_fn=context.replay.copy_now(memo), memo=memo, buffers=buffers)
        shards = Shards([p.shape for p in params], lambda index, whole: whole_to_local(params[index], whole),
                        self._sum_on_host)
        return perturb_([local_tensor(p) for p in params], perturbation, shards=shards)

    def release(self, ghost: Ghost) -> None:
        ghost.replica = None

    def _sum_on_host(self, values: torch.Tensor) -> None:
        on_device = values.to(self.context.device)
        self.run.all_reduce(on_device)
        values.copy_(on_device.cpu())

    # ------------------------------------------------------------------------------------------ training

    def train_step(self, ghosts: list[Ghost], micro_batches: list[MicroBatch], step: int
                   ) -> list[tuple[int, Fault]]:
        context, config = self.context, self.context.config
        errors: list[str | None] = []
        nonfinite: list[torch.Tensor | None] = []
        local: BaseException | None = None
        for ghost in ghosts:
            replica = ghost.replica
            assert isinstance(replica, ShardedReplica)
            try:
                sync_hyperparameters(context.optimizer, replica.optimizer)
                with self.slot.holding(replica.params, replica.buffers, train=True):
                    losses = replay_gradients(replica, micro_batches, context.replay)
                match_grad_presence(context.main_params, replica.params)
                step_optimizer(replica, clip_grad_norm=config.clip_grad_norm, clip_grad_value=config.clip_grad_value)
                errors.append(None)
                nonfinite.append(~losses_finite(losses))
            except Exception as error:  # noqa: BLE001 - agreed on below, never left to one rank
                errors.append(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
                nonfinite.append(None)
                local = local or error
        exceptions = self._agree(ghosts, errors, nonfinite)
        faults: list[tuple[int, Fault]] = []
        world = self.run.world_size
        for k, ghost in enumerate(ghosts):
            if exceptions[k]:
                faults.append((ghost.ghost_id, agreed_failure(errors[k], exceptions[k], world, local)))
            else:
                faults.append((ghost.ghost_id, Fault("diverged", "non-finite loss", when=self._nonfinite[k] > 0)))
        return faults

    def _agree(self, ghosts: list[Ghost], errors: list[str | None], nonfinite: list[torch.Tensor | None]
               ) -> list[int]:
        """The step's one collective (module docstring); returns the exception counts per ghost (read on the host)
        and keeps the separations, non-finite counts and the control's drift on the device."""
        device = self.context.device
        count = len(ghosts)
        control = next((k for k, g in enumerate(ghosts) if g.control), None)  # the same layout on every rank
        parts = [torch.tensor([float(e is not None) for e in errors], dtype=torch.float64, device=device),
                 torch.stack([torch.zeros((), dtype=torch.float64, device=device) if f is None
                              else f.to(device, torch.float64) for f in nonfinite]),
                 torch.stack([local_separation_squares(g.replica.params, self.context.main_params).to(device)
                              if errors[k] is None else torch.zeros((), dtype=torch.float64, device=device)
                              for k, g in enumerate(ghosts)])]
        if control is not None:
            drift = torch.zeros(len(self._drift_names), dtype=torch.float64, device=device)
            if errors[control] is None:  # a failed control stops anyway: zeros keep the layout
                drift = self._local_drift(ghosts[control]).to(device)
            parts.append(drift)
        payload = torch.cat(parts)
        self.run.all_reduce(payload)
        self._nonfinite = payload[count: 2 * count]
        self._separations = {g.ghost_id: payload[2 * count + k].sqrt() for k, g in enumerate(ghosts)}
        self._drift = payload[3 * count:] if control is not None else None
        return [int(round(v)) for v in payload[:count].tolist()]  # the step's one host read

    def _local_drift(self, control: Ghost) -> torch.Tensor:
        replica = control.replica
        assert isinstance(replica, ShardedReplica)
        mine = [local_tensor(p) for p in replica.params] + [replica.buffers[name] for name, _ in self.slot.buffers]
        main = [local_tensor(p) for p in self.context.main_params] + [b for _, b in self.slot.buffers]
        return max_abs_differences(main, mine)

    # ------------------------------------------------------------------------------------------ readings

    def separations(self, ghosts: list[Ghost]) -> dict[int, torch.Tensor]:
        """This step's all-reduced separations; for ghosts not trained this step (a spawn), one collective now."""
        missing = [g for g in ghosts if g.ghost_id not in self._separations and g.replica is not None]
        if missing:
            squares = torch.stack([local_separation_squares(g.replica.params, self.context.main_params)
                                   for g in missing]).to(self.context.device)
            self.run.all_reduce(squares)
            self._separations.update({g.ghost_id: squares[k].sqrt() for k, g in enumerate(missing)})
        values = {g.ghost_id: self._separations[g.ghost_id] for g in ghosts if g.ghost_id in self._separations}
        self._separations = {}
        return values

    def control_drift(self, control: Ghost) -> tuple[str, list[str], torch.Tensor] | None:
        drift, self._drift = self._drift, None
        return None if drift is None else ("main", self._drift_names, drift)

    def reference(self, main: MainSnapshot, *, kernel_of: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None
                  ) -> Reference:
        return Reference("main", main.params, main.preds, main.kernel, main.state, evaluation=main.evaluation)

    def module_of(self, ghost: Ghost) -> tuple[nn.Module, list[torch.Tensor]]:
        assert ghost.replica is not None
        return self.context.model, ghost.replica.params

    def state_of(self, ghost: Ghost) -> dict[str, torch.Tensor]:
        replica = ghost.replica
        assert isinstance(replica, ShardedReplica)
        return replica.state(self.context.model)

    def reference_state(self) -> dict[str, torch.Tensor]:
        model = self.context.model
        return {name: t.detach() for name, t in list(model.named_parameters()) + list(model.named_buffers())
                if t is not None}
