"""Where the earlier snapshots' vectors of an interval matrix live: a buffer in memory within a byte budget (all
of them, or after the spill the first one and a ring of the newest), the rest in the run directory, read back
whole or one column span at a time (:mod:`dynprobe.metrics.interval` describes the schedule)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["VectorHistory"]


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
        memory_budget: bytes of vectors kept in memory; or a function returning them, called when the second vector
            arrives (the first is kept alone until then): the probe measures its default budget only after the
            user's first optimizer step, once the step's own memory (optimizer state, activations) is taken.
        load: ``index -> array or None``, reads an entry back from the run directory.
        load_columns: ``(index, start, stop) -> array or None``, reads entries ``start:stop`` of a stored vector
            (None: :meth:`load_columns` reads the whole vector and slices it).
        before_load: called before entries are read back (waits for a background writer to finish them).

    ``bytes_loaded`` counts what was read back. While every vector fits, the buffer holds them all in order;
    after the spill it holds the anchor (the first snapshot, when two or more fit) and a ring of the newest
    ``ring_size`` snapshots (module docstring).
    """

    def __init__(self, device: torch.device, *, dtype: torch.dtype, memory_budget: int | Callable[[], int],
                 load: Callable[[int], np.ndarray | None],
                 load_columns: Callable[[int, int, int], np.ndarray | None] | None = None,
                 before_load: Callable[[], None] | None = None) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self._measure_budget = memory_budget if callable(memory_budget) else None
        self.memory_budget: int | None = None if callable(memory_budget) else int(memory_budget)
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

    def _set_capacity(self, dim: int, *, now: bool = False) -> None:
        """Decide how many vectors fit (once the budget is known; a deferred budget is measured at the second vector,
        or ``now``). Until then the capacity is provisionally one vector."""
        if self.capacity is not None and self.memory_budget is not None:
            return
        self.size = int(dim)
        if self.memory_budget is None and (now or len(self.slots) >= 1):
            assert self._measure_budget is not None
            self.memory_budget = int(self._measure_budget())
        if self.memory_budget is None:
            self.capacity = 1
            return
        row = dim * torch.empty((), dtype=self.dtype).element_size()
        self.capacity = self.memory_budget // max(1, row)
        if len(self.slots) > self.capacity:  # the provisional first vector does not fit the measured budget
            self.spilled, self.anchored = True, False
            self.far = list(self.slots) + self.far
            self.slots.clear()
            self._buffer = None

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

    def near_runs(self, newest: int) -> list[tuple[list[int], torch.Tensor]]:
        """The first snapshot and the ``newest`` latest ones among those in memory, as runs of consecutive buffer
        slots: ``[(indices, view)]``."""
        if not self.slots:
            return []
        assert self._buffer is not None
        chosen = set(sorted(self.slots)[-newest:]) | {self.slots[0] if not self.spilled or self.anchored else -1}
        runs: list[tuple[list[int], torch.Tensor]] = []
        slot = 0
        while slot < len(self.slots):
            if self.slots[slot] not in chosen:
                slot += 1
                continue
            end = slot
            while end < len(self.slots) and self.slots[end] in chosen:
                end += 1
            runs.append((self.slots[slot:end], self._buffer[slot:end]))
            slot = end
        return runs

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
        self._set_capacity(first.numel(), now=True)
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
