"""Ghost replicas: perturbed copies of the model trained in lock-step with the main run (the two-phase paper's §4).

A ghost is spawned at step t0 as a copy of the model (parameters *and* buffers) and of the optimizer, then
θ' = θ + ε. After every main optimizer step, each live ghost replays the captured micro-batches
(:mod:`dynprobe.capture`) with the main optimizer's current hyper-parameters; the main RNG stream is restored
afterwards, so the user's run is unchanged. How the replicas are held and trained is a :class:`GhostTrainer`'s
business (:func:`choose_trainer`); this set owns the ghosts' identities, spawn schedule, statuses and records.

An ε = 0 control ghost is the canary: it is compared with its reference after every step, and any drift is recorded
with its likely causes (training logic the ghosts cannot see). Ghost faults (non-finite loss or parameters, an
exploding norm, an exception) stop the ghost and are recorded; they never reach the user's loop. After every step
each ghost's separation from its reference is appended to its separation curve (:mod:`.separation`). None of this
synchronizes with the device on a plain step: the per-step values are read in batches (:mod:`.readings`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from dynprobe._util.evaluation import EvalSet, evaluate
from dynprobe._util.inputs import index_inputs, inputs_to
from dynprobe._util.modules import is_compiled, layer_slices, preserved_rng
from dynprobe._util.user_warnings import warn_user
from dynprobe.capture.loss_state import module_memo
from dynprobe.capture.step import MicroBatch, UnmatchedLoss
from dynprobe.config import Ghosts
from dynprobe.store.manifest import GHOST_MODE_CONVENTIONS
from dynprobe.store.sink import RunSink

from .attached import AttachedLayout, check_attachable
from .comparison import active_slices
from .loss_replay import LossIsolation, LossReplay
from .notices import control_drift_notice, precision_notice, realized_norm_notice, replay_notice, shadow_drift_notice
from .perturbation import Perturbation
from .readings import PendingReadings, StepReading, StepValues
from .replica import deterministic_replay_possible, lifetime_reached
from .separation import SeparationLog
from .sequential import SequentialTrainer
from .trainer import Ghost, GhostTrainer, MainSnapshot, TrainerContext
from .vectorized import VectorizedTrainer

__all__ = ["Ghost", "GhostSet", "MainSnapshot", "choose_trainer"]

KernelOf = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
TrainerFactory = Callable[[TrainerContext], GhostTrainer]


def choose_trainer(context: TrainerContext) -> GhostTrainer:
    """The one place the ghosts' training path is chosen: ``Ghosts(vectorize=False)`` (the default, exact) trains
    deep copies; ``True`` and ``"auto"`` a vmap stack (``"auto"`` only when measured faster)."""
    if context.config.vectorize is False:
        return SequentialTrainer(context)
    return VectorizedTrainer(context)


class GhostSet:
    """All ghosts of a run: spawning, lock-step training through a :class:`GhostTrainer`, the control canary,
    separation curves, and comparisons at snapshots.

    Args:
        config: the user's :class:`dynprobe.Ghosts`.
        model, optimizer: the main run's.
        writer: the run's sink (events ``ghost_spawn``, ``ghost_compare``, ``ghost_status``, ``ghost_mode``, …).
        main_params: the main model's trainable parameters, in ``vec(θ)`` order.
        eval_set, output_fn, eval_batch_size, device: as the probe's, for the ghosts' predictions.
        storage_dtype: dtype of flat parameter vectors.
        no_copy: objects a deep copy of the model must share, not copy (the probe).
        raise_errors: ``Probe(errors="raise")``.
        final_step: ``Probe(total_steps=)``: S and the barriers are always measured at that step.
        loss_from_output: output → loss for models that compute their own loss (``Probe(loss_from_output=)``).
        trainer_factory: builds the trainer (the DDP trainer under torch.distributed); default :func:`choose_trainer`.
        compiled: the training loop calls a ``torch.compile`` wrapper of ``model`` (ghosts train ``model`` eagerly).
    """

    def __init__(
        self,
        config: Ghosts,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        writer: RunSink,
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
        final_step: int | None = None,
        loss_from_output: Callable[[Any], torch.Tensor] | None = None,
        trainer_factory: TrainerFactory | None = None,
        compiled: bool = False,
    ) -> None:
        self.config, self.model, self.optimizer, self.writer = config, model, optimizer, writer
        self.cuda_devices, self.raise_errors = cuda_devices, raise_errors
        self.eval_set = eval_set
        no_copy_map = {id(obj): obj for obj in no_copy}
        self._compiled = compiled or is_compiled(model)
        check_attachable(model, optimizer, device, writer, compiled=self._compiled)

        def evaluate_model(module: nn.Module) -> Any:
            return evaluate(module, eval_set, output_fn=output_fn, batch_size=eval_batch_size, device=device)

        def sample_inputs() -> Any:
            return inputs_to(index_inputs(eval_set.inputs, slice(0, min(8, eval_set.n))), device)

        replay = LossReplay(loss_from_output=loss_from_output, shared=no_copy_map)
        self._model_objects = {id(obj): obj for obj in [*module_memo(model, model).values(), optimizer]}
        self._isolation = LossIsolation(replay, {*self._model_objects, *no_copy_map}, self._record_stateful_loss)
        self.context = TrainerContext(
            config=config, model=model, optimizer=optimizer, main_params=main_params, no_copy=no_copy_map,
            replay=replay, device=device, storage_dtype=storage_dtype,
            raise_errors=raise_errors, evaluate=evaluate_model, sample_inputs=sample_inputs, output_fn=output_fn,
            on_mode=self._record_mode, disagreement=eval_set.task.disagreement)
        self.ghosts: list[Ghost] = []
        self._by_id: dict[int, Ghost] = {}
        self.final_step = final_step  # Probe(total_steps=): S and B are always measured there
        self._layers = layer_slices([(n, p) for n, p in model.named_parameters() if p.requires_grad])
        self._active: list[slice] | None = None  # vec(θ) without inert tensors, once some are found
        self._layout = AttachedLayout(model, optimizer)
        self._layout_changed = False
        self._warned: set[str] = set()
        self._control_drifted = False
        self._precision_pending: list[Ghost] = []
        # Identity bookkeeping (a resumed run continues after the earlier ghosts; see resume).
        self._next_id = 0
        self._perturbed = 0
        self._spawned_control = False
        self._done_steps: set[int] = set()
        # resume: the spawns the interrupted process recorded at the resume step, by (ghost id, control)
        self._recorded: dict[tuple[int, bool], dict[str, Any]] = {}
        self.loss_fn = config.loss_fn
        self.trainer: GhostTrainer = (trainer_factory or choose_trainer)(self.context)
        self.separation = SeparationLog(writer)
        self._pending = PendingReadings(prepare=getattr(self.trainer, "prepare_readings", None))

    # ------------------------------------------------------------------------------------------ properties

    @property
    def mode(self) -> str | None:
        """``"sequential"`` or ``"vectorized"``; None while ``vectorize="auto"`` has not decided yet."""
        return self.trainer.mode

    @property
    def live(self) -> list[Ghost]:
        return [g for g in self.ghosts if g.alive]

    @property
    def loss_fn(self) -> Callable[..., torch.Tensor] | None:
        return self.context.replay.loss_fn

    @loss_fn.setter
    def loss_fn(self, value: Callable[..., torch.Tensor] | None) -> None:
        """The loss the ghosts replay (each with its own copy): set before any call of it through the probe."""
        self.context.replay.set_loss(value, self._model_objects)
        self._isolation.observe()

    @property
    def loss_from_output(self) -> Callable[[Any], torch.Tensor] | None:
        return self.context.replay.loss_from_output

    # ------------------------------------------------------------------------------------------ spawning

    def resume(self, events: list[dict[str, Any]], step: int) -> None:
        """Continue a resumed run's ghosts from its event log (rewound to ``step``, the step training restarts from).

        Ghosts keep their identities: numbering, the control and perturbation seeds go on after the earlier ghosts.
        Ghosts spawned before ``step`` and alive then end as ``interrupted`` at ``step`` (a ghost's state is not
        saved), their separation curves ending there too. Spawns due at ``step`` or later happen exactly once: one
        the interrupted process already recorded at ``step`` is re-created (same ghost id, seed and realized norm: θ_t
        and ε are known) without a second record, and is then continued as in an uninterrupted run.
        """
        spawned = [e for e in events if e.get("event") == "ghost_spawn" and int(e["spawn_step"]) <= step]
        ended = {e["ghost"] for e in events if e.get("event") == "ghost_status" and int(e["step"]) <= step}
        earlier = [e for e in spawned if int(e["spawn_step"]) < step]
        self._next_id = len(earlier)
        self._perturbed = sum(1 for e in earlier if not e["control"])
        self._spawned_control = any(e["control"] for e in earlier)
        self._done_steps = {int(e["spawn_step"]) for e in earlier}
        self._recorded = {(int(e["ghost"]), bool(e["control"])): {**e, "ended": e["ghost"] in ended}
                          for e in spawned if int(e["spawn_step"]) == step}
        interrupted = [e["ghost"] for e in earlier if e["ghost"] not in ended]
        for ghost_id in interrupted:
            self.writer.event("ghost_status", ghost=ghost_id, step=step, status="interrupted",
                              reason=f"the run was resumed at step {step}; a ghost's state is not saved")
        if interrupted:
            warn_user(f"dynprobe: resuming at step {step}: ghosts {interrupted} alive at the interruption cannot be "
                      f"continued (a ghost's state is not saved); they end as 'interrupted' at step {step}. Ghosts "
                      "due at this step and later are spawned as scheduled", UserWarning)
        self.spawn_due(step)

    def spawn_due(self, step: int) -> None:
        """Spawn the ghosts scheduled at ``step`` (and the control at the first spawn step), once."""
        if step not in self.config.at or step in self._done_steps:
            return
        self._done_steps.add(step)
        blocked = "the model's parameters changed after attach" if not self._layout_unchanged(step) else \
            self._isolation.refused
        if blocked is not None:
            self.writer.event("ghost_spawn_skipped", step=step, reason=blocked)
            return
        spawned: list[Ghost] = []
        if self.config.control and not self._spawned_control:
            self._spawned_control = True
            spawned += self._spawn(step, Perturbation(norm=0.0, kind=self.config.perturbation.kind, seed=0),
                                   control=True)
        base = self.config.perturbation
        for _ in range(self.config.directions):  # one ghost per direction of ε, each with its own seed
            spawned += self._spawn(step, Perturbation(norm=base.norm, kind=base.kind,
                                                      seed=base.seed + self._perturbed), control=False)
            self._perturbed += 1
        self.read()
        self.separation.flush()
        self._warn_realized_norms([g for g in spawned if not g.control], step)

    def _spawn(self, step: int, perturbation: Perturbation, *, control: bool) -> list[Ghost]:
        self.read()  # a stack may take the new ghost: faults of its rows (or its shadow) decided first
        ghost_id = self._next_id
        self._next_id += 1
        recorded = self._recorded.pop((ghost_id, control), None)
        if recorded is not None and recorded["ended"]:  # it stopped at its spawn snapshot: nothing to continue
            return []
        ghost = Ghost(ghost_id, step, control, report=None)  # type: ignore[arg-type]
        ghost.report = self.trainer.spawn(ghost, perturbation)
        if recorded is not None and not ghost.report.matches(recorded):
            self.trainer.release(ghost)
            self.writer.event("ghost_status", ghost=ghost_id, step=step, status="interrupted",
                              reason="the run was resumed at its spawn step, but re-creating it gave another "
                                     f"perturbation (realized norm {ghost.report.realized_norm:.6g} instead of "
                                     f"{recorded['realized_norm']:.6g}): the model is not at its state of step {step}")
            return []
        self.ghosts.append(ghost)
        self._by_id[ghost_id] = ghost
        if recorded is None:  # a re-created ghost's spawn record and first separation pair exist already
            report = ghost.report
            self.writer.event(
                "ghost_spawn", ghost=ghost_id, step=step, spawn_step=step, control=control, kind=perturbation.kind,
                seed=perturbation.seed, nominal_norm=report.nominal_norm, realized_norm=report.realized_norm,
                changed=report.changed, total=report.total, direction_cosine=report.direction_cosine,
                share_on_zeros=report.share_on_zeros, changed_at=report.changed_at)
            self._pending.add(StepValues(step, separations=self.trainer.separations([ghost])))
        if not control:
            self._precision_pending.append(ghost)
        return [ghost]

    # ------------------------------------------------------------------------------------------ training

    def train_step(self, micro_batches: list[MicroBatch], step: int, unmatched: Sequence[UnmatchedLoss] = ()) -> None:
        """Advance every live ghost by one main optimizer step on the captured micro-batches.

        ``step``: the main run's step *after* its update; ``unmatched``: its watched-loss calls not replayable.
        """
        live = self.live
        if not live:
            return
        notice = replay_notice(bool(micro_batches), unmatched)
        if notice is not None:
            kind, message, reason = notice
            self.read()
            self._warn_once(kind, message)
            self._stop_all(self.live, "failed", step, reason)
            return
        if not self._layout_unchanged(step):
            return
        if self._precision_pending:
            self._check_precision(micro_batches[0].forward.autocast.regions)
        refused = self._isolation.before_step()
        if refused is not None:
            self._stop_all(live, "failed", step, refused)
            return
        with preserved_rng(self.cuda_devices):
            faults = self.trainer.train_step(live, micro_batches, step)
        touched = self._isolation.after_step()
        if touched is not None:
            self._stop_all(live, "failed", step, touched)
            return
        # Faults known now (exceptions) and lifetimes stop ghosts at this step; the device flags wait for a read.
        now = [(ghost_id, fault) for ghost_id, fault in faults if fault.when is None]
        failed = {ghost_id for ghost_id, _ in now}
        trained = [g for g in live if g.ghost_id not in failed]
        finishing = [g for g in trained if lifetime_reached(g.spawn_step, step, self.config.lifetime_steps)]
        values = StepValues(step, [(i, f) for i, f in faults if f.when is not None], self.trainer.separations(trained))
        control = next((g for g in trained if g.control and g not in finishing), None)
        if control is not None and not self._control_drifted:
            values.control, values.drift = control.ghost_id, self.trainer.control_drift(control)
        self._pending.add(values)
        if now or finishing or self._pending.due:
            self.read()
        raised = None
        for ghost_id, fault in now:
            ghost = self._by_id[ghost_id]
            if ghost.alive:  # not stopped by a fault of an earlier step (a diverged ghost's extra steps never raise)
                self._set_status(ghost, fault.status, step, fault.reason,
                                 **({"traceback": fault.traceback} if fault.traceback else {}))
                raised = raised or fault.error
        for ghost in finishing:
            if ghost.alive:
                self._set_status(ghost, "finished", step, f"lifetime of {self.config.lifetime_steps} steps reached")
        if raised is not None and self.raise_errors:
            raise raised

    def read(self) -> None:
        """Read the ghosts' pending per-step values (one host synchronisation) and record them in step order: faults
        (the ghost stops at that step), separation pairs of the ghosts still alive, the control's first drift."""
        if not len(self._pending):
            return
        for reading in self._pending.read():
            for ghost_id, fault in reading.faults:
                ghost = self._by_id[ghost_id]
                if ghost.alive:
                    self._set_status(ghost, fault.status, reading.step, fault.reason)
            for ghost_id, value in reading.separations.items():
                if self._by_id[ghost_id].alive:
                    self.separation.note(ghost_id, reading.step, value)
            self._check_control(reading)

    def _check_control(self, reading: StepReading) -> None:
        if reading.control is None or not reading.drifted or self._control_drifted:
            return
        control = self._by_id[reading.control]
        if not control.alive:
            return
        reference, drifted, step = reading.reference, reading.drifted, reading.step
        self._control_drifted = True
        causes, message = control_drift_notice(
            reference, step, drifted, grad_edit_detected=self.context.grad_edit_detected, compiled=self._compiled,
            nondeterministic=not deterministic_replay_possible(self.context.device))
        self.writer.event("control_drift", step=step, ghost=control.ghost_id, reference=reference,
                          tensors=list(drifted)[:10], max_abs_diff=max(drifted.values()), likely_causes=causes)
        self._warn_once("control-drift", message)

    def note_grad_edit(self, step: int) -> None:
        """The main gradients changed between backward and step (see :mod:`dynprobe.capture.hooks`)."""
        if self.config.clip_grad_norm or self.config.clip_grad_value or self.config.scaler is not None:
            return
        self.context.grad_edit_detected = True
        if "grad-edit" not in self._warned:
            self.writer.event("grad_edit_detected", step=step)
        self._warn_once("grad-edit", "dynprobe: gradients were modified between backward() and optimizer.step() "
                        "(e.g. clip_grad_norm_). Ghosts do not see that: declare it with Ghosts(clip_grad_norm=...) "
                        "or Ghosts(clip_grad_value=...)")

    def set_inert(self, names: list[str]) -> None:
        """Parameter tensors an adaptive optimizer moves on rounding noise (:mod:`dynprobe.recording.inert`): the
        comparisons also report ``L2_active``, the separation over the other tensors."""
        self._active = active_slices(self.model, names)

    def _record_stateful_loss(self, changed: list[str], separate: bool) -> None:
        self.writer.event("stateful_loss", step=None, changed=changed[:20], separate_copies=separate)

    def _layout_unchanged(self, step: int) -> bool:
        """False once the parameters differ from attach (:mod:`.attached`): the first time, the live ghosts stop
        (event ``model_changed``), and no ghost spawns afterwards."""
        if self._layout_changed:
            return False
        change = self._layout.change()
        if change is None:
            return True
        self._layout_changed = True
        self.writer.event("model_changed", step=step, **change.fields())
        self._warn_once("model-changed", f"dynprobe: {change.reason}; the ghosts stop")
        self._stop_all(self.live, "failed", step, change.reason)
        return False

    def _check_precision(self, regions: tuple[tuple[str, torch.dtype], ...]) -> None:
        """Warn (once) when perturbations are below the resolution of the autocast compute dtype of the step."""
        pending, self._precision_pending = self._precision_pending, []
        low = [dtype for _, dtype in regions if dtype in (torch.bfloat16, torch.float16)]
        notice = precision_notice({g.ghost_id: g.report for g in pending}, low[0]) if low else None
        if notice is not None:
            hidden, message = notice
            self.writer.event("perturbation_below_precision", ghosts=hidden, dtype=str(low[0]).removeprefix("torch."),
                              step=next(g.spawn_step for g in pending if g.ghost_id == hidden[0]))
            self._warn_once("precision", message)

    # ------------------------------------------------------------------------------------------ snapshots

    def compare(self, data: Any, kernel_of: KernelOf | None, main_state: Mapping[str, torch.Tensor]) -> None:
        """Compare with a snapshot measured by :class:`dynprobe.recording.snapshot.SnapshotRecorder` (``data``): the
        ghosts' arrays go into ``data.extra_arrays``. See :meth:`compare_with`."""
        main = MainSnapshot(data.step, data.params, data.evaluation.preds, data.kernel, main_state, data.evaluation)
        data.extra_arrays.update(self.compare_with(main, kernel_of))

    def compare_with(self, main: MainSnapshot, kernel_of: KernelOf | None) -> dict[str, np.ndarray]:
        """Compare every live ghost with its reference at the snapshot ``main``: writes ``ghost_compare`` events (and
        ``shadow_drift`` for vectorized ghosts); returns the arrays to store with the snapshot (ghost predictions,
        and parameters with ``Ghosts(save_params=True)``). S is measured for a ghost at every
        ``kernel_every_snapshots``-th of its comparisons (its first included) and at ``final_step``."""
        self.read()
        self.separation.flush()
        live = self.live if self._layout_unchanged(main.step) else []
        if not live:
            return {}
        every = self.config.kernel_every_snapshots
        due = {g.ghost_id: g.comparisons % every == 0 or main.step == self.final_step for g in live}
        needs_kernel = kernel_of is not None and main.kernel is not None and any(due.values())
        try:
            reference = self.trainer.reference(main, kernel_of=kernel_of if needs_kernel else None)
        except Exception as error:  # noqa: BLE001 - without its reference no ghost can be compared
            self._stop_all(live, "failed", main.step, f"the reference could not be evaluated "
                                                      f"({type(error).__name__}: {error})")
            if self.raise_errors:
                raise
            return {}
        arrays: dict[str, np.ndarray] = {}
        records = []
        task = self.eval_set.task
        for ghost in live:
            try:
                module, params = self.trainer.module_of(ghost)
                result = self.trainer.comparer(
                    ghost.ghost_id, module, params, reference, step=main.step, storage_dtype=self.context.storage_dtype,
                    divergence_ratio=self.config.divergence_ratio, evaluate=self.context.evaluate,
                    disagreement=task.disagreement, preds_dtype=task.storage_dtype, layers=self._layers,
                    kernel_of=kernel_of if needs_kernel and due[ghost.ghost_id] else None,
                    state=lambda ghost=ghost: self.trainer.state_of(ghost), save_params=self.config.save_params,
                    active=self._active)
            except Exception as error:  # noqa: BLE001
                self._set_status(ghost, "failed", main.step, f"{type(error).__name__}: {error}")
                if self.raise_errors:
                    raise
                continue
            if result.stop is not None:
                self._set_status(ghost, "diverged", main.step, result.stop)
                continue
            ghost.comparisons += 1
            self.writer.event("ghost_compare", **result.record)
            records.append((ghost, result.record))
            arrays.update(result.arrays)
        if reference.drift is not None:
            self._record_reference_drift(main.step, reference.drift, records)
        return arrays

    def _record_reference_drift(self, step: int, drift: dict[str, Any], records: list[tuple[Ghost, dict]]) -> None:
        fields, message = shadow_drift_notice(step, drift, [r["L2"] for g, r in records if not g.control])
        self.writer.event("shadow_drift", step=step, **fields)
        if message is not None:
            self._warn_once("shadow-drift", message)

    def comparison_states(self) -> list[tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """``(ghost id, reference state, ghost state)`` for every live ghost, for barriers between a ghost and its
        reference (parameters and buffers by name). Call it after the snapshot's :meth:`compare_with`: the states
        are the ghosts' and reference's now, valid until the next training step."""
        live = self.live
        if not live:
            return []
        reference = self.trainer.reference_state()
        return [(g.ghost_id, reference, self.trainer.state_of(g)) for g in live]

    # ------------------------------------------------------------------------------------------ status

    def finish(self, step: int) -> None:
        self.read()
        self.separation.flush()
        for ghost in self.live:
            self._set_status(ghost, "finished", step, "run closed")

    def _stop_all(self, ghosts: list[Ghost], status: str, step: int, reason: str) -> None:
        self.read()  # a ghost that stopped earlier keeps that status
        for ghost in ghosts:
            if ghost.alive:
                self._set_status(ghost, status, step, reason)

    def _set_status(self, ghost: Ghost, status: str, step: int, reason: str, **extra: Any) -> None:
        ghost.status = status
        self.writer.event("ghost_status", ghost=ghost.ghost_id, step=step, status=status, reason=reason, **extra)
        if status in ("diverged", "failed"):
            self._warn_once(f"status-{status}", f"dynprobe: ghost {ghost.ghost_id} (spawned at step "
                            f"{ghost.spawn_step}) "
                            f"{status} at step {step}: {reason}. It is recorded in the run (as are any later ghost "
                            "faults, without another warning); your training is unaffected")
        self.trainer.release(ghost)

    def _record_mode(self, mode: str, step: int, reason: str, *, warn: bool = False, **fields: Any) -> None:
        """A trainer decided its mode: a ``ghost_mode`` event, the manifest's ``ghost_mode`` and convention."""
        reference = "main" if mode == "sequential" else "shadow"
        self.writer.event("ghost_mode", step=step, mode=mode, reference=reference, reason=reason, **fields)
        conventions = {**self.writer.manifest.get("conventions", {}), "ghosts": GHOST_MODE_CONVENTIONS[mode]}
        self.writer.update_manifest(ghost_mode={"mode": mode, "reference": reference, "step": step},
                                    conventions=conventions)
        if warn:
            self._warn_once("ghost-mode", f"dynprobe: ghosts fall back to the sequential path: {reason}")

    def _warn_realized_norms(self, spawned: list[Ghost], step: int) -> None:
        message = realized_norm_notice({g.ghost_id: g.report for g in spawned}, step)
        if message is not None:
            self._warn_once("realized-norm", message)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warn_user(message)

