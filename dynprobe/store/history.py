"""Where the earlier snapshots' vectors of an interval matrix live: a buffer in memory within a byte budget (all
of them, or after the spill the first one and a ring of the newest), the rest in the run directory, read back
whole or one column span at a time (:mod:`dynprobe.metrics.interval` describes the row schedule).

**Committed lazily, shed before the limit.** Nothing is reserved up front: the buffer grows by doubling,
``rows = min(capacity, max(8, 2·needed))``, and each growth takes at most :data:`GROWTH_SHARE` of what the process
may still allocate where the buffer lives (:func:`dynprobe._util.memory.device_headroom`, measured at the growth:
cgroup v1/v2, ``RLIMIT_AS``, available RAM; on CUDA the free memory within the per-process fraction). On the CPU
a row costs memory only once written, so each new row is held to the same share (one vector ≤ half the headroom,
asked at every new row). A growth or row that does not fit — or an allocation that fails — is not an error: the
history spills at the rows it holds (from then on memory keeps the anchor and a ring of the newest, the rest is
read back from the run directory), so the training step keeps the other half of the headroom. The stored rows do
not depend on where a vector was kept.

**Transactions.** :meth:`VectorHistory.savepoint` and :meth:`VectorHistory.rollback` undo the appends of a
snapshot that did not commit (an exception, a Ctrl-C): the bookkeeping is restored from the savepoint and a ring
slot overwritten since then gets its vector back (kept aside, one vector, while a savepoint is open).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from dynprobe._util.memory import device_headroom

__all__ = ["GROWTH_SHARE", "HistorySavepoint", "VectorHistory"]

GROWTH_SHARE = 0.5  # of the process's remaining headroom, the most one growth of the buffer may take


@dataclass
class HistorySavepoint:
    """The bookkeeping of a :class:`VectorHistory` before a snapshot, and what the snapshot overwrote since."""

    length: int
    slots: list[int]
    far: list[int]
    flags: tuple[bool, bool, int | None, int | None, int | None]  # spilled, anchored, capacity, budget, size
    buffer: torch.Tensor | None = None  # the buffer, when the snapshot dropped it (a first vector that did not fit)
    overwritten: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (slot, its vector before)


class VectorHistory:
    """The vectors of earlier snapshots: in a buffer grown on demand within a byte budget, beyond it on disk.

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
        headroom: ``() -> bytes`` the process may still allocate where the buffer lives (default
            :func:`dynprobe._util.memory.device_headroom` of ``device``), asked at each growth.

    ``bytes_loaded`` counts what was read back. While every vector fits, the buffer holds them all in order;
    after the spill it holds the anchor (the first snapshot, when two or more fit) and a ring of the newest
    ``ring_size`` snapshots.
    """

    def __init__(self, device: torch.device | str, *, dtype: torch.dtype, memory_budget: int | Callable[[], int],
                 load: Callable[[int], np.ndarray | None],
                 load_columns: Callable[[int, int, int], np.ndarray | None] | None = None,
                 before_load: Callable[[], None] | None = None,
                 headroom: Callable[[], float] | None = None) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self._measure_budget = memory_budget if callable(memory_budget) else None
        self.memory_budget: int | None = None if callable(memory_budget) else int(memory_budget)
        self._load, self._load_columns, self._before_load = load, load_columns, before_load
        self._headroom = headroom if headroom is not None else (lambda: device_headroom(self.device))
        self.present: list[bool] = []
        self.summaries: dict[int, np.ndarray] = {}
        self.slots: list[int] = []  # snapshot index held by each used buffer row
        self.far: list[int] = []  # present snapshots not in memory (ascending)
        self.spilled = False
        self.anchored = False  # after the spill: slot 0 keeps the first snapshot
        self.capacity: int | None = None
        self.size: int | None = None  # numbers per vector
        self.bytes_loaded = 0
        self.shed = 0  # growths refused because the process neared its memory limit
        self._buffer: torch.Tensor | None = None
        self._savepoint: HistorySavepoint | None = None

    def __len__(self) -> int:
        return len(self.present)

    @property
    def ring_size(self) -> int:
        """How many of the newest snapshots stay in memory after the spill (0: none)."""
        return max(0, (self.capacity or 0) - int(self.anchored))

    @property
    def bytes_held(self) -> int:
        """Bytes of the buffer as allocated (rows grown so far, used or not)."""
        return 0 if self._buffer is None else self._buffer.numel() * self._buffer.element_size()

    def _row_bytes(self) -> int:
        return int(self.size or 0) * torch.empty((), dtype=self.dtype).element_size()

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
        self.capacity = self.memory_budget // max(1, self._row_bytes())
        if len(self.slots) > self.capacity:  # the provisional first vector does not fit the measured budget
            self.spilled, self.anchored = True, False
            self.far = list(self.slots) + self.far
            self.slots.clear()
            if self._savepoint is not None:
                self._savepoint.buffer = self._buffer
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

    def _grow(self, needed: int) -> bool:
        """Make room for ``needed`` rows: double the buffer (module docstring), within :data:`GROWTH_SHARE` of the
        process's headroom. Returns False when not even ``needed`` rows fit (the caller spills instead)."""
        if self._buffer is not None and self._buffer.shape[0] >= needed:
            # a CPU row costs memory only once written: the new row too must fit the share, else shed now
            if self.device.type == "cpu" and self._row_bytes() > GROWTH_SHARE * self._headroom():
                self.shed += 1
                return False
            return True
        assert self.capacity is not None and self.size is not None
        row = max(1, self._row_bytes())
        # the grown buffer is allocated while the old one is still held: it alone must fit the share
        allowed = int(min(GROWTH_SHARE * self._headroom(), 2**62) // row)
        rows = min(self.capacity, max(8, 2 * needed), allowed)
        if rows < needed:
            self.shed += 1
            return False
        try:
            # torch.empty: every row is written before it is read (under deterministic mode torch fills new memory
            # with NaN, a cost paid once per growth)
            grown = torch.empty((rows, self.size), dtype=self.dtype, device=self.device)
        except (RuntimeError, MemoryError):  # the allocator says no: shed rather than fail the snapshot
            self.shed += 1
            return False
        if self._buffer is not None:
            grown[: len(self.slots)].copy_(self._buffer[: len(self.slots)])
        self._buffer = grown
        return True

    def _put(self, slot: int, vector: torch.Tensor) -> None:
        assert self._buffer is not None
        if self._savepoint is not None and slot < len(self.slots):  # a ring slot: keep what it held
            self._savepoint.overwritten.append((slot, self._buffer[slot].clone()))
        self._buffer[slot].copy_(vector.reshape(-1))

    def release(self) -> None:
        """Free the vectors held in memory (the run is over; the row files and matrices are written)."""
        self._buffer = None
        self.slots.clear()

    def append(self, vector: torch.Tensor | None, summary: np.ndarray | None) -> bool:
        """Register the next snapshot and keep its vector in memory. Returns whether it is in memory (False only
        when not even one vector fits, or for ``None``).

        A vector that does not fit while every earlier one did (the budget, or the process's headroom at a growth)
        triggers the spill; from then on it replaces the oldest snapshot of the ring, which spills.
        """
        index = len(self.present)
        self.present.append(vector is not None)
        if vector is None:
            return False
        assert summary is not None
        self.summaries[index] = summary
        self._set_capacity(vector.numel())
        if not self.spilled and len(self.slots) < (self.capacity or 0):
            if self._grow(len(self.slots) + 1):
                self._put(len(self.slots), vector)
                self.slots.append(index)
                return True
            self.capacity = len(self.slots)  # shed: the rows held so far become the anchor and the ring
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
            if not self._grow(len(self.slots) + 1):
                break  # the process nears its limit: the rest stays on disk
            self._put(len(self.slots), vector)
            self.slots.append(index)
            self.summaries[index] = summary(vector)
        if len(self.slots) < len(keep):
            self.capacity = len(self.slots)
            self.spilled, self.anchored = True, self.capacity >= 2 and keep[0] == indices[0]
        kept = set(self.slots)
        self.far = [i for i in indices if i not in kept]

    # ------------------------------------------------------------------------------------------- transactions

    def savepoint(self) -> HistorySavepoint:
        """Open a savepoint before a snapshot's appends (:meth:`rollback` returns to it; :meth:`release_savepoint`
        ends it once the snapshot committed)."""
        self._savepoint = HistorySavepoint(
            len(self.present), list(self.slots), list(self.far),
            (self.spilled, self.anchored, self.capacity, self.memory_budget, self.size))
        return self._savepoint

    def release_savepoint(self) -> None:
        """The snapshot committed: forget the savepoint (and the vectors kept aside for it)."""
        self._savepoint = None

    def rollback(self, savepoint: HistorySavepoint) -> None:
        """Return to ``savepoint``: the appends since are undone, overwritten ring slots get their vectors back."""
        del self.present[savepoint.length :]
        for index in [i for i in self.summaries if i >= savepoint.length]:
            del self.summaries[index]
        self.slots, self.far = list(savepoint.slots), list(savepoint.far)
        self.spilled, self.anchored, self.capacity, self.memory_budget, self.size = savepoint.flags
        if savepoint.buffer is not None:
            self._buffer = savepoint.buffer
        for slot, vector in reversed(savepoint.overwritten):
            assert self._buffer is not None
            self._buffer[slot].copy_(vector)
        self._savepoint = None
