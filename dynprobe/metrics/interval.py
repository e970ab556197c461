"""Online pairwise matrices: one row per snapshot (torchmetrics-style state objects).

A :class:`PairwiseMatrix` owns the state of one interval metric over a run's snapshots (C, D, S, ...): the
earlier snapshots' vectors (:class:`VectorHistory`) and the append-only row files (one per channel: C has one
channel for the whole parameter vector and one per layer). ``update(vector)`` computes the new row
``M[t, 0..t]`` with a :class:`PairMetric` and appends it; ``compute()`` returns the T×T matrix.

**Memory and disk.** The history is kept in the vectors' own dtype (a float32 model's θ in float32: float64
storage would double memory and buy no precision, since the rows accumulate in float64 anyway) within a byte
budget. While every vector fits, rows are complete at once. Beyond the budget the history *spills*: memory
then holds an anchor (the first snapshot) and a ring of the newest snapshots; a new row is computed at once
against what is in memory (so ``C(t, 0)`` and ``C(t, t−1)`` are always available online) and its entries
against the spilled vectors are left NaN (pending). When ``K`` rows are pending, they are completed together and
written in place (:meth:`dynprobe.store.rows.TriangularRows.fill`): for C and S (:mod:`dynprobe.metrics._columns`)
every vector involved is read back once, one column span at a time, so ``K = max(ring, MIN_GROUP)`` does not
depend on memory; for other metrics ``K`` is the ring (the pending rows are all in it) and each spilled vector is
read whole once per group. A run of T snapshots of p numbers so reads about ``T²·p / (2K) + T·p`` numbers from
disk instead of ``T²·p / 2``.
:meth:`PairwiseMatrix.complete` finishes the pending entries (the probe calls it at close).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from dynprobe.store.rows import TriangularRows

from ._blocked import Blocks, cosine_rows, squared_norms
from ._columns import complete_by_columns

__all__ = ["CosineMetric", "FunctionMetric", "PairMetric", "PairwiseMatrix", "VectorHistory"]

# A row function maps (new vector, k earlier vectors stacked) to the k metric values, float64.
RowFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# C and S rows completed together after the spill: a pending entry waits at most 15 snapshots, and a run of T
# snapshots reads about T²·p/32 numbers back instead of the T²·p/2 of re-reading at every snapshot (module docstring)
MIN_GROUP = 16


class PairMetric(Protocol):
    """A metric between one vector and a stack of vectors, on ``channels`` outputs."""

    channels: int

    def summary(self, vector: torch.Tensor) -> np.ndarray:
        """Per-vector numbers computed once and kept for every snapshot (e.g. squared norms)."""

    def rows(self, vector: torch.Tensor, summary: np.ndarray, stack: torch.Tensor,
             stack_summaries: np.ndarray) -> np.ndarray:
        """Values between ``vector`` and each row of ``stack``; float64 (channels, n)."""


class CosineMetric:
    """C (eq. 1) or S (eq. 4): cosine dissimilarity, per channel (the whole vector, then each layer slice)."""

    def __init__(self, size: int | None = None, slices: Sequence[slice] | None = None) -> None:
        self._slices = slices
        self._blocks = Blocks(size, slices) if size is not None else None
        self.channels = 1 + len(slices) if slices else 1

    def blocks(self, size: int) -> Blocks:
        """The block structure (built at the first vector when the size was not known up front)."""
        if self._blocks is None:
            self._blocks = Blocks(size, self._slices)
        if self._blocks.size != size:
            raise ValueError(f"vectors of {size} elements for a metric over {self._blocks.size}")
        return self._blocks

    def summary(self, vector: torch.Tensor) -> np.ndarray:
        return squared_norms(vector.reshape(-1), self.blocks(vector.numel()))

    def rows(self, vector, summary, stack, stack_summaries) -> np.ndarray:
        return cosine_rows(vector.reshape(-1), summary, stack, stack_summaries, self.blocks(vector.numel()))[0]

    def summary_and_rows(self, vector, stack, stack_summaries) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`summary` and :meth:`rows` in one pass over ``vector`` (its norms come with the dot products)."""
        values, norms = cosine_rows(vector.reshape(-1), None, stack, stack_summaries, self.blocks(vector.numel()))
        return norms, values


class FunctionMetric:
    """A one-channel metric from a row function ``(vector, stack) -> (n,)`` (D, eq. 6, and the task's D)."""

    channels = 1

    def __init__(self, function: RowFunction) -> None:
        self.function = function

    def summary(self, vector: torch.Tensor) -> np.ndarray:
        return np.zeros(0)

    def rows(self, vector, summary, stack, stack_summaries) -> np.ndarray:
        return torch.as_tensor(self.function(vector, stack)).detach().cpu().numpy().astype(np.float64)[None]


def _uninitialized(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` that leaves memory untouched even when deterministic mode would fill it with NaN (every
    row is written before it is read)."""
    flags = getattr(torch.utils, "deterministic", None)
    fill = getattr(flags, "fill_uninitialized_memory", False)
    if fill:
        flags.fill_uninitialized_memory = False
    try:
        return torch.empty(shape, dtype=dtype, device=device)
    finally:
        if fill:
            flags.fill_uninitialized_memory = True


class VectorHistory:
    """The vectors of earlier snapshots: in one preallocated buffer within a byte budget, beyond it on disk.

    Args:
        device: where rows are computed (the model's device).
        dtype: dtype the vectors are kept in (the parameters' own dtype for C; exact for the values stored).
        memory_budget: bytes of vectors kept in memory.
        load: ``index -> array or None``, reads an entry back from the run directory.
        load_columns: ``(index, start, stop) -> array or None``, reads entries ``start:stop`` of a stored vector
            (None: :meth:`load_columns` reads the whole vector and slices it).
        before_load: called before entries are read back (waits for a background writer to finish them).

    ``bytes_loaded`` counts what was read back. While every vector fits, the buffer holds them all in order;
    after the spill it holds the anchor (the first snapshot, when two or more fit) and a ring of the newest
    ``ring_size`` snapshots (module docstring).
    """

    def __init__(self, device: torch.device, *, dtype: torch.dtype, memory_budget: int,
                 load: Callable[[int], np.ndarray | None],
                 load_columns: Callable[[int, int, int], np.ndarray | None] | None = None,
                 before_load: Callable[[], None] | None = None) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self.memory_budget = int(memory_budget)
        self._load, self._load_columns, self._before_load = load, load_columns, before_load
        self.present: list[bool] = []
        self.summaries: dict[int, np.ndarray] = {}
        self.slots: list[int] = []  # snapshot index held by each used buffer row
        self.far: list[int] = []  # present snapshots not in memory (ascending)
        self.spilled = False
        self.anchored = False  # after the spill: slot 0 keeps the first snapshot
        self.capacity: int | None = None
        self.size: int | None = None  # numbers per vector
        self.bytes_loaded = 0
        self._buffer: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.present)

    @property
    def ring_size(self) -> int:
        """How many of the newest snapshots stay in memory after the spill (0: none)."""
        return max(0, (self.capacity or 0) - int(self.anchored))

    def _set_capacity(self, dim: int) -> None:
        if self.capacity is None:
            row = dim * torch.empty((), dtype=self.dtype).element_size()
            self.capacity = self.memory_budget // max(1, row)
            self.size = int(dim)

    def resident(self) -> tuple[list[int], torch.Tensor | None]:
        """The indices in memory and their stacked vectors (one view of the buffer; slot order, not sorted)."""
        if not self.slots:
            return [], None
        assert self._buffer is not None
        return list(self.slots), self._buffer[: len(self.slots)]

    def stacked(self, indices: list[int], extra: dict[int, torch.Tensor]) -> torch.Tensor:
        """The vectors of ``indices`` (all in memory, or in ``extra``), as a view where possible."""
        position = {index: slot for slot, index in enumerate(self.slots)}
        slots = [position.get(i, -1) for i in indices]
        if self._buffer is not None and -1 not in slots and slots == list(range(slots[0], slots[0] + len(slots))):
            return self._buffer[slots[0] : slots[0] + len(slots)]
        return torch.stack([extra[i] if i in extra else self._buffer[position[i]] for i in indices])

    def in_memory(self, index: int) -> bool:
        return index in self.slots

    def load(self, index: int) -> torch.Tensor | None:
        """Read a vector back from the run directory (counted in ``bytes_loaded``)."""
        return self._tensor(self._load(index))

    def load_columns(self, index: int, start: int, stop: int) -> torch.Tensor | None:
        """Entries ``start:stop`` of a stored vector, read back from the run directory (counted)."""
        if self._load_columns is None:
            whole = self.load(index)
            return None if whole is None else whole[start:stop]
        return self._tensor(self._load_columns(index, start, stop))

    def _tensor(self, array: np.ndarray | None) -> torch.Tensor | None:
        if array is None:
            return None
        self.bytes_loaded += int(array.nbytes)
        array = np.asarray(array).reshape(-1)
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())  # one copy at most
        return tensor.to(self.device, self.dtype)

    def columns(self, index: int, start: int, stop: int, extra: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """Entries ``start:stop`` of a vector: a view of memory (or of ``extra``), else read back."""
        if index in extra:
            return extra[index][start:stop]
        if index in self.slots:
            assert self._buffer is not None
            return self._buffer[self.slots.index(index), start:stop]
        return self.load_columns(index, start, stop)

    def prepare_loads(self) -> None:
        if self._before_load is not None:
            self._before_load()

    # ------------------------------------------------------------------------------------------- storing

    def _put(self, slot: int, vector: torch.Tensor) -> None:
        needed = slot + 1
        if self._buffer is None or self._buffer.shape[0] < needed:
            assert self.capacity is not None
            # On the CPU the whole budget is reserved at once: pages cost memory only once written (the buffer is
            # never NaN-filled, even under torch.use_deterministic_algorithms), and the buffer never has to be
            # copied, so memory never holds two buffers. On an accelerator memory is committed at allocation:
            # the buffer grows by doubling.
            rows = self.capacity if self.device.type == "cpu" else min(self.capacity, max(8, 2 * needed))
            try:
                grown = _uninitialized((rows, vector.numel()), self.dtype, self.device)
            except (RuntimeError, MemoryError) as error:
                raise MemoryError(
                    f"cannot allocate {rows} earlier vectors of {vector.numel()} numbers on {self.device} for the "
                    f"interval rows ({error}); pass a smaller history_memory (now {self.memory_budget} bytes)"
                ) from error
            if self._buffer is not None:
                grown[: len(self.slots)].copy_(self._buffer[: len(self.slots)])
            self._buffer = grown
        self._buffer[slot].copy_(vector.reshape(-1))

    def release(self) -> None:
        """Free the vectors held in memory (the run is over; the row files and matrices are written)."""
        self._buffer = None
        self.slots.clear()

    def append(self, vector: torch.Tensor | None, summary: np.ndarray | None) -> bool:
        """Register the next snapshot and keep its vector in memory. Returns whether it is in memory (False only
        when not even one vector fits, or for ``None``).

        A vector that does not fit while every earlier one did triggers the spill; from then on it replaces the
        oldest snapshot of the ring, which spills.
        """
        index = len(self.present)
        self.present.append(vector is not None)
        if vector is None:
            return False
        assert summary is not None
        self.summaries[index] = summary
        self._set_capacity(vector.numel())
        if not self.spilled and len(self.slots) < self.capacity:
            self._put(len(self.slots), vector)
            self.slots.append(index)
            return True
        if not self.spilled:
            self.spilled, self.anchored = True, (self.capacity or 0) >= 2
        if not self.ring_size:
            self.far.append(index)
            return False
        ring = range(int(self.anchored), len(self.slots))
        oldest = min(ring, key=lambda slot: self.slots[slot])
        self.far.append(self.slots[oldest])  # the ring holds the newest: what leaves it is newer than all of far
        self._put(oldest, vector)
        self.slots[oldest] = index
        return True

    def register_stored(self, present: list[bool], summary: Callable[[torch.Tensor], np.ndarray]) -> None:
        """A resumed run: register the committed entries; load what fits (all, or the anchor and the newest)."""
        indices = [i for i, p in enumerate(present) if p]
        self.present.extend(present)
        if not indices:
            return
        first = self.load(indices[0])
        if first is None:
            raise ValueError(f"the stored vector of snapshot {indices[0]} is missing")
        self._set_capacity(first.numel())
        capacity = self.capacity or 0
        fits = len(indices) <= capacity
        if not fits:
            self.spilled, self.anchored = True, capacity >= 2
        keep = indices if fits else indices[: int(self.anchored)] + indices[len(indices) - self.ring_size :]
        for index in keep:
            vector = first if index == indices[0] else self.load(index)
            self._put(len(self.slots), vector)
            self.slots.append(index)
            self.summaries[index] = summary(vector)
        self.far = [i for i in indices if i not in set(keep)]


class PairwiseMatrix:
    """Online T×T matrix of one interval metric; ``update`` appends row t against snapshots 0..t.

    Args:
        name: the metric's name (``"C"``, ``"D"``, ``"S"``).
        metric: a :class:`PairMetric` (or a row function ``(vector, stack) -> values``, one channel).
        history: where earlier vectors are kept.
        rows: the append-only row file of each channel.
        self_value: the diagonal M[t, t] (0 for a distance of a vector to itself, by definition rather than by
            round-off).
    """

    def __init__(self, name: str, metric: PairMetric | RowFunction, history: VectorHistory,
                 rows: TriangularRows | Sequence[TriangularRows], *, self_value: float = 0.0) -> None:
        self.name = name
        self.metric: PairMetric = metric if hasattr(metric, "channels") else FunctionMetric(metric)
        self.history = history
        self.rows = [rows] if isinstance(rows, TriangularRows) else list(rows)
        if len(self.rows) != self.metric.channels:
            raise ValueError(f"{name}: {self.metric.channels} channels but {len(self.rows)} row files")
        self.self_value = self_value
        self.pending: dict[int, np.ndarray] = {}  # row -> columns still NaN (their vectors spilled)
        self.last_row: np.ndarray | None = None  # (channels, t + 1): the latest row as appended

    @property
    def count(self) -> int:
        return len(self.history)

    @property
    def group_size(self) -> int:
        """Pending rows completed together: the ring (all of them still in memory), or, for a metric computed
        column span by column span (C, S), at least ``MIN_GROUP`` (the rows beyond the ring are read back in
        slices with the spilled vectors)."""
        ring = self.history.ring_size
        return max(ring, MIN_GROUP) if isinstance(self.metric, CosineMetric) else max(1, ring)

    def update(self, vector: torch.Tensor | None) -> np.ndarray:
        """Append the row of a new snapshot (``None``: not measured at this snapshot, a NaN row).

        Returns the row of channel 0 as appended (NaN where pending); :attr:`last_row` has every channel.
        """
        index = self.count
        row = np.full((self.metric.channels, index + 1), np.nan)
        summary = None
        if vector is not None:
            vector = vector.detach().reshape(-1).to(self.history.device)
            indices, stack = self.history.resident()
            if indices and hasattr(self.metric, "summary_and_rows"):
                summaries = np.stack([self.history.summaries[i] for i in indices])
                summary, row[:, indices] = self.metric.summary_and_rows(vector, stack, summaries)
            else:
                summary = self.metric.summary(vector)
                if indices:
                    row[:, indices] = self.metric.rows(vector, summary, stack,
                                                       np.stack([self.history.summaries[i] for i in indices]))
            if self.history.far:
                self.pending[index] = np.asarray(self.history.far, dtype=np.int64)
            row[:, index] = self.self_value
        for channel, rows in enumerate(self.rows):
            rows.append(row[channel], index)
        stored = self.history.append(vector, summary)
        self.last_row = row
        if vector is not None and len(self.pending) >= self.group_size:
            self.complete(extra={} if stored else {index: vector})
        return row[0]

    def complete(self, extra: dict[int, torch.Tensor] | None = None) -> None:
        """Compute every pending entry: each spilled vector is read once per group of pending rows."""
        extra = dict(extra or {})
        waiting = sorted(self.pending)
        if not waiting:
            return
        self.history.prepare_loads()
        group_size = self.group_size
        for start in range(0, len(waiting), group_size):
            group = waiting[start : start + group_size]
            if isinstance(self.metric, CosineMetric):
                self._complete_by_columns(group, extra)
            else:
                self._complete_group(group, extra)

    def _fill(self, values: dict[int, np.ndarray]) -> None:
        for i, row in values.items():
            columns = self.pending.pop(i)
            for channel, rows_file in enumerate(self.rows):
                rows_file.fill(i, columns, row[channel, columns])

    def _complete_group(self, group: list[int], extra: dict[int, torch.Tensor]) -> None:
        """Whole vectors: the group's in memory (or read back), each wanted spilled vector read once."""
        history = self.history
        for index in list(group):
            if not history.in_memory(index) and index not in extra:
                loaded = history.load(index)
                if loaded is None:  # not stored (a sink that writes nothing): its entries stay NaN
                    group.remove(index)
                    self.pending.pop(index)
                    continue
                extra[index] = loaded
            if index not in history.summaries:
                history.summaries[index] = self.metric.summary(extra[index])
        if not group:
            return
        stack = history.stacked(group, extra)
        summaries = np.stack([history.summaries[i] for i in group])
        values = {i: np.full((self.metric.channels, i + 1), np.nan) for i in group}
        wanted = [set(self.pending[i].tolist()) for i in group]
        vector = None
        for j in sorted(set().union(*wanted)):
            vector = None  # the previous one is released before the next is read: one spilled vector at a time
            vector = history.stacked([j], {})[0] if history.in_memory(j) else history.load(j)
            if vector is None:
                continue
            if j not in history.summaries:
                history.summaries[j] = self.metric.summary(vector)
            rows = [k for k, w in enumerate(wanted) if j in w]
            some = stack if len(rows) == len(group) else stack[rows]
            result = self.metric.rows(vector, history.summaries[j], some, summaries[rows])
            for position, k in enumerate(rows):
                values[group[k]][:, j] = result[:, position]
        self._fill(values)

    def _complete_by_columns(self, group: list[int], extra: dict[int, torch.Tensor]) -> None:
        """C and S: the group's vectors that are not in memory and each wanted spilled vector are read once, one
        column span at a time (:func:`~dynprobe.metrics._columns.complete_by_columns`)."""
        assert isinstance(self.metric, CosineMetric) and self.history.size is not None
        values = complete_by_columns(self.metric.blocks(self.history.size), self.history,
                                     {i: self.pending[i] for i in group}, extra)
        for i in group:
            if i not in values:  # not stored (a sink that writes nothing): its entries stay NaN
                self.pending.pop(i)
        self._fill(values)

    def compute(self, channel: int = 0) -> np.ndarray:
        """The full symmetric matrix so far (NaN where not computed, or still pending)."""
        return self.rows[channel].read(self.count)

    @classmethod
    def reattach(cls, name: str, metric: PairMetric | RowFunction, history: VectorHistory,
                 paths: Path | Sequence[Path], present: list[bool], *, self_value: float = 0.0) -> PairwiseMatrix:
        """Continue a matrix of a resumed run whose first ``len(present)`` rows are committed.

        Entries left NaN between two present snapshots (pending when the run stopped) are pending again.
        """
        files = [TriangularRows(p) for p in ([paths] if isinstance(paths, Path) else paths)]
        for rows in files:
            rows.truncate(len(present))
        matrix = cls(name, metric, history, files, self_value=self_value)
        history.register_stored(present, matrix.metric.summary)
        stored = files[0].read(len(present))
        for i, here in enumerate(present):
            missing = [j for j in range(i) if here and present[j] and np.isnan(stored[i, j])]
            if missing:
                matrix.pending[i] = np.asarray(missing, dtype=np.int64)
        matrix.complete()  # the block the run stopped in (the buffer is nearly empty now)
        return matrix
