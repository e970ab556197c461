"""``Barriers``: which loss barriers (eq. (5) of the two-phase paper, and the linear-reference barrier) the probe
measures while training runs, and how much time they may take."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dynprobe._util.checks import check_int

__all__ = ["AUTO_BUDGET_FRACTION", "Barriers"]

#: ``time_budget=None``: barriers may take this fraction of the time the rest of the snapshots take.
AUTO_BUDGET_FRACTION = 0.5


@dataclass(frozen=True)
class Barriers:
    """Online loss barriers, within a time budget shared by all of them.

    A barrier costs one evaluation of the eval set per α, so it is by far the most expensive thing a snapshot
    can do; the probe therefore computes barriers only while a budget allows and leaves the rest to
    :func:`dynprobe.fill_barriers` (trajectory pairs; ghost barriers need the ghosts and are online only).
    Each barrier stores both B_mean (eq. 5, ``run.B``, ``run.chaos["B"]``) and B_linear (the height above the
    chord between the endpoint losses, ``run.B_linear``, ``run.chaos["B_linear"]``).

    Args:
        alphas: points of the α grid on [0, 1], endpoints included (≥ 2). The default 11 resolves a barrier's
            peak to 0.1 in α at a third of the cost of the paper author's 30.
        ghosts: measure B between each live ghost and its reference (the main run) at its snapshots.
        previous_snapshots: after each snapshot, the barrier to this many preceding snapshots of the main run
            (``metrics/B.jsonl``; 0: none, 1: consecutive pairs).
        every_snapshots: barriers are due at every ``every_snapshots``-th snapshot (of a ghost, counted from its
            spawn; of the run, for trajectory barriers). Ghost barriers are always due at the run's final step
            (``total_steps``, or the snapshot taken at ``close()``) and computed there whatever the budget, so
            the chaos maps' last column is complete.
        time_budget: seconds per snapshot that barriers may use, shared by all of them; unspent time carries
            over to later snapshots, and a barrier that does not fit is skipped (counted in the run's
            ``barrier_budget`` event). ``None`` (default): barriers may take ``AUTO_BUDGET_FRACTION`` (one half)
            of the time the rest of the snapshots took, so the probe's cost grows by at most that factor;
            ``math.inf``: every due barrier, whatever it costs; ``0``: only the final ghost barriers.
    """

    alphas: int = 11
    ghosts: bool = True
    previous_snapshots: int = 0
    every_snapshots: int = 1
    time_budget: float | None = None

    def __post_init__(self) -> None:
        check_int("Barriers(alphas=)", self.alphas, minimum=2, hint="(points on [0, 1], endpoints included)")
        if not isinstance(self.ghosts, bool):
            raise TypeError(f"Barriers(ghosts=) must be True or False; got {self.ghosts!r}")
        for name, minimum in (("previous_snapshots", 0), ("every_snapshots", 1)):
            check_int(f"Barriers({name}=)", getattr(self, name), minimum=minimum)
        budget = self.time_budget
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or math.isnan(budget) or budget < 0:
                raise ValueError("Barriers(time_budget=) must be None (automatic), a number of seconds >= 0, or "
                                 f"math.inf (no limit); got {budget!r}")

    @property
    def enabled(self) -> bool:
        """Whether any barrier is requested at all."""
        return self.ghosts or self.previous_snapshots > 0

    def active(self, with_ghosts: bool) -> bool:
        """Whether a probe (with or without ghosts) has any barrier to compute."""
        return (self.ghosts and with_ghosts) or self.previous_snapshots > 0

    def to_config(self) -> dict[str, Any]:
        budget = self.time_budget
        return {"alphas": self.alphas, "ghosts": self.ghosts, "previous_snapshots": self.previous_snapshots,
                "every_snapshots": self.every_snapshots,
                "time_budget": "auto" if budget is None else ("inf" if math.isinf(budget) else float(budget)),
                "auto_budget_fraction": AUTO_BUDGET_FRACTION}

