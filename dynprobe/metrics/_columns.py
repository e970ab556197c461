"""Completing pending C or S entries for a group of rows at once, one column span at a time.

Once rows are deferred (:mod:`dynprobe.metrics.interval`), a group of pending rows ``G`` needs its entries against
earlier vectors ``J``, in memory or, once the history has spilled, on disk. The vectors in memory enter one product
of the whole group per span (:meth:`~dynprobe.metrics._spans.ColumnPass.products`: the history converted and
read once for the group). Both forms of C (eq. 1) are sums over columns — the dot products
and squared norms of the dot-product form, and ``‖x̂ − ŷ‖²`` of the cancellation-free form — so the columns are
visited span by span (:class:`~dynprobe.metrics._spans.ColumnPass`): for each span, the slices of ``G``'s
vectors that are not in memory and then of each ``j ∈ J``, one at a time, are read back. Each vector involved is
read once per group (twice for the few that have entries in the cancellation-free form), in slices that together
take about one vector of memory, and the sums are the ones the whole vectors give: the result does not depend on
how the history was kept.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from dynprobe._util.distances import channel_block_sums, cosine_from_sums, scales

from ._blocked import BLOCK, Blocks, cosine_values, inaccurate
from ._spans import ColumnPass

__all__ = ["MEMORY_BATCH", "TARGET_BATCH", "ColumnSource", "complete_by_columns"]


TARGET_BATCH = 16  # vectors read back per span at a time (with the group's slices: about one vector of memory)
MEMORY_BATCH = 256  # vectors in memory per product (its float64 block sums: 256·K·512 numbers per task)


class ColumnSource(Protocol):
    """Where the vectors come from (a :class:`~dynprobe.store.history.VectorHistory`)."""

    size: int | None
    device: torch.device
    summaries: dict[int, np.ndarray]

    def columns(self, index: int, start: int, stop: int, extra: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """Entries ``start:stop`` of vector ``index`` (None: not stored)."""

    def resident(self) -> tuple[list[int], torch.Tensor | None]:
        """The indices held in memory and their stacked vectors."""


def complete_by_columns(blocks: Blocks, source: ColumnSource, wanted: dict[int, Sequence[int]],
                        extra: dict[int, torch.Tensor]) -> dict[int, np.ndarray]:
    """The pending entries of the rows ``wanted`` (row ``i`` → the earlier snapshots it still needs): for each row
    that is stored, float64 (channels, i + 1) with the wanted columns filled (NaN elsewhere, and against vectors
    that are not stored). Squared norms missing from ``source.summaries`` are computed on the way and stored.

    The dot products of the whole group with many vectors at once (:meth:`ColumnPass.products`): the vectors in
    memory in one product per span, the others ``TARGET_BATCH`` at a time as they are read back.
    """
    group = sorted(wanted)
    targets = sorted(set().union(*(set(map(int, w)) for w in wanted.values())))
    size = int(source.size or 0)
    resident, stack_in_memory = source.resident()
    wanted_set = set(targets)
    in_memory = {j: position for position, j in enumerate(resident) if j in wanted_set and j not in extra}
    elsewhere = [j for j in targets if j not in in_memory]
    # the product runs over the slots from the first to the last target in memory (not the near ones after them)
    low, high = (min(in_memory.values()), max(in_memory.values()) + 1) if in_memory else (0, 0)
    # the group as one view of memory when its rows sit in consecutive slots (the usual case before the spill)
    slots = [resident.index(i) if i in resident and i not in extra else -1 for i in group]
    contiguous = -1 not in slots and slots == list(range(slots[0], slots[0] + len(slots)))
    # slices read back (or copied) per span: about one vector of memory in all
    copied = (0 if contiguous else len(group)) + (TARGET_BATCH if elsewhere else 0)
    plan = ColumnPass(blocks, len(group), device=source.device, max_columns=max(BLOCK, size // (copied + 2)))
    tasks = len(plan.tasks)
    dots = {j: np.zeros((len(group), tasks)) for j in targets}
    norms = {i: np.zeros((1, tasks)) for i in sorted(set(group) | set(targets)) if i not in source.summaries}
    missing: set[int] = set()
    for span, (start, stop, first, end) in enumerate(plan.spans):
        parts = _read(source, group, start, stop, extra, missing)
        rows = [k for k, i in enumerate(group) if i in parts]
        if contiguous:
            assert stack_in_memory is not None
            stack = stack_in_memory[slots[0] : slots[0] + len(group), start:stop]
        else:
            stack = torch.stack([parts[i] for i in group if i in parts]) if parts else None
        for i, part in parts.items():
            if i in norms:
                norms[i][:, first:end] = plan.norm_sums(span, part)
        if stack is None:
            continue
        if in_memory:
            assert stack_in_memory is not None
            for lower in range(low, high, MEMORY_BATCH):  # bounded temporaries however long the history
                upper = min(high, lower + MEMORY_BATCH)
                products = plan.products(span, stack_in_memory[lower:upper, start:stop], stack)
                for j, position in in_memory.items():
                    if lower <= position < upper:
                        dots[j][rows, first:end] = products[position - lower]
        for batch_start in range(0, len(elsewhere), TARGET_BATCH):
            chosen = elsewhere[batch_start : batch_start + TARGET_BATCH]
            batch = _read(source, [j for j in chosen if j not in parts], start, stop, extra, missing)
            batch = {j: parts[j] if j in parts else batch[j] for j in chosen if j in parts or j in batch}
            for j, part in batch.items():
                if j in norms and j not in parts:
                    norms[j][:, first:end] = plan.norm_sums(span, part)
            if batch:
                products = plan.products(span, torch.stack(list(batch.values())), stack)
                for position, j in enumerate(batch):
                    dots[j][rows, first:end] = products[position]
            batch = {}  # released before the next batch is read
    for i, partial in norms.items():
        if i not in missing:
            source.summaries[i] = plan.combine(partial)[:, 0]
    stored = [i for i in group if i not in missing]
    values = {i: np.full((blocks.channels, i + 1), np.nan) for i in stored}
    exact: dict[int, list[tuple[int, np.ndarray]]] = {}  # target → (channel, rows of the group)
    for j in targets:
        rows = [i for i in stored if j in set(map(int, wanted[i]))]
        if j in missing or not rows:
            continue
        result = cosine_values(plan.combine(dots[j][[group.index(i) for i in rows]]), source.summaries[j],
                               np.stack([source.summaries[i] for i in rows]))
        for position, i in enumerate(rows):
            values[i][:, j] = result[:, position]
        flagged = [(channel, np.asarray(rows)[k]) for channel, k in enumerate(inaccurate(result, blocks)) if k.size]
        if flagged:
            exact[j] = flagged
    if exact:
        _cancellation_free(blocks, plan, source, exact, values, extra)
    return values


def _read(source: ColumnSource, indices: Sequence[int], start: int, stop: int, extra: dict[int, torch.Tensor],
          missing: set[int]) -> dict[int, torch.Tensor]:
    """The slices of the vectors that are stored (the others join ``missing``: their entries stay NaN)."""
    parts = {}
    for i in indices:
        part = None if i in missing else source.columns(i, start, stop, extra)
        if part is None:
            missing.add(i)
        else:
            parts[i] = part
    return parts


def _cancellation_free(blocks: Blocks, plan: ColumnPass, source: ColumnSource,
                       exact: dict[int, list[tuple[int, np.ndarray]]], values: dict[int, np.ndarray],
                       extra: dict[int, torch.Tensor]) -> None:
    """Recompute the flagged pairs (every channel of each) in the cancellation-free form of
    :func:`~dynprobe._util.distances.channel_block_sums`, span by span, each target against its flagged rows of the
    group at once (gathered chunk by chunk from the group's view of memory, or from one stack of its slices per
    span). The spans start and end on block boundaries, so their block sums, in column order, are the whole
    vectors'."""
    rows_of = {j: sorted({int(i) for _, rows in flagged for i in rows}) for j, flagged in exact.items()}
    members = sorted(set().union(*map(set, rows_of.values())))
    where = {i: position for position, i in enumerate(members)}
    resident, stack_in_memory = source.resident()
    slots = [resident.index(i) if i in resident and i not in extra else -1 for i in members]
    contiguous = -1 not in slots and slots == list(range(slots[0], slots[0] + len(slots)))
    norms = {i: torch.as_tensor(np.asarray(source.summaries[i], np.float64), device=source.device)
             for i in set(members) | set(rows_of)}
    index = {j: torch.as_tensor([where[i] for i in rows], device=source.device) for j, rows in rows_of.items()}
    sums: dict[int, list[list[torch.Tensor]]] = {j: [[] for _ in range(blocks.channels)] for j in rows_of}
    for start, stop, _, _ in plan.spans:
        if contiguous:
            assert stack_in_memory is not None
            group = stack_in_memory[slots[0] : slots[0] + len(members), start:stop]
        else:
            parts = _read(source, members, start, stop, extra, set())
            group = torch.stack([parts[i] for i in members])
        for j, rows in rows_of.items():
            target = _read(source, [j], start, stop, extra, set()).get(j)
            assert target is not None  # it was read in the first pass
            pair_scales = scales(norms[j], torch.stack([norms[i] for i in rows]))
            block_sums = channel_block_sums(target, group, pair_scales, blocks.layers, blocks.per_layer, start, stop,
                                            rows=index[j], width=blocks.width)
            for channel, part in enumerate(block_sums):
                sums[j][channel].append(part)
    for j, per_channel in sums.items():
        result = cosine_from_sums([torch.cat(parts, 1) for parts in per_channel], norms[j],
                                  torch.stack([norms[i] for i in rows_of[j]])).cpu().numpy()
        for position, i in enumerate(rows_of[j]):
            values[i][:, j] = result[:, position]
