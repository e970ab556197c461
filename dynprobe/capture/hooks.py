"""Wiring the probe into a training loop through public PyTorch hooks (nothing is monkey-patched).

* :class:`CaptureHooks` — ``Module.register_forward_pre_hook(with_kwargs=True)`` and
  ``register_forward_hook(with_kwargs=True)`` on the main model feed a :class:`dynprobe.capture.step.StepCapture`
  with every training-mode forward (inputs, RNG, autocast, output); only needed when ghosts are on.
* :class:`GradEditDetector` — ``Tensor.register_post_accumulate_grad_hook`` records each gradient's version
  counter after backward, and ``Optimizer.register_step_pre_hook`` checks it before the step: a changed
  counter means user code edited gradients in between (``clip_grad_norm_``, ``clip_grad_value_``,
  ``grad.mul_``), which ghosts cannot see unless told. Edits through ``.data`` bypass version counters and are
  caught only by the control ghost.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .step import StepCapture

__all__ = ["CaptureHooks", "GradEditDetector"]


class CaptureHooks:
    """Forward hooks on the main model that record training forwards into ``capture``.

    Args:
        model: the main model; hooks ignore any other module (ghosts are deep copies that carry the hooks).
        capture: where records go.
        is_busy: returns True while the probe itself runs the model (evaluations, ghosts): ignored.
        loss_from_output: for models that compute their own loss (Hugging Face style): maps the output to the
            loss tensor the user backpropagates.
    """

    def __init__(self, model: nn.Module, capture: StepCapture, is_busy: Callable[[], bool],
                 loss_from_output: Callable[[Any], torch.Tensor] | None = None) -> None:
        self.model, self.capture, self.is_busy = model, capture, is_busy
        self.loss_from_output = loss_from_output
        self.handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]

    def _records(self, module: nn.Module) -> bool:
        return module is self.model and module.training and torch.is_grad_enabled() and not self.is_busy()

    def _before_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._records(module):
            self.capture.on_forward(args, kwargs)

    def _after_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if self._records(module):
            self.capture.on_output(output)
            if self.loss_from_output is not None:
                loss = self.loss_from_output(output)
                if isinstance(loss, torch.Tensor) and loss.requires_grad:
                    self.capture.on_output_loss(loss)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class GradEditDetector:
    """Detects gradient edits between backward and the optimizer step (see the module docstring)."""

    def __init__(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                 on_edit: Callable[[], None]) -> None:
        self._ids = {id(p) for p in params}
        self._versions: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._on_edit = on_edit
        self.handles = [p.register_post_accumulate_grad_hook(self._after_accumulate) for p in params]
        self.handles.append(optimizer.register_step_pre_hook(self._before_step))

    def _after_accumulate(self, param: torch.Tensor) -> None:
        if id(param) in self._ids and param.grad is not None:  # ghosts' deep-copied parameters carry the hook
            self._versions[id(param)] = (param, param.grad, param.grad._version)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        edited = any(param.grad is not grad or grad._version != version
                     for param, grad, version in self._versions.values())
        self._versions.clear()
        if edited:
            self._on_edit()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
