"""When to take snapshots (and spawn ghosts): small schedule objects that answer ``step in schedule``.

A step number counts the optimizer steps taken so far: step 0 is the initialization, step t the state after
t updates. Schedules compose with ``|``:

>>> from dynprobe import schedule
>>> s = schedule.log_spaced(until=1000) | schedule.every(250)      # the default
>>> [t for t in range(0, 1600) if t in s][-6:]
[631, 750, 794, 1000, 1250, 1500]

The transition the paper looks for happens in the first few hundred to few thousand steps, hence the dense
log-spaced start; after it the interval metrics change slowly, and a linear tail keeps the cost per step low.
"""
from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import Any

from dynprobe._util.checks import check_int

__all__ = [
    "Every",
    "LogSpaced",
    "Schedule",
    "Steps",
    "Union",
    "as_schedule",
    "at",
    "default_schedule",
    "every",
    "log_spaced",
]


class Schedule(abc.ABC):
    """A set of non-negative step numbers, possibly infinite, with O(1) membership tests."""

    @abc.abstractmethod
    def __contains__(self, step: int) -> bool: ...

    @abc.abstractmethod
    def to_config(self) -> dict[str, Any]:
        """A JSON-serializable description, stored in the run manifest."""

    def steps(self, until: int) -> list[int]:
        """Every scheduled step in ``[0, until]``, ascending."""
        return [t for t in range(until + 1) if t in self]

    def next_after(self, step: int, limit: int = 10**9) -> int | None:
        """The first scheduled step strictly after ``step`` (searching up to ``limit``), or None."""
        for t in range(step + 1, limit + 1):
            if t in self:
                return t
        return None

    def __or__(self, other: Schedule) -> Schedule:
        if not isinstance(other, Schedule):
            return NotImplemented
        return Union(self, other)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_config()})"


class Every(Schedule):
    """Every ``k`` steps: ``start, start + k, start + 2k, …`` up to ``stop`` (inclusive) if given."""

    def __init__(self, k: int, *, start: int = 0, stop: int | None = None) -> None:
        _check_int("every(k)", k, minimum=1)
        _check_int("every(start=)", start, minimum=0)
        if stop is not None:
            _check_int("every(stop=)", stop, minimum=start)
        self.k, self.start, self.stop = int(k), int(start), None if stop is None else int(stop)

    def __contains__(self, step: int) -> bool:
        return step >= self.start and (self.stop is None or step <= self.stop) and (step - self.start) % self.k == 0

    def to_config(self) -> dict[str, Any]:
        return {"kind": "every", "k": self.k, "start": self.start, "stop": self.stop}


class LogSpaced(Schedule):
    """Step 0 and ``round(10 ** (i / per_decade))`` for i = 0, 1, … up to ``until`` (duplicates merged).

    With ``per_decade=10`` and ``until=1000``: 0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50, 63, 79,
    100, 126, …, 794, 1000 (29 steps).
    """

    def __init__(self, until: int = 1000, *, per_decade: int = 10) -> None:
        _check_int("log_spaced(until=)", until, minimum=0)
        _check_int("log_spaced(per_decade=)", per_decade, minimum=1)
        self.until, self.per_decade = int(until), int(per_decade)
        steps = {0}
        i = 0
        while (t := round(10 ** (i / self.per_decade))) <= self.until:
            steps.add(t)
            i += 1
        self._steps = frozenset(steps)

    def __contains__(self, step: int) -> bool:
        return step in self._steps

    def to_config(self) -> dict[str, Any]:
        return {"kind": "log_spaced", "until": self.until, "per_decade": self.per_decade}


class Steps(Schedule):
    """An explicit list of steps: non-negative integers, strictly increasing."""

    def __init__(self, steps: Iterable[int]) -> None:
        values = list(steps)
        for i, t in enumerate(values):
            _check_int(f"steps[{i}]", t, minimum=0)
            if i and values[i - 1] >= t:
                problem = "duplicated" if values[i - 1] == t else f"unsorted ({values[i - 1]} before {t})"
                raise ValueError(f"schedule steps must be strictly increasing; step {t} is {problem}. "
                                 f"Pass sorted(set(steps)).")
        self.values = tuple(int(t) for t in values)
        self._set = frozenset(self.values)

    def __contains__(self, step: int) -> bool:
        return step in self._set

    def steps(self, until: int) -> list[int]:
        return [t for t in self.values if t <= until]

    def to_config(self) -> dict[str, Any]:
        return {"kind": "steps", "steps": list(self.values)}


class Union(Schedule):
    """Steps in any of the parts."""

    def __init__(self, *parts: Schedule) -> None:
        flat: list[Schedule] = []
        for part in parts:
            flat.extend(part.parts if isinstance(part, Union) else [part])
        self.parts = tuple(flat)

    def __contains__(self, step: int) -> bool:
        return any(step in part for part in self.parts)

    def to_config(self) -> dict[str, Any]:
        return {"kind": "union", "parts": [p.to_config() for p in self.parts]}


def every(k: int, *, start: int = 0, stop: int | None = None) -> Every:
    """Every ``k`` steps from ``start`` (see :class:`Every`)."""
    return Every(k, start=start, stop=stop)


def log_spaced(until: int = 1000, *, per_decade: int = 10) -> LogSpaced:
    """Log-spaced steps from 0 to ``until`` (see :class:`LogSpaced`)."""
    return LogSpaced(until, per_decade=per_decade)


def at(steps: Iterable[int]) -> Steps:
    """Exactly these steps (strictly increasing non-negative integers)."""
    return Steps(steps)


def default_schedule() -> Schedule:
    """``log_spaced(until=1000, per_decade=10) | every(250)``: 32 snapshots in the first 1,000 steps, then one
    every 250 steps (a 10k-step run gets 68 snapshots, a 60k-step run 268)."""
    return log_spaced(1000, per_decade=10) | every(250)


def as_schedule(value: Schedule | int | Iterable[int] | None, *, argument: str = "schedule") -> Schedule:
    """Coerce the user's ``schedule=`` argument: a Schedule, an int k (every k steps), a list of steps, or None
    (the default schedule)."""
    if value is None:
        return default_schedule()
    if isinstance(value, Schedule):
        return value
    if isinstance(value, bool):
        raise TypeError(f"{argument} must be a Schedule, an int or a list of steps; got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{argument}={value}: an int schedule means 'every k steps' and needs k >= 1")
        return every(value)
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return at(value)
    raise TypeError(
        f"{argument} must be a dynprobe.schedule.Schedule (every, log_spaced, at, ...), an int k (every k steps) "
        f"or a list of steps; got {type(value).__name__}"
    )


def schedule_from_config(config: dict[str, Any]) -> Schedule:
    """Rebuild a schedule from :meth:`Schedule.to_config` output (used when resuming a run)."""
    kind = config.get("kind")
    if kind == "every":
        return every(config["k"], start=config.get("start", 0), stop=config.get("stop"))
    if kind == "log_spaced":
        return log_spaced(config["until"], per_decade=config.get("per_decade", 10))
    if kind == "steps":
        return at(config["steps"])
    if kind == "union":
        return Union(*(schedule_from_config(part) for part in config["parts"]))
    raise ValueError(f"unknown schedule kind {kind!r} in a run manifest")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    """:func:`~dynprobe._util.checks.check_int`, where a float with an integer value (``1e3``) counts as one."""
    check_int(name, int(value) if isinstance(value, float) and value.is_integer() else value, minimum=minimum)
