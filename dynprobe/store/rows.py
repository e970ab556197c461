"""Append-only binary logs of a run: lower-triangular matrix rows (``metrics/NAME.rows``) and (step, value) pairs
(``train_loss.f8``, ``ghosts/ghost_NNN.separation``). Both are little-endian float64; the file size says how many
records are complete, so a record torn by a kill is simply not counted, and a writer cuts it before appending."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .files import RunFormatError, append_bytes, open_for_writing, truncate_file
from .reading import open_regular, regular_size

__all__ = ["MAX_PAIRS_PER_STEP", "PAIR_BYTES", "PairLog", "TriangularRows"]


class TriangularRows:
    """An append-only file of the lower triangle of a T×T float64 matrix: row k holds ``M[k, 0..k]``.

    Appending a row costs O(k) bytes (the online metrics' O(T) per snapshot). Values are little-endian float64;
    NaN marks entries that were not computed.
    """

    itemsize = 8

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @staticmethod
    def bytes_for(rows: int) -> int:
        return rows * (rows + 1) // 2 * TriangularRows.itemsize

    @classmethod
    def rows_in(cls, size: int) -> int:
        """How many complete rows ``size`` bytes hold."""
        rows = int((np.sqrt(8 * size / cls.itemsize + 1) - 1) // 2)
        while cls.bytes_for(rows + 1) <= size:
            rows += 1
        while rows and cls.bytes_for(rows) > size:
            rows -= 1
        return rows

    def _size(self) -> int:
        return regular_size(self.path)  # 0 when missing; a folder or FIFO here is a RunFormatError

    def complete_rows(self) -> int:
        return self.rows_in(self._size())

    def append(self, row: np.ndarray, index: int) -> None:
        row = np.ascontiguousarray(row, dtype="<f8").reshape(-1)
        if row.size != index + 1:
            raise ValueError(f"row {index} of {self.path.name} must have {index + 1} entries; got {row.size}")
        size = self._size()
        if size != self.bytes_for(index):
            if size < self.bytes_for(index):
                raise ValueError(f"{self.path} holds {self.complete_rows()} complete rows; cannot append row {index}")
            self.truncate(index)  # a torn row, or rows of snapshots that were never committed
        append_bytes(self.path, row.tobytes())

    def fill(self, index: int, columns: np.ndarray, values: np.ndarray) -> None:
        """Write ``M[index, columns] = values`` in place, in a row that is already complete in the file.

        For entries a row was appended without (NaN) and that are computed later, in a block (an interval
        matrix whose history spilled to disk). Crash safety: the file never changes size, each value is one
        aligned 8-byte write over a NaN placeholder (never split by a sector boundary), so a kill in the middle
        leaves every entry either NaN (still pending: a resumed probe computes it again) or final.
        """
        columns = np.asarray(columns, dtype=np.int64).reshape(-1)
        values = np.ascontiguousarray(values, dtype="<f8").reshape(-1)
        if columns.size != values.size:
            raise ValueError(f"{columns.size} columns but {values.size} values")
        if columns.size == 0:
            return
        if columns.min() < 0 or columns.max() > index or index >= self.complete_rows():
            raise ValueError(f"{self.path.name}: row {index} is not complete, or columns {columns.min()}.."
                             f"{columns.max()} are outside it")
        order = np.argsort(columns, kind="stable")
        columns, values = columns[order], values[order]
        breaks = np.flatnonzero(np.diff(columns) != 1) + 1  # runs of adjacent columns: one write each
        fd = open_for_writing(self.path, os.O_WRONLY)
        try:
            for run_columns, run_values in zip(np.split(columns, breaks), np.split(values, breaks)):
                data, offset = memoryview(run_values.tobytes()), self.bytes_for(index) + int(run_columns[0]) * 8
                while data:
                    written = os.pwrite(fd, data, offset)
                    data, offset = data[written:], offset + written
        finally:
            os.close(fd)

    def truncate(self, rows: int) -> None:
        """Keep the first ``rows`` rows (drops a torn row, or rows of snapshots a resumed run rewound)."""
        truncate_file(self.path, self.bytes_for(rows))

    def read(self, rows: int) -> np.ndarray:
        """The symmetric ``rows × rows`` matrix (NaN where not computed or where the file is short).

        The caller bounds ``rows`` (a :class:`dynprobe.store.Run` never asks for more rows than the file holds), so
        the matrix is never larger than about twice the file.
        """
        matrix = np.full((rows, rows), np.nan)
        available = min(rows, self.complete_rows())
        if available == 0:
            return matrix
        with open_regular(self.path) as handle:
            flat = np.fromfile(handle, dtype="<f8", count=self.bytes_for(available) // self.itemsize)
        if flat.size != self.bytes_for(available) // self.itemsize:
            raise RunFormatError(f"{self.path} shrank while it was read; read the run again")
        lower = np.tril_indices(available)
        # np.tril_indices walks row by row, left to right: the file's order.
        matrix[lower] = flat
        matrix[(lower[1], lower[0])] = flat
        return matrix


_PAIR = np.dtype([("step", "<f8"), ("value", "<f8")])
PAIR_BYTES = _PAIR.itemsize  # one (step, value) record
_CHUNK_PAIRS = 65536
MAX_PAIRS_PER_STEP = 65536  # watched-loss calls per optimizer step (accumulation, an eval loop): room to spare


class PairLog:
    """An append-only log of (step, value) float64 pairs, in step order (the watched training loss of every call,
    a ghost's separation after every step it takes)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, steps: np.ndarray, values: np.ndarray, *, durable: bool = False) -> None:
        """Append pairs; a torn pair left by a kill is cut first."""
        steps, values = np.asarray(steps, dtype="<f8").reshape(-1), np.asarray(values, dtype="<f8").reshape(-1)
        if steps.shape != values.shape:
            raise ValueError(f"{self.path.name}: {steps.size} steps but {values.size} values")
        pairs = np.empty(steps.size, dtype=_PAIR)
        pairs["step"], pairs["value"] = steps, values
        size = self.path.stat().st_size if self.path.exists() else 0
        if size % _PAIR.itemsize:
            truncate_file(self.path, size - size % _PAIR.itemsize)
        append_bytes(self.path, pairs.tobytes(), durable=durable)

    def read(self, *, until: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(steps int64, values float64)`` of every complete pair (a torn last pair is ignored), up to step
        ``until`` when given.

        Read in chunks, in bounded time and memory whatever the file's declared size: reading stops at the first
        pair after ``until``, and a log holding more than :data:`MAX_PAIRS_PER_STEP` pairs per step on average
        (a sparse file of zeros, a foreign file) raises :class:`RunFormatError`, as do steps that go back.
        """
        try:
            handle = open_regular(self.path)
        except FileNotFoundError:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        chunks, count = [], 0
        with handle:
            while True:
                data = os.pread(handle.fileno(), _CHUNK_PAIRS * _PAIR.itemsize, count * _PAIR.itemsize)
                pairs = np.frombuffer(data[: len(data) - len(data) % _PAIR.itemsize], dtype=_PAIR)
                if pairs.size == 0:
                    break
                steps = pairs["step"]
                previous = chunks[-1]["step"][-1] if chunks else -np.inf
                if not (np.all(np.isfinite(steps)) and steps[0] >= previous and np.all(np.diff(steps) >= 0)):
                    raise RunFormatError(f"{self.path}: steps go back or are not numbers; the file is damaged. "
                                         "Move it aside to read the rest of the run")
                if until is not None and steps[-1] > until:
                    chunks.append(pairs[: int(np.searchsorted(steps, until, side="right"))])
                    break
                chunks.append(pairs)
                count += pairs.size
                if count > (max(float(steps[-1]), 0.0) + 1) * MAX_PAIRS_PER_STEP:
                    raise RunFormatError(
                        f"{self.path} holds {count} records for steps up to {int(steps[-1])}, more than "
                        f"{MAX_PAIRS_PER_STEP} per step: not a log dynprobe wrote (a sparse or foreign file). Move it "
                        "aside to read the rest of the run")
        pairs = np.concatenate(chunks) if chunks else np.zeros(0, dtype=_PAIR)
        return pairs["step"].astype(np.int64), pairs["value"].astype(np.float64)

    def truncate_after(self, step: int) -> None:
        """Drop the pairs recorded after ``step`` (a resumed run that restarts from ``step``), and a torn pair."""
        steps, _ = self.read()
        later = np.flatnonzero(steps > step)
        keep = int(later[0]) if later.size else steps.size
        truncate_file(self.path, keep * _PAIR.itemsize)

    def remove(self) -> None:
        """Delete the log (a ghost whose spawn a resumed run discarded); never follows a link."""
        self.path.unlink(missing_ok=True)  # unlinking a link removes the link, never its target
