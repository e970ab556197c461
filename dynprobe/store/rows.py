"""Append-only lower-triangular rows of an interval matrix (``metrics/NAME.rows``): O(T) bytes per snapshot."""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["TriangularRows"]


class TriangularRows:
    """An append-only file of the lower triangle of a T×T float64 matrix: row k holds ``M[k, 0..k]``.

    Appending a row costs O(k) bytes (the online metrics' O(T) per snapshot); the file size says how many rows
    are complete, so a torn final row is simply not counted. Values are little-endian float64; NaN marks
    entries that were not computed.
    """

    itemsize = 8

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @staticmethod
    def bytes_for(rows: int) -> int:
        return rows * (rows + 1) // 2 * TriangularRows.itemsize

    def complete_rows(self) -> int:
        size = self.path.stat().st_size if self.path.exists() else 0
        rows = int((np.sqrt(8 * size / self.itemsize + 1) - 1) // 2)
        while self.bytes_for(rows + 1) <= size:
            rows += 1
        while rows and self.bytes_for(rows) > size:
            rows -= 1
        return rows

    def append(self, row: np.ndarray, index: int) -> None:
        row = np.ascontiguousarray(row, dtype="<f8").reshape(-1)
        if row.size != index + 1:
            raise ValueError(f"row {index} of {self.path.name} must have {index + 1} entries; got {row.size}")
        size = self.path.stat().st_size if self.path.exists() else 0
        if size != self.bytes_for(index):
            if size < self.bytes_for(index):
                raise ValueError(f"{self.path} holds {self.complete_rows()} complete rows; cannot append row {index}")
            self.truncate(index)  # a torn row, or rows of snapshots that were never committed
        with open(self.path, "ab") as handle:
            handle.write(row.tobytes())
            handle.flush()

    def truncate(self, rows: int) -> None:
        """Keep the first ``rows`` rows (drops a torn row, or rows of snapshots a resumed run rewound)."""
        if self.path.exists():
            with open(self.path, "r+b") as handle:
                handle.truncate(self.bytes_for(rows))

    def read(self, rows: int) -> np.ndarray:
        """The symmetric ``rows × rows`` matrix (NaN where not computed or where the file is short)."""
        matrix = np.full((rows, rows), np.nan)
        if rows == 0 or not self.path.exists():
            return matrix
        available = min(rows, self.complete_rows())
        flat = np.fromfile(self.path, dtype="<f8", count=self.bytes_for(available) // self.itemsize)
        lower = np.tril_indices(available)
        # np.tril_indices walks row by row, left to right: the file's order.
        matrix[lower] = flat
        matrix[(lower[1], lower[0])] = flat
        return matrix
