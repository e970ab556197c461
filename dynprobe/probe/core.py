"""``Probe``: attaches to an unmodified training loop through public PyTorch hooks and wires the parts together.

Two added lines::

    probe = dynprobe.Probe(model, optimizer, eval_data=(x_test, y_test), out="runs/exp")
    criterion = probe.watch(criterion)

The probe counts optimizer steps with ``Optimizer.register_step_post_hook`` (step t = t updates taken; step 0 = the
initialization, recorded when the probe attaches). After each step it advances the ghosts (if any), spawns those
due, and at scheduled steps measures the model side-effect-free and appends one row to every interval matrix. This
module holds no math and no file names: measuring and committing is :mod:`dynprobe.recording`, the replicas
:mod:`dynprobe.ghosts`, what a step consumed :mod:`dynprobe.capture`, the files :mod:`dynprobe.store`.
"""
from __future__ import annotations

import atexit
import os
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from dynprobe._util.checks import check_model, check_optimizer
from dynprobe._util.evaluation import EvalSet, default_output_fn
from dynprobe._util.modules import device_of, rng_devices, trainable_parameters
from dynprobe.analysis.estimate import TransitionEstimate
from dynprobe.capture.hooks import GradEditDetector
from dynprobe.capture.step import StepCapture, explicit_micro_batch
from dynprobe.capture.watched import WatchedLoss
from dynprobe.config import Barriers, Ghosts, KernelConfig
from dynprobe.distributed.kernel import sharded_kernel
from dynprobe.distributed.runtime import DistributedRun, unwrap_model
from dynprobe.ghosts.ghost_set import GhostSet
from dynprobe.recording.background import BackgroundWriter
from dynprobe.recording.barriers import BarrierScheduler
from dynprobe.recording.kernel_probe import KernelMeasure
from dynprobe.recording.progress import SnapshotProgress
from dynprobe.recording.snapshot import SnapshotRecorder
from dynprobe.recording.train_loss import TrainLoss
from dynprobe.schedule import Schedule
from dynprobe.store.layout import EVAL_INDICES, KERNEL_PROBE_INDICES, train_loss_path
from dynprobe.store.run import load_run
from dynprobe.store.writer import check_out

from .guard import FaultGuard, attempt
from .options import ProbeOptions
from .parts import (
    attach_ghosts,
    background_writes,
    check_model_output,
    check_resumed_parameters,
    open_run,
    warn_about_new_parameters,
    warn_if_the_disk_is_too_small,
)
from .sequence import SnapshotSequence
from .transition import TransitionWatch

__all__ = ["Probe"]

_OPEN_PROBES: weakref.WeakSet[Probe] = weakref.WeakSet()


class Probe:
    """Record a training run's trajectory and its interval metrics (the two-phase paper's C, D, S, B).

    Args:
        model: the ``nn.Module`` being trained. Its trainable parameters (``requires_grad``) form ``vec(θ)``.
        optimizer: the ``torch.optim.Optimizer`` training it; its steps are the probe's clock.
        eval_data: ``(inputs, targets)`` — inputs a tensor (``model(x)``) or a dict of tensors (``model(**x)``),
            targets 1-D class labels — or a ``DataLoader`` of such pairs. Subsampled (seeded) to ``eval_max``
            examples once; every snapshot evaluates the same examples.
        out: the run directory. It must not exist yet, be empty, or (with ``resume=True``) hold a dynprobe run.
        schedule: when to snapshot: a :class:`dynprobe.schedule.Schedule`, an int k (every k steps) or a list
            of steps. Default: ``log_spaced(until=1000) | every(250)``.
        kernel: a :class:`dynprobe.KernelConfig` to measure the eNTK H(θ_t) on a fixed probe set at snapshots
            and the kernel distance S (eq. 4) between them (off by default).
        ghosts: a :class:`dynprobe.Ghosts` to run the chaos experiment (off by default).
        loss_from_output: for models that compute their own loss (Hugging Face style), instead of ``watch``:
            ``True`` (``output.loss``) or a function output → loss tensor. Needed by ghosts only.
        total_steps: the number of optimizer steps you plan (optional): ghost spawn steps beyond it are an
            error at construction instead of ghosts that silently never spawn.
        resume: continue the run in ``out`` after restoring your own checkpoint. ``resume_step`` says which step
            your training restarts from (default: the run's last snapshot); later snapshots are discarded. When the
            run has a snapshot at that step, the model's parameters must equal it (else a clear error).
        eval_max: at most this many eval examples (default 2,000).
        eval_batch_size: batch size of snapshot evaluations.
        output_fn: selects the ``(N, num_classes)`` logits from the model's output (default: the output itself,
            ``output.logits`` or ``output["logits"]``).
        seed: seeds the eval subsample; never the global RNG.
        barriers: the loss barriers (eq. 5 and the linear reference) computed online and their time budget, a
            :class:`dynprobe.Barriers` (default ``Barriers()``).
        task: ``"classification"``, ``"tokens"``, ``"regression"`` or a task object (default: from the eval targets).
        progress: a progress line on stderr while a snapshot takes more than ~2 s.
        durable: ``fsync`` every file and its directory at each commit point, so a power loss cannot lose a
            committed snapshot (a kill of the process never can); it costs far more than a snapshot's own writes
            on most filesystems, hence off by default.
        history_memory: bytes of earlier parameter vectors kept on the model's device to compute C rows in
            O(T) per snapshot; older vectors are streamed back from ``out``.
        snapshot_on_close: also snapshot the final step at ``close()`` if the schedule did not.
        on_transition: called once, with a :class:`dynprobe.analysis.TransitionEstimate`, when the online
            estimate of the chaotic-to-stable transition becomes confident (see
            :class:`dynprobe.analysis.TransitionDetector`) — e.g. to start weight averaging. The estimate is
            recorded in the run's events either way. The callback runs after the optimizer step, outside the
            probe's fault guard: its exceptions are yours.
        on_snapshot: called after each committed snapshot (step 0 included) with a dict: the snapshot's record
            (``step``, ``eval_loss``, ``eval_accuracy``, ``train_loss``, ``lr``, ``C_prev``, ``D_prev``, ``S_prev``,
            ...), ``rows`` (the new row M[k, 0..k] of each interval matrix, numpy), ``steps`` (every snapshot's
            step), ``transition`` (the online estimate or None) and ``out``. For scalar exporters
            (:mod:`dynprobe.exporters`); it runs inside the probe's fault guard.
        errors: ``"warn"`` (default): an internal error during training — including the run directory's disk
            filling up or turning read-only — is recorded in the run where possible, reported once, and the probe
            detaches itself so the user's training goes on; ``"raise"``: re-raise it.

    Under ``torch.distributed`` (DDP) build the probe on every rank with the ``DistributedDataParallel`` wrapper:
    rank 0 writes ``out``, ghosts average their gradients across ranks, the eNTK is split over the ranks (see
    :mod:`dynprobe.distributed`).

    The probe never changes training: it reads parameters, evaluates in eval mode under ``no_grad`` with the
    RNG state and every module's train/eval flag restored, runs ghosts under a forked RNG, and writes only to
    ``out``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        eval_data: Any,
        out: str | os.PathLike,
        schedule: Schedule | int | Iterable[int] | None = None,
        kernel: KernelConfig | None = None,
        ghosts: Ghosts | None = None,
        loss_from_output: bool | Callable[[Any], torch.Tensor] | None = None,
        total_steps: int | None = None,
        resume: bool = False,
        resume_step: int | None = None,
        eval_max: int = 2000,
        eval_batch_size: int = 256,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        seed: int = 0,
        barriers: Barriers | None = None,
        task: Any = None,
        progress: bool = True,
        durable: bool = False,
        history_memory: int | None = None,
        snapshot_on_close: bool = True,
        on_transition: Callable[[TransitionEstimate], None] | None = None,
        on_snapshot: Callable[[dict[str, Any]], None] | None = None,
        errors: str = "warn",
    ) -> None:
        check_out(out)  # a missing or empty out= fails first, before anything else is looked at
        self._busy = True  # hooks ignore everything until the probe is fully attached
        self._closed = False
        self._handles: list[Any] = []
        self._warned: set[str] = set()
        self.options = ProbeOptions(
            schedule=schedule, kernel=kernel, ghosts=ghosts, loss_from_output=loss_from_output,
            total_steps=total_steps, resume=resume, resume_step=resume_step, eval_max=eval_max,
            eval_batch_size=eval_batch_size, output_fn=output_fn, seed=seed,
            history_memory=history_memory, snapshot_on_close=snapshot_on_close,
            on_transition=on_transition, on_snapshot=on_snapshot, errors=errors, barriers=barriers, task=task,
            progress=progress, durable=durable)
        # torch.distributed (DDP): hooks on what the loop calls (the wrapper), everything else on the inner module.
        self._dist = DistributedRun.detect(model)
        self._hooked_model = model
        self.model = check_model(unwrap_model(model))
        self.optimizer = check_optimizer(optimizer, self.model)
        try:
            self._attach(eval_data, out)
        except BaseException:  # a refused attach leaves no hook behind and the run directory free for a writer
            self._remove_hooks()
            if hasattr(self, "writer"):
                attempt(self.writer.close, [])
            raise
        _OPEN_PROBES.add(self)
        self._busy = False
        # The snapshot (and ghost spawns) of the current step: step 0 of a new run, or the resume step of a run
        # continued from a checkpoint taken between snapshots (a committed snapshot there is not taken twice).
        self._guarded(self._advance_to_current_step)

    def _attach(self, eval_data: Any, out: str | os.PathLike) -> None:
        options, model = self.options, self.model
        self.schedule, self.total_steps = options.schedule, options.total_steps
        self.output_fn = options.output_fn or default_output_fn
        self.device = device_of(model)
        self._cuda_devices = rng_devices(model)
        self._named_params = trainable_parameters(model)
        self._params = [p for _, p in self._named_params]
        self.storage_dtype = torch.float64 if any(p.dtype == torch.float64 for p in self._params) else torch.float32
        self.eval_set = EvalSet.from_user(eval_data, max_examples=options.eval_max, seed=options.seed,
                                          task=options.task)
        self.num_classes = check_model_output(model, self.eval_set, self.output_fn, self.device, self._cuda_devices)
        self._kernel = None
        if options.kernel is not None:
            self._kernel = KernelMeasure(options.kernel, model, self.eval_set, output_fn=self.output_fn,
                                         device=self.device, kernel_factory=sharded_kernel(self._dist, model))
        self.writer = open_run(self._dist, out, options, model=model, named_params=self._named_params,
                               optimizer=self.optimizer, eval_set=self.eval_set, num_classes=self.num_classes,
                               storage_dtype=self.storage_dtype, device=self.device,
                               kernel_convention=self._kernel.convention() if self._kernel is not None else None)
        self.out = self.writer.root
        if (self._dist is None or self._dist.is_writer) and background_writes(self._params, self.storage_dtype):
            self.writer = BackgroundWriter(self.writer)  # large θ: snapshot files written off the training thread
        self._guard = FaultGuard(options.errors, record=self._record_error, detach=self._detach,
                                 describe=lambda: str(self.out))
        resumed = self.writer.resumed
        self.step_count = self.writer.resume_from_step(options.resume_step) if resumed else 0
        if resumed:
            check_resumed_parameters(self.writer, self._params, self.step_count)
            if self._kernel is not None:  # the kernel cadence (every_snapshots, lag companions) continues
                self._kernel.resume(self.writer.snapshots)
        else:
            self.writer.save_run_array(EVAL_INDICES, self.eval_set.indices.numpy())
            if self._kernel is not None:
                self.writer.save_run_array(KERNEL_PROBE_INDICES, self._kernel.indices.numpy())
            warn_if_the_disk_is_too_small(self.writer, options, self._params, self.storage_dtype, model,
                                          self.eval_set.n, options.kernel.n if options.kernel is not None else None)
        writes = self._dist is None or self._dist.is_writer
        last = int(self.writer.snapshots[-1]["step"]) if resumed and self.writer.snapshots else None
        self._train_loss = TrainLoss(train_loss_path(self.out) if writes else None,
                                     resumed_at=self.step_count if resumed else None, since=last)
        self._recorder = SnapshotRecorder(
            self.writer, model, self._params, self.eval_set, device=self.device, storage_dtype=self.storage_dtype,
            output_fn=self.output_fn, eval_batch_size=options.eval_batch_size,
            history_memory=options.history_memory,
            kernel_fn=(lambda index: self._sequence.kernel_at(self.step_count)) if self._kernel is not None else None,
        )
        self._progress = SnapshotProgress(enabled=options.progress)
        self._barriers = BarrierScheduler(
            options.barriers, sink=self.writer, model=model, eval_set=self.eval_set, output_fn=self.output_fn,
            batch_size=options.eval_batch_size, final_step=options.total_steps, progress=self._progress,
        ) if options.barriers.active(options.ghosts is not None) and writes else None
        self.on_snapshot = options.on_snapshot
        self._transition = TransitionWatch(self.writer.event, options.on_transition,
                                           lag_steps=options.kernel.lag_steps if options.kernel is not None else None)
        if resumed:
            self._transition.replay(load_run(self.out))
        self._sequence = SnapshotSequence(
            recorder=self._recorder, kernel=self._kernel, schedule=self.schedule, train_loss=self._train_loss,
            barriers=self._barriers, transition=self._transition, progress=self._progress, model=model,
            optimizer=self.optimizer, writer=self.writer, writes=writes, on_snapshot=options.on_snapshot)
        self._explicit = False
        self._hook_steps = 0
        self._handles.append(self.optimizer.register_step_post_hook(self._after_optimizer_step))
        self._ghosts: GhostSet | None = None
        self._capture: StepCapture | None = None
        if options.ghosts is not None:
            self._ghosts, self._capture, handles = attach_ghosts(
                options.ghosts, options, model=self.model, hooked_model=self._hooked_model, optimizer=self.optimizer,
                writer=self.writer, params=self._params, eval_set=self.eval_set, output_fn=self.output_fn,
                device=self.device, storage_dtype=self.storage_dtype, cuda_devices=self._cuda_devices,
                owner=self, dist=self._dist, busy=lambda: self._busy, step=lambda: self.step_count,
                resume_step=self.step_count if self.writer.resumed else None)
            self._handles += handles

    # ------------------------------------------------------------------------------------------ public API

    @property
    def global_step(self) -> int:
        """Optimizer steps taken so far: the step number of the model's current state."""
        return self.step_count

    @property
    def attached(self) -> bool:
        """Whether the probe still follows training (False after ``close()`` or after it detached itself)."""
        return not self._closed

    @property
    def transition(self) -> TransitionEstimate | None:
        """The online transition estimate, once the detector is confident (None before)."""
        return self._transition.estimate

    @property
    def errors(self) -> str:
        return self.options.errors

    @property
    def snapshot_on_close(self) -> bool:
        return self.options.snapshot_on_close

    def watch(self, loss_fn: Callable[..., torch.Tensor]) -> WatchedLoss:
        """Wrap the training loss function; the wrapper returns exactly what ``loss_fn`` returns."""
        if isinstance(loss_fn, WatchedLoss):
            raise ValueError("this loss function is already watched by a probe; pass the original loss function")
        if not callable(loss_fn):
            raise TypeError(f"watch() needs the loss function (callable); got {type(loss_fn).__name__}")
        if self._ghosts is not None and self._ghosts.config.loss_fn is None:
            self._ghosts.loss_fn = loss_fn
        return WatchedLoss(loss_fn, on_loss=self._on_training_loss, muted=lambda: self._busy)

    def step(self, inputs: Any = None, targets: Any = None) -> None:
        """Explicit alternative to the hooks: call ``probe.step(x, y)`` at the top of every iteration, *before*
        the forward pass, with the batch that the coming optimizer step trains on.

        The first call detaches the probe's hooks; from then on these calls are the probe's clock (step t's
        snapshot is taken at the call that starts iteration t + 1, or at ``close()``). Ghosts train on
        ``model(inputs)`` (``model(**inputs)`` for a dict) and the watched loss (or ``Ghosts(loss_fn=...)``)
        applied to ``(output, targets)``, with the RNG state of this call. Mixing both styles is an error.
        Explicit calls cannot see skipped steps (``GradScaler``), accumulation or clipping. After the probe
        detached itself (a probe failure under ``errors="warn"``) these calls do nothing.
        """
        if self._closed:
            if self._guard.tripped is not None:
                return  # the probe detached itself and said so: training goes on without it
            raise RuntimeError("probe.step() called after probe.close()")
        if self._hook_steps:
            raise RuntimeError(
                "probe.step(x, y) was called after the optimizer already stepped under the probe's hooks. Call "
                "probe.step(x, y) at the top of the loop, before the forward pass, in every iteration (and do not "
                "mix it with hook-driven stepping)"
            )
        if not self._explicit:
            self._explicit = True
            self._remove_hooks()
        self._guarded(lambda: self._explicit_step(inputs, targets))
        self._transition.notify()

    # For frameworks that run the forward and the loss themselves (Lightning, Hugging Face): what the hooks and
    # ``watch`` see in a plain loop, handed over explicitly. Each is a no-op once the probe is detached.

    def record_forward(self, *args: Any, **kwargs: Any) -> None:
        """A training forward is about to run with these arguments: with ghosts, capture them (and the RNG and
        autocast state now) so the ghosts can replay it. Call it where the framework calls the model."""
        if self._capture is not None and not self._closed and not self._busy:
            self._capture.on_forward(args, kwargs)

    def record_forward_loss(self, loss: torch.Tensor, training_loss: torch.Tensor | None = None) -> None:
        """The loss of the last recorded forward, before its backward: ghosts replay the forward and take its loss
        the same way; ``training_loss`` (default ``loss``, e.g. before an accumulation divisor) is the step's."""
        if self._closed or self._busy or not loss.requires_grad:
            return
        self._train_loss.note(self.step_count + 1, loss if training_loss is None else training_loss)
        if self._capture is not None:
            self._capture.on_output_loss(loss)

    def record_training_loss(self, loss: torch.Tensor) -> None:
        """The training loss of the coming step, for ``run.train_loss`` (a plain loop gets it from ``watch``)."""
        if not self._closed and not self._busy:
            self._train_loss.note(self.step_count + 1, loss)

    def ignore_gradient_edits(self) -> None:
        """Stop watching for gradient edits between ``backward()`` and ``step()`` (e.g. a framework's no-op
        ``clip_grad_norm_(params, inf)`` that only measures the norm). The ε = 0 control ghost still checks the
        replay bit for bit."""
        kept = [h for h in self._handles if not isinstance(h, GradEditDetector)]
        for handle in self._handles:
            if isinstance(handle, GradEditDetector):
                handle.remove()
        self._handles = kept

    def flush(self) -> None:
        """Return once every snapshot taken so far is on disk. Snapshots of models whose θ exceeds 16 MiB are
        written off the training thread; a reader in the same process that needs the latest one calls this."""
        if not self._closed:
            self.writer.flush()

    def close(self) -> None:
        """Finish the run: final snapshot (if ``snapshot_on_close``), full matrices, status. Idempotent; also
        runs at interpreter exit and when a ``with Probe(...)`` block ends."""
        self._close(status="closed")

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        if kind is None:
            self._close(status="closed")
        else:
            self._close(status="failed", reason=f"{kind.__name__}: {error}", final_snapshot=False)

    def __repr__(self) -> str:
        return f"Probe(out={str(self.out)!r}, step={self.step_count}, snapshots={len(self.writer.snapshots)})"

    # ------------------------------------------------------------------------------------------ the clock

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._busy or self._closed:
            return
        self._hook_steps += 1
        self.step_count += 1
        self._guarded(self._after_step_work)
        self._transition.notify()

    def _after_step_work(self) -> None:
        if self._ghosts is not None and self._capture is not None:
            self._ghosts.train_step(self._capture.take(), self.step_count)
        self._advance_to_current_step()

    def _advance_to_current_step(self) -> None:
        """Spawn the ghosts due now, then snapshot if the schedule says so."""
        if self._ghosts is not None:
            self._ghosts.spawn_due(self.step_count)
        kernel_due = self._kernel is not None and self._kernel.snapshot_due(self.step_count)  # a lag companion
        if (self.step_count in self.schedule or kernel_due) and not self._snapshotted(self.step_count):
            self._snapshot()

    def _explicit_step(self, inputs: Any, targets: Any) -> None:
        if self.step_count > 0:
            self._advance_to_current_step()
        if self._ghosts is not None and self._ghosts.live:
            if self._ghosts.loss_from_output is None and self._ghosts.loss_fn is None:
                raise ValueError("ghosts with explicit probe.step(x, y) need the loss: call "
                                 "criterion = probe.watch(criterion) or pass Ghosts(loss_fn=...)")
            micro = explicit_micro_batch(inputs, targets, self._cuda_devices,
                                         with_loss=self._ghosts.loss_from_output is None)
            self._ghosts.train_step([micro], self.step_count + 1)
        self.step_count += 1

    def _on_training_loss(self, loss: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._closed:
            return
        self._train_loss.note(self.step_count + 1, loss)
        if self._capture is not None and not self._explicit:
            self._capture.on_loss(loss, args, kwargs)

    # ------------------------------------------------------------------------------------------ snapshots

    def _snapshotted(self, step: int) -> bool:
        return bool(self.writer.snapshots) and self.writer.snapshots[-1]["step"] == step

    def _snapshot(self) -> None:
        warn_about_new_parameters(self.model, self._named_params, self._warned)
        self._sequence.take(self.step_count, ghosts=self._ghosts)

    # ------------------------------------------------------------------------------------------ lifecycle

    def _guarded(self, action: Callable[[], None]) -> None:
        """Run probe work inside the user's loop: hooks muted, failures behind the fault barrier."""
        self._busy = True
        try:
            self._guard.run(action, step=self.step_count)
        finally:
            self._busy = False

    def _record_error(self, summary: str, trace: str) -> None:
        self.writer.event("probe_error", step=self.step_count, error=summary, traceback=trace)

    def _detach(self, reason: str) -> None:
        self._close(status="probe_failed", reason=reason, final_snapshot=False)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            attempt(handle.remove, [])
        self._handles.clear()

    def _close(self, *, status: str, reason: str | None = None, final_snapshot: bool = True) -> None:
        if self._closed:
            return
        if final_snapshot and self.snapshot_on_close and not self._snapshotted(self.step_count):
            self._guarded(self._snapshot)
            if self._closed:  # the final snapshot failed and the probe detached itself already
                return
        self._closed = True
        self._remove_hooks()  # first: whatever fails below, training goes on without the probe
        _OPEN_PROBES.discard(self)
        failures: list[str] = []
        if self._barriers is not None and status == "closed":  # the final ghost barriers, before the ghosts stop
            attempt(lambda: self._barriers.close(self.step_count, self._ghosts), failures)
        if self._ghosts is not None:
            attempt(lambda: self._ghosts.finish(self.step_count), failures)
            unreached = [t for t in getattr(self._ghosts.config.at, "values", ()) if t > self.step_count]
            if unreached and status == "closed":
                warnings.warn(f"dynprobe: ghost spawn steps {unreached} were never reached (the run ended at "
                              f"step {self.step_count})", RuntimeWarning, stacklevel=3)
        attempt(self._train_loss.flush, failures)
        if self._dist is None or self._dist.is_writer:
            attempt(self._recorder.materialize, failures)
        attempt(self._recorder.release, failures)
        fields: dict[str, Any] = {"status": status, "final_step": self.step_count}
        if reason:
            fields["status_reason"] = reason
        attempt(lambda: self.writer.update_manifest(**fields), failures)
        attempt(lambda: self.writer.event("close", step=self.step_count, status=status, reason=reason), failures)
        attempt(self.writer.close, failures)  # releases the run's writer lock
        if failures and status != "probe_failed":
            self._guard.run(lambda: _raise_close_failure(failures), step=self.step_count)


def _raise_close_failure(failures: list[str]) -> None:
    raise OSError("closing the run failed: " + "; ".join(failures))


@atexit.register
def _close_open_probes() -> None:
    for probe in list(_OPEN_PROBES):
        try:
            probe.close()
        except Exception:  # noqa: BLE001 - interpreter exit: report, never raise
            traceback.print_exc()
