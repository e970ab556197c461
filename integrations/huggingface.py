"""Hugging Face ``transformers.Trainer``: ``DynprobeCallback(eval_data=..., **probe_options)``.

::

    from .huggingface import DynprobeCallback

    callback = DynprobeCallback(eval_data=(eval_inputs, eval_labels), ghosts=dynprobe.Ghosts(at=[0, 50]))
    Trainer(model=model, args=args, train_dataset=train, callbacks=[callback]).train()
    # the run is written to <args.output_dir>/dynprobe

How it maps onto the Trainer:

* **attach** at ``on_train_begin``: the probe watches the ``model`` and the torch optimizer inside the
  ``optimizer`` the Trainer passes to callbacks (Accelerate's wrapper is looked through). Its clock is the optimizer's
  steps, equal to ``state.global_step``; a training resumed from a checkpoint continues the dynprobe run.
* **the loss**: the model computes it (``outputs.loss``, or ``outputs[0]`` for tuple outputs) from dict /
  ``BatchEncoding`` inputs that include ``labels``; the probe's forward hooks capture the inputs, the RNG state and
  the loss's gradient scale (which carries the Trainer's division by ``gradient_accumulation_steps``), so ghosts
  replay exactly the Trainer's micro-batches.
* **clipping**: ``args.max_grad_norm`` (> 0) is declared to the ghosts (``Ghosts(clip_grad_norm=...)``).
* **training loss**: a forward hook on the model hands every training forward's ``outputs.loss`` to
  ``probe.record_training_loss`` (``run.train_loss``: the mean over the step's micro-batches; when the Trainer
  passes ``num_items_in_batch``, the model's loss is a share of the accumulated batch's and is scaled back by
  ``gradient_accumulation_steps``).
* **close** at ``on_train_end``.

Ghosts cannot replay a loss the Trainer computes outside the model — ``label_smoothing_factor``, a
``compute_loss_func`` or an overridden ``compute_loss`` — the first is an error at attach, the others are caught by
the ε = 0 control ghost (a ``control_drift`` event and a warning).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

try:
    import transformers
except ImportError as _error:  # pragma: no cover
    raise ImportError("dynprobe.integrations.huggingface needs transformers: pip install transformers accelerate "
                      "(or, in the dynprobe checkout, pip install -e '.[huggingface]')") from _error

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

__all__ = ["DynprobeCallback", "output_loss"]

_MINIMUM = (4, 40)


def output_loss(output: Any) -> torch.Tensor:
    """The loss a Hugging Face model returns: ``output["loss"]`` (``ModelOutput``, dict) or ``output[0]``
    (``return_dict=False``), as ``Trainer.compute_loss`` reads it."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None and isinstance(output, (tuple, list)) and output:
        loss = output[0]
    if not isinstance(loss, torch.Tensor):
        raise ValueError(f"the model returned no loss ({type(output).__name__}); ghosts need models that compute "
                         "their loss: pass labels in the training inputs")
    return loss


def eval_pairs(eval_data: Any) -> Any:
    """``eval_data`` as the probe takes it; a batch mapping with ``labels`` (e.g. a tokenizer's
    ``BatchEncoding`` plus labels) is split into ``(inputs, labels)``."""
    if isinstance(eval_data, Mapping) and "labels" in eval_data:
        inputs = {name: value for name, value in eval_data.items() if name != "labels"}
        return inputs, torch.as_tensor(eval_data["labels"])
    return eval_data


class DynprobeCallback(transformers.TrainerCallback):
    """Attach a :class:`dynprobe.Probe` to ``Trainer.train`` (see :mod:`dynprobe.integrations.huggingface`).

    Args:
        eval_data: the eval set (required; the Trainer does not hand its eval dataset to callbacks):
            ``(inputs, labels)`` with inputs a dict of tensors, a batch mapping with a ``labels`` entry, or a
            DataLoader of ``(inputs, labels)`` pairs.
        exporters: per-snapshot scalars to dashboards: ``"tensorboard"`` (into ``args.logging_dir`` when set, else
            ``<run>/tensorboard``), ``"wandb"`` (the active run), or objects from :mod:`dynprobe.exporters`.
        **probe_options: any other keyword argument of :class:`dynprobe.Probe` except ``model``/``optimizer``;
            ``out`` defaults to ``<args.output_dir>/dynprobe``, ``total_steps`` to ``state.max_steps``.

    After training, ``callback.probe.out`` is the run directory.
    """

    def __init__(self, *, eval_data: Any = None, exporters: Any = None, **probe_options: Any) -> None:
        check_version("transformers", transformers.__version__, _MINIMUM, "transformers")
        if eval_data is None:
            raise ValueError("DynprobeCallback(eval_data=...) is required: (inputs, labels) with inputs a dict of "
                             "tensors (what model(**inputs) takes), or a batch dict that includes 'labels'")
        self._options = checked_probe_options("Hugging Face", {**probe_options, "eval_data": eval_pairs(eval_data)})
        check_exporters(exporters)
        self._exporter_spec = exporters
        self.probe: dynprobe.Probe | None = None
        self.exporters: list[Any] = []
        self._warned_clock = False
        self._loss_hook: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if self.probe is not None:
            raise RuntimeError("this DynprobeCallback already recorded a training; create a new one per train()")
        if model is None:
            raise ValueError("DynprobeCallback received no model from the Trainer")
        optimizer = _torch_optimizer(optimizer)
        options = dict(self._options)
        ghosts = options.get("ghosts")
        if ghosts is not None:
            if getattr(args, "label_smoothing_factor", 0):
                raise ValueError("dynprobe ghosts replay the loss the model returns; label_smoothing_factor makes the "
                                 "Trainer compute another loss. Set it to 0 or remove ghosts=")
            if getattr(args, "fp16", False):
                raise ValueError("dynprobe ghosts do not support fp16 (GradScaler) through the Trainer; use bf16 or "
                                 "fp32, or remove ghosts=")
            clip = declared_clipping(getattr(args, "max_grad_norm", None), "norm")
            options["ghosts"] = sequential_ghosts(ghosts, "Hugging Face", **clip)
            options.setdefault("loss_from_output", output_loss)
        if options.get("total_steps") is None and getattr(state, "max_steps", 0) and state.max_steps > 0:
            options["total_steps"] = int(state.max_steps)
        out = Path(options.pop("out", None) or default_out(args.output_dir))
        logging_dir = getattr(args, "logging_dir", None)
        self.exporters = resolved_exporters(self._exporter_spec,
                                            tensorboard_dir=lambda: logging_dir or out / "tensorboard")
        self.probe = open_probe(model, optimizer, options=options, out=out, start_step=int(state.global_step),
                                exporters=self.exporters, framework="Hugging Face")
        self._loss_hook = model.register_forward_hook(
            _training_loss_recorder(self.probe, model, int(getattr(args, "gradient_accumulation_steps", 1) or 1)),
            with_kwargs=True)
        if ghosts is not None and not getattr(args, "max_grad_norm", 0) > 0:
            # Without clipping (max_grad_norm <= 0) the Trainer still measures the gradient norm with
            # clip_grad_norm_(params, inf), which multiplies every gradient by exactly 1.0 in place: a no-op that
            # the probe's gradient-edit detector would report at every step. The ε = 0 control still checks it.
            self.probe.ignore_gradient_edits()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        probe = self.probe
        if self._warned_clock or probe is None or not probe.attached:
            return
        if probe.global_step != state.global_step:
            self._warned_clock = True
            warnings.warn(f"dynprobe: the probe's step ({probe.global_step}) differs from state.global_step "
                          f"({state.global_step}) (optimizer steps skipped?); snapshots are labelled with optimizer "
                          "steps taken", RuntimeWarning, stacklevel=2)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.probe is not None:
            try:
                self.probe.close()
            finally:
                if self._loss_hook is not None:
                    self._loss_hook.remove()
                close_exporters(self.exporters)


def _training_loss_recorder(probe: dynprobe.Probe, model: torch.nn.Module, accumulation: int) -> Any:
    """A forward hook handing each training forward's loss to the probe (``run.train_loss``).

    A plain function (a closure), not a bound method: ghosts are deep copies of the model and carry its hooks, and
    ``copy.deepcopy`` shares functions instead of copying what they reference; the ``module is model`` test then
    ignores the ghosts' forwards (and the probe ignores calls made while it works).
    """
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if module is not model or not module.training or not torch.is_grad_enabled():
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return  # no labels in this forward, or a loss the Trainer computes outside the model
        if kwargs.get("num_items_in_batch") is not None:  # a share of the accumulated batch's loss
            loss = loss.detach() * accumulation
        probe.record_training_loss(loss)
    return hook


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer the Trainer steps (inside Accelerate's ``AcceleratedOptimizer``)."""
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    raise ValueError(f"DynprobeCallback needs the Trainer's torch optimizer; got {type(optimizer).__name__}. Use "
                     "dynprobe.Probe(model, optimizer, ...) directly with this optimizer")
