"""The watched training loss: every call recorded, the per-snapshot mean exact across a resume.

The loss tensors of a stretch of steps stay detached on their device (no synchronisation per step) and are appended
to ``train_loss.f8`` as little-endian float64 (step, loss) pairs at each snapshot, every :data:`FLUSH_EVERY` calls and
at close. A snapshot's ``train_loss`` is the mean of the losses recorded at steps after the previous snapshot, up to
its own step — micro-batches of gradient accumulation included, each call counted once. After a resume the losses the
interrupted process had flushed for steps up to the resume step are read back, so the mean covers the same steps as
an uninterrupted run's whenever they were flushed; ``train_loss_calls`` in the snapshot record says how many calls the
mean covers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dynprobe.store.rows import PairLog

__all__ = ["FLUSH_EVERY", "TrainLoss", "read_train_losses"]

FLUSH_EVERY = 256  # calls between flushes: one device synchronisation per this many steps at most


def read_train_losses(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(steps int64, losses float64)`` of every complete pair in ``path`` (a torn last pair is ignored)."""
    return PairLog(path).read()


class TrainLoss:
    """The training losses since the last snapshot, and their log on disk.

    Args:
        path: ``train_loss.f8`` of the run, or None where nothing is written (DDP ranks other than 0).
        resumed_at: for a resumed run, the step training restarts from: the flushed pairs up to it and after ``since``
            are taken back as the current stretch (the writer's resume cuts the pairs after it from the log).
        since: the step of the last committed snapshot (a resumed run).
    """

    def __init__(self, path: Path | None, *, resumed_at: int | None = None, since: int | None = None) -> None:
        self.path = None if path is None else Path(path)
        self._pending: list[tuple[int, torch.Tensor]] = []  # not yet on disk
        self._stretch: list[float] = []  # flushed losses of the current stretch, in order
        if self.path is not None and resumed_at is not None:
            steps, losses = read_train_losses(self.path)
            keep = steps <= resumed_at
            lower = -1 if since is None else since
            self._stretch = [float(v) for v in losses[keep & (steps > lower)]]

    def note(self, step: int, loss: torch.Tensor) -> None:
        """A watched loss call at (the coming) ``step``. Per-example losses (``reduction="none"``, any shape) are
        logged as their mean, in float64 — your ``.mean()``; a ``.sum()`` is that mean times the batch size — and the
        probe records that it saw them (the ``per_example_loss`` event)."""
        loss = loss.detach()
        self._pending.append((step, loss.to(torch.float64).mean() if loss.dim() else loss))
        if len(self._pending) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Move the pending losses to the stretch and append them to the log."""
        if not self._pending:
            return
        # float64 on the device: exact for float32, bfloat16 and float16 losses, and a float64 loss keeps every digit
        values = torch.stack([loss.reshape(()).to(torch.float64) for _, loss in self._pending]).cpu().numpy()
        steps = np.array([step for step, _ in self._pending], dtype=np.float64)
        self._pending.clear()
        self._stretch.extend(float(v) for v in values)
        if self.path is not None:
            PairLog(self.path).append(steps, values)

    def pop_mean(self) -> tuple[float | None, int]:
        """The mean loss of the stretch since the previous snapshot and how many calls it covers; starts a new one."""
        self.flush()
        values, self._stretch = self._stretch, []
        if not values:
            return None, 0
        return float(np.mean(np.asarray(values, dtype=np.float64))), len(values)
