"""What happens at a snapshot, in order: measure the model, check for inert parameter tensors (once), compare the live
ghosts, commit, then tell the online detector, the user's ``on_snapshot`` and the barrier scheduler.

The commit is a transaction (:meth:`dynprobe.recording.snapshot.SnapshotRecorder.commit`): an exception inside it
leaves no row behind. Once it stands, the detector is told even if an exception (a Ctrl-C) followed the commit,
since the detector must see every committed row, in order."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from dynprobe._util.signals import interrupts_deferred
from dynprobe.ghosts.ghost_set import GhostSet
from dynprobe.recording.barriers import BarrierScheduler
from dynprobe.recording.inert import InertWatch
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
                 on_snapshot: Callable[[dict[str, Any]], None] | None, inert: InertWatch | None) -> None:
        self.recorder, self.kernel = recorder, kernel
        self.train_loss, self.barriers, self.transition, self.progress = train_loss, barriers, transition, progress
        self.learning_rates = learning_rates
        self.model, self.sink = model, sink
        self.on_snapshot = on_snapshot
        self.inert = inert

    def take(self, step: int, *, ghosts: GhostSet | None) -> None:
        """The snapshot at ``step`` (optimizer steps taken)."""
        with self.progress.snapshot(step):
            data = self.recorder.measure(step)
            data.extra_arrays.update(self.kernel.snapshot_arrays() if self.kernel is not None else {})
            main_state = {name: t.detach() for name, t in
                          list(self.model.named_parameters()) + list(self.model.named_buffers()) if t is not None}
            inert = self.inert.check(step) if self.inert is not None else []
            if ghosts is not None:
                if inert:
                    ghosts.set_inert(inert)
                self.progress.phase("ghosts", f"comparing {len(ghosts.live)} ghosts")
                ghosts.compare(data, self.kernel.measure if self.kernel is not None else None, main_state)
            train_loss, calls = self.train_loss.pop_mean()
            self.learning_rates.flush()
            record = {"train_loss": train_loss, "train_loss_calls": calls,
                      **(self.kernel.snapshot_record() if self.kernel is not None else {})}
            count = len(self.sink.snapshots)
            try:
                committed = self.recorder.commit(data, record)
            finally:  # a committed snapshot's rows reach the detector even when an interrupt follows the commit
                if self.sink.writes and len(self.sink.snapshots) > count:
                    with interrupts_deferred():
                        self.transition.update(data.step, self.recorder.last_rows, self.recorder.last_filled)
            if not self.sink.writes:
                return
            if self.on_snapshot is not None:
                self.sink.flush()  # callbacks (exporters) may read the run back
                kernel_lag = self.kernel.config.lag_steps or None if self.kernel is not None else None
                self.on_snapshot({**committed, "rows": self.recorder.last_rows, "out": self.sink.root,
                                  "transition": self.transition.estimate, "kernel_lag_steps": kernel_lag,
                                  "steps": [s["step"] for s in self.sink.snapshots]})
            if self.barriers is not None:
                self.barriers.on_snapshot(data, main_state, ghosts)
