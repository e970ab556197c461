"""``Probe``: attaches to an unmodified training loop through public PyTorch hooks and orchestrates the work.

Two added lines::

    probe = dynprobe.Probe(model, optimizer, eval_data=(x_test, y_test), out="runs/exp")
    criterion = probe.watch(criterion)

The probe counts optimizer steps with ``Optimizer.register_step_post_hook`` (step t = t updates taken; step 0 =
the initialization, recorded when the probe attaches). After each step it advances the ghosts (if any), spawns
those due, and at scheduled steps measures the model side-effect-free and appends one row to every interval
matrix. This module holds no math: see :mod:`dynprobe.snapshot` (measuring, committing), :mod:`dynprobe.ghosts`
(replicas), :mod:`dynprobe.capture` and :mod:`dynprobe.hooks` (what a step consumed), :mod:`dynprobe.metrics`
(formulas), :mod:`dynprobe.writer` (files).
"""
from __future__ import annotations

import atexit
import os
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from dynprobe._util.checks import check_int, check_model, check_optimizer
from dynprobe._util.evaluation import EvalSet, check_logits, default_output_fn, forward, index_inputs, inputs_to
from dynprobe._util.modules import device_of, eval_mode, preserved_rng, rng_devices, trainable_parameters
from dynprobe.analysis.detector import TransitionDetector
from dynprobe.analysis.estimate import TransitionEstimate
from dynprobe.capture.hooks import CaptureHooks, GradEditDetector
from dynprobe.capture.step import AutocastState, ForwardCall, LossCall, MicroBatch, RngState, StepCapture
from dynprobe.capture.watched import WatchedLoss
from dynprobe.config import Ghosts, KernelConfig
from dynprobe.distributed.runtime import DistributedRun, check_supported, open_run_writer, unwrap_model, warn_comm_hook
from dynprobe.ghosts.ghost_set import GhostSet
from dynprobe.recording.barriers import TrajectoryBarriers
from dynprobe.recording.kernel_probe import KernelMeasure
from dynprobe.recording.snapshot import SnapshotRecorder
from dynprobe.schedule import Schedule, as_schedule
from dynprobe.store.files import read_jsonl
from dynprobe.store.layout import EVENTS
from dynprobe.store.manifest import CONVENTIONS, GHOST_CONVENTIONS, build_manifest
from dynprobe.store.run import load_run
from dynprobe.store.writer import json_safe

__all__ = ["Probe"]

_OPEN_PROBES: weakref.WeakSet[Probe] = weakref.WeakSet()


def _output_loss(output: Any) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_from_output=True needs outputs with a .loss tensor; got {type(output).__name__}")
    return loss


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
        resume: continue the run in ``out`` (after restoring your own checkpoint). ``resume_step`` says which
            step your training restarts from (default: the run's last snapshot); later snapshots are discarded.
            Ghosts alive at the interruption cannot be continued; spawns scheduled later still happen.
        eval_max: at most this many eval examples (default 2,000).
        eval_batch_size: batch size of snapshot evaluations.
        output_fn: selects the ``(N, num_classes)`` logits from the model's output (default: the output itself,
            ``output.logits`` or ``output["logits"]``).
        seed: seeds the eval subsample; never the global RNG.
        trajectory_barriers: after each snapshot, compute the loss barrier B (eq. 5) to this many preceding
            snapshots (0: none; 1: consecutive pairs). Each costs ``barrier_alphas`` evaluations of the eval set;
            :func:`dynprobe.fill_barriers` computes other pairs afterwards.
        barrier_alphas: α grid size on [0, 1] for trajectory barriers.
        history_memory: bytes of earlier parameter vectors kept on the model's device to compute C rows in
            O(T) per snapshot; older vectors are streamed back from ``out``.
        snapshot_on_close: also snapshot the final step at ``close()`` if the schedule did not.
        on_transition: called once, with a :class:`dynprobe.analysis.TransitionEstimate`, when the online
            estimate of the chaotic-to-stable transition becomes confident (kernel velocity and parameter
            direction-change rate have dropped and stayed low; see :class:`dynprobe.detector.TransitionDetector`)
            — e.g. to start weight averaging. The estimate is recorded in the run's events either way. The
            callback runs after the optimizer step, outside the probe's error guard: its exceptions are yours.
        on_snapshot: called after each committed snapshot (step 0 included) with a dict: the snapshot's record
            (``step``, ``eval_loss``, ``eval_accuracy``, ``train_loss``, ``lr``, ``C_prev``, ``D_prev``, ``S_prev``,
            ...), ``rows`` (the new row M[k, 0..k] of each interval matrix, numpy), ``steps`` (every snapshot's
            step), ``transition`` (the online estimate or None) and ``out``. For scalar exporters
            (:mod:`dynprobe.exporters`); it runs inside the probe's error guard.
        errors: ``"warn"`` (default): an internal error during training is recorded in the run, warned about,
            and the probe detaches itself so the user's training goes on; ``"raise"``: re-raise it.

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
        trajectory_barriers: int = 0,
        barrier_alphas: int = 30,
        history_memory: int = 512 * 2**20,
        snapshot_on_close: bool = True,
        on_transition: Callable[[TransitionEstimate], None] | None = None,
        on_snapshot: Callable[[dict[str, Any]], None] | None = None,
        errors: str = "warn",
    ) -> None:
        self._busy = True  # hooks ignore everything until the probe is fully attached
        self._closed = False
        self._handles: list[Any] = []
        # torch.distributed (DDP): hooks on what the loop calls (the wrapper), everything else on the inner module.
        self._dist = DistributedRun.detect(model)
        self._hooked_model = model
        model = unwrap_model(model)
        self.model = check_model(model)
        self.optimizer = check_optimizer(optimizer, model)
        self.schedule = as_schedule(schedule)
        if ghosts is not None and isinstance(ghosts, Ghosts):
            # A ghost is compared with the main run from its spawn on: snapshot at every spawn step too.
            self.schedule = self.schedule | ghosts.at
        check_int("eval_max", eval_max)
        check_int("eval_batch_size", eval_batch_size)
        check_int("history_memory", history_memory, minimum=0)
        check_int("trajectory_barriers", trajectory_barriers, minimum=0)
        check_int("barrier_alphas", barrier_alphas, minimum=2)
        if errors not in ("warn", "raise"):
            raise ValueError(f"errors must be 'warn' or 'raise'; got {errors!r}")
        if resume_step is not None:
            check_int("resume_step", resume_step, minimum=0)
        if total_steps is not None:
            check_int("total_steps", total_steps)
            late = [t for t in getattr(getattr(ghosts, "at", None), "values", ()) if t > total_steps]
            if late:
                raise ValueError(f"Ghosts(at=...) has spawn steps beyond total_steps={total_steps}: {late}; they "
                                 "would never spawn. Remove them or raise total_steps")
        self.total_steps = total_steps
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable (output -> logits); got {type(output_fn).__name__}")
        if on_transition is not None and not callable(on_transition):
            raise TypeError(f"on_transition must be callable (estimate -> None); got {type(on_transition).__name__}")
        if on_snapshot is not None and not callable(on_snapshot):
            raise TypeError(f"on_snapshot must be callable (dict -> None); got {type(on_snapshot).__name__}")
        self.on_snapshot = on_snapshot
        if kernel is not None and not isinstance(kernel, KernelConfig):
            raise TypeError(f"kernel must be a dynprobe.KernelConfig(...); got {type(kernel).__name__}")
        if ghosts is not None and not isinstance(ghosts, Ghosts):
            raise TypeError(f"ghosts must be a dynprobe.Ghosts(...) configuration; got {type(ghosts).__name__}")
        if loss_from_output is not None and loss_from_output is not True and not callable(loss_from_output):
            raise TypeError("loss_from_output must be True (use output.loss) or a function output -> loss tensor")
        self.errors = errors
        self.output_fn = output_fn or default_output_fn
        self.snapshot_on_close = bool(snapshot_on_close)
        self.device = device_of(model)
        self._cuda_devices = rng_devices(model)
        self._named_params = trainable_parameters(model)
        self._params = [p for _, p in self._named_params]
        self.storage_dtype = torch.float64 if any(p.dtype == torch.float64 for p in self._params) else torch.float32

        self.eval_set = EvalSet.from_user(eval_data, max_examples=eval_max, seed=seed)
        self.num_classes = self._check_model_output()
        self._kernel = None
        if kernel is not None:
            self._kernel = KernelMeasure(kernel, model, self.eval_set, output_fn=self.output_fn, device=self.device,
                                         distributed=self._dist)

        config = {"schedule": self.schedule.to_config(), "eval_max": eval_max, "eval_batch_size": eval_batch_size,
                  "total_steps": total_steps, "trajectory_barriers": trajectory_barriers,
                  "barrier_alphas": barrier_alphas,
                  "seed": seed, "snapshot_on_close": self.snapshot_on_close,
                  "kernel": kernel.to_config() if kernel is not None else None,
                  "ghosts": ghosts.to_config() if ghosts is not None else None}
        conventions = {**CONVENTIONS, **(GHOST_CONVENTIONS if ghosts is not None else {})}
        if self._kernel is not None:
            conventions["S"] = "eq. (4): 1 - <H_i, H_j>_F / (‖H_i‖_F ‖H_j‖_F), float64"
            conventions["kernel"] = json_safe(self._kernel.convention())
        manifest = build_manifest(model=model, named_params=self._named_params, optimizer=optimizer,
                                  eval_set=self.eval_set, num_classes=self.num_classes,
                                  storage_dtype=self.storage_dtype, device=self.device, config=config,
                                  conventions=conventions)
        self.writer = open_run_writer(self._dist, out, manifest, params=self._params, resume=resume,
                                      resume_step=resume_step, problems=check_supported(ghosts))
        self.out = self.writer.root
        self.step_count = self.writer.resume_from_step(resume_step) if self.writer.resumed else 0
        if not self.writer.resumed:
            self.writer.save_run_array("eval_indices", self.eval_set.indices.numpy())
            if self._kernel is not None:
                self.writer.save_run_array("kernel_probe_indices", self._kernel.indices.numpy())
        self._recorder = SnapshotRecorder(
            self.writer, model, self._params, self.eval_set, device=self.device, storage_dtype=self.storage_dtype,
            output_fn=self.output_fn, eval_batch_size=eval_batch_size, history_memory=history_memory,
            kernel_fn=self._kernel_at if self._kernel is not None else None,
        )
        self._barriers = None
        if trajectory_barriers and (self._dist is None or self._dist.is_writer):
            self._barriers = TrajectoryBarriers(self.out, self.writer.manifest, model, self.eval_set,
                                                per_snapshot=trajectory_barriers, alphas=barrier_alphas,
                                                output_fn=self.output_fn, batch_size=max(eval_batch_size, 256))
        self.on_transition = on_transition
        self._detector = TransitionDetector()
        self._transition: TransitionEstimate | None = None
        self._transition_pending = False
        if self.writer.resumed:
            self._replay_detector()
        self._recent_losses: list[torch.Tensor] = []
        self._explicit = False
        self._hook_steps = 0
        self._loss_fn: Callable[..., torch.Tensor] | None = None
        self._handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        self._ghosts: GhostSet | None = None
        self._capture: StepCapture | None = None
        if ghosts is not None:
            self._attach_ghosts(ghosts, loss_from_output)
        _OPEN_PROBES.add(self)
        self._busy = False
        if not self.writer.resumed:
            self._run_guarded(self._advance_to_current_step)

    def _attach_ghosts(self, config: Ghosts, loss_from_output: bool | Callable | None) -> None:
        self._ghosts = GhostSet(
            config, self.model, self.optimizer, self.writer, main_params=self._params, eval_set=self.eval_set,
            output_fn=self.output_fn, eval_batch_size=self._recorder.eval_batch_size, device=self.device,
            storage_dtype=self.storage_dtype, cuda_devices=self._cuda_devices, no_copy=[self],
            raise_errors=self.errors == "raise", distributed=self._dist,
        )
        self._ghosts.final_step = self.total_steps  # B and S are always measured at the last step
        from_output = _output_loss if loss_from_output is True else loss_from_output
        self._ghosts.loss_from_output = from_output
        scale_fn = config.scaler.get_scale if config.scaler is not None else None
        self._capture = StepCapture(self._cuda_devices, scale_fn=scale_fn)
        capture_hooks = CaptureHooks(self._hooked_model, self._capture, lambda: self._busy,
                                     loss_from_output=from_output)
        self._handles.append(capture_hooks)
        if self._dist is None:  # DDP writes the averaged gradients back after backward: every step would look edited
            detector = GradEditDetector(self._params, self.optimizer,
                                        lambda: self._ghosts.note_grad_edit(self.step_count))
            self._handles.append(detector)
        warn_comm_hook(self._dist)
        if self.writer.resumed:
            self._ghosts.resume(read_jsonl(self.writer.root / EVENTS), self.step_count)
            warnings.warn("resuming a run with ghosts: ghosts alive at the interruption cannot be continued (they "
                          "end as finished); ghosts spawned at later steps will be", stacklevel=3)

    # ------------------------------------------------------------------------------------------ public API

    @property
    def global_step(self) -> int:
        """Optimizer steps taken so far: the step number of the model's current state."""
        return self.step_count

    def watch(self, loss_fn: Callable[..., torch.Tensor]) -> WatchedLoss:
        """Wrap the training loss function; the wrapper returns exactly what ``loss_fn`` returns."""
        if isinstance(loss_fn, WatchedLoss):
            raise ValueError("this loss function is already watched by a probe; pass the original loss function")
        if not callable(loss_fn):
            raise TypeError(f"watch() needs the loss function (callable); got {type(loss_fn).__name__}")
        self._loss_fn = loss_fn
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
        Explicit calls cannot see skipped steps (``GradScaler``), accumulation or clipping.
        """
        if self._closed:
            raise RuntimeError("probe.step() called after probe.close()")
        if self._hook_steps:
            raise RuntimeError(
                "probe.step(x, y) was called after the optimizer already stepped under the probe's hooks. Call "
                "probe.step(x, y) at the top of the loop, before the forward pass, in every iteration (and do not "
                "mix it with hook-driven stepping)"
            )
        if not self._explicit:
            self._explicit = True
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
        self._run_guarded(lambda: self._explicit_step(inputs, targets))
        self._notify_transition()

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
        self._run_guarded(self._after_step_work)
        self._notify_transition()

    def _after_step_work(self) -> None:
        if self._ghosts is not None and self._capture is not None:
            self._ghosts.train_step(self._capture.take(), self.step_count)
        self._advance_to_current_step()

    def _advance_to_current_step(self) -> None:
        """Spawn the ghosts due now, then snapshot if the schedule says so."""
        if self._ghosts is not None:
            self._ghosts.spawn_due(self.step_count)
        if self.step_count in self.schedule and not self._snapshotted(self.step_count):
            self._snapshot()

    def _explicit_step(self, inputs: Any, targets: Any) -> None:
        if self.step_count > 0:
            self._advance_to_current_step()
        if self._ghosts is not None and self._ghosts.live:
            self._ghosts.train_step([self._explicit_micro_batch(inputs, targets)], self.step_count + 1)
        self.step_count += 1

    def _explicit_micro_batch(self, inputs: Any, targets: Any) -> MicroBatch:
        args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else ((inputs,), {})
        call = ForwardCall(args, kwargs, RngState.capture(self._cuda_devices), AutocastState.capture(), ())
        if self._ghosts.loss_from_output is not None:
            return MicroBatch(call, None)
        if self._ghosts.loss_fn is None:
            raise ValueError("ghosts with explicit probe.step(x, y) need the loss: call "
                             "criterion = probe.watch(criterion) or pass Ghosts(loss_fn=...)")
        loss = LossCall((None, targets), {}, call, (((("index", 0),), ()),), AutocastState.capture())
        return MicroBatch(call, loss)

    def _on_training_loss(self, loss: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._recent_losses.append(loss.detach())
        if len(self._recent_losses) >= 4096:  # bound memory on long stretches without snapshots
            self._recent_losses = self._recent_losses[::2]
        if self._capture is not None and not self._explicit:
            self._capture.on_loss(loss, args, kwargs)

    # ------------------------------------------------------------------------------------------ snapshots

    def _snapshotted(self, step: int) -> bool:
        return bool(self.writer.snapshots) and self.writer.snapshots[-1]["step"] == step

    def _snapshot(self) -> None:
        if self._dist is not None and not self._dist.is_writer:  # DDP: rank 0 records; this rank keeps in step
            self._dist.follow_snapshot(self)
            return
        data = self._recorder.measure(self.step_count)
        main_state = {name: t.detach() for name, t in
                      list(self.model.named_parameters()) + list(self.model.named_buffers()) if t is not None}
        if self._ghosts is not None:
            kernel_of = self._kernel.measure if self._kernel is not None else None
            self._ghosts.compare(data, kernel_of, main_state, len(self.writer.snapshots))
        record = {
            "train_loss": self._pop_train_loss(),
            "lr": [group.get("lr") for group in self.optimizer.param_groups],
        }
        committed = self._recorder.commit(data, record)
        self._update_detector(data.step)
        if self.on_snapshot is not None:
            self.on_snapshot({**committed, "rows": self._recorder.last_rows, "out": self.out, "transition":
                              self._transition, "steps": [s["step"] for s in self.writer.snapshots]})
        if self._barriers is not None:
            self._barriers.after_commit([s["step"] for s in self.writer.snapshots], main_state)

    def _update_detector(self, step: int) -> None:
        rows = self._recorder.last_rows
        estimate = self._detector.update(step, rows["C"], rows.get("S"))
        if estimate is not None:
            self._announce(estimate)

    def _announce(self, estimate: TransitionEstimate) -> None:
        if self._transition is None:
            self._transition = estimate
            self._transition_pending = True
            self.writer.event("transition", step=estimate.step, estimate=estimate.to_dict())

    def _replay_detector(self) -> None:
        """A resumed run: feed the committed rows to the detector again; announce only what was not announced."""
        run = load_run(self.out)
        C, S = run.C, run.S if run.has_kernels else None
        for k, step in enumerate(run.steps):
            self._detector.update(int(step), C[k, : k + 1], None if S is None else S[k, : k + 1])
        announced = [e for e in run.events if e.get("event") == "transition"]
        if announced:  # the callback already ran in the interrupted process: never again
            recorded = dict(announced[-1]["estimate"])
            recorded["interval"] = tuple(recorded["interval"]) if recorded.get("interval") else None
            self._transition = self._detector.estimate or TransitionEstimate(**recorded)
        elif self._detector.estimate is not None:
            self._announce(self._detector.estimate)

    def _notify_transition(self) -> None:
        if self._transition_pending and self._transition is not None:
            self._transition_pending = False
            if self.on_transition is not None:
                self.on_transition(self._transition)

    @property
    def transition(self) -> TransitionEstimate | None:
        """The online transition estimate, once the detector is confident (None before)."""
        return self._transition

    def _kernel_at(self, snapshot_index: int) -> torch.Tensor | None:
        assert self._kernel is not None
        return self._kernel.measure() if self._kernel.due(snapshot_index) else None

    def _pop_train_loss(self) -> float | None:
        if not self._recent_losses:
            return None
        value = float(torch.stack([x.float() for x in self._recent_losses]).mean())
        self._recent_losses.clear()
        return value

    def _run_guarded(self, action: Callable[[], None]) -> None:
        """Run probe work inside the user's loop: hooks muted; errors recorded, then raised or detached."""
        self._busy = True
        try:
            action()
        except Exception as error:  # noqa: BLE001 - a probe failure must not kill the user's training
            self.writer.event("probe_error", step=self.step_count, error=f"{type(error).__name__}: {error}",
                              traceback=traceback.format_exc())
            if self.errors == "raise":
                raise
            warnings.warn(
                f"dynprobe: the probe failed at step {self.step_count} ({type(error).__name__}: {error}) and "
                f"detached itself; training continues unaffected. Details in {self.out / 'events.jsonl'}",
                RuntimeWarning, stacklevel=3,
            )
            self._close(status="probe_failed", reason=f"{type(error).__name__}: {error}", final_snapshot=False)
        finally:
            self._busy = False

    # ------------------------------------------------------------------------------------------ lifecycle

    def _close(self, *, status: str, reason: str | None = None, final_snapshot: bool = True) -> None:
        if self._closed:
            return
        if final_snapshot and self.snapshot_on_close and not self._snapshotted(self.step_count):
            self._run_guarded(self._snapshot)
            if self._closed:  # the final snapshot failed and closed the probe already
                return
        self._closed = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        _OPEN_PROBES.discard(self)
        try:
            if self._ghosts is not None:
                self._ghosts.finish(self.step_count)
                unreached = [t for t in getattr(self._ghosts.config.at, "values", ()) if t > self.step_count]
                if unreached and status == "closed":
                    warnings.warn(f"dynprobe: ghost spawn steps {unreached} were never reached (the run ended at "
                                  f"step {self.step_count})", RuntimeWarning, stacklevel=3)
            if self._dist is None or self._dist.is_writer:
                self._recorder.materialize()
        finally:
            fields: dict[str, Any] = {"status": status, "final_step": self.step_count}
            if reason:
                fields["status_reason"] = reason
            self.writer.update_manifest(**fields)
            self.writer.event("close", step=self.step_count, status=status, reason=reason)

    def _check_model_output(self) -> int:
        sample = inputs_to(index_inputs(self.eval_set.inputs, slice(0, 2)), self.device)
        targets = self.eval_set.targets[:2].to(self.device)
        with torch.no_grad(), eval_mode(self.model), preserved_rng(self._cuda_devices):
            try:
                output = forward(self.model, sample)
            except Exception as error:
                raise ValueError(
                    f"calling the model on eval_data inputs failed ({type(error).__name__}: {error}); eval_data "
                    "inputs must be what the model takes: a tensor (model(x)) or a dict (model(**x))"
                ) from error
            try:
                logits = self.output_fn(output)
            except TypeError as error:
                raise ValueError(str(error)) from error
        check_logits(logits, targets)
        num_classes = int(logits.shape[1])
        check_logits(torch.empty(self.eval_set.n, num_classes), self.eval_set.targets)
        return num_classes


@atexit.register
def _close_open_probes() -> None:
    for probe in list(_OPEN_PROBES):
        try:
            probe.close()
        except Exception:  # noqa: BLE001 - interpreter exit: report, never raise
            traceback.print_exc()
