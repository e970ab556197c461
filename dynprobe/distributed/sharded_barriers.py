"""Trajectory loss barriers (eq. 5 of the two-phase paper, and B_linear) of an FSDP2 run: :class:`ShardedBarriers`.

The same scheduler as an unsharded run (:class:`~dynprobe.recording.barriers.BarrierScheduler`: which barriers are
due after each snapshot, the time budget, the ``barrier_budget`` event), with three differences:

* **Every rank computes every barrier.** The FSDP forward is collective, so each rank evaluates the same eval
  batches along the same path: it writes its own piece of ``θ(α) = lerp(θ_b, θ_a, α)`` into the model's shards
  (:class:`~dynprobe.distributed.sharded_path.ShardedLine`), evaluates, and puts the model back. θ_a is the new
  snapshot (what the model holds), θ_b an earlier one: its pieces come from the recorder's history of local pieces
  (:class:`~dynprobe.distributed.sharded_rows.ShardedCosineRows`, kept for the C rows anyway), its floating buffers
  from a copy kept here for the last ``previous_snapshots`` snapshots. Only rank 0's sink writes
  ``metrics/B.jsonl``. Barriers run after the snapshot's agreement (:class:`~dynprobe.distributed.sharded.
  AgreedSnapshots`), so every rank starts them knowing that every rank committed the snapshot.
* **The budget is agreed.** Which barriers fit is decided from wall-clock times, which differ between ranks; were
  each rank to decide from its own, one rank could run a barrier's collective forwards while another skipped it.
  Every time the budget books — the snapshot's own duration (the automatic budget's measure) and each barrier's
  — is replaced by its maximum over the ranks (the slowest rank's time: the collective forwards wait for it),
  agreed with one small all-reduce (:func:`agreed_seconds`), so every rank's budget sees the same numbers, in the
  same order, and takes the same decisions. Cost: one such all-reduce per snapshot, two per barrier.
* **Faults are agreed.** Each of these all-reduces carries a failure flag. A barrier begins with one (every rank
  has θ_b's pieces ready, so no rank enters the forwards alone) and ends with one (its time): a barrier that
  failed on one rank (rank 0's write of ``metrics/B.jsonl``, say) raises on every rank, after every rank finished
  the barrier's forwards, and the probe detaches on every rank at the same snapshot. A failure inside the model's
  own FSDP forward on one rank only cannot be caught this way (as for the snapshot's evaluation).

**Ghost barriers** (between each live ghost and the main run) go the same way: a ghost's shards are its own
DTensors (:mod:`~dynprobe.distributed.sharded_ghosts`), so each rank writes its piece of ``lerp(θ', θ, α)`` — the
ghost at α = 0, the main run at α = 1, as ``loss_barrier(main, ghost)`` orders them on one process — and the
ghost's floating buffers, into the model. Whether a ghost equals the main run bit for bit (B = 0 without
evaluating) is agreed over the ranks (one all-reduce per ghost), and its time is agreed like a trajectory
barrier's.
A pair whose older snapshot is not in this process's memory (recorded before a resume) is not due: it is left to
:func:`dynprobe.fill_barriers`, like every pair the budget skipped.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from dynprobe._util.evaluation import EvalSet
from dynprobe.config.barriers import Barriers
from dynprobe.metrics.barrier import BarrierResult, loss_barrier_in_place
from dynprobe.recording.barriers import BarrierScheduler
from dynprobe.recording.progress import SnapshotProgress
from dynprobe.store.records import append_barrier
from dynprobe.store.sink import RunSink

from .sharded import Collectives, ShardedRunFailure, local_piece, same_local_tensors
from .sharded_path import ShardedLine, floating_buffers

__all__ = ["CONVENTION", "ShardedBarriers", "agreed_seconds"]

CONVENTION = ("FSDP2: trajectory and ghost barriers computed online on every rank (each writes its piece of "
              "theta(alpha) = lerp(theta_b, theta_a, alpha) into its shards, the FSDP forward gathers it, the shards "
              "and buffers are put back bit for bit); the time budget books the maximum over the ranks of each "
              "measured time, so every rank takes the same decisions")


class PieceHistory(Protocol):
    """The recorder's history of this rank's pieces of θ (by snapshot index)."""

    count: int

    def piece(self, index: int) -> torch.Tensor: ...


def agreed_seconds(run: Collectives, seconds: float, error: BaseException | None, what: str,
                   device: torch.device) -> float:
    """The maximum over the ranks of ``seconds``, the same on every rank (one SUM all-reduce of a vector with
    each rank's time in its own slot and a failure count); raises on every rank when ``error`` is set on any."""
    payload = torch.zeros(run.world_size + 1, dtype=torch.float64, device=device)
    payload[run.rank] = seconds
    payload[-1] = 0.0 if error is None else 1.0
    run.all_reduce(payload)
    values = payload.cpu()
    if error is not None:
        raise error
    failed = int(values[-1])
    if failed:
        raise ShardedRunFailure(f"{what} failed on {failed} of {run.world_size} ranks (see that rank's warning); "
                                "the probe detaches on every rank")
    return float(values[:-1].max())


class ShardedBarriers(BarrierScheduler):
    """The barrier scheduler of an FSDP2 run, on every rank (module docstring).

    Args:
        config: what to measure and the budget.
        run: this process's collectives (``rank``, ``world_size``, ``all_reduce``).
        sink: the run sink (rank 0's writer; a null sink elsewhere).
        model: the ``fully_shard``-ed model.
        params: its trainable parameters (DTensors), in the order of the pieces.
        pieces: the recorder's history of this rank's pieces (one row per snapshot, in order).
        eval_set, output_fn, batch_size: as for the snapshot evaluations.
        device: where the agreement's all-reduce runs (the parameters' device).
        progress: the probe's progress line.
        clock: seconds (``time.perf_counter``); the budget books what it measures, agreed over the ranks.
    """

    def __init__(self, config: Barriers, *, run: Collectives, sink: RunSink, model: nn.Module,
                 params: Sequence[torch.Tensor], pieces: PieceHistory, eval_set: EvalSet,
                 output_fn: Callable[[Any], torch.Tensor], batch_size: int, device: torch.device,
                 progress: SnapshotProgress | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__(config, sink=sink, model=model, eval_set=eval_set, output_fn=output_fn,
                         batch_size=batch_size, progress=progress)
        self.run, self.params, self.pieces, self.device, self.clock = run, list(params), pieces, device, clock
        self._rows: dict[int, int] = {}  # step → its row in the pieces' history (snapshots of this process)
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}  # step → its floating buffers (the last few)
        self.computed_pairs: list[tuple[int, int]] = []  # (step, older step) of every barrier computed here
        if sink.writes:
            sink.update_manifest(conventions={**(sink.manifest.get("conventions") or {}), "barriers_sharded":
                                              CONVENTION})

    def after_agreed_snapshot(self, step: int, snapshot_seconds: float, ghosts: Any = None) -> None:
        """The barriers due at the snapshot at ``step``, once every rank committed it (every rank calls this, with
        how long its own snapshot took, and the probe's ghost set or None)."""
        error: BaseException | None = None
        try:  # the newest snapshot: its row in the pieces and its buffers (the model holds it now)
            self._rows[step] = self.pieces.count - 1
            self._buffers[step] = {name: b.detach().clone() for name, b in floating_buffers(self.model).items()}
            for old in sorted(self._buffers)[:-1 - self.config.previous_snapshots]:
                del self._buffers[old]
        except Exception as failure:  # noqa: BLE001 - every rank must reach the agreement
            error = failure
        seconds = agreed_seconds(self.run, snapshot_seconds, error, f"the barriers' bookkeeping at step {step}",
                                 self.device)
        steps = [int(s["step"]) for s in self.sink.snapshots if int(s["step"]) in self._rows]
        with (self.progress.snapshot(step, what=f"barriers at step {step}") if self.progress is not None
              else contextlib.nullcontext()):
            states = ghosts.comparison_states() if ghosts is not None else []
            self.after_snapshot(step, {}, states, snapshot_steps=steps, snapshot_seconds=seconds)

    def _identical(self, reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> bool:
        """Bit for bit equal on every rank (this rank's shards and buffers compared, the answer agreed)."""
        differs = torch.tensor([0.0 if same_local_tensors(reference, state) else 1.0], dtype=torch.float64,
                               device=self.device)
        self.run.all_reduce(differs)
        return not differs.item()

    def _ghost_job(self, step: int, ghost: int, reference: Mapping[str, torch.Tensor],
                   state: Mapping[str, torch.Tensor], identical: bool) -> Callable[[], None]:
        def run() -> None:
            what = f"the barrier between the main run and ghost {ghost} at step {step}"
            started = self.clock()
            fields: dict[str, Any] = {"B": 0.0, "B_linear": 0.0, "argmax_alpha": None, "argmax_alpha_linear": None}
            error = None
            if not identical:  # the ε = 0 control: lerp(θ, θ, α) = θ, so B = 0 exactly without evaluating
                result, error = self._measure(what, f"main ↔ ghost {ghost}", lambda: ShardedLine(
                    self.model, self.params, local_piece([state[n] for n in self._parameter_names()], torch.float64),
                    {name: state[name] for name in floating_buffers(self.model)}))
                if result is not None:
                    fields = {"B": result.mean, "B_linear": result.linear, "argmax_alpha": result.argmax_alpha_mean,
                              "argmax_alpha_linear": result.argmax_alpha_linear}
            try:
                if error is None:
                    self.sink.event("ghost_barrier", ghost=ghost, step=step, alphas=self.config.alphas, **fields)
            except Exception as failure:  # noqa: BLE001 - every rank must reach the agreement
                error = failure
            seconds = agreed_seconds(self.run, self.clock() - started, error, what, self.device)
            self._last_ghost_barrier[ghost] = step
            self.tally.computed["ghost"] += 1
            if identical:
                self.tally.exact_zero += 1
            self.budget.spend(seconds, 0 if identical else self.config.alphas)
        return run

    def _parameter_names(self) -> list[str]:
        """The names of ``params`` in the model (the keys of a ghost's state)."""
        by_id = {id(p): name for name, p in self.model.named_parameters()}
        return [by_id[id(p)] for p in self.params]

    # ------------------------------------------------------------------------------------------ the job

    def _trajectory_job(self, step: int, older: int, state: Any) -> Callable[[], None]:
        def run() -> None:
            what = f"the barrier between steps {step} and {older}"
            started = self.clock()
            result, error = self._measure(what, f"step {step} ↔ step {older}", lambda: ShardedLine(
                self.model, self.params, self.pieces.piece(self._rows[older]), self._buffers[older]))
            try:
                if result is not None and self.sink.writes:
                    append_barrier(Path(self.sink.root), step, older, result)
            except Exception as failure:  # noqa: BLE001 - every rank must reach the agreement
                error = failure
            seconds = agreed_seconds(self.run, self.clock() - started, error, what, self.device)
            self.computed_pairs.append((step, older))
            self.tally.computed["trajectory"] += 1
            self.budget.spend(seconds, self.config.alphas)
        return run

    def _measure(self, what: str, label: str, make_line: Callable[[], ShardedLine]
                 ) -> tuple[BarrierResult | None, BaseException | None]:
        """One barrier's collective part: the line built (then one agreement, so that no rank enters the forwards
        alone), then evaluated; returns the result or this rank's error (agreed on by the caller's last
        all-reduce)."""
        line, error = None, None
        try:
            line = make_line()
        except Exception as failure:  # noqa: BLE001 - every rank must reach the agreement
            error = failure
        agreed_seconds(self.run, 0.0, error, what, self.device)  # raises on every rank if any failed
        assert line is not None
        try:
            return self._evaluate(line, label), None
        except Exception as failure:  # noqa: BLE001 - every rank must reach the agreement
            return None, failure

    def _evaluate(self, line: ShardedLine, what: str) -> BarrierResult:
        """B between the model's θ (α = 1) and the line's older snapshot (α = 0); the model is put back after."""
        if self.progress is not None:
            self.progress.phase("barriers", f"{what} ({self.config.alphas} α)")
        with line:
            return loss_barrier_in_place(
                self.model, line.load, (self.eval_set.inputs, self.eval_set.targets), alphas=self.config.alphas,
                task=self.eval_set.task, output_fn=self.output_fn, batch_size=self.batch_size,
                interpolated="each rank's local shards of the trainable parameters and its floating-point buffers, "
                             "torch.lerp in each tensor's dtype, written in place (FSDP2); integer buffers kept")
