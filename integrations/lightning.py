"""PyTorch Lightning: ``DynprobeCallback(**probe_options)`` attaches a :class:`dynprobe.Probe` to a ``Trainer.fit``.

::

    from .lightning import DynprobeCallback

    trainer = lightning.Trainer(max_steps=2000, callbacks=[DynprobeCallback(ghosts=dynprobe.Ghosts(at=[0, 100]))])
    trainer.fit(module, datamodule)        # the run is written to <trainer.log_dir>/dynprobe

Works with ``lightning`` (2.1+) and the ``pytorch_lightning`` package of the same versions
(``dynprobe.integrations.lightning.PLDynprobeCallback``).

How it maps onto Lightning:

* **attach** at ``on_fit_start`` (optimizers exist, a checkpoint's step is restored): the probe watches the
  LightningModule and ``trainer.optimizers[0]``; its clock is the optimizer's steps, equal to
  ``trainer.global_step``. A fit restored from a checkpoint continues the run (``resume=True``).
* **eval set**: ``eval_data=`` if given, else the fit's validation dataloader (read once under a forked RNG).
* **ghosts** replay the module's own ``training_step(batch, batch_idx)`` on a deep copy of the module (sequential
  ghosts: the ε = 0 control stays bitwise equal to the main run). The batch and the RNG state are captured at
  ``on_train_batch_start`` (after the batch reached the device), the loss at ``on_before_backward``; a ghost
  divides its ``training_step`` loss by ``accumulate_grad_batches`` exactly as Lightning does, runs under the
  precision plugin's ``train_step_context`` (autocast for ``bf16-mixed``), and applies the trainer's
  ``gradient_clip_val`` / ``gradient_clip_algorithm``. In a ghost, ``self.log``, ``self.log_dict`` and
  ``self.print`` do nothing; ``self.trainer``, ``self.global_step`` and ``self.current_epoch`` are the real ones.
* **close** at ``on_fit_end`` (status ``closed``) or ``on_exception`` (status ``failed``).

Unsupported with ghosts (a clear error at attach): manual optimization, several optimizers, ``16-mixed``
precision (GradScaler). Without ghosts these work: the probe only reads parameters at optimizer steps.
"""
from __future__ import annotations

import functools
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dynprobe
from dynprobe.exporters import check_exporters

from ._common import (
    check_version,
    checked_probe_options,
    close_exporters,
    declared_clipping,
    default_out,
    open_probe,
    resolved_exporters,
    sequential_ghosts,
)

try:  # the `lightning` package; `pytorch_lightning` is the same code under another name
    import lightning.pytorch as _pl
except ImportError:  # pragma: no cover - depends on what is installed
    _pl = None
if _pl is None:
    try:
        import pytorch_lightning as _pl
    except ImportError as _error:  # pragma: no cover
        raise ImportError("dynprobe.integrations.lightning needs PyTorch Lightning: pip install lightning "
                          "(or, in the dynprobe checkout, pip install -e '.[lightning]')") from _error

__all__ = ["DynprobeCallback", "LightningStepModel", "PLDynprobeCallback"]  # noqa: F822 - from __getattr__

_MINIMUM = (2, 1)


class _TrainingStepCall:
    """A captured ``training_step(batch, batch_idx)`` call (what a ghost replays)."""

    __slots__ = ("batch", "batch_idx")

    def __init__(self, batch: Any, batch_idx: int) -> None:
        self.batch, self.batch_idx = batch, batch_idx


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


def _closure_loss(output: Any, normalize: int) -> torch.Tensor:
    """The loss Lightning backpropagates for a ``training_step`` output: the tensor (or ``output["loss"]``) divided
    by ``accumulate_grad_batches`` — the same operation as Lightning's ``ClosureResult``, so bit for bit the same."""
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, torch.Tensor):
        raise ValueError("a ghost's training_step returned no loss (a tensor or a dict with 'loss')")
    return loss / normalize


class LightningStepModel(nn.Module):
    """The module the probe watches under Lightning: the LightningModule as its only child ``module``.

    ``model(x)`` is the LightningModule's forward (evaluations, the eNTK); a ghost — a deep copy of this wrapper —
    called with a captured :class:`_TrainingStepCall` runs its copy's ``training_step`` instead. Parameter names
    in the run carry the ``module.`` prefix (strip it to load ``run.state_dict(step=t)`` into the LightningModule).
    The trainer is held by a weak reference, so deep copies share it instead of copying it (``LightningModule``
    itself drops its trainer reference when copied).
    """

    def __init__(self, module: nn.Module, trainer: Any) -> None:
        super().__init__()
        self.module = module
        self._trainer_ref = weakref.ref(trainer)
        self._ghost_ready = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and isinstance(args[0], _TrainingStepCall):
            return self._training_step(args[0])
        return self.module(*args, **kwargs)

    def _training_step(self, call: _TrainingStepCall) -> Any:
        trainer = self._trainer_ref()
        if trainer is None:
            raise RuntimeError("the Lightning trainer is gone")
        if not self._ghost_ready:  # first replay on this copy: make it a silent replica of the main module
            for module in self.module.modules():
                if hasattr(module, "log") and hasattr(module, "training_step"):
                    module.trainer = trainer
                    module.log = module.log_dict = module.print = _no_op
            self._ghost_ready = True
        with trainer.precision_plugin.train_step_context():
            return self.module.training_step(call.batch, call.batch_idx)


def _make_callback_class(pl: Any) -> type:
    base = pl.Callback

    class _DynprobeCallback(base):
        __doc__ = DYNPROBE_CALLBACK_DOC

        def __init__(self, *, exporters: Any = None, **probe_options: Any) -> None:
            check_version("lightning", pl.__version__, _MINIMUM, "lightning")
            self._options = checked_probe_options("Lightning", probe_options)
            self._exporter_spec = exporters
            check_exporters(exporters)  # names and installed packages fail now, not after the trainer's setup
            self.probe: dynprobe.Probe | None = None
            self.exporters: list[Any] = []
            self._accumulate = 1

        # -------------------------------------------------------------------------------------- attach

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            if self.probe is not None:
                raise RuntimeError("this DynprobeCallback already recorded a fit; create a new one per fit")
            options = dict(self._options)
            optimizers = list(trainer.optimizers)
            if not optimizers:
                raise ValueError("DynprobeCallback found no optimizer: configure_optimizers() must return one")
            ghosts = options.get("ghosts")
            if ghosts is not None:
                if len(optimizers) > 1:
                    raise ValueError("dynprobe ghosts support one optimizer; this module configures "
                                     f"{len(optimizers)}. Remove ghosts= to probe without them")
                if not pl_module.automatic_optimization:
                    raise ValueError("dynprobe ghosts replay training_step under automatic optimization; this module "
                                     "sets automatic_optimization=False. Remove ghosts= to probe without them")
                if str(trainer.precision).startswith("16"):
                    raise ValueError(f"dynprobe ghosts do not support precision={trainer.precision!r} (GradScaler) "
                                     "through Lightning; use 32-true or bf16-mixed, or remove ghosts=")
                clip = declared_clipping(trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
                options["ghosts"] = sequential_ghosts(ghosts, "Lightning", **clip)
                # Not a bound method: the probe's hooks (and what they reference) are deep-copied into ghosts.
                options["loss_from_output"] = functools.partial(_closure_loss,
                                                                normalize=int(trainer.accumulate_grad_batches))
            if options.get("eval_data") is None:
                options["eval_data"] = _validation_data(trainer)
            if options.get("total_steps") is None and trainer.max_steps and trainer.max_steps > 0:
                options["total_steps"] = int(trainer.max_steps)
            out = Path(options.pop("out", None) or default_out(trainer.log_dir or trainer.default_root_dir))
            self.exporters = resolved_exporters(
                self._exporter_spec, tensorboard_dir=lambda: out / "tensorboard",
                tensorboard_writer=lambda: _tensorboard_writer(trainer))
            model = LightningStepModel(pl_module, trainer)
            self._accumulate = max(1, int(trainer.accumulate_grad_batches))
            self.probe = open_probe(model, optimizer=optimizers[0], options=options, out=out,
                                    start_step=int(trainer.global_step), exporters=self.exporters,
                                    framework="Lightning")

        # -------------------------------------------------------------------------------------- capture

        # Lightning never calls the wrapper the probe watches: the forward and its loss are handed over here.

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.probe is not None:
                self.probe.record_forward(_TrainingStepCall(batch, batch_idx))

        def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
            # ``loss`` is training_step's loss divided by accumulate_grad_batches (what is backpropagated and what
            # ghosts replay); run.train_loss records the training_step loss itself.
            if self.probe is not None:
                self.probe.record_forward_loss(loss, training_loss=loss.detach() * self._accumulate)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            probe = self.probe
            if probe is not None and probe.attached and probe.global_step != trainer.global_step:
                if not getattr(self, "_warned_clock", False):
                    self._warned_clock = True
                    warnings.warn(f"dynprobe: the probe's step ({probe.global_step}) differs from "
                                  f"trainer.global_step ({trainer.global_step}); snapshots are labelled with "
                                  "optimizer steps taken", RuntimeWarning, stacklevel=2)

        # -------------------------------------------------------------------------------------- close

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            self._finish(None)

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            self._finish(exception)

        def _finish(self, error: BaseException | None) -> None:
            if self.probe is None:
                return
            try:
                if error is None:
                    self.probe.close()
                else:
                    self.probe.__exit__(type(error), error, error.__traceback__)
            finally:
                close_exporters(self.exporters)

    return _DynprobeCallback


DYNPROBE_CALLBACK_DOC = """Attach a :class:`dynprobe.Probe` to ``Trainer.fit`` (:mod:`dynprobe.integrations.lightning`).

    Args:
        exporters: per-snapshot scalars to dashboards: ``"tensorboard"`` (into the trainer's TensorBoardLogger
            when it has one, else ``<run>/tensorboard``), ``"wandb"`` (the active run), or exporter objects from
            :mod:`dynprobe.exporters`.
        **probe_options: any keyword argument of :class:`dynprobe.Probe` except ``model``/``optimizer``. Defaults
            that differ: ``out`` = ``<trainer.log_dir>/dynprobe``; ``eval_data`` = the validation dataloader;
            ``total_steps`` = ``trainer.max_steps``.

    After ``fit``, ``callback.probe.out`` is the run directory (``dynprobe.load_run(callback.probe.out)``).
    """


def _validation_data(trainer: Any) -> Any:
    """The fit's validation dataloader (from the datamodule, the module or ``fit(val_dataloaders=...)``)."""
    loader = None
    try:
        source = trainer.fit_loop.epoch_loop.val_loop._data_source
        if source.instance is not None and source.is_defined():
            with torch.random.fork_rng(devices=[]):  # building a user's dataloader may draw random numbers
                loader = source.dataloader()
    except AttributeError:  # a Lightning version that keeps the source elsewhere
        loader = None
    if isinstance(loader, (list, tuple)) and loader:
        loader = loader[0]
    if isinstance(loader, dict) and loader:
        loader = next(iter(loader.values()))
    if not isinstance(loader, torch.utils.data.DataLoader):
        raise ValueError("DynprobeCallback needs an eval set: pass eval_data=(inputs, targets) (or a DataLoader of "
                         "such pairs), or give the fit a validation dataloader")
    return loader


def _tensorboard_writer(trainer: Any) -> Any:
    for logger in getattr(trainer, "loggers", []):
        if type(logger).__name__ == "TensorBoardLogger":
            return logger.experiment
    return None


def _named(cls: type, name: str) -> type:
    cls.__name__ = cls.__qualname__ = name
    return cls


DynprobeCallback = _named(_make_callback_class(_pl), "DynprobeCallback")


def __getattr__(name: str) -> Any:
    """``PLDynprobeCallback``: the same callback for the ``pytorch_lightning`` package (imported on first use)."""
    if name == "PLDynprobeCallback":
        import pytorch_lightning

        cls = _named(_make_callback_class(pytorch_lightning), "PLDynprobeCallback")
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
