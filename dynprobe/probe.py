"""``Probe``: attaches to an unmodified training loop through public PyTorch hooks and orchestrates snapshots.

Two added lines::

    probe = dynprobe.Probe(model, optimizer, eval_data=(x_test, y_test), out="runs/exp")
    criterion = probe.watch(criterion)

The probe counts optimizer steps with ``Optimizer.register_step_post_hook`` (step t = t updates taken; step 0 =
the initialization, recorded when the probe attaches), and at each scheduled step it measures the model in a
side-effect-free way and appends one row to every interval matrix. This module holds no math: see
:mod:`dynprobe.snapshot` (measuring and committing), :mod:`dynprobe.metrics` (formulas), :mod:`dynprobe.writer`
(files).
"""
from __future__ import annotations

import atexit
import hashlib
import os
import platform
import sys
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ._version import __version__
from ._modules import device_of, eval_mode, preserved_rng, rng_devices, trainable_parameters
from .evaluation import EvalSet, check_logits, default_output_fn, forward, index_inputs, inputs_to
from .schedule import Schedule, as_schedule
from .snapshot import SnapshotData, SnapshotRecorder
from .writer import RunWriter, json_safe

__all__ = ["Probe", "ProbeError", "WatchedLoss"]

_OPEN_PROBES: weakref.WeakSet[Probe] = weakref.WeakSet()


class ProbeError(RuntimeError):
    """An error inside the probe while the user's training ran (raised only with ``errors="raise"``)."""


class WatchedLoss:
    """The user's loss function, unchanged in value and gradient, seen by the probe (``probe.watch``).

    Calls pass straight through; for training-mode calls (grad enabled) the probe notes the loss value (the
    run's ``train_loss``). Attribute access is forwarded, so ``criterion.weight`` still works.
    """

    def __init__(self, probe: Probe, loss_fn: Callable[..., torch.Tensor]) -> None:
        self._probe = probe
        self.loss_fn = loss_fn
        self.__wrapped__ = loss_fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        loss = self.loss_fn(*args, **kwargs)
        probe = self._probe
        if not probe._busy and torch.is_grad_enabled() and isinstance(loss, torch.Tensor) and loss.requires_grad:
            probe._on_training_loss(loss)
        return loss

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loss_fn"], name)

    def __repr__(self) -> str:
        return f"WatchedLoss({self.loss_fn!r})"


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
        resume: continue the run in ``out`` (after restoring your own checkpoint). ``resume_step`` says which
            step your training restarts from (default: the run's last snapshot); later snapshots are discarded.
        eval_max: at most this many eval examples (default 2,000).
        eval_batch_size: batch size of snapshot evaluations.
        output_fn: selects the ``(N, num_classes)`` logits from the model's output (default: the output itself,
            ``output.logits`` or ``output["logits"]``).
        seed: seeds the eval subsample (and, through configs, the eNTK probe set); never the global RNG.
        history_memory: bytes of earlier parameter vectors kept on the model's device to compute C rows in
            O(T) per snapshot; older vectors are streamed back from ``out``.
        snapshot_on_close: also snapshot the final step at ``close()`` if the schedule did not.
        errors: ``"warn"`` (default): an internal error during training is recorded in the run, warned about,
            and the probe detaches itself so the user's training goes on; ``"raise"``: re-raise it.

    The probe never changes training: it reads parameters, evaluates in eval mode under ``no_grad`` with the
    RNG state and every module's train/eval flag restored, and writes only to ``out``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        eval_data: Any,
        out: str | os.PathLike,
        schedule: Schedule | int | Iterable[int] | None = None,
        resume: bool = False,
        resume_step: int | None = None,
        eval_max: int = 2000,
        eval_batch_size: int = 256,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        seed: int = 0,
        history_memory: int = 512 * 2**20,
        snapshot_on_close: bool = True,
        errors: str = "warn",
    ) -> None:
        self._busy = True  # hooks ignore everything until the probe is fully attached
        self._closed = False
        self._handles: list[Any] = []
        self.model = _check_model(model)
        self.optimizer = _check_optimizer(optimizer, model)
        self.schedule = as_schedule(schedule)
        _check_positive_int("eval_max", eval_max)
        _check_positive_int("eval_batch_size", eval_batch_size)
        _check_positive_int("history_memory", history_memory, minimum=0)
        if errors not in ("warn", "raise"):
            raise ValueError(f"errors must be 'warn' or 'raise'; got {errors!r}")
        if resume_step is not None:
            _check_positive_int("resume_step", resume_step, minimum=0)
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable (output -> logits); got {type(output_fn).__name__}")
        self.errors = errors
        self.output_fn = output_fn or default_output_fn
        self.snapshot_on_close = bool(snapshot_on_close)
        self.device = device_of(model)
        self._named_params = trainable_parameters(model)
        self._params = [p for _, p in self._named_params]
        self.storage_dtype = torch.float64 if any(p.dtype == torch.float64 for p in self._params) else torch.float32

        self.eval_set = EvalSet.from_user(eval_data, max_examples=eval_max, seed=seed)
        self.num_classes = self._check_model_output()

        self.writer = RunWriter(out, self._manifest(seed, eval_max, eval_batch_size), resume=resume,
                                resume_step=resume_step)
        self.out = self.writer.root
        self.step_count = self.writer.resume_from_step(resume_step) if self.writer.resumed else 0
        if not self.writer.resumed:
            self.writer.save_run_array("eval_indices", self.eval_set.indices.numpy())
        self._recorder = SnapshotRecorder(
            self.writer, model, self._params, self.eval_set, device=self.device, storage_dtype=self.storage_dtype,
            output_fn=self.output_fn, eval_batch_size=eval_batch_size, history_memory=history_memory,
        )
        self._recent_losses: list[torch.Tensor] = []
        self._explicit = False
        self._hook_steps = 0

        self._handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        _OPEN_PROBES.add(self)
        self._busy = False
        if not self.writer.resumed:
            self._run_guarded(self._snapshot)

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
        return WatchedLoss(self, loss_fn)

    def step(self, inputs: Any = None, targets: Any = None) -> None:
        """Explicit alternative to the hooks: call ``probe.step(x, y)`` at the top of every iteration, *before*
        the forward pass, with the batch that the coming optimizer step trains on.

        The first call detaches the optimizer hook; from then on these calls are the probe's clock (step t's
        snapshot is taken at the call that starts iteration t + 1, or at ``close()``). Mixing both styles is an
        error. Explicit calls cannot see skipped steps (``GradScaler``) or gradient accumulation: count one call
        per optimizer step.
        """
        self._explicit_step(inputs, targets)

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

    # ------------------------------------------------------------------------------------------ hooks

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._busy or self._closed:
            return
        self._hook_steps += 1
        self.step_count += 1
        if self.step_count in self.schedule:
            self._run_guarded(self._snapshot)

    def _explicit_step(self, inputs: Any, targets: Any) -> None:
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
            self._handles[0].remove()  # from now on the explicit calls are the clock
        if self.step_count > 0 and self.step_count in self.schedule and not self._snapshotted(self.step_count):
            self._run_guarded(self._snapshot)
        self.step_count += 1

    def _on_training_loss(self, loss: torch.Tensor) -> None:
        self._recent_losses.append(loss.detach())
        if len(self._recent_losses) >= 4096:  # bound memory on long stretches without snapshots
            self._recent_losses = self._recent_losses[::2]

    # ------------------------------------------------------------------------------------------ snapshots

    def _snapshotted(self, step: int) -> bool:
        return bool(self.writer.snapshots) and self.writer.snapshots[-1]["step"] == step

    def _snapshot(self) -> None:
        data = self._recorder.measure(self.step_count)
        self._commit(data)

    def _commit(self, data: SnapshotData) -> None:
        record = {
            "train_loss": self._pop_train_loss(),
            "lr": [group.get("lr") for group in self.optimizer.param_groups],
        }
        self._recorder.commit(data, record)

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
            self._recorder.materialize()
        finally:
            fields: dict[str, Any] = {"status": status, "final_step": self.step_count}
            if reason:
                fields["status_reason"] = reason
            self.writer.update_manifest(**fields)
            self.writer.event("close", step=self.step_count, status=status, reason=reason)

    # ------------------------------------------------------------------------------------------ attach checks

    def _check_model_output(self) -> int:
        sample = inputs_to(index_inputs(self.eval_set.inputs, slice(0, 2)), self.device)
        targets = self.eval_set.targets[:2].to(self.device)
        with torch.no_grad(), eval_mode(self.model), preserved_rng(rng_devices(self.model)):
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

    def _manifest(self, seed: int, eval_max: int, eval_batch_size: int) -> dict[str, Any]:
        offset = 0
        parameters = []
        for name, p in self._named_params:
            parameters.append({"name": name, "shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", ""),
                               "offset": offset, "numel": p.numel()})
            offset += p.numel()
        buffers = [{"name": n, "shape": list(b.shape), "dtype": str(b.dtype).replace("torch.", "")}
                   for n, b in self.model.named_buffers() if b is not None]
        return {
            "dynprobe_version": __version__,
            "torch_version": torch.__version__,
            "numpy_version": np.__version__,
            "python_version": platform.python_version(),
            "command": " ".join(sys.argv),
            "config": {
                "schedule": self.schedule.to_config(),
                "eval_max": eval_max,
                "eval_batch_size": eval_batch_size,
                "seed": seed,
                "snapshot_on_close": self.snapshot_on_close,
            },
            "model": {
                "class": type(self.model).__name__,
                "num_parameters": offset,
                "storage_dtype": str(self.storage_dtype).replace("torch.", ""),
                "device": str(self.device),
                "parameters": parameters,
                "buffers": buffers,
            },
            "optimizer": {"class": type(self.optimizer).__name__, "defaults": json_safe(self.optimizer.defaults)},
            "eval": {"n": self.eval_set.n, "num_classes": self.num_classes, "fingerprint": self._eval_fingerprint()},
            "conventions": CONVENTIONS,
        }

    def _eval_fingerprint(self) -> str:
        digest = hashlib.sha1()
        digest.update(self.eval_set.targets.numpy().tobytes())
        inputs = self.eval_set.inputs
        tensors = [inputs] if isinstance(inputs, torch.Tensor) else [inputs[k] for k in sorted(inputs)]
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                digest.update(str(tuple(tensor.shape)).encode())
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


CONVENTIONS: dict[str, str] = {
    "step": "optimizer steps taken so far; step 0 is the initialization",
    "theta": "trainable parameters (requires_grad) in named_parameters() order, flattened",
    "C": "eq. (1): 1 - <θ_i, θ_j> / (‖θ_i‖‖θ_j‖), float64 accumulation",
    "D": "eq. (6): fraction of eval examples whose argmax prediction differs",
    "eval_loss": "mean cross-entropy of the logits on the eval set, model in eval mode",
    "train_loss": "mean of the watched training loss over the steps since the previous snapshot",
}


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "model has no trainable parameters (none with requires_grad=True): there is no trajectory to probe. "
            "Attach the probe to the module you train"
        )
    return model


def _check_optimizer(optimizer: Any, model: nn.Module) -> torch.optim.Optimizer:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    mine = {id(p) for p in model.parameters() if p.requires_grad}
    if not owned & mine:
        raise ValueError(
            "optimizer does not own any of the model's trainable parameters: pass the optimizer that trains this "
            f"model (e.g. torch.optim.SGD(model.parameters(), ...)); the model has {len(trainable)} trainable tensors"
        )
    missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
    if missing:
        warnings.warn(
            f"{len(missing)} trainable parameters of the model are not in the optimizer (e.g. {missing[0]!r}); they "
            "are still part of vec(θ) for C. Set requires_grad=False on parameters you do not train",
            stacklevel=3,
        )
    return optimizer


def _check_positive_int(name: str, value: Any, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")


@atexit.register
def _close_open_probes() -> None:
    for probe in list(_OPEN_PROBES):
        try:
            probe.close()
        except Exception:  # noqa: BLE001 - interpreter exit: report, never raise
            traceback.print_exc()

