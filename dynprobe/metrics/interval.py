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

**Deferred rows.** A row against T earlier vectors reads the whole history: at millions of parameters that is
the cost of a snapshot. Once the history holds ``defer_bytes`` (256 MiB) in memory, or has spilled, a C or S
row is computed at once only against the first snapshot and the ``NEAR`` newest ones (so ``C(t, 0)``, the
recent velocity and the online detector's usual lag pairs stay live); its other entries wait until ``MIN_GROUP``
rows are pending and then come from one product of the group with the history
(:meth:`~dynprobe.metrics._spans.ColumnPass.products`), which converts and reads the history once per group.
Online consumers get those entries as they are computed (:meth:`PairwiseMatrix.take_filled`).
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
from .history import VectorHistory

__all__ = ["CosineMetric", "FunctionMetric", "PairMetric", "PairwiseMatrix", "VectorHistory"]

# A row function maps (new vector, k earlier vectors stacked) to the k metric values, float64.
RowFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# C and S rows completed together once rows are deferred: a pending entry waits at most 15 snapshots, the history is
# converted and read once per 16 rows, and a spilled run of T snapshots reads about T²·p/32 numbers back instead of
# the T²·p/2 of re-reading at every snapshot (module docstring)
MIN_GROUP = 16
NEAR = MIN_GROUP  # while rows are deferred: the newest snapshots a row is computed against at once (and the first)
DEFER_BYTES = 256 * 2**20  # history in memory beyond which C and S rows are deferred (a row then costs > ~10 ms)


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
        """:meth:`summary` and :meth:`rows` together (the norms of ``vector`` first, then its rows)."""
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


class PairwiseMatrix:
    """Online T×T matrix of one interval metric; ``update`` appends row t against snapshots 0..t.

    Args:
        name: the metric's name (``"C"``, ``"D"``, ``"S"``).
        metric: a :class:`PairMetric` (or a row function ``(vector, stack) -> values``, one channel).
        history: where earlier vectors are kept.
        rows: the append-only row file of each channel.
        self_value: the diagonal M[t, t] (0 for a distance of a vector to itself, by definition rather than by
            round-off).
        defer_bytes: C and S rows are computed at once only against the first and the ``NEAR`` newest snapshots
            once the history holds this many bytes in memory (or has spilled); the other entries are completed in
            groups of ``MIN_GROUP`` rows (None: ``DEFER_BYTES``).
    """

    def __init__(self, name: str, metric: PairMetric | RowFunction, history: VectorHistory,
                 rows: TriangularRows | Sequence[TriangularRows], *, self_value: float = 0.0,
                 defer_bytes: int | None = None) -> None:
        self.name = name
        self.defer_bytes = DEFER_BYTES if defer_bytes is None else int(defer_bytes)
        self.metric: PairMetric = metric if hasattr(metric, "channels") else FunctionMetric(metric)
        self.history = history
        self.rows = [rows] if isinstance(rows, TriangularRows) else list(rows)
        if len(self.rows) != self.metric.channels:
            raise ValueError(f"{name}: {self.metric.channels} channels but {len(self.rows)} row files")
        self.self_value = self_value
        self.pending: dict[int, np.ndarray] = {}  # row -> columns still NaN (deferred, or their vectors spilled)
        self.last_row: np.ndarray | None = None  # (channels, t + 1): the latest row as appended
        self._filled: list[tuple[int, np.ndarray, np.ndarray]] = []  # (row, columns, channel-0 values) since taken

    @property
    def count(self) -> int:
        return len(self.history)

    @property
    def group_size(self) -> int:
        """Pending rows completed together: for C and S ``MIN_GROUP`` (or the ring, when more fit in memory after
        the spill), each far vector then read once for the whole group; for other metrics the ring (all of its
        rows still in memory)."""
        ring = self.history.ring_size
        if isinstance(self.metric, CosineMetric):
            return max(ring, MIN_GROUP) if self.history.spilled else MIN_GROUP
        return max(1, ring)

    @property
    def deferring(self) -> bool:
        """Whether rows are computed at once only against the near snapshots (C and S once the history has spilled
        or holds ``defer_bytes`` in memory; module docstring)."""
        history = self.history
        if not isinstance(self.metric, CosineMetric) or history.size is None:
            return False
        held = len(history.slots) * history.size * torch.empty((), dtype=history.dtype).element_size()
        return history.spilled or held >= self.defer_bytes

    def update(self, vector: torch.Tensor | None) -> np.ndarray:
        """Append the row of a new snapshot (``None``: not measured at this snapshot, a NaN row).

        Returns the row of channel 0 as appended (NaN where pending); :attr:`last_row` has every channel.
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
                if summary is None and hasattr(self.metric, "summary_and_rows"):
                    summary, row[:, indices] = self.metric.summary_and_rows(vector, stack, summaries)
                else:
                    summary = self.metric.summary(vector) if summary is None else summary
                    row[:, indices] = self.metric.rows(vector, summary, stack, summaries)
            if summary is None:
                summary = self.metric.summary(vector)
            later = {i for indices, _ in runs for i in indices}
            waiting = [j for j in range(index) if self.history.present[j] and j not in later] if deferring \
                else self.history.far
            if waiting:
                self.pending[index] = np.asarray(waiting, dtype=np.int64)
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
        if self.history.spilled:  # something will be read back (else every vector is in memory)
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
            self._filled.append((i, columns, row[0, columns]))

    def take_filled(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """The pending entries computed since the last call: ``[(row, columns, values)]`` of channel 0 (for online
        consumers of the rows, e.g. the transition detector)."""
        filled, self._filled = self._filled, []
        return filled

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
                 paths: Path | Sequence[Path], present: list[bool], *, self_value: float = 0.0,
                 defer_bytes: int | None = None) -> PairwiseMatrix:
        """Continue a matrix of a resumed run whose first ``len(present)`` rows are committed.

        Entries left NaN between two present snapshots (pending when the run stopped) are pending again.
        """
        files = [TriangularRows(p) for p in ([paths] if isinstance(paths, Path) else paths)]
        for rows in files:
            rows.truncate(len(present))
        matrix = cls(name, metric, history, files, self_value=self_value, defer_bytes=defer_bytes)
        history.register_stored(present, matrix.metric.summary)
        stored = files[0].read(len(present))
        for i, here in enumerate(present):
            missing = [j for j in range(i) if here and present[j] and np.isnan(stored[i, j])]
            if missing:
                matrix.pending[i] = np.asarray(missing, dtype=np.int64)
        # the rows pending when the run stopped wait for their group, as in the uninterrupted run: the group
        # products then have the same shapes, and the resumed matrix the same numbers
        return matrix
