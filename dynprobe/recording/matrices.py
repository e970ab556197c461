"""An interval matrix as the recorder keeps it: the pure state object and its row files, updated as one transaction.

:class:`RecordedMatrix` pairs a :class:`dynprobe.metrics.interval.PairwiseMatrix` (the state and the math, no I/O)
with its :class:`dynprobe.store.matrix_rows.MatrixRows` (the files): each new row is appended to the files as soon
as it is computed, and so are the pending entries completed on the way. Between :meth:`RecordedMatrix.begin` and
:meth:`RecordedMatrix.end` the updates of one snapshot can be undone (:meth:`RecordedMatrix.rollback`): the state
returns to the savepoint and the files lose the rows appended since; entries filled in place since then are
pending again and are computed again, to the same values.
"""
from __future__ import annotations

import numpy as np
import torch

from dynprobe.metrics.interval import MatrixSavepoint, PairwiseMatrix
from dynprobe.store.history import VectorHistory
from dynprobe.store.matrix_rows import MatrixRows

__all__ = ["RecordedMatrix"]


class RecordedMatrix:
    """One interval matrix of a run: :attr:`matrix` (the state) and :attr:`rows` (its files)."""

    def __init__(self, matrix: PairwiseMatrix, rows: MatrixRows) -> None:
        if rows.channels != matrix.metric.channels:
            raise ValueError(f"{matrix.name}: {matrix.metric.channels} channels but {rows.channels} row files")
        self.matrix, self.rows = matrix, rows
        self._taken: list[tuple[int, np.ndarray, np.ndarray]] = []  # channel-0 entries filled since taken
        self._savepoint: tuple[MatrixSavepoint, int, int] | None = None

    @property
    def history(self) -> VectorHistory:
        return self.matrix.history

    @property
    def last_row(self) -> np.ndarray | None:
        return self.matrix.last_row

    @property
    def count(self) -> int:
        return self.matrix.count

    def update(self, vector: torch.Tensor | None) -> np.ndarray:
        """Compute and store the row of a new snapshot; returns its channel 0."""
        index = self.matrix.count
        row = self.matrix.update(vector)
        assert self.matrix.last_row is not None
        self.rows.append(self.matrix.last_row, index)
        self._store_filled()
        return row

    def complete(self) -> None:
        """Compute and store every pending entry."""
        self.matrix.complete()
        self._store_filled()

    def _store_filled(self) -> None:
        filled = self.matrix.take_filled()
        self.rows.fill(filled)
        self._taken.extend((i, columns, values[0]) for i, columns, values in filled)

    def take_filled(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Pending entries of channel 0 computed since the last call: ``[(row, columns, values)]``."""
        taken, self._taken = self._taken, []
        return taken

    def compute(self, channel: int = 0) -> np.ndarray:
        """The full symmetric matrix so far, read from the row files (NaN where not computed or still pending)."""
        return self.rows.read(self.matrix.count, channel)

    # ------------------------------------------------------------------------------------------- transactions

    def begin(self) -> None:
        """Open the transaction of one snapshot."""
        self._savepoint = (self.matrix.savepoint(), self.matrix.count, len(self._taken))

    def end(self) -> None:
        """Close the transaction (committed, or already rolled back)."""
        if self._savepoint is not None:
            self.matrix.release_savepoint()
        self._savepoint = None

    def rollback(self) -> None:
        """Undo the snapshot's updates: the state as at :meth:`begin`, the rows appended since cut off."""
        if self._savepoint is None:
            return
        savepoint, count, taken = self._savepoint
        self._savepoint = None
        self.matrix.rollback(savepoint)
        del self._taken[taken:]
        self.rows.truncate(count)
