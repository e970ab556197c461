"""What happens at a snapshot, in order: measure the model, compare the live ghosts, commit, then tell the online
detector, the user's ``on_snapshot`` and the barrier scheduler."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from dynprobe.ghosts.ghost_set import GhostSet
from dynprobe.recording.barriers import BarrierScheduler
from dynprobe.recording.kernel_probe import KernelMeasure
from dynprobe.recording.learning_rate import LearningRateLog
from dynprobe.recording.progress import SnapshotProgress
from dynprobe.recording.snapshot import SnapshotRecorder
from dynprobe.recording.train_loss import TrainLoss
from dynprobe.store.sink import RunSink

from .transition import TransitionWatch

__all__ = ["SnapshotSequence"]


class SnapshotSequence:
    """The snapshot step of a probe (every part is built by :func:`dynprobe.probe.assembly.assemble`).

    Under DDP every rank runs the same sequence — the measurements contain collectives (the sharded eNTK) and the
    ghost comparisons decide statuses on every rank — into its sink; only a sink that writes (rank 0's) goes on
    to the detector, the callback and the barriers.
    """

    def __init__(self, *, recorder: SnapshotRecorder, kernel: KernelMeasure | None, train_loss: TrainLoss,
                 learning_rates: LearningRateLog, barriers: BarrierScheduler | None, transition: TransitionWatch,
                 progress: SnapshotProgress, model: nn.Module, sink: RunSink,
                 on_snapshot: Callable[[dict[str, Any]], None] | None) -> None:
        self.recorder, self.kernel = recorder, kernel
        self.train_loss, self.barriers, self.transition, self.progress = train_loss, barriers, transition, progress
        self.learning_rates = learning_rates
        self.model, self.sink = model, sink
        self.on_snapshot = on_snapshot

    def take(self, step: int, *, ghosts: GhostSet | None) -> None:
        """The snapshot at ``step`` (optimizer steps taken)."""
        with self.progress.snapshot(step):
            data = self.recorder.measure(step)
            data.extra_arrays.update(self.kernel.snapshot_arrays() if self.kernel is not None else {})
            main_state = {name: t.detach() for name, t in
                          list(self.model.named_parameters()) + list(self.model.named_buffers()) if t is not None}
            if ghosts is not None:
                self.progress.phase("ghosts", f"comparing {len(ghosts.live)} ghosts")
                ghosts.compare(data, self.kernel.measure if self.kernel is not None else None, main_state)
            train_loss, calls = self.train_loss.pop_mean()
            self.learning_rates.flush()
            record = {"train_loss": train_loss, "train_loss_calls": calls,
                      **(self.kernel.snapshot_record() if self.kernel is not None else {})}
            committed = self.recorder.commit(data, record)
            if not self.sink.writes:
                return
            self.transition.update(data.step, self.recorder.last_rows, self.recorder.last_filled)
            if self.on_snapshot is not None:
                self.sink.flush()  # callbacks (exporters) may read the run back
                kernel_lag = self.kernel.config.lag_steps if self.kernel is not None else None
                self.on_snapshot({**committed, "rows": self.recorder.last_rows, "out": self.sink.root,
                                  "transition": self.transition.estimate, "kernel_lag_steps": kernel_lag,
                                  "steps": [s["step"] for s in self.sink.snapshots]})
            if self.barriers is not None:
                self.barriers.on_snapshot(data, main_state, ghosts)
