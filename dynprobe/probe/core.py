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
import inspect
import os
import traceback
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dynprobe._util.modules import eager_compiled
from dynprobe.analysis.estimate import TransitionEstimate
from dynprobe.capture.hooks import GradEditDetector
from dynprobe.capture.step import explicit_micro_batch
from dynprobe.capture.watched import WatchedLoss
from dynprobe.store.sink import RunSink
from dynprobe.store.writer import check_out

from .assembly import ProbeClock, assemble
from .guard import FaultGuard, attempt
from .options import ProbeOptions, probe_signature
from .parts import warn_about_new_parameters

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
        **options: the probe's options as keyword arguments: the fields of
            :class:`dynprobe.probe.options.ProbeOptions`, where each is declared once with its default and meaning
            (``help(dynprobe.Probe)`` lists them in the signature; ``probe.options`` holds them validated). An
            unknown name or a bad value fails here, naming the argument.

    Under ``torch.distributed`` (DDP) build the probe on every rank with the ``DistributedDataParallel`` wrapper:
    rank 0 writes ``out``, ghosts average their gradients across ranks, the eNTK is split over the ranks (see
    :mod:`dynprobe.distributed`).

    The probe never changes training: it reads parameters, evaluates in eval mode under ``no_grad`` with the
    RNG state and every module's train/eval flag restored, runs ghosts under a forked RNG, and writes only to
    ``out``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, eval_data: Any,
                 out: str | os.PathLike, **options: Any) -> None:
        check_out(out)  # a missing or empty out= fails first, before anything else is looked at
        self.options = ProbeOptions.from_keywords(options)
        self._clock = ProbeClock()  # busy: the hooks ignore everything until the probe is fully attached
        self._closed = False
        self._warned: set[str] = set()
        with eager_compiled():
            parts = assemble(self.options, model, optimizer, eval_data=eval_data, out=out, clock=self._clock,
                             owner=self)
        self._parts = parts
        self.model, self.optimizer, self.eval_set = parts.model, optimizer, parts.eval_set
        self.writer: RunSink = parts.sink
        self.out = parts.sink.root
        self._kernel, self._recorder = parts.kernel, parts.recorder
        self._ghosts, self._capture = parts.ghosts, parts.capture
        self._guard = FaultGuard(self.options.errors, record=self._record_error, detach=self._detach,
                                 describe=lambda: str(parts.sink.root))
        self._explicit = False
        self._hook_steps = 0
        self._handles: list[Any] = [optimizer.register_step_post_hook(self._after_optimizer_step), *parts.handles]
        _OPEN_PROBES.add(self)
        self._clock.busy = False
        # The snapshot (and ghost spawns) of the current step: step 0 of a new run, or the resume step of a run
        # continued from a checkpoint taken between snapshots (a committed snapshot there is not taken twice).
        self._guarded(self._advance_to_current_step)

    # ------------------------------------------------------------------------------------------ public API

    @property
    def global_step(self) -> int:
        """Optimizer steps taken so far: the step number of the model's current state (the frameworks' name)."""
        return self._clock.step

    @property
    def attached(self) -> bool:
        """Whether the probe still follows training (False after ``close()`` or after it detached itself)."""
        return not self._closed

    @property
    def transition(self) -> TransitionEstimate | None:
        """The online transition estimate, once the detector is confident (None before)."""
        return self._parts.transition.estimate

    def watch(self, loss_fn: Callable[..., torch.Tensor]) -> WatchedLoss:
        """Wrap the training loss function; the wrapper returns exactly what ``loss_fn`` returns."""
        if isinstance(loss_fn, WatchedLoss):
            raise ValueError("this loss function is already watched by a probe; pass the original loss function")
        if not callable(loss_fn):
            raise TypeError(f"watch() needs the loss function (callable); got {type(loss_fn).__name__}")
        if self._ghosts is not None and self._ghosts.config.loss_fn is None:
            self._ghosts.loss_fn = loss_fn
        return WatchedLoss(loss_fn, on_loss=self._on_training_loss, muted=lambda: self._clock.busy)

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
        self._parts.transition.notify()

    # For frameworks that run the forward and the loss themselves (Lightning, Hugging Face): what the hooks and
    # ``watch`` see in a plain loop, handed over explicitly. Each is a no-op once the probe is detached.

    def record_forward(self, *args: Any, **kwargs: Any) -> None:
        """A training forward is about to run with these arguments: with ghosts, capture them (and the RNG and
        autocast state now) so the ghosts can replay it. Call it where the framework calls the model."""
        if self._capture is not None and not self._closed and not self._clock.busy:
            self._capture.on_forward(args, kwargs)

    def record_forward_loss(self, loss: torch.Tensor, training_loss: torch.Tensor | None = None) -> None:
        """The loss of the last recorded forward, before its backward: ghosts replay the forward and take its loss
        the same way; ``training_loss`` (default ``loss``, e.g. before an accumulation divisor) is the step's."""
        if self._closed or self._clock.busy or not loss.requires_grad:
            return
        self._parts.train_loss.note(self._clock.step + 1, loss if training_loss is None else training_loss)
        if self._capture is not None:
            self._capture.on_output_loss(loss)

    def record_training_loss(self, loss: torch.Tensor) -> None:
        """The training loss of the coming step, for ``run.train_loss`` (a plain loop gets it from ``watch``)."""
        if not self._closed and not self._clock.busy:
            self._parts.train_loss.note(self._clock.step + 1, loss)

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
        return f"Probe(out={str(self.out)!r}, step={self._clock.step}, snapshots={len(self.writer.snapshots)})"

    # ------------------------------------------------------------------------------------------ the clock

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._clock.busy or self._closed:
            return
        self._hook_steps += 1
        self._parts.learning_rates.note(self._clock.step, optimizer.param_groups)  # the update just taken
        self._clock.step += 1
        self._guarded(self._after_step_work)
        self._parts.transition.notify()

    def _after_step_work(self) -> None:
        if self._ghosts is not None and self._capture is not None:
            captured = self._capture.take()
            self._ghosts.train_step(captured.micro_batches, self._clock.step, unmatched=captured.unmatched)
        self._advance_to_current_step()

    def _advance_to_current_step(self) -> None:
        """Spawn the ghosts due now, then snapshot if the schedule says so."""
        if self._ghosts is not None:
            self._ghosts.spawn_due(self._clock.step)
        kernel_due = self._kernel is not None and self._kernel.snapshot_due(self._clock.step)  # a lag companion
        if (self._clock.step in self.options.schedule or kernel_due) and not self._snapshotted(self._clock.step):
            self._snapshot()

    def _explicit_step(self, inputs: Any, targets: Any) -> None:
        if self._clock.step > 0:
            self._advance_to_current_step()
        if self._ghosts is not None and self._ghosts.live:
            if self._ghosts.loss_from_output is None and self._ghosts.loss_fn is None:
                raise ValueError("ghosts with explicit probe.step(x, y) need the loss: call "
                                 "criterion = probe.watch(criterion) or pass Ghosts(loss_fn=...)")
            micro = explicit_micro_batch(inputs, targets, self._parts.cuda_devices,
                                         with_loss=self._ghosts.loss_from_output is None)
            self._ghosts.train_step([micro], self._clock.step + 1)
        self._parts.learning_rates.note(self._clock.step, self.optimizer.param_groups)  # the coming update
        self._clock.step += 1

    def _on_training_loss(self, loss: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._closed:
            return
        self._parts.train_loss.note(self._clock.step + 1, loss)
        if loss.dim() and "per-example-loss" not in self._warned:
            self._warned.add("per-example-loss")
            self.writer.event("per_example_loss", step=self._clock.step + 1, shape=list(loss.shape),
                              train_loss="mean of the per-example losses")
        if self._capture is not None and not self._explicit:
            self._capture.on_loss(loss, args, kwargs)

    # ------------------------------------------------------------------------------------------ snapshots

    def _snapshotted(self, step: int) -> bool:
        return bool(self.writer.snapshots) and self.writer.snapshots[-1]["step"] == step

    def _snapshot(self) -> None:
        warn_about_new_parameters(self.model, self._parts.named_params, self._warned)
        self._parts.sequence.take(self._clock.step, ghosts=self._ghosts)

    # ------------------------------------------------------------------------------------------ lifecycle

    def _guarded(self, action: Callable[[], None]) -> None:
        """Run probe work inside the user's loop: hooks muted, failures behind the fault barrier."""
        self._clock.busy = True
        try:
            with eager_compiled():  # compiled code the probe reaches runs eagerly and is never recompiled
                self._guard.run(action, step=self._clock.step)
        finally:
            self._clock.busy = False

    def _record_error(self, summary: str, trace: str) -> None:
        self.writer.event("probe_error", step=self._clock.step, error=summary, traceback=trace)

    def _detach(self, reason: str) -> None:
        self._close(status="probe_failed", reason=reason, final_snapshot=False)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            attempt(handle.remove, [])
        self._handles.clear()

    def _close(self, *, status: str, reason: str | None = None, final_snapshot: bool = True) -> None:
        with eager_compiled():  # the final barriers evaluate the model too
            self._finish(status=status, reason=reason, final_snapshot=final_snapshot)

    def _finish(self, *, status: str, reason: str | None, final_snapshot: bool) -> None:
        if self._closed:
            return
        if final_snapshot and self.options.snapshot_on_close and not self._snapshotted(self._clock.step):
            self._guarded(self._snapshot)
            if self._closed:  # the final snapshot failed and the probe detached itself already
                return
        self._closed = True
        self._remove_hooks()  # first: whatever fails below, training goes on without the probe
        _OPEN_PROBES.discard(self)
        failures: list[str] = []
        if self._parts.barriers is not None and status == "closed":  # the final ghost barriers, before the ghosts stop
            attempt(lambda: self._parts.barriers.close(self._clock.step, self._ghosts), failures)
        if self._ghosts is not None:
            attempt(lambda: self._ghosts.finish(self._clock.step), failures)
            unreached = [t for t in getattr(self._ghosts.config.at, "values", ()) if t > self._clock.step]
            if unreached and status == "closed":
                warnings.warn(f"dynprobe: ghost spawn steps {unreached} were never reached (the run ended at "
                              f"step {self._clock.step})", RuntimeWarning, stacklevel=3)
        attempt(self._parts.train_loss.flush, failures)
        attempt(self._parts.learning_rates.flush, failures)
        if self.writer.writes:
            attempt(self._recorder.materialize, failures)
        attempt(self._recorder.release, failures)
        fields: dict[str, Any] = {"status": status, "final_step": self._clock.step}
        if reason:
            fields["status_reason"] = reason
        attempt(lambda: self.writer.update_manifest(**fields), failures)
        attempt(lambda: self.writer.event("close", step=self._clock.step, status=status, reason=reason), failures)
        attempt(self.writer.close, failures)  # releases the run's writer lock
        if failures and status != "probe_failed":
            self._guard.run(lambda: _raise_close_failure(failures), step=self._clock.step)


# help(dynprobe.Probe) and inspect.signature show every option with its default, from ProbeOptions' fields.
Probe.__signature__ = probe_signature(list(inspect.signature(Probe.__init__).parameters.values())[1:-1])  # type: ignore[attr-defined]


def _raise_close_failure(failures: list[str]) -> None:
    raise OSError("closing the run failed: " + "; ".join(failures))


@atexit.register
def _close_open_probes() -> None:
    for probe in list(_OPEN_PROBES):
        try:
            probe.close()
        except Exception:  # noqa: BLE001 - interpreter exit: report, never raise
            traceback.print_exc()
