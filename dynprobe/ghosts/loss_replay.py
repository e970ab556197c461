"""How ghosts recompute the loss of a captured micro-batch without calling the user's loss object.

:class:`LossReplay` holds the watched loss (or ``loss_from_output``) and hands every replica its own copy
(:func:`dynprobe.capture.loss_state.copy_loss`): taken from the loss's state at the replica's spawn, or — for a
replica spawned before the loss was known (the step-0 spawn happens before ``probe.watch``) — from a copy taken when
the probe got the loss, before any call. A stateful loss (call counter, curriculum, running statistics) then
advances once per main step in the user's run and once per replica step in each replica.

:class:`LossIsolation` checks what copies cannot guarantee. Before the ghosts' step it reads the user's loss state
(:func:`dynprobe.capture.loss_state.loss_state`): a change since the previous reading means the loss is stateful
(recorded once, event ``stateful_loss``); a stateful loss whose state the copies share (a closure) refuses the ghosts
before any of their calls. After the ghosts' step it reads again: a change means a ghost changed the user's state
(state the walk cannot see as shared), and the ghosts stop.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dynprobe.capture.loss_state import LossState, copy_loss, loss_state, shared_state, state_changes

__all__ = ["LossIsolation", "LossReplay"]


@dataclass
class LossReplay:
    """The loss function of the main run (``loss_fn``, never called by a ghost) or ``loss_from_output`` (a function
    of the model output), and ``initial``: a copy of ``loss_fn`` as it was when the probe got it. ``shared`` maps the
    ids of objects every copy shares (the probe) to themselves."""

    loss_fn: Any = None
    loss_from_output: Any = None
    initial: Any = None
    shared: dict[int, Any] = field(default_factory=dict)

    def set_loss(self, loss_fn: Callable[..., Any] | None, keep: Mapping[int, Any]) -> None:
        """Take ``loss_fn`` (before any call of it through the probe) and copy it now, so that a copy that fails says
        so at once. ``keep``: objects the copy shares (the model, the optimizer), besides ``shared``."""
        self.loss_fn = loss_fn
        self.initial = copy_loss(loss_fn, {**self.shared, **keep}) if loss_fn is not None else None

    def copy_now(self, memo: Mapping[int, Any]) -> Callable[..., Any] | None:
        """A copy of the loss in its current state for a replica spawned now (None while the loss is unknown);
        ``memo`` maps the main model's objects to the replica's."""
        return copy_loss(self.loss_fn, {**self.shared, **memo}) if self.loss_fn is not None else None

    def copy_initial(self, memo: Mapping[int, Any]) -> Callable[..., Any] | None:
        """A copy of the loss as it was before any call (for a replica spawned before the loss was known)."""
        return copy_loss(self.initial, {**self.shared, **memo}) if self.initial is not None else None


class LossIsolation:
    """Keeps the user's loss object out of the ghosts' steps (module docstring).

    Args:
        replay: the run's :class:`LossReplay`.
        exclude: ids of objects the state walk skips (the model, its parameters and buffers, the optimizer, the
            probe): they change every step by design.
        on_stateful: called once with the changed attribute paths and whether the ghosts' copies are separate.
    """

    def __init__(self, replay: LossReplay, exclude: set[int],
                 on_stateful: Callable[[list[str], bool], None]) -> None:
        self.replay, self.exclude, self.on_stateful = replay, exclude, on_stateful
        self._last: LossState | None = None
        self._before: LossState | None = None
        self._watched: Any = None
        self.stateful: list[str] = []
        self.shares_state = False
        self.refused: str | None = None  # why the ghosts may no longer call the loss (they stop, none spawns)

    def _read(self) -> LossState | None:
        loss_fn = self.replay.loss_fn
        if loss_fn is not self._watched:  # a new loss: its first reading, and whether its copies share its state
            self._watched, self._last = loss_fn, None
            self.shares_state = loss_fn is not None and shared_state(loss_fn, self.replay.initial, self.exclude)
            self.stateful = []
        return loss_state(loss_fn, self.exclude) if loss_fn is not None else None

    def observe(self) -> None:
        """Read the loss's state now (when the probe gets the loss, before any call of it)."""
        state = self._read()
        self._note(state)
        self._last = state

    def before_step(self) -> str | None:
        """Read the user's loss state before the ghosts' step; returns why the ghosts must not call it (None: go)."""
        state = self._read()
        self._note(state)
        self._before = state
        if self.stateful and self.shares_state:
            changed = ", ".join(self.stateful[:3])
            self.refused = (f"the watched loss keeps state that changes on every call of your loop ({changed}) and "
                            "that a copy cannot separate (a function's closure or a shared object), so a ghost's "
                            "call would change your run. Keep that state in attributes of a loss object (an nn.Module "
                            "or a class instance: each ghost then gets its own deep copy), or pass ghosts a stateless "
                            "loss with Ghosts(loss_fn=...)")
        return self.refused

    def after_step(self) -> str | None:
        """Read the user's loss state after the ghosts' step; returns why the ghosts must stop (None: unchanged)."""
        state, before = self._read(), self._before
        self._last, self._before = state, None
        changed = state_changes(before, state) if state is not None and before is not None else []
        if not changed:
            return None
        self.refused = (f"a ghost's loss call changed the state of your watched loss ({', '.join(changed[:3])}): "
                        "the state is shared in a way the probe cannot copy. Keep it in attributes of a loss object "
                        "(each ghost then gets its own deep copy), or pass ghosts a stateless loss with "
                        "Ghosts(loss_fn=...)")
        return self.refused

    def _note(self, state: LossState | None) -> None:
        if state is None or self._last is None or self.stateful:
            return
        changed = state_changes(self._last, state)
        if changed:
            self.stateful = changed
            self.on_stateful(changed, not self.shares_state)
