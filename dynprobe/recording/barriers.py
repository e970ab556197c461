"""Loss barriers while training runs: one scheduler for ghost and trajectory barriers, within a time budget.

A barrier (eq. (5) of the two-phase paper) costs one evaluation of the eval set per α — for a real-size model,
many times the rest of a snapshot. :class:`BarrierScheduler` runs after each committed snapshot and decides,
within the budget of :class:`dynprobe.Barriers`, which of the barriers due there it computes:

* **ghost barriers** — between each live ghost and its reference (the main run, or the shadow of vectorized
  ghosts), written as ``ghost_barrier`` events ``{ghost, step, B, B_linear, argmax_alpha, argmax_alpha_linear,
  alphas}`` (read back as ``run.chaos["B"]`` and ``run.chaos["B_linear"]``). A ghost identical to its reference
  (the ε = 0 control) has B = 0 exactly, recorded without evaluating. At the run's final step they are computed
  whatever the budget.
* **trajectory barriers** — between the new snapshot and the ``previous_snapshots`` before it, appended to
  ``metrics/B.jsonl`` with both values (``run.B``, ``run.B_linear``); :func:`dynprobe.fill_barriers` computes
  the pairs left out.

**The budget.** Each snapshot grants ``time_budget`` seconds (default: half of the time the snapshot itself
took); unspent time carries over, and a barrier runs only if its estimated cost (α points × the measured time
of one evaluation) fits in what is left — keeping, when the last step is known (``total_steps``), enough for the
ghost barriers forced there. Forced final barriers may overdraw. The due, computed and skipped
barriers and the seconds spent are written as one ``barrier_budget`` event when the run closes.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynprobe._util.evaluation import EvalSet
from dynprobe._util.modules import same_tensors
from dynprobe.config.barriers import AUTO_BUDGET_FRACTION, Barriers
from dynprobe.metrics.barrier import BarrierResult, loss_barrier
from dynprobe.store.files import load_snapshot_state
from dynprobe.store.records import append_barrier
from dynprobe.store.sink import RunSink

from .progress import SnapshotProgress

__all__ = ["BarrierBudget", "BarrierScheduler", "GhostStates"]

#: ``(ghost id, reference state, ghost state)`` for every live ghost at a snapshot.
GhostStates = Sequence[tuple[int, Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]]


@dataclass
class _Tally:
    due: dict[str, int] = field(default_factory=lambda: {"ghost": 0, "trajectory": 0})
    computed: dict[str, int] = field(default_factory=lambda: {"ghost": 0, "trajectory": 0})
    exact_zero: int = 0

    def to_event(self, budget: BarrierBudget) -> dict[str, Any]:
        skipped = {kind: self.due[kind] - self.computed[kind] for kind in self.due}
        return {"due": dict(self.due), "computed": dict(self.computed), "skipped": skipped,
                "identical_endpoints": self.exact_zero, "seconds": round(budget.spent, 3),
                "budget_seconds": None if math.isinf(budget.granted) else round(budget.granted, 3)}


class BarrierBudget:
    """The time budget of online barriers (the same rule drives :func:`dynprobe.recording.cost.estimate_cost`).

    ``grant(snapshot_seconds, models)`` adds a snapshot's allowance (``time_budget``, or ``AUTO_BUDGET_FRACTION``
    of the snapshot's own time); ``fits(evaluations)`` says whether a barrier of that many evaluations fits in what
    is left, at the measured (or, before any barrier ran, guessed) seconds per evaluation; ``spend`` books it.
    """

    def __init__(self, time_budget: float | None) -> None:
        self.time_budget = time_budget
        self.credit = 0.0
        self.granted = 0.0
        self.spent = 0.0
        self.seconds_per_alpha: float | None = None

    def grant(self, snapshot_seconds: float, models_evaluated: int) -> None:
        budget = self.time_budget
        grant = AUTO_BUDGET_FRACTION * max(0.0, snapshot_seconds) if budget is None else float(budget)
        self.credit += grant
        self.granted += grant
        if self.seconds_per_alpha is None and snapshot_seconds > 0:
            # First guess until a barrier is timed: the snapshot evaluated this many models (and did more).
            self.seconds_per_alpha = snapshot_seconds / max(1, models_evaluated)

    def fits(self, evaluations: int, reserve: int = 0) -> bool:
        """Whether ``evaluations`` fit, keeping ``reserve`` evaluations' worth of credit (for barriers that will be
        forced later). A barrier that evaluates nothing always fits."""
        if evaluations == 0 or math.isinf(self.credit):
            return True
        return self.credit > 0 and (evaluations + reserve) * (self.seconds_per_alpha or 0.0) <= self.credit

    def spend(self, seconds: float, evaluations: int) -> None:
        self.credit -= seconds
        self.spent += seconds
        if evaluations:
            measured = seconds / evaluations
            previous = self.seconds_per_alpha
            self.seconds_per_alpha = measured if previous is None else 0.5 * (previous + measured)


class BarrierScheduler:
    """Computes the barriers due at each snapshot that fit in the budget (see the module docstring).

    Args:
        config: what to measure and the budget.
        sink: the run's writer (``root``, ``manifest``, ``event``).
        model: the architecture (the user's model; only evaluated through ``functional_call``).
        eval_set: the probe's eval set and its task (the barrier's loss is the task's eval loss).
        output_fn, batch_size: as for the snapshot evaluations.
        final_step: the run's last step when known (``total_steps``): ghost barriers are forced there.
        progress: the probe's progress line, told which barrier is being computed.
    """

    def __init__(self, config: Barriers, *, sink: RunSink, model: nn.Module, eval_set: EvalSet,
                 output_fn: Callable[[Any], torch.Tensor], batch_size: int, final_step: int | None = None,
                 progress: SnapshotProgress | None = None) -> None:
        self.config, self.sink, self.model, self.eval_set = config, sink, model, eval_set
        self.output_fn, self.batch_size, self.final_step = output_fn, batch_size, final_step
        self.progress = progress
        self.budget = BarrierBudget(config.time_budget)
        self.tally = _Tally()
        self._ghost_snapshots: dict[int, int] = {}  # ghost → snapshots seen (for every_snapshots)
        self._last_ghost_barrier: dict[int, int] = {}  # ghost → step of its latest barrier
        self._snapshots_seen = 0
        self._last_step: int | None = None
        self._closed = False

    # ------------------------------------------------------------------------------------------ per snapshot

    def after_snapshot(self, step: int, main_state: Mapping[str, torch.Tensor], ghost_states: GhostStates, *,
                       snapshot_steps: Sequence[int], snapshot_seconds: float, final: bool = False) -> None:
        """Barriers of the snapshot at ``step`` (committed; ``snapshot_steps`` lists every committed step, the newest
        last). ``snapshot_seconds``: how long the snapshot's own work took (the automatic budget's measure);
        ``final``: this is the run's last snapshot (ghost barriers forced)."""
        final = final or (self.final_step is not None and step >= self.final_step)
        self.budget.grant(snapshot_seconds, 1 + len(ghost_states))
        self._last_step = step
        jobs: list[tuple[bool, Callable[[], None], int]] = []  # (forced, run, evaluations)
        reserve = 0  # with a known last step: keep credit for the ghost barriers forced there
        if self.config.ghosts:
            ordered = sorted(ghost_states, key=lambda g: self._last_ghost_barrier.get(g[0], -1))
            for ghost, reference, state in ordered:
                identical = self._identical(reference, state)
                reserve += 0 if identical or final or self.final_step is None else self.config.alphas
                seen = self._ghost_snapshots.get(ghost, 0)
                self._ghost_snapshots[ghost] = seen + 1
                if final or seen % self.config.every_snapshots == 0:
                    self.tally.due["ghost"] += 1
                    jobs.append((final, self._ghost_job(step, ghost, reference, state, identical),
                                 0 if identical else self.config.alphas))
        if self.config.previous_snapshots and self._snapshots_seen % self.config.every_snapshots == 0:
            for older in reversed(list(snapshot_steps[-1 - self.config.previous_snapshots: -1])):
                self.tally.due["trajectory"] += 1
                jobs.append((False, self._trajectory_job(step, older, main_state), self.config.alphas))
        self._snapshots_seen += 1
        for forced, run, evaluations in jobs:
            if forced or self.budget.fits(evaluations, reserve):
                run()

    def on_snapshot(self, data: Any, main_state: Mapping[str, torch.Tensor], ghosts: Any) -> None:
        """:meth:`after_snapshot` for the probe: ``data`` is the committed ``SnapshotData`` (step, start time),
        ``ghosts`` the probe's ghost set or None (its ``comparison_states()``); committed steps from the sink."""
        states = ghosts.comparison_states() if ghosts is not None else []
        self.after_snapshot(data.step, main_state, states, snapshot_steps=[s["step"] for s in self.sink.snapshots],
                            snapshot_seconds=time.perf_counter() - data.started)

    def close(self, step: int, ghosts: Any) -> None:
        """At the end of the run (before the ghosts stop): the final ghost barriers, if the last snapshot was at
        ``step`` and did not get them; then the ``barrier_budget`` event. ``ghosts``: the ghost states, or the
        probe's ghost set (its ``comparison_states()``), or None."""
        if self._closed:
            return
        self._closed = True
        ghost_states = ghosts.comparison_states() if hasattr(ghosts, "comparison_states") else list(ghosts or [])
        if self.config.ghosts and self._last_step == step:
            for ghost, reference, state in ghost_states:
                if self._last_ghost_barrier.get(ghost) != step:
                    self.tally.due["ghost"] += 1
                    self._ghost_job(step, ghost, reference, state, self._identical(reference, state))()
        self.sink.event("barrier_budget", step=step, **self.tally.to_event(self.budget))

    # ------------------------------------------------------------------------------------------ the jobs

    def _identical(self, reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> bool:
        """Whether a ghost equals its reference bit for bit (B = 0 exactly, nothing evaluated)."""
        return same_tensors(reference, state)

    def _barrier(self, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], what: str
                 ) -> BarrierResult:
        if self.progress is not None:
            self.progress.phase("barriers", f"{what} ({self.config.alphas} α)")
        return loss_barrier(self.model, state_a, state_b, (self.eval_set.inputs, self.eval_set.targets),
                            alphas=self.config.alphas, task=self.eval_set.task, output_fn=self.output_fn,
                            batch_size=self.batch_size)

    def _ghost_job(self, step: int, ghost: int, reference: Mapping[str, torch.Tensor],
                   state: Mapping[str, torch.Tensor], identical: bool) -> Callable[[], None]:
        def run() -> None:
            started = time.perf_counter()
            if identical:  # the ε = 0 control: lerp(θ, θ, α) = θ, so B = 0 exactly without evaluating
                fields = {"B": 0.0, "B_linear": 0.0, "argmax_alpha": None, "argmax_alpha_linear": None}
                self.tally.exact_zero += 1
            else:
                result = self._barrier(reference, state, f"main ↔ ghost {ghost}")
                fields = {"B": result.mean, "B_linear": result.linear, "argmax_alpha": result.argmax_alpha_mean,
                          "argmax_alpha_linear": result.argmax_alpha_linear}
            self.sink.event("ghost_barrier", ghost=ghost, step=step, alphas=self.config.alphas, **fields)
            self._last_ghost_barrier[ghost] = step
            self.tally.computed["ghost"] += 1
            self.budget.spend(time.perf_counter() - started, 0 if identical else self.config.alphas)
        return run

    def _trajectory_job(self, step: int, older: int, state: Mapping[str, torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            started = time.perf_counter()
            self.sink.flush()  # the older snapshot's files may still be queued on a background writer
            older_state = load_snapshot_state(Path(self.sink.root), self.sink.manifest, older)
            result = self._barrier(state, older_state, f"step {step} ↔ step {older}")
            append_barrier(Path(self.sink.root), step, older, result)
            self.tally.computed["trajectory"] += 1
            self.budget.spend(time.perf_counter() - started, self.config.alphas)
        return run

