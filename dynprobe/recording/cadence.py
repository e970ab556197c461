"""When a probe snapshots and when a snapshot measures the eNTK: the one owner of both rules.

The probe snapshots at every step of its schedule, which includes the ghosts' spawn steps (a ghost is compared
with the main run from its spawn on: :func:`snapshot_schedule`), and at the companion steps of the kernel cadence.
The kernel cadence (:class:`KernelCadence`) measures H at every ``KernelConfig(every_snapshots=k)``-th scheduled
snapshot (a *primary* kernel snapshot) and, with ``lag_steps=Δ``, at t + Δ after each primary one (a *companion*,
an extra snapshot when the schedule has none there) so that S(θ_t, θ_{t+Δ}) exists at one fixed lag; companions
get no companions of their own. The running probe (:mod:`dynprobe.recording.kernel_probe`), the projected disk
use at attach and :func:`dynprobe.estimate_cost` (:func:`planned_snapshots`) all follow these objects.
"""
from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dynprobe.config import Ghosts, KernelConfig
from dynprobe.schedule import Schedule, as_schedule

__all__ = ["KernelCadence", "PlannedSnapshot", "planned_snapshots", "snapshot_schedule"]


def snapshot_schedule(schedule: Schedule | int | Iterable[int] | None, ghosts: Ghosts | None) -> Schedule:
    """The probe's schedule: the user's ``schedule=`` (None: the default) and the ghosts' spawn steps."""
    schedule = as_schedule(schedule)
    return schedule | ghosts.at if ghosts is not None else schedule


class KernelCadence:
    """Which snapshots measure H (module docstring); fed every snapshot, in order, through :meth:`role`.

    Args:
        every_snapshots: ``KernelConfig(every_snapshots=)``.
        lag_steps: ``KernelConfig(lag_steps=)`` (None: no companions; resolve the default lag first).
    """

    def __init__(self, every_snapshots: int, lag_steps: int | None) -> None:
        self.every_snapshots, self.lag_steps = every_snapshots, lag_steps
        self._scheduled = 0  # scheduled snapshots seen (the cadence counts these, not companion-only ones)
        self._primary: set[int] = set()
        self._kernel_steps: set[int] = set()

    @classmethod
    def of(cls, config: KernelConfig) -> KernelCadence:
        return cls(config.every_snapshots, config.lag_steps or None)  # 0: no companions

    def companion_due(self, step: int) -> bool:
        """Whether a companion kernel snapshot is due at ``step`` (the probe snapshots there whatever its
        schedule says)."""
        lag = self.lag_steps
        return lag is not None and step - lag in self._primary and step not in self._kernel_steps

    def role(self, step: int, *, scheduled: bool) -> str | None:
        """The kernel role of the snapshot at ``step`` — ``"primary"``, ``"companion"`` or None (no kernel) — and
        advance the cadence past it. ``scheduled``: the schedule asked for this snapshot (False for a
        companion-only one)."""
        primary = scheduled and self._scheduled % self.every_snapshots == 0
        self._scheduled += int(scheduled)
        companion = self.lag_steps is not None and step - self.lag_steps in self._primary
        if not (primary or companion) or step in self._kernel_steps:
            return None
        if primary:
            self._primary.add(step)
        self._kernel_steps.add(step)
        return "primary" if primary else "companion"

    def resume(self, snapshots: Iterable[Mapping[str, Any]]) -> None:
        """Continue the cadence of a resumed run from its committed snapshot records."""
        for record in snapshots:
            step = int(record["step"])
            self._scheduled += int(not record.get("companion_only", False))
            if record.get("kernel"):
                self._kernel_steps.add(step)
                if record.get("kernel_role", "primary") == "primary":
                    self._primary.add(step)


@dataclass(frozen=True)
class PlannedSnapshot:
    """One snapshot a configuration will take: its step and kernel role (None: no kernel)."""

    step: int
    kernel_role: str | None = None


def planned_snapshots(schedule: Schedule, total_steps: int, kernel: KernelConfig | None, *,
                      snapshot_on_close: bool = True) -> list[PlannedSnapshot]:
    """Every snapshot a probe with this (complete: :func:`snapshot_schedule`) ``schedule`` and ``kernel`` takes
    in a run of ``total_steps`` optimizer steps, companion-only ones included, in order — by the same
    :class:`KernelCadence` the running probe follows. ``snapshot_on_close``: the final step is snapshotted too."""
    scheduled = {s for s in schedule.steps(total_steps) if 0 <= s <= total_steps}
    pending = sorted(scheduled | ({total_steps} if snapshot_on_close else set()))
    cadence = KernelCadence.of(kernel) if kernel is not None else None
    plan: list[PlannedSnapshot] = []
    while pending:
        step = heapq.heappop(pending)
        if plan and plan[-1].step == step:
            continue
        if cadence is None:
            plan.append(PlannedSnapshot(step))
            continue
        due = cadence.companion_due(step)  # as the probe decides at each step (Probe and kernel_at_snapshot)
        role = cadence.role(step, scheduled=step in scheduled or not due)
        plan.append(PlannedSnapshot(step, role))
        if role == "primary" and cadence.lag_steps is not None and step + cadence.lag_steps <= total_steps:
            heapq.heappush(pending, step + cadence.lag_steps)
    return plan
