"""Warnings that point at the user's line.

The probe runs inside hooks (``optimizer.step()``, a module's forward, a framework's callback), so a fixed
``stacklevel`` lands on a different frame depending on how deep the call chain is. :func:`warn_user` walks up the
stack past every frame of dynprobe itself and of the frameworks that call it (PyTorch, Lightning, Transformers,
Accelerate) and attributes the warning to the first frame outside them: the line in the user's script.
"""
from __future__ import annotations

import sys
import warnings

__all__ = ["user_stacklevel", "warn_user"]

_INTERNAL = ("dynprobe", "torch", "lightning", "pytorch_lightning", "lightning_fabric", "transformers", "accelerate",
             "contextlib", "functools", "weakref", "atexit")


def _internal(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in _INTERNAL)


def user_stacklevel(skip: int = 1) -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` call in the caller's frame, ``skip`` frames above this one) of
    the first frame outside dynprobe and the frameworks around it; the outermost frame if every frame is internal."""
    frame = sys._getframe(skip)
    level = 1
    while frame.f_back is not None and _internal(frame.f_globals.get("__name__", "")):
        frame = frame.f_back
        level += 1
    return level


def warn_user(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the user's line (see the module docstring)."""
    warnings.warn(message, category, stacklevel=user_stacklevel(2) + 1)
