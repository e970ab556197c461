"""Optimizers for a stack of replicas whose parameters are ``[R, *shape]`` tensors (:mod:`dynprobe.ghosts.stack`).

Two ways to step R replicas that live in one stacked tensor per parameter:

* :class:`StackedOptimizer` — one optimizer of the user's class over the stacked tensors. Exact (bitwise equal
  to R separate optimizers) only when every update is elementwise, so that stacking cannot mix replicas: SGD,
  Adam(W), RMSprop, Adagrad, Adamax, NAdam, RAdam (``tests/ghosts/test_stack.py`` checks each against per-replica
  optimizers). Their per-parameter state is either elementwise (momentum, moments: stacked along dim 0 like the
  parameter) or a step counter shared by all replicas (``step``, NAdam's ``mu_product``): replicas of one stack
  always descend from the same optimizer history, so those counters agree (checked when a replica is added).
* :class:`AliasOptimizers` — one optimizer per replica over *leaf aliases* of its rows (``stacked[r].detach()``,
  which share the stacked storage): any optimizer, including ones with per-tensor norms (LARS, LAMB) that a
  stacked optimizer would compute over all replicas at once. Slower: R optimizer steps.

Both are rebuilt whenever rows are added or removed (:meth:`rebuild`), keeping each surviving row's state, and
both copy the main optimizer's current per-group hyper-parameters before every step (:meth:`sync`).
"""
from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from dynprobe._util.modules import same_tensors

from .replica import sync_hyperparameters

__all__ = ["ELEMENTWISE_OPTIMIZERS", "AliasOptimizers", "StackedOptimizer", "RowSource", "is_elementwise"]

# Optimizer classes whose step is elementwise, with the state keys that are per-parameter scalars (shared by all
# replicas) rather than per-element tensors. Only these exact classes: a subclass may override step().
ELEMENTWISE_OPTIMIZERS: dict[type, frozenset[str]] = {
    torch.optim.SGD: frozenset(),
    torch.optim.Adam: frozenset({"step"}),
    torch.optim.AdamW: frozenset({"step"}),
    torch.optim.RMSprop: frozenset({"step"}),
    torch.optim.Adagrad: frozenset({"step"}),
    torch.optim.Adamax: frozenset({"step"}),
    torch.optim.NAdam: frozenset({"step", "mu_product"}),
    torch.optim.RAdam: frozenset({"step"}),
}


def is_elementwise(optimizer: torch.optim.Optimizer) -> bool:
    """Whether one optimizer of this class over stacked replicas equals per-replica optimizers bitwise."""
    return type(optimizer) in ELEMENTWISE_OPTIMIZERS


class RowSource(Protocol):
    """A replica outside the stack: its trainable tensors and an optimizer bound to exactly those tensors."""

    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer


def copy_without_state(optimizer: torch.optim.Optimizer, memo: dict[int, Any]) -> torch.optim.Optimizer:
    """``deepcopy(optimizer, memo)`` without copying its state (the copy's state is empty).

    Goes through a shallow copy, so the user's optimizer is never modified, not even temporarily.
    """
    memo = dict(memo)
    for group in optimizer.param_groups:  # tensors not remapped (frozen parameters) are shared, not copied
        for p in group["params"]:
            memo.setdefault(id(p), p)
    shallow = copy.copy(optimizer)
    shallow.state = defaultdict(dict)
    return copy.deepcopy(shallow, memo)


def _bind_groups(optimizer: torch.optim.Optimizer, tensors: Sequence[torch.Tensor]) -> None:
    """Keep only ``tensors`` in the param groups (frozen parameters of the template never train)."""
    keep = {id(t) for t in tensors}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) in keep]


class StackedOptimizer:
    """One optimizer of the user's (elementwise) class over the stacked ``[R, *shape]`` parameters.

    Args:
        template: the main optimizer: its class, param groups and defaults (never modified).
        main_params: the main model's trainable parameters, in stack order (row k of the stack is parameter k).
    """

    mode = "stacked"

    def __init__(self, template: torch.optim.Optimizer, main_params: Sequence[torch.Tensor]) -> None:
        if not is_elementwise(template):
            names = sorted(c.__name__ for c in ELEMENTWISE_OPTIMIZERS)
            raise ValueError(f"a stacked optimizer is exact only for {names}; "
                             f"got {type(template).__name__} (use per-replica optimizers)")
        self.template, self.main_params = template, list(main_params)
        self.scalar_keys = ELEMENTWISE_OPTIMIZERS[type(template)]
        self.optimizer: torch.optim.Optimizer | None = None
        self.stacked: list[torch.Tensor] = []

    def rebuild(self, stacked: list[torch.Tensor], keep: Sequence[int], new: Sequence[RowSource]) -> None:
        """Bind to new stacked tensors whose rows are the current rows ``keep`` followed by the ``new`` replicas."""
        optimizer = copy_without_state(self.template, {id(p): s for p, s in zip(self.main_params, stacked)})
        _bind_groups(optimizer, stacked)
        index = torch.tensor(list(keep), dtype=torch.long)
        for k, tensor in enumerate(stacked):
            old = self.optimizer.state.get(self.stacked[k], {}) if self.optimizer is not None and len(keep) else None
            rows = [source.optimizer.state.get(source.params[k], {}) for source in new]
            state = self._merge(old, index.to(tensor.device), rows)
            if state:
                optimizer.state[tensor] = state
        self.optimizer, self.stacked = optimizer, stacked

    def _merge(self, old: dict[str, Any] | None, keep: torch.Tensor, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """One stacked state from the kept rows of ``old`` (the current stacked state) and the new ``rows``."""
        sources = ([old] if old is not None else []) + rows
        layouts = {tuple(sorted(s)) for s in sources}
        if len(layouts) > 1:
            raise ValueError(f"replicas of one stack must share the optimizer state layout; got keys {sorted(layouts)}")
        merged: dict[str, Any] = {}
        for key in sources[0] if sources else ():
            values = [s[key] for s in sources]
            if key in self.scalar_keys or not isinstance(values[0], torch.Tensor):
                if not all(_same(values[0], v) for v in values[1:]):
                    raise ValueError(f"replicas of one stack must share the optimizer's {key!r} (a step counter); "
                                     f"got {values}")
                merged[key] = values[0].clone() if isinstance(values[0], torch.Tensor) else values[0]
                continue
            parts = [old[key][keep]] if old is not None else []
            parts += [row[key].detach().unsqueeze(0) for row in rows]
            merged[key] = torch.cat(parts)
        return merged

    def row_state(self, row: int) -> list[dict[str, Any]]:
        """Row ``row``'s state per parameter (views for elementwise entries)."""
        assert self.optimizer is not None
        states = []
        for tensor in self.stacked:
            state = self.optimizer.state.get(tensor, {})
            states.append({key: value if key in self.scalar_keys or not isinstance(value, torch.Tensor) else value[row]
                           for key, value in state.items()})
        return states

    def export(self, row: int, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """A stand-alone optimizer of the user's class over ``params`` with row ``row``'s state (copied)."""
        optimizer = copy_without_state(self.template, {id(p): t for p, t in zip(self.main_params, params)})
        _bind_groups(optimizer, params)
        if self.optimizer is not None:  # hyper-parameters as last synced, not the template's
            sync_hyperparameters(self.optimizer, optimizer)
        for tensor, state in zip(params, self.row_state(row)):
            if state:
                optimizer.state[tensor] = {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                                           for k, v in state.items()}
        return optimizer

    def sync(self, main: torch.optim.Optimizer) -> None:
        assert self.optimizer is not None
        sync_hyperparameters(main, self.optimizer)

    def step(self) -> None:
        assert self.optimizer is not None
        self.optimizer.step()


class AliasOptimizers:
    """One optimizer per replica (the user's class, deep-copied) over leaf aliases of the replica's rows.

    ``aliases[r][k] = stacked[k][r].detach().requires_grad_()`` shares the stacked storage, so a per-replica
    ``step()`` updates the stack in place; gradients are handed over as views ``stacked[k].grad[r]``.
    """

    mode = "per_replica"

    def __init__(self, template: torch.optim.Optimizer, main_params: Sequence[torch.Tensor]) -> None:
        self.template, self.main_params = template, list(main_params)
        self.optimizers: list[torch.optim.Optimizer] = []
        self.aliases: list[list[torch.Tensor]] = []
        self.stacked: list[torch.Tensor] = []

    def rebuild(self, stacked: list[torch.Tensor], keep: Sequence[int], new: Sequence[RowSource]) -> None:
        rows = len(keep) + len(new)
        aliases = [[tensor[r].detach().requires_grad_() for tensor in stacked] for r in range(rows)]
        sources = [(self.optimizers[r], self.aliases[r]) for r in keep] + [(s.optimizer, s.params) for s in new]
        optimizers = []
        for (optimizer, old), new_aliases in zip(sources, aliases):
            # A deep copy with a memo remaps every reference to the old tensors (param groups, state keys, and
            # anything an optimizer keeps itself) onto the new aliases.
            copied = copy.deepcopy(optimizer, {id(o): a for o, a in zip(old, new_aliases)})
            _bind_groups(copied, new_aliases)
            optimizers.append(copied)
        self.optimizers, self.aliases, self.stacked = optimizers, aliases, stacked

    def export(self, row: int, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return copy.deepcopy(self.optimizers[row], {id(a): p for a, p in zip(self.aliases[row], params)})

    def sync(self, main: torch.optim.Optimizer) -> None:
        for optimizer in self.optimizers:
            sync_hyperparameters(main, optimizer)

    def step(self) -> None:
        for row, (optimizer, aliases) in enumerate(zip(self.optimizers, self.aliases)):
            for alias, tensor in zip(aliases, self.stacked):
                alias.grad = tensor.grad[row] if tensor.grad is not None else None
            optimizer.step()
            for alias in aliases:
                alias.grad = None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and same_tensors({"value": a}, {"value": b})
    return a == b
