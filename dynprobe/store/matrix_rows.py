"""The row files of one interval matrix: ``metrics/NAME.rows`` and, for C per layer, ``metrics/NAME.layer_NNN.rows``.

:class:`MatrixRows` stores what a :class:`dynprobe.metrics.interval.PairwiseMatrix` computes — each new row
``M[t, 0..t]`` of every channel (:meth:`MatrixRows.append`) and the pending entries completed later
(:meth:`MatrixRows.fill`) — in :class:`~dynprobe.store.rows.TriangularRows` files, channel ``c`` in file ``c``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .rows import TriangularRows

__all__ = ["MatrixRows"]


class MatrixRows:
    """The append-only row files of a matrix's channels (channel 0 first).

    Args:
        paths: one file per channel.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self.files = [TriangularRows(Path(p)) for p in paths]

    @property
    def channels(self) -> int:
        return len(self.files)

    def append(self, row: np.ndarray, index: int) -> None:
        """Append row ``index`` of every channel: ``row`` is float64 (channels, index + 1)."""
        row = np.asarray(row, dtype=np.float64).reshape(self.channels, -1)
        for channel, rows in enumerate(self.files):
            rows.append(row[channel], index)

    def fill(self, filled: Sequence[tuple[int, np.ndarray, np.ndarray]]) -> None:
        """Write completed entries in place: ``[(row, columns, values (channels, len(columns)))]``."""
        for index, columns, values in filled:
            values = np.asarray(values, dtype=np.float64).reshape(self.channels, -1)
            for channel, rows in enumerate(self.files):
                rows.fill(index, columns, values[channel])

    def truncate(self, rows: int) -> None:
        """Keep the first ``rows`` rows of every channel (rows of a snapshot that did not commit go)."""
        for file in self.files:
            file.truncate(rows)

    def read(self, rows: int, channel: int = 0) -> np.ndarray:
        """The symmetric ``rows × rows`` matrix of ``channel`` (NaN where not computed)."""
        return self.files[channel].read(rows)
