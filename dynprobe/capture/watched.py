"""``probe.watch(loss_fn)``: the user's loss function, unchanged in value and gradient, seen by the probe."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["WatchedLoss"]

LossObserver = Callable[[torch.Tensor, tuple[Any, ...], dict[str, Any]], None]


class WatchedLoss:
    """A transparent wrapper of a loss function.

    Calls pass straight through and return exactly what ``loss_fn`` returns. For training-mode calls (grad
    enabled, a loss that requires grad) ``on_loss(loss, args, kwargs)`` is told about the call — the probe notes
    the training loss and, with ghosts, records the call so ghosts can replay it with their own output —
    unless ``muted()`` says the probe itself is calling (ghost replays, evaluations). Attribute access is
    forwarded, so ``criterion.weight`` still works.
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor], *, on_loss: LossObserver,
                 muted: Callable[[], bool]) -> None:
        self.loss_fn = loss_fn
        self.__wrapped__ = loss_fn
        self._on_loss = on_loss
        self._muted = muted

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        loss = self.loss_fn(*args, **kwargs)
        if not self._muted() and torch.is_grad_enabled() and isinstance(loss, torch.Tensor) and loss.requires_grad:
            self._on_loss(loss, args, kwargs)
        return loss

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loss_fn"], name)

    def __repr__(self) -> str:
        return f"WatchedLoss({self.loss_fn!r})"
