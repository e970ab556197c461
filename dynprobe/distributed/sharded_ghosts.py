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

**No collective of the probe's own and no host read on a training step.** Each ghost's flags (an exception here,
a non-finite loss), its separation (this rank's ``‖θ'_r − θ_r‖²``) and the control's max |Δ| per tensor stay on
the device, per rank, until the ghost set reads its pending values in a batch (at a snapshot, a spawn, a status
change, close, and every ``READ_EVERY`` steps: the same points on every rank): then one all-reduce sums them
(:meth:`ShardedGhostTrainer.prepare_readings`), so every rank stops a ghost at the first step it failed on any rank,
and until then every rank trains it, keeping the ranks' collectives in step. A failure inside a ghost's forward on
one rank only (where the others wait in FSDP's all-gather) cannot be caught this way, as for the main run's.

Comparisons at snapshots: :mod:`dynprobe.distributed.sharded_compare`.
"""
from __future__ import annotations

import copy
import dataclasses
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
from dynprobe.ghosts.readings import StepValues
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
        """Each ghost's step through the main model, no collective of the probe's own and no host read: a ghost
        that raised (here) or whose loss is not finite is flagged on the device (this rank's flags, summed over
        the ranks at the next read: :meth:`prepare_readings`); it goes on training until then on every rank, so
        the ranks' collectives stay in step. ``errors="raise"`` re-raises here, on the rank that failed."""
        context, config = self.context, self.context.config
        device = context.device
        faults: list[tuple[int, Fault]] = []
        for ghost in ghosts:
            replica = ghost.replica
            assert isinstance(replica, ShardedReplica)
            failed, reason, trace, losses = False, "an exception on another rank", None, []
            try:
                sync_hyperparameters(context.optimizer, replica.optimizer)
                with self.slot.holding(replica.params, replica.buffers, train=True):
                    losses = replay_gradients(replica, micro_batches, context.replay)
                match_grad_presence(context.main_params, replica.params)
                step_optimizer(replica, clip_grad_norm=config.clip_grad_norm, clip_grad_value=config.clip_grad_value)
            except Exception as error:  # noqa: BLE001 - recorded at the next read, on every rank
                if context.raise_errors:
                    raise
                failed, reason, trace = True, f"{type(error).__name__}: {error}", traceback.format_exc()
            flag = torch.full((), float(failed), dtype=torch.float64, device=device)
            faults.append((ghost.ghost_id, Fault("failed", reason, trace, when=flag)))
            nonfinite = (~losses_finite(losses)).to(device, torch.float64) if losses else torch.zeros(
                (), dtype=torch.float64, device=device)
            faults.append((ghost.ghost_id, Fault("diverged", "non-finite loss", when=nonfinite)))
        return faults

    def prepare_readings(self, pending: list[StepValues]) -> None:
        """Sum every rank's pending values in one all-reduce, just before the ghost set reads them (every rank
        reads at the same points, with the same values pending): fault flags (a ghost stops on every rank at the
        first step it failed on any), separations (this rank's ``‖θ'_r − θ_r‖²`` → ``‖θ' − θ‖``) and the control's
        max |Δ| per tensor (a sum over the ranks of each rank's: 0 exactly when bitwise equal everywhere)."""
        tensors: list[torch.Tensor] = []
        for values in pending:
            tensors += [fault.when.reshape(-1) for _, fault in values.faults if fault.when is not None]
            tensors += [value.reshape(-1) for value in values.separations.values()]
            if values.drift is not None:
                tensors.append(values.drift[2].reshape(-1))
        if not tensors:
            return
        device = self.context.device
        flat = torch.cat([t.to(device, torch.float64) for t in tensors])
        self.run.all_reduce(flat)
        offset = 0

        def take(size: int = 1) -> torch.Tensor:
            nonlocal offset
            offset += size
            return flat[offset - size:offset]

        for values in pending:
            values.faults = [(ghost_id, dataclasses.replace(fault, when=take()[0] > 0) if fault.when is not None
                              else fault) for ghost_id, fault in values.faults]
            values.separations = {ghost_id: take()[0].sqrt() for ghost_id in values.separations}
            if values.drift is not None:
                reference, names, drift = values.drift
                values.drift = (reference, names, take(drift.numel()))

    def _local_drift(self, control: Ghost) -> torch.Tensor:
        replica = control.replica
        assert isinstance(replica, ShardedReplica)
        mine = [local_tensor(p) for p in replica.params] + [replica.buffers[name] for name, _ in self.slot.buffers]
        main = [local_tensor(p) for p in self.context.main_params] + [b for _, b in self.slot.buffers]
        return max_abs_differences(main, mine)

    # ------------------------------------------------------------------------------------------ readings

    def separations(self, ghosts: list[Ghost]) -> dict[int, torch.Tensor]:
        """This rank's ``‖θ'_r − θ_r‖²`` of each ghost (device values, summed over the ranks and square-rooted
        at the next read: :meth:`prepare_readings`)."""
        return {g.ghost_id: local_separation_squares(g.replica.params, self.context.main_params)
                for g in ghosts if g.replica is not None}

    def control_drift(self, control: Ghost) -> tuple[str, list[str], torch.Tensor] | None:
        """This rank's max |Δ| per tensor between the control and the main run (summed at the next read)."""
        return "main", self._drift_names, self._local_drift(control)

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
