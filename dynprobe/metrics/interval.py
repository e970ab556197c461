"""Online pairwise matrices: one row per snapshot (torchmetrics-style state objects, no file I/O).

A :class:`PairwiseMatrix` owns the state of one interval metric over a run's snapshots (C, D, S, ...): which
entries are still pending, the latest row, the entries computed since the caller last took them. It keeps the
earlier snapshots' vectors in a :class:`~dynprobe.store.history.VectorHistory` (the store layer: memory within a
budget, the rest read back from the run directory). ``update(vector)`` computes the new row ``M[t, 0..t]`` with a
:class:`PairMetric` and returns it; the caller stores it (:class:`dynprobe.store.rows.MatrixRows`) together with
:meth:`PairwiseMatrix.take_filled`, the pending entries computed since. Nothing here opens a file or changes a
process-wide flag; the math is in :mod:`dynprobe.metrics.functions` and the blocked float64 sums it calls.

**Memory and disk.** The history is kept in the vectors' own dtype (a float32 model's θ in float32: float64
storage would double memory and buy no precision, since the rows accumulate in float64 anyway) within a byte
budget. While every vector fits, rows are complete at once. Beyond the budget the history *spills*: memory
then holds an anchor (the first snapshot) and a ring of the newest snapshots; a new row is computed at once
against what is in memory (so ``C(t, 0)`` and ``C(t, t−1)`` are always available online) and its entries
against the spilled vectors are left NaN (pending). When ``K`` rows are pending they are completed together by
the metric's own :meth:`PairMetric.complete`: a metric that declares ``defers`` (C and S,
:mod:`dynprobe.metrics._columns`) reads every vector involved back once, one column span at a time, so
``K = max(ring, MIN_GROUP)`` does not depend on memory; for other metrics ``K`` is the ring (the pending rows are
all in it) and each spilled vector is read whole once per group. A run of T snapshots of p numbers so reads about
``T²·p / (2K) + T·p`` numbers from disk instead of ``T²·p / 2``.

**Deferred rows.** A row against T earlier vectors reads the whole history: at millions of parameters that is
the cost of a snapshot. For a metric that ``defers``, once the history holds ``defer_bytes`` (256 MiB) in memory,
or has spilled, a row is computed at once only against the first snapshot and the ``NEAR`` newest ones (so
``C(t, 0)``, the recent velocity and the online detector's usual lag pairs stay live); its other entries wait
until ``MIN_GROUP`` rows are pending and then come from one product of the group with the history
(:meth:`~dynprobe.metrics._spans.ColumnPass.products`), which converts and reads the history once per group.
:meth:`PairwiseMatrix.complete` finishes the pending entries (the probe calls it at close).

**Transactions.** :meth:`PairwiseMatrix.savepoint` / :meth:`PairwiseMatrix.rollback` undo an ``update`` whose
snapshot did not commit (an exception or Ctrl-C part-way through it): the state, the history included, is as
before the update, so the next row is the one an uninterrupted run would compute.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from dynprobe.store.history import HistorySavepoint, VectorHistory

from ._blocked import Blocks, cosine_rows, squared_norms
from ._columns import complete_by_columns

__all__ = ["CosineMetric", "FunctionMetric", "MatrixSavepoint", "PairMetric", "PairwiseMatrix"]

# A row function maps (new vector, k earlier vectors stacked) to the k metric values, float64.
RowFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Pending entries computed: (row, columns, values (channels, len(columns))).
Filled = tuple[int, np.ndarray, np.ndarray]

# C and S rows completed together once rows are deferred: a pending entry waits at most 15 snapshots, the history is
# converted and read once per 16 rows, and a spilled run of T snapshots reads about T²·p/32 numbers back instead of
# the T²·p/2 of re-reading at every snapshot (module docstring)
MIN_GROUP = 16
NEAR = MIN_GROUP  # while rows are deferred: the newest snapshots a row is computed against at once (and the first)
DEFER_BYTES = 256 * 2**20  # history in memory beyond which C and S rows are deferred (a row then costs > ~10 ms)


class PairMetric(Protocol):
    """A metric between one vector and a stack of vectors, on ``channels`` outputs.

    ``defers`` declares how pending entries are completed: True when :meth:`complete` reads each vector one column
    span at a time for a whole group of rows (rows may then be deferred, module docstring); False when it needs
    the group's rows whole (they are all in memory: the group is the ring).
    """

    channels: int
    defers: bool

    def summary(self, vector: torch.Tensor) -> np.ndarray:
        """Per-vector numbers computed once and kept for every snapshot (e.g. squared norms)."""

    def rows(self, vector: torch.Tensor, summary: np.ndarray, stack: torch.Tensor,
             stack_summaries: np.ndarray) -> np.ndarray:
        """Values between ``vector`` and each row of ``stack``; float64 (channels, n)."""

    def summary_and_rows(self, vector: torch.Tensor, stack: torch.Tensor,
                         stack_summaries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`summary` and :meth:`rows` of a new vector together."""

    def complete(self, history: VectorHistory, wanted: dict[int, np.ndarray],
                 extra: dict[int, torch.Tensor]) -> dict[int, np.ndarray]:
        """The entries ``M[i, wanted[i]]`` of each pending row ``i``: float64 (channels, i + 1), NaN elsewhere; a
        row absent from the result cannot be completed (its vector is not stored). ``extra``: vectors of rows
        that are neither in memory nor stored yet."""


class CosineMetric:
    """C (eq. 1) or S (eq. 4): cosine dissimilarity, per channel (the whole vector, then each layer slice).

    ``M[t, j] = 1 − ⟨x_t, x_j⟩ / (‖x_t‖ ‖x_j‖)`` per channel, from blocked float64 dot products
    (:func:`~dynprobe.metrics._blocked.cosine_rows`); pending entries completed one column span at a time.
    """

    defers = True

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

    def rows(self, vector: torch.Tensor, summary: np.ndarray, stack: torch.Tensor,
             stack_summaries: np.ndarray) -> np.ndarray:
        return cosine_rows(vector.reshape(-1), summary, stack, stack_summaries, self.blocks(vector.numel()))[0]

    def summary_and_rows(self, vector: torch.Tensor, stack: torch.Tensor,
                         stack_summaries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`summary` and :meth:`rows` together (the norms of ``vector`` first, then its rows)."""
        values, norms = cosine_rows(vector.reshape(-1), None, stack, stack_summaries, self.blocks(vector.numel()))
        return norms, values

    def complete(self, history: VectorHistory, wanted: dict[int, np.ndarray],
                 extra: dict[int, torch.Tensor]) -> dict[int, np.ndarray]:
        """The group's vectors not in memory and each wanted spilled vector are read once, one column span at a
        time (:func:`~dynprobe.metrics._columns.complete_by_columns`)."""
        assert history.size is not None
        return complete_by_columns(self.blocks(history.size), history, wanted, extra)


class FunctionMetric:
    """A one-channel metric from a row function ``(vector, stack) -> (n,)`` (D, eq. 6, and the task's D)."""

    channels = 1
    defers = False

    def __init__(self, function: RowFunction) -> None:
        self.function = function

    def summary(self, vector: torch.Tensor) -> np.ndarray:
        return np.zeros(0)

    def rows(self, vector: torch.Tensor, summary: np.ndarray, stack: torch.Tensor,
             stack_summaries: np.ndarray) -> np.ndarray:
        return torch.as_tensor(self.function(vector, stack)).detach().cpu().numpy().astype(np.float64)[None]

    def summary_and_rows(self, vector: torch.Tensor, stack: torch.Tensor,
                         stack_summaries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        summary = self.summary(vector)
        return summary, self.rows(vector, summary, stack, stack_summaries)

    def complete(self, history: VectorHistory, wanted: dict[int, np.ndarray],
                 extra: dict[int, torch.Tensor]) -> dict[int, np.ndarray]:
        """Whole vectors: the group's in memory (or read back), each wanted spilled vector read once."""
        extra = dict(extra)
        group = []
        for index in sorted(wanted):
            if not history.in_memory(index) and index not in extra:
                loaded = history.load(index)
                if loaded is None:  # not stored (a sink that writes nothing): its entries stay NaN
                    continue
                extra[index] = loaded
            group.append(index)
        if not group:
            return {}
        stack = history.stacked(group, extra)
        summaries = np.stack([self.summary(stack[k]) for k in range(len(group))])
        values = {i: np.full((self.channels, i + 1), np.nan) for i in group}
        targets = [set(np.asarray(wanted[i]).tolist()) for i in group]
        vector = None
        for j in sorted(set().union(*targets)):
            vector = None  # the previous one is released before the next is read: one spilled vector at a time
            vector = history.stacked([j], {})[0] if history.in_memory(j) else history.load(j)
            if vector is None:
                continue
            rows = [k for k, target in enumerate(targets) if j in target]
            some = stack if len(rows) == len(group) else stack[rows]
            result = self.rows(vector, self.summary(vector), some, summaries[rows])
            for position, k in enumerate(rows):
                values[group[k]][:, j] = result[:, position]
        return values


@dataclass(frozen=True)
class MatrixSavepoint:
    """The state of a :class:`PairwiseMatrix` before an update (:meth:`PairwiseMatrix.rollback` returns to it)."""

    pending: dict[int, np.ndarray]
    filled: int
    last_row: np.ndarray | None
    history: HistorySavepoint


class PairwiseMatrix:
    """Online T×T matrix of one interval metric; ``update`` computes row t against snapshots 0..t.

    Args:
        name: the metric's name (``"C"``, ``"D"``, ``"S"``).
        metric: a :class:`PairMetric`.
        history: where earlier vectors are kept.
        self_value: the diagonal M[t, t] (0 for a distance of a vector to itself, by definition rather than by
            round-off).
        defer_bytes: rows of a metric that ``defers`` are computed at once only against the first and the
            ``NEAR`` newest snapshots once the history holds this many bytes in memory (or has spilled); the other
            entries are completed in groups of ``MIN_GROUP`` rows (None: ``DEFER_BYTES``).

    State: :attr:`pending` (row → columns still NaN), :attr:`last_row` (channels, t + 1) and the entries filled
    since :meth:`take_filled`. The values themselves are the caller's to store.
    """

    def __init__(self, name: str, metric: PairMetric, history: VectorHistory, *, self_value: float = 0.0,
                 defer_bytes: int | None = None) -> None:
        self.name = name
        self.defer_bytes = DEFER_BYTES if defer_bytes is None else int(defer_bytes)
        self.metric = metric
        self.history = history
        self.self_value = self_value
        self.pending: dict[int, np.ndarray] = {}  # row -> columns still NaN (deferred, or their vectors spilled)
        self.last_row: np.ndarray | None = None  # (channels, t + 1): the latest row as computed
        self._filled: list[Filled] = []  # pending entries computed since taken, every channel

    @property
    def count(self) -> int:
        return len(self.history)

    @property
    def group_size(self) -> int:
        """Pending rows completed together: for a metric that ``defers`` ``MIN_GROUP`` (or the ring, when more fit
        in memory after the spill), each far vector then read once for the whole group; for other metrics the
        ring (all of its rows still in memory)."""
        ring = self.history.ring_size
        if self.metric.defers:
            return max(ring, MIN_GROUP) if self.history.spilled else MIN_GROUP
        return max(1, ring)

    @property
    def deferring(self) -> bool:
        """Whether rows are computed at once only against the near snapshots (a metric that ``defers``, once the
        history has spilled or holds ``defer_bytes`` in memory; module docstring)."""
        history = self.history
        if not self.metric.defers or history.size is None:
            return False
        held = len(history.slots) * history.size * torch.empty((), dtype=history.dtype).element_size()
        return history.spilled or held >= self.defer_bytes

    def update(self, vector: torch.Tensor | None) -> np.ndarray:
        """Compute the row of a new snapshot (``None``: not measured at this snapshot, a NaN row).

        Returns the row of channel 0 (NaN where pending); :attr:`last_row` has every channel.
        """
        index = self.count
        row = np.full((self.metric.channels, index + 1), np.nan)
        summary = None
        if vector is not None:
            vector = vector.detach().reshape(-1).to(self.history.device)
            deferring = self.deferring
            runs = self.history.near_runs(NEAR) if deferring else [self.history.resident()]
            for indices, stack in runs:
                if not indices:
                    continue
                summaries = np.stack([self.history.summaries[i] for i in indices])
                if summary is None:
                    summary, row[:, indices] = self.metric.summary_and_rows(vector, stack, summaries)
                else:
                    row[:, indices] = self.metric.rows(vector, summary, stack, summaries)
            if summary is None:
                summary = self.metric.summary(vector)
            later = {i for indices, _ in runs for i in indices}
            waiting = [j for j in range(index) if self.history.present[j] and j not in later] if deferring \
                else self.history.far
            if waiting:
                self.pending[index] = np.asarray(waiting, dtype=np.int64)
            row[:, index] = self.self_value
        self.last_row = row
        stored = self.history.append(vector, summary)
        if vector is not None and len(self.pending) >= self.group_size:
            self.complete(extra={} if stored else {index: vector})
        return row[0]

    def complete(self, extra: dict[int, torch.Tensor] | None = None) -> None:
        """Compute every pending entry (:meth:`PairMetric.complete`, one group of rows at a time)."""
        extra = dict(extra or {})
        waiting = sorted(self.pending)
        if not waiting:
            return
        if self.history.spilled:  # something will be read back (else every vector is in memory)
            self.history.prepare_loads()
        group_size = self.group_size
        for start in range(0, len(waiting), group_size):
            group = waiting[start : start + group_size]
            values = self.metric.complete(self.history, {i: self.pending[i] for i in group}, extra)
            for i in group:
                columns = self.pending.pop(i)
                if i in values:  # else not stored (a sink that writes nothing): its entries stay NaN
                    self._filled.append((i, columns, values[i][:, columns]))

    def take_filled(self) -> list[Filled]:
        """The pending entries computed since the last call: ``[(row, columns, values (channels, k))]`` (to store,
        and for online consumers of the rows, e.g. the transition detector)."""
        filled, self._filled = self._filled, []
        return filled

    # ------------------------------------------------------------------------------------------- transactions

    def savepoint(self) -> MatrixSavepoint:
        """The state before an update; pass it to :meth:`rollback` if the snapshot does not commit, else call
        :meth:`release_savepoint`."""
        return MatrixSavepoint(dict(self.pending), len(self._filled), self.last_row, self.history.savepoint())

    def release_savepoint(self) -> None:
        self.history.release_savepoint()

    def rollback(self, savepoint: MatrixSavepoint) -> None:
        """Undo everything since ``savepoint``: entries filled since are pending again (a caller may have stored
        some of them already: they are computed again, to the same values)."""
        self.history.rollback(savepoint.history)
        self.pending = dict(savepoint.pending)
        del self._filled[savepoint.filled :]
        self.last_row = savepoint.last_row

    @classmethod
    def reattach(cls, name: str, metric: PairMetric, history: VectorHistory, stored: np.ndarray,
                 present: list[bool], *, self_value: float = 0.0, defer_bytes: int | None = None) -> PairwiseMatrix:
        """Continue a matrix of a resumed run whose first ``len(present)`` rows are committed (``stored``: their
        channel-0 matrix as read back).

        Entries left NaN between two present snapshots (pending when the run stopped) are pending again.
        """
        matrix = cls(name, metric, history, self_value=self_value, defer_bytes=defer_bytes)
        history.register_stored(present, matrix.metric.summary)
        for i, here in enumerate(present):
            missing = [j for j in range(i) if here and present[j] and np.isnan(stored[i, j])]
            if missing:
                matrix.pending[i] = np.asarray(missing, dtype=np.int64)
        # the rows pending when the run stopped wait for their group, as in the uninterrupted run: the group
        # products then have the same shapes, and the resumed matrix the same numbers
        return matrix
