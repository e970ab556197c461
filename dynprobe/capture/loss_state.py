"""The state a watched loss keeps between calls, and copies of the loss that keep their own.

Ghosts recompute the watched loss on their own outputs. A loss object that keeps state — a call counter driving a
curriculum, running statistics, an EMA of the loss — must not be called on their behalf: each extra call advances
the user's state and changes the main run. So every replica computes its loss with its own copy
(:func:`copy_loss`, a ``deepcopy`` in which the main model's modules, parameters and buffers map to the replica's),
which advances once per replica step exactly as the user's advances once per main step; the ε = 0 control stays
bitwise equal to the main run.

A copy cannot separate state that it shares with the original: a plain function's closure cells and globals (a
``deepcopy`` of a function is the function itself). :func:`loss_state` reads what can be seen of a loss's state
without a device synchronisation — scalar attributes by value, tensors by identity and version counter (an in-place
update bumps it, a reassignment changes the identity), walked through attributes, containers, ``functools.partial``
and closure cells — so that the probe can tell that the state changed across calls (:func:`state_changes`) and
whether a copy shares any of it (:func:`shared_state`). Globals and objects outside this walk are not seen.
"""
from __future__ import annotations

import copy
import functools
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["LossState", "copy_loss", "loss_state", "module_memo", "shared_state", "state_changes"]

_MAX_DEPTH = 6
_MAX_ITEMS = 64  # per container: a loss holding a large table is read by its first entries
_ATOMIC = (int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device)
_OPAQUE = (type, types.ModuleType, types.BuiltinFunctionType, types.CodeType)


@dataclass
class LossState:
    """What :func:`loss_state` saw: ``tokens`` by attribute path (``"calls"``, ``"_buffers.running"``,
    ``"<closure>.count"``), and the ids of the mutable objects walked (containers, instances, tensors, cells).
    ``keep`` holds the tensors walked, so that their ids stay unique while this state is compared."""

    tokens: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    mutable: set[int] = field(default_factory=set)
    keep: list[Any] = field(default_factory=list)


def loss_state(loss_fn: Any, exclude: set[int]) -> LossState:
    """The visible state of ``loss_fn`` (see the module docstring); objects whose ids are in ``exclude`` (the model,
    its parameters and buffers, the optimizer, the probe) are not walked. No device synchronisation."""
    state = LossState()
    seen: set[int] = set(exclude)
    for path, value in _walk(loss_fn, "", 0, seen, state):
        state.tokens[path] = _token(value, state)
    return state


def state_changes(before: LossState, after: LossState) -> list[str]:
    """The attribute paths whose value, tensor identity or tensor version differ between two readings."""
    return sorted(path for path in before.tokens.keys() | after.tokens.keys()
                  if before.tokens.get(path) != after.tokens.get(path))


def shared_state(original: Any, copied: Any, exclude: set[int]) -> bool:
    """Whether ``copied`` reaches a mutable object that ``original`` reaches too (outside ``exclude``): then a call
    of the copy can change the original's state."""
    return bool(loss_state(original, exclude).mutable & loss_state(copied, exclude).mutable)


def module_memo(model: nn.Module, replica: nn.Module) -> dict[int, Any]:
    """A ``deepcopy`` memo mapping ``model``'s modules, parameters and buffers to ``replica``'s (same structure)."""
    memo: dict[int, Any] = {}
    for ours, theirs in ((model.modules(), replica.modules()), (model.parameters(), replica.parameters()),
                         (model.buffers(), replica.buffers())):
        memo.update((id(a), b) for a, b in zip(ours, theirs))
    return memo


def copy_loss(loss_fn: Callable[..., Any], memo: Mapping[int, Any]) -> Callable[..., Any]:
    """``deepcopy(loss_fn)`` with ``memo``'s objects mapped as it says (shared objects map to themselves).

    Raises ``ValueError`` naming the fix when the loss cannot be copied."""
    try:
        return copy.deepcopy(loss_fn, dict(memo))
    except Exception as error:  # noqa: BLE001 - any failure of a user object's copy is reported the same way
        raise ValueError(
            f"ghosts compute their loss with their own copy of the watched loss (so that your loss object, and any "
            f"state it keeps, is only called by your loop), but copy.deepcopy({type(loss_fn).__name__}) failed "
            f"({type(error).__name__}: {error}). Make the loss deep-copyable, pass ghosts a stateless loss with "
            "Ghosts(loss_fn=...), or run without ghosts (ghosts=None)") from None


def _walk(value: Any, path: str, depth: int, seen: set[int], state: LossState) -> Iterator[tuple[str, Any]]:
    if isinstance(value, _ATOMIC) or isinstance(value, _OPAQUE):
        yield path, value
        return
    if id(value) in seen or depth > _MAX_DEPTH:
        return
    seen.add(id(value))
    if isinstance(value, (torch.Tensor, np.ndarray)):
        state.mutable.add(id(value))
        yield path, value
        return
    prefix = f"{path}." if path else ""
    children: list[tuple[str, Any]] = []
    if isinstance(value, (types.FunctionType, types.MethodType, functools.partial)):
        if isinstance(value, types.MethodType):
            children.append(("<self>", value.__self__))
        elif isinstance(value, functools.partial):
            children += [("<func>", value.func), ("<args>", value.args), ("<keywords>", value.keywords)]
        else:
            cells = value.__closure__ or ()
            state.mutable.update(id(cell) for cell in cells)
            children += [(f"<closure>.{name}", cell.cell_contents) for name, cell in
                         zip(value.__code__.co_freevars, cells) if _cell_filled(cell)]
            children += [("<defaults>", value.__defaults__), ("<kwdefaults>", value.__kwdefaults__)]
    elif isinstance(value, Mapping):
        state.mutable.add(id(value))
        yield f"{prefix}<len>", len(value)
        children += [(str(key), item) for key, item in list(value.items())[:_MAX_ITEMS]]
    elif isinstance(value, (list, tuple, set, frozenset)):
        if not isinstance(value, (tuple, frozenset)):
            state.mutable.add(id(value))
        yield f"{prefix}<len>", len(value)
        items = value if isinstance(value, (list, tuple)) else sorted(value, key=repr)
        children += [(str(i), item) for i, item in enumerate(list(items)[:_MAX_ITEMS])]
    elif hasattr(value, "__dict__"):
        state.mutable.add(id(value))
        children += list(vars(value).items())[:_MAX_ITEMS * 4]
    else:
        yield path, type(value).__name__
        return
    for name, child in children:
        yield from _walk(child, prefix + name, depth + 1, seen, state)


def _cell_filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _token(value: Any, state: LossState) -> tuple[Any, ...]:
    if isinstance(value, torch.Tensor):
        state.keep.append(value)
        return "tensor", id(value), value._version
    if isinstance(value, np.ndarray):
        small = value.size <= 4096
        return "ndarray", id(value), value.shape, hash(value.tobytes()) if small else None
    if isinstance(value, _ATOMIC):
        return "value", repr(value)
    return "object", id(value) if isinstance(value, _OPAQUE) else repr(type(value))
