"""The ghosts of a run as the reader sees them: their identities and statuses (``run.ghosts``) and the
ghost × snapshot maps of their comparisons with the main run (``run.chaos``), assembled from validated events."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .validate import CHAOS_FIELDS

__all__ = ["CHAOS_METRICS", "GhostInfo", "chaos_maps", "ghost_infos"]

CHAOS_METRICS = CHAOS_FIELDS


@dataclass(frozen=True)
class GhostInfo:
    """One ghost replica of a run: ``ghost_id`` is its number in the run (the ``ghost`` of its events and files);
    its row in every ``run.chaos`` map is its position in ``run.ghosts``."""

    ghost_id: int
    spawn_step: int
    control: bool
    kind: str
    seed: int
    nominal_norm: float
    realized_norm: float
    changed: int
    total: int
    status: str  # alive / diverged / failed / finished / interrupted
    status_step: int | None = None
    reason: str | None = None


def ghost_infos(events: list[dict[str, Any]], last_step: int) -> list[GhostInfo]:
    """Every ghost spawned at or before ``last_step`` (the last committed snapshot), with its latest status up to
    it, in ghost-id order."""
    infos: dict[int, dict[str, Any]] = {}
    for event in events:
        kind = event["event"]
        if kind == "ghost_spawn" and event["step"] <= last_step:
            infos[event["ghost"]] = {
                "ghost_id": event["ghost"], "spawn_step": event["spawn_step"], "control": event["control"],
                "kind": event["kind"], "seed": event["seed"], "nominal_norm": event["nominal_norm"],
                "realized_norm": event["realized_norm"], "changed": event["changed"], "total": event["total"],
                "status": "alive",
            }
        elif kind == "ghost_status" and event["ghost"] in infos and event["step"] <= last_step:
            infos[event["ghost"]].update(status=event["status"], status_step=event["step"],
                                         reason=event.get("reason"))
    return [GhostInfo(**infos[i]) for i in sorted(infos)]


def chaos_maps(events: list[dict[str, Any]], ghosts: list[GhostInfo], steps: np.ndarray) -> dict[str, np.ndarray]:
    """``{metric: (G, T) array}`` from the ``ghost_compare`` and ``ghost_barrier`` events (NaN where absent)."""
    column = {int(step): i for i, step in enumerate(steps)}
    row = {g.ghost_id: r for r, g in enumerate(ghosts)}
    maps = {name: np.full((len(ghosts), len(steps)), np.nan) for name in CHAOS_METRICS}
    for event in events:
        if event["event"] not in ("ghost_compare", "ghost_barrier"):
            continue
        r, c = row.get(event["ghost"]), column.get(event["step"])
        if r is None or c is None:
            continue
        for name in CHAOS_METRICS:
            value = event.get(name)
            if value is not None:
                maps[name][r, c] = value
    return maps
