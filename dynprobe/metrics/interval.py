"""Online pairwise matrices: one row per snapshot, O(T) work per row (torchmetrics-style state objects).

A :class:`PairwiseMatrix` owns the state of one interval metric over a run's snapshots (C, D, S, ...): the
earlier snapshots' vectors (:class:`VectorHistory`) and the append-only row file. ``update(vector)`` computes
the new row ``M[t, 0..t]`` with a pure function from :mod:`dynprobe.metrics` and appends it; ``compute()``
returns the T×T matrix. The math never lives here.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from dynprobe.store.rows import TriangularRows

__all__ = ["PairwiseMatrix", "VectorHistory"]

# A row function maps (new vector, k earlier vectors stacked) to the k metric values, float64.
RowFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

class VectorHistory:
    """The vectors of earlier snapshots, kept on the computing device within a memory budget.

    Resident vectors live in one preallocated ``(capacity, dim)`` buffer (grown by doubling), so a new row is a
    single matrix-vector product over a view, with no re-stacking per snapshot. Entries beyond the budget stay
    in the run directory and are streamed back in chunks, so a long run never holds T×p numbers in memory. An
    entry may be ``None`` (the metric was not measured at that snapshot); its row entries are NaN.

    Args:
        device: where rows are computed (the model's device).
        dtype: dtype the vectors are kept in (float64 for C and S, so rows need no per-snapshot cast).
        memory_budget: bytes of resident vectors.
        load: ``index -> array or None``, reads an entry back from the run directory.
        chunk_bytes: size of the chunks streamed back from disk.
    """

    def __init__(
        self,
        device: torch.device,
        *,
        dtype: torch.dtype,
        memory_budget: int,
        load: Callable[[int], np.ndarray | None],
        chunk_bytes: int = 64 * 2**20,
    ) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self.memory_budget, self.chunk_bytes = int(memory_budget), int(chunk_bytes)
        self._load = load
        self._count = 0
        self._buffer: torch.Tensor | None = None
        self._resident: list[int] = []  # snapshot index of each buffer row
        self._on_disk: list[int] = []  # snapshot indices beyond the budget

    def __len__(self) -> int:
        return self._count

    def append(self, vector: torch.Tensor | None) -> None:
        index = self._count
        self._count += 1
        if vector is not None:
            self._store(index, vector.detach().reshape(-1))

    def extend_from_disk(self, present: list[bool]) -> None:
        """Register entries already in the run directory (a resumed run), loading what fits the budget."""
        for was_present in present:
            index = self._count
            self._count += 1
            if was_present:
                array = self._load(index)
                if array is not None:
                    self._store(index, torch.from_numpy(np.array(array)).reshape(-1))

    def _store(self, index: int, vector: torch.Tensor) -> None:
        if self._fits(vector.numel()):
            assert self._buffer is not None
            self._buffer[len(self._resident)].copy_(vector)
            self._resident.append(index)
        else:
            self._on_disk.append(index)

    def _fits(self, dim: int) -> bool:
        row_bytes = dim * torch.empty((), dtype=self.dtype).element_size()
        rows_needed = len(self._resident) + 1
        if self._on_disk or rows_needed * row_bytes > self.memory_budget:
            return False
        if self._buffer is None or self._buffer.shape[0] < rows_needed:
            capacity = min(max(8, 2 * rows_needed), max(1, self.memory_budget // row_bytes))
            grown = torch.empty((capacity, dim), dtype=self.dtype, device=self.device)
            if self._buffer is not None:
                grown[: len(self._resident)].copy_(self._buffer[: len(self._resident)])
            self._buffer = grown
        return True

    def chunks(self) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Yield ``(indices, stacked vectors)``: the resident block as one view, then disk entries in chunks."""
        if self._resident:
            assert self._buffer is not None
            yield self._resident, self._buffer[: len(self._resident)]
        indices: list[int] = []
        tensors: list[torch.Tensor] = []
        size = 0
        for index in self._on_disk:
            array = self._load(index)
            if array is None:
                continue
            tensor = torch.from_numpy(np.array(array)).reshape(-1).to(self.device, self.dtype)
            if tensors and size + tensor.numel() * tensor.element_size() > self.chunk_bytes:
                yield indices, torch.stack(tensors)
                indices, tensors, size = [], [], 0
            indices.append(index)
            tensors.append(tensor)
            size += tensor.numel() * tensor.element_size()
        if tensors:
            yield indices, torch.stack(tensors)


class PairwiseMatrix:
    """Online T×T matrix of one interval metric; ``update`` appends row t against snapshots 0..t.

    Args:
        name: the metric's name (``"C"``, ``"D"``, ``"S"``); also the row file's stem.
        row_function: pure function (vector, stacked earlier vectors) → values, e.g.
            :func:`dynprobe.metrics.cosine_dissimilarity_to_many`.
        history: where earlier vectors are kept.
        rows: the append-only row file.
        self_value: the diagonal M[t, t] (0 for a distance of a vector to itself, by definition rather than by
            round-off).
    """

    def __init__(
        self, name: str, row_function: RowFunction, history: VectorHistory, rows: TriangularRows,
        *, self_value: float = 0.0,
    ) -> None:
        self.name = name
        self.row_function = row_function
        self.history = history
        self.rows = rows
        self.self_value = self_value

    @property
    def count(self) -> int:
        return len(self.history)

    def update(self, vector: torch.Tensor | None) -> np.ndarray:
        """Append the row of a new snapshot (``None``: not measured at this snapshot, a NaN row)."""
        index = self.count
        row = np.full(index + 1, np.nan)
        if vector is not None:
            vector = vector.detach().to(self.history.device)
            for indices, stacked in self.history.chunks():
                row[indices] = self.row_function(vector, stacked).cpu().numpy()
            row[index] = self.self_value
        self.rows.append(row, index)
        self.history.append(vector)
        return row

    def compute(self) -> np.ndarray:
        """The full symmetric matrix so far (NaN where not computed)."""
        return self.rows.read(self.count)

    @classmethod
    def reattach(
        cls, name: str, row_function: RowFunction, history: VectorHistory, path: Path, present: list[bool],
        *, self_value: float = 0.0,
    ) -> PairwiseMatrix:
        """Continue a matrix of a resumed run whose first ``len(present)`` rows are committed."""
        rows = TriangularRows(path)
        rows.truncate(len(present))
        history.extend_from_disk(present)
        return cls(name, row_function, history, rows, self_value=self_value)
