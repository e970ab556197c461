"""Validation of the probe's inputs: every mistake fails at ``Probe(...)``, naming the argument and the fix."""
from __future__ import annotations

import numbers
import warnings
from typing import Any

import torch
from torch import nn

__all__ = ["check_int", "check_model", "check_optimizer", "is_int"]


def check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "model has no trainable parameters (none with requires_grad=True): there is no trajectory to probe. "
            "Attach the probe to the module you train"
        )
    meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t is not None and t.is_meta]
    if meta:
        raise ValueError(
            f"model has {len(meta)} tensors on the meta device (shapes without values, e.g. {meta[0]!r}); "
            "materialize the model (model.to_empty(device=...) and load or initialize its weights) before "
            "attaching the probe"
        )
    return model


def check_optimizer(optimizer: Any, model: nn.Module) -> torch.optim.Optimizer:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not owned & {id(p) for _, p in trainable}:
        raise ValueError(
            "optimizer does not own any of the model's trainable parameters: pass the optimizer that trains this "
            f"model (e.g. torch.optim.SGD(model.parameters(), ...)); the model has {len(trainable)} trainable tensors"
        )
    missing = [name for name, p in trainable if id(p) not in owned]
    if missing:
        warnings.warn(
            f"{len(missing)} trainable parameters of the model are not in the optimizer (e.g. {missing[0]!r}); they "
            "are still part of vec(θ) for C. Set requires_grad=False on parameters you do not train",
            stacklevel=3,
        )
    return optimizer


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer: a Python or numpy integer, never a bool. The package's one integer test."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, *, minimum: int = 1, hint: str = "") -> int:
    """``value`` as an int (:func:`is_int`), at least ``minimum``; else ``TypeError`` (not an integer) or
    ``ValueError`` (too small) saying ``"{name} must be an int >= {minimum}; got {value!r}"``, then ``hint``."""
    if not is_int(value) or value < minimum:
        error = ValueError if is_int(value) else TypeError
        raise error(f"{name} must be an int >= {minimum}; got {value!r}" + (f". {hint}" if hint else ""))
    return int(value)
