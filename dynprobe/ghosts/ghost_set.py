"""Ghost replicas: perturbed copies of the model trained in lock-step with the main run (the paper's §4).

A ghost is spawned at step t0 as a deep copy of the model (parameters *and* buffers) and of the optimizer
(``deepcopy(optimizer, memo={id(p_main): p_ghost})``: the user's optimizer class, its hyper-parameters and a
copy of its state — rebuilding it from ``type(opt)(groups, **defaults)`` fails for AdamW), then θ' = θ + ε.
After every main optimizer step, each live ghost replays the captured micro-batches (:mod:`dynprobe.capture`)
and steps with the main optimizer's *current* per-group hyper-parameters (learning rate, momentum, betas —
whatever a scheduler changed). The main RNG stream is restored afterwards, so the user's run is unchanged.

An ε = 0 control ghost is the canary: it is compared with the main model after every step, and any drift is
recorded with its likely causes (training logic the ghosts cannot see). Ghost faults (non-finite loss or
parameters, exploding norm, an exception) mark the ghost and stop it; they never reach the user's loop.
"""
from __future__ import annotations

import copy
import math
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dynprobe._util.evaluation import EvalSet, evaluate
from dynprobe._util.modules import preserved_rng
from dynprobe.capture.step import MicroBatch, replay_micro_batch
from dynprobe.config import Ghosts
from dynprobe.metrics import functions as metrics
from dynprobe.metrics.barrier import loss_barrier
from dynprobe.recording.snapshot import SnapshotData, flatten_parameters
from dynprobe.store.writer import RunWriter

from .perturbation import Perturbation, PerturbationReport, perturb_
from .vectorized import VectorizedGhosts, record_ghost_mode

__all__ = ["Ghost", "GhostSet", "clone_for_ghost"]

KernelOf = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


def clone_for_ghost(model: nn.Module, optimizer: torch.optim.Optimizer, memo_extra: dict[int, Any]
                    ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Deep copies of ``model`` (parameters, buffers, submodule flags) and ``optimizer`` bound to the copy.

    ``memo_extra`` maps ids of objects that must *not* be copied (the probe and its hooks' owners) to
    themselves. The optimizer copy keeps the user's optimizer class, its param-group hyper-parameters and a
    deep copy of its state (momentum buffers, Adam moments, step counts); ``Optimizer.__getstate__`` drops
    its hooks, so the copy never fires the probe's hooks.
    """
    memo = dict(memo_extra)
    ghost_model = copy.deepcopy(model, memo)
    mapping = {id(p): g for p, g in zip(model.parameters(), ghost_model.parameters())}
    owned = [p for group in optimizer.param_groups for p in group["params"]]
    outside = [p for p in owned if id(p) not in mapping]
    if outside:
        raise ValueError(
            f"ghosts need an optimizer over the model's parameters only; this optimizer also holds "
            f"{len(outside)} tensors that are not parameters of the model (e.g. a learnable loss parameter)"
        )
    optimizer_memo = {**memo_extra, **mapping}
    ghost_optimizer = copy.deepcopy(optimizer, optimizer_memo)
    return ghost_model, ghost_optimizer


@dataclass
class Ghost:
    """One live (or stopped) ghost replica."""

    index: int
    spawn_step: int
    control: bool
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    params: list[torch.Tensor]
    report: PerturbationReport
    status: str = "alive"
    comparisons: int = 0

    @property
    def alive(self) -> bool:
        return self.status == "alive"


class GhostSet:
    """All ghosts of a run: spawning, lock-step training, the control canary, and comparisons at snapshots.

    Args:
        config: the user's :class:`dynprobe.Ghosts`.
        model, optimizer: the main run's.
        writer: the run directory (events ``ghost_spawn``, ``ghost_compare``, ``ghost_status``, …).
        main_params: the main model's trainable parameters, in ``vec(θ)`` order.
        eval_set, output_fn, eval_batch_size: as the probe's, for the ghosts' predictions and barriers.
        storage_dtype: dtype of flat parameter vectors.
        no_copy: objects a deep copy of the model must share, not copy (the probe).
    """

    def __init__(
        self,
        config: Ghosts,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        writer: RunWriter,
        *,
        main_params: list[torch.Tensor],
        eval_set: EvalSet,
        output_fn: Callable[[Any], torch.Tensor],
        eval_batch_size: int,
        device: torch.device,
        storage_dtype: torch.dtype,
        cuda_devices: list[int],
        no_copy: list[Any],
        raise_errors: bool,
        distributed: Any = None,
    ) -> None:
        self.config = config
        self.model, self.optimizer, self.writer = model, optimizer, writer
        self.main_params = main_params
        self.eval_set, self.output_fn, self.eval_batch_size = eval_set, output_fn, eval_batch_size
        self.device, self.storage_dtype, self.cuda_devices = device, storage_dtype, cuda_devices
        self.raise_errors = raise_errors
        self._memo = {id(obj): obj for obj in no_copy}
        self.ghosts: list[Ghost] = []
        self.loss_fn: Callable[..., torch.Tensor] | None = config.loss_fn
        self.loss_from_output: Callable[[Any], torch.Tensor] | None = None
        self._spawned_control = False
        self._control_drifted = False
        self._warned: set[str] = set()
        self._first_spawn = None
        self.grad_edit_detected = False
        # The run's planned last step (Probe(total_steps=)): costly comparisons are made there whatever the
        # costly_every cadence, so the chaos maps' final column is complete.
        self.final_step: int | None = None
        # A resumed run's earlier ghosts (see resume): indices and perturbation seeds continue after them.
        self._index_offset = 0
        self._perturbed_offset = 0
        self._spawned_steps: set[int] = set()
        clone_for_ghost(model, optimizer, self._memo)  # fail at construction if the model/optimizer can't be cloned
        # Ghosts(vectorize=True/"auto"): the vectorized mode lives in dynprobe._vectorized_ghosts; the branches
        # below marked "vectorized" hand over to it, and everything else here is the sequential path.
        self._vector: VectorizedGhosts | None = None
        # torch.distributed: a dynprobe.distributed.DistributedRun averages the ghosts' gradients across ranks.
        self.distributed = distributed
        if distributed is not None:
            from dynprobe.distributed.runtime import SEQUENTIAL_REASON

            record_ghost_mode(writer, "sequential", step=0, requested=config.vectorize, reason=SEQUENTIAL_REASON)
        elif config.vectorize is False:
            record_ghost_mode(writer, "sequential", step=0, requested=False,
                              reason="requested: Ghosts(vectorize=False)")
        else:
            self._vector = VectorizedGhosts(self)  # vectorize=True: raises here if the model cannot be vmapped

    @property
    def mode(self) -> str | None:
        """``"sequential"`` or ``"vectorized"``; None while ``vectorize="auto"`` has not decided yet."""
        return "sequential" if self._vector is None else self._vector.mode

    # ------------------------------------------------------------------------------------------ spawning

    @property
    def live(self) -> list[Ghost]:
        return [g for g in self.ghosts if g.alive]

    def resume(self, events: list[dict[str, Any]], step: int) -> None:
        """Continue a resumed run's ghosts: numbering, control and perturbation seeds go on from its
        ``ghost_spawn`` events, spawn steps already taken are not repeated, and ghosts that were alive at the
        interruption end as ``finished`` at ``step`` (a ghost's state is not saved, so it cannot be continued)."""
        spawned = [e for e in events if e.get("event") == "ghost_spawn"]
        ended = {e["ghost"] for e in events if e.get("event") == "ghost_status"}
        self._index_offset = len(spawned)
        self._perturbed_offset = sum(1 for e in spawned if not e["control"])
        self._spawned_control = self._spawned_control or any(e["control"] for e in spawned)
        self._spawned_steps = {int(e["spawn_step"]) for e in spawned}
        for event in spawned:
            if event["ghost"] not in ended:
                self.writer.event("ghost_status", ghost=event["ghost"], step=step, status="finished",
                                  reason=f"the run was resumed at step {step}; a ghost's state is not saved")

    def spawn_due(self, step: int) -> None:
        """Spawn the ghosts scheduled at ``step`` (and the control at the first spawn step)."""
        if step not in self.config.at or step in self._spawned_steps:
            return
        if self.config.control and not self._spawned_control:
            self._spawn(step, Perturbation(norm=0.0, kind=self.config.perturbation.kind, seed=0), control=True)
            self._spawned_control = True
        base = self.config.perturbation
        perturbed = self._perturbed_offset + sum(1 for g in self.ghosts if not g.control)
        self._spawn(step, Perturbation(norm=base.norm, kind=base.kind, seed=base.seed + perturbed), control=False)

    def _spawn(self, step: int, perturbation: Perturbation, *, control: bool) -> None:
        if self._vector is not None and self._vector.has_stack:  # vectorized: a new row from the shadow + ε
            report = self._vector.spawn_in_stack(self._index_offset + len(self.ghosts), perturbation)
            ghost = Ghost(self._index_offset + len(self.ghosts), step, control, None, None, None, [], report)  # type: ignore[arg-type]
        else:
            model, optimizer = clone_for_ghost(self.model, self.optimizer, self._memo)
            params = [p for p in model.parameters() if p.requires_grad]
            report = perturb_(params, perturbation)
            scaler = None
            if self.config.scaler is not None:
                scaler = copy.deepcopy(self.config.scaler)
            ghost = Ghost(self._index_offset + len(self.ghosts), step, control, model, optimizer, scaler, params, report)
        self.ghosts.append(ghost)
        if self._vector is not None and ghost.model is not None:  # a clone while a stack may come: its shadow
            self._vector.note_clone_spawn()
        self.writer.event(
            "ghost_spawn", ghost=ghost.index, step=step, spawn_step=step, control=control,
            kind=perturbation.kind, seed=perturbation.seed, nominal_norm=report.nominal_norm,
            realized_norm=report.realized_norm, changed=report.changed, total=report.total,
            direction_cosine=report.direction_cosine, share_on_zeros=report.share_on_zeros,
        )
        message = report.warning()
        if message:
            self._warn_once(f"perturb-{ghost.index}", f"dynprobe ghost {ghost.index} (spawned at step {step}): {message}")

    # ------------------------------------------------------------------------------------------ training

    def train_step(self, micro_batches: list[MicroBatch], step: int) -> None:
        """Advance every live ghost by one main optimizer step on the captured micro-batches.

        ``step`` is the main run's step *after* its update (the ghosts reach it here).
        """
        live = self.live
        if not live:
            return
        if not micro_batches:
            self._warn_once(
                "no-capture",
                "dynprobe: the optimizer stepped but the ghosts saw no (forward, loss, backward) to replay. Wrap "
                "the loss with criterion = probe.watch(criterion), pass loss_from_output= for models that "
                "compute their own loss, or call probe.step(x, y) explicitly",
            )
            for ghost in live:
                self._set_status(ghost, "failed", step, "no captured batch to replay")
            return
        groups = _group_by_scale(micro_batches) if self.config.scaler is not None else [micro_batches]
        with preserved_rng(self.cuda_devices):
            if self.distributed is not None:  # DDP: local gradients, one all-reduce for every ghost, then step
                self.distributed.train_ghosts(self, live, micro_batches, step)
                return
            if self._vector is not None:  # vectorized (or deciding): the stack trains, or hands back to us
                if self._vector.train_step(micro_batches, step):
                    return
                if self._vector.mode == "sequential" and self._vector.revisit_at is None:
                    self._vector = None  # final: the sequential path from now on
            for ghost in live:
                try:
                    losses = self._train_ghost(ghost, groups)
                except Exception as error:  # noqa: BLE001 - a ghost fault never reaches the user's loop
                    self._set_status(ghost, "failed", step, f"{type(error).__name__}: {error}",
                                     traceback=traceback.format_exc())
                    if self.raise_errors:
                        raise
                    continue
                if not all(math.isfinite(value) for value in losses):
                    self._set_status(ghost, "diverged", step, "non-finite loss")
                elif self.config.lifetime is not None and step - ghost.spawn_step >= self.config.lifetime:
                    self._set_status(ghost, "finished", step, f"lifetime of {self.config.lifetime} steps reached")
        self._check_control(step)

    def _train_ghost(self, ghost: Ghost, groups: list[list[MicroBatch]]) -> list[float]:
        self._sync_hyperparameters(ghost)
        losses: list[float] = []
        for group in groups:
            ghost.optimizer.zero_grad(set_to_none=True)
            scale_loss = ghost.scaler.scale if ghost.scaler is not None else None
            for micro in group:
                loss = replay_micro_batch(ghost.model, micro, loss_fn=self.loss_fn,
                                          loss_from_output=self.loss_from_output, scale_loss=scale_loss)
                losses.append(float(loss.float()))
            self._match_grad_presence(ghost)
            self._step_optimizer(ghost)
        return losses

    def _sync_hyperparameters(self, ghost: Ghost) -> None:
        # Schedulers (StepLR, cosine, OneCycleLR's momentum cycling, ...) edit the main param groups; copying
        # every non-parameter entry makes the ghost follow any of them without knowing which.
        for main_group, ghost_group in zip(self.optimizer.param_groups, ghost.optimizer.param_groups):
            for key, value in main_group.items():
                if key != "params":
                    ghost_group[key] = value

    def _match_grad_presence(self, ghost: Ghost) -> None:
        # zero_grad(set_to_none=False) leaves zero gradients on parameters the loss does not reach; optimizers
        # treat a zero gradient (weight decay, momentum) differently from None, so the ghost mirrors the main.
        # (main_params and ghost.params are both the trainable parameters in the model's order; walking the
        # module tree here instead cost ~0.1 ms per ghost and step on small models.)
        for main_p, ghost_p in zip(self.main_params, ghost.params):
            if main_p.grad is not None and ghost_p.grad is None:
                ghost_p.grad = torch.zeros_like(ghost_p)

    def _step_optimizer(self, ghost: Ghost) -> None:
        config = self.config
        if ghost.scaler is not None and (config.clip_grad_norm or config.clip_grad_value):
            ghost.scaler.unscale_(ghost.optimizer)
        if config.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(ghost.params, config.clip_grad_norm)
        if config.clip_grad_value:
            torch.nn.utils.clip_grad_value_(ghost.params, config.clip_grad_value)
        if ghost.scaler is not None:
            ghost.scaler.step(ghost.optimizer)
            ghost.scaler.update()
        else:
            ghost.optimizer.step()

    # ------------------------------------------------------------------------------------------ canary

    def _check_control(self, step: int) -> None:
        control = next((g for g in self.ghosts if g.control and g.alive), None)
        if control is None or self._control_drifted:
            return
        main_state, ghost_state = _named_tensors(self.model), _named_tensors(control.model)
        drifted = [name for name, value in main_state.items() if not torch.equal(value, ghost_state[name])]
        if not drifted:
            return
        self._control_drifted = True
        diff = max(float((main_state[n].double() - ghost_state[n].double()).abs().max()) for n in drifted)
        causes = []
        if self.grad_edit_detected:
            causes.append("gradients edited between backward() and step() (declare Ghosts(clip_grad_norm=...))")
        causes += ["a loss term outside the watched loss", "randomness the probe cannot replay (a global "
                   "torch.Generator, numpy/python RNG in forward)", "parameter edits outside the optimizer",
                   "several models or optimizers"]
        self.writer.event("control_drift", step=step, ghost=control.index, tensors=drifted[:10], max_abs_diff=diff,
                          likely_causes=causes)
        self._warn_once(
            "control-drift",
            f"dynprobe: the ε=0 control ghost drifted from the main run at step {step} ({len(drifted)} tensors, "
            f"max |Δ| {diff:.3g}, e.g. {drifted[0]!r}): the ghosts do not reproduce your training step exactly, "
            f"so chaos maps mix ε with that difference. Likely causes: {'; '.join(causes)}",
        )

    def note_grad_edit(self, step: int) -> None:
        """The main gradients changed between backward and step (see :class:`dynprobe.probe.Probe`)."""
        if self.config.clip_grad_norm or self.config.clip_grad_value or self.config.scaler is not None:
            return
        self.grad_edit_detected = True
        if "grad-edit" not in self._warned:
            self.writer.event("grad_edit_detected", step=step)
        self._warn_once(
            "grad-edit",
            "dynprobe: gradients were modified between backward() and optimizer.step() (e.g. clip_grad_norm_). "
            "Ghosts do not see that: declare it with Ghosts(clip_grad_norm=...) or Ghosts(clip_grad_value=...)",
        )

    # ------------------------------------------------------------------------------------------ snapshots

    def compare(self, data: SnapshotData, kernel_of: KernelOf | None, main_state: Mapping[str, torch.Tensor],
                snapshot_index: int) -> None:
        """Compare every live ghost with the main snapshot ``data``; writes ``ghost_compare`` events and stores
        the ghost's predictions (and parameters) with the snapshot."""
        if self._vector is not None and self._vector.has_stack:  # vectorized: compared with the shadow
            self._vector.compare(data, kernel_of, main_state)
            return
        main_flat = data.params
        for ghost in self.live:
            try:
                self._compare_one(ghost, data, main_flat, kernel_of, main_state)
            except Exception as error:  # noqa: BLE001
                self._set_status(ghost, "failed", data.step, f"{type(error).__name__}: {error}",
                                 traceback=traceback.format_exc())
                if self.raise_errors:
                    raise

    def _compare_one(self, ghost: Ghost, data: SnapshotData, main_flat: torch.Tensor, kernel_of: KernelOf | None,
                     main_state: Mapping[str, torch.Tensor]) -> None:
        flat = flatten_parameters(ghost.params, self.storage_dtype)
        if not bool(torch.isfinite(flat).all()):
            self._set_status(ghost, "diverged", data.step, "non-finite parameters")
            return
        main_norm, ghost_norm = float(main_flat.double().norm()), float(flat.double().norm())
        if ghost_norm > self.config.divergence_ratio * main_norm:
            self._set_status(ghost, "diverged", data.step,
                             f"‖θ'‖ = {ghost_norm:.3g} exceeds {self.config.divergence_ratio:g}·‖θ‖ = {main_norm:.3g}")
            return
        evaluation = evaluate(ghost.model, self.eval_set, output_fn=self.output_fn,
                              batch_size=self.eval_batch_size, device=self.device)
        record: dict[str, Any] = {
            "ghost": ghost.index,
            "step": data.step,
            "C": metrics.cosine_dissimilarity(main_flat, flat),
            "L2": metrics.l2_distance(main_flat, flat),
            "D": metrics.disagreement(data.evaluation.preds, evaluation.preds),
            "eval_loss": evaluation.loss,
            "eval_accuracy": evaluation.accuracy,
        }
        costly = ghost.comparisons % self.config.costly_every == 0 or data.step == self.final_step
        if costly and kernel_of is not None and data.kernel is not None:
            ghost_kernel = kernel_of(_state_of(ghost.model))
            record["S"] = metrics.kernel_distance(data.kernel, ghost_kernel)
        if costly and self.config.barrier:
            result = loss_barrier(ghost.model, dict(main_state), _state_of(ghost.model),
                                  (self.eval_set.inputs, self.eval_set.targets), alphas=self.config.barrier_alphas,
                                  output_fn=self.output_fn, batch_size=max(self.eval_batch_size, 256))
            record["B"] = float(result)
            record["B_argmax_alpha"] = float(result.argmax_alpha)
        ghost.comparisons += 1
        self.writer.event("ghost_compare", **record)
        data.extra_arrays[f"ghost_{ghost.index:03d}.preds"] = evaluation.preds.cpu().numpy().astype(np.int32)
        if self.config.save_params:
            data.extra_arrays[f"ghost_{ghost.index:03d}.params"] = flat.cpu().numpy()

    # ------------------------------------------------------------------------------------------ status

    def finish(self, step: int) -> None:
        for ghost in self.live:
            self._set_status(ghost, "finished", step, "run closed")

    def _set_status(self, ghost: Ghost, status: str, step: int, reason: str, **extra: Any) -> None:
        ghost.status = status
        self.writer.event("ghost_status", ghost=ghost.index, step=step, status=status, reason=reason, **extra)
        if status in ("diverged", "failed"):
            self._warn_once(f"status-{ghost.index}",
                            f"dynprobe: ghost {ghost.index} (spawned at step {ghost.spawn_step}) {status} at step "
                            f"{step}: {reason}. It is recorded in the run; your training is unaffected")
        if self._vector is not None:  # vectorized: drop the ghost's row of the stack
            self._vector.release(ghost)
        # Free the replica's memory once it stops.
        ghost.model, ghost.optimizer, ghost.params = None, None, []  # type: ignore[assignment]

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name (what ``state_dict()`` holds, without its hooks and detach overhead)."""
    return dict(list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if b is not None])


def _state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach() for name, tensor in
            list(model.named_parameters()) + list(model.named_buffers()) if tensor is not None}


def _group_by_scale(micro_batches: list[MicroBatch]) -> list[list[MicroBatch]]:
    """Split a step's micro-batches into main iterations by GradScaler scale.

    A skipped iteration (inf/NaN gradients) fires no optimizer hook, so its micro-batches arrive together
    with the next step's; GradScaler backs its scale off after every skip, so consecutive groups of equal
    scale are the iterations. The ghosts replay each with their own scaler, which decides for itself.
    """
    groups: list[list[MicroBatch]] = []
    for micro in micro_batches:
        if groups and groups[-1][0].scale == micro.scale:
            groups[-1].append(micro)
        else:
            groups.append([micro])
    return groups
