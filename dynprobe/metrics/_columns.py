"""Completing pending C or S entries one column span at a time: the spilled part of the history, read back in slices.

Once the history has spilled (:mod:`dynprobe.metrics.interval`), a group of pending rows ``G`` needs its entries
against earlier vectors ``J`` that are on disk. Both forms of C (eq. 1) are sums over columns — the dot products
and squared norms of the dot-product form, and ``‖x̂ − ŷ‖²`` of the cancellation-free form — so the columns are
visited span by span (:class:`~dynprobe.metrics._blocked.ColumnPass`): for each span, the slices of ``G``'s
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

from ._blocked import BLOCK, Blocks, ColumnPass, _pairwise, cosine_values, exact_chunks, half_square_sums, inaccurate

__all__ = ["ColumnSource", "complete_by_columns"]


class ColumnSource(Protocol):
    """Where the vectors come from (a :class:`~dynprobe.metrics.interval.VectorHistory`)."""

    size: int | None
    device: torch.device
    summaries: dict[int, np.ndarray]

    def columns(self, index: int, start: int, stop: int, extra: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """Entries ``start:stop`` of vector ``index`` (None: not stored)."""


def complete_by_columns(blocks: Blocks, source: ColumnSource, wanted: dict[int, Sequence[int]],
                        extra: dict[int, torch.Tensor]) -> dict[int, np.ndarray]:
    """The pending entries of the rows ``wanted`` (row ``i`` → the earlier snapshots it still needs): for each row
    that is stored, float64 (channels, i + 1) with the wanted columns filled (NaN elsewhere, and against vectors
    that are not stored). Squared norms missing from ``source.summaries`` are computed on the way and stored."""
    group = sorted(wanted)
    targets = sorted(set().union(*(set(map(int, w)) for w in wanted.values())))
    size = int(source.size or 0)
    plan = ColumnPass(blocks, len(group), device=source.device, max_columns=max(BLOCK, size // (len(group) + 2)))
    tasks = len(plan.tasks)
    dots = {j: np.zeros((len(group), tasks)) for j in targets}
    norms = {i: np.zeros((1, tasks)) for i in sorted(set(group) | set(targets)) if i not in source.summaries}
    missing: set[int] = set()
    for span, (start, stop, first, end) in enumerate(plan.spans):
        parts = _read(source, group, start, stop, extra, missing)
        stack = torch.stack([parts[i] for i in group if i in parts]) if parts else None
        rows = [k for k, i in enumerate(group) if i in parts]
        for i, part in parts.items():
            if i in norms:
                norms[i][:, first:end] = plan.norm_sums(span, part)
        for j in targets:
            part = parts.get(j) if j in parts else _read(source, [j], start, stop, extra, missing).get(j)
            if part is None:
                continue
            if j in norms and j not in parts:
                norms[j][:, first:end] = plan.norm_sums(span, part)
            if stack is not None:
                dots[j][rows, first:end] = plan.sums(span, part, stack)
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
    """Recompute the flagged entries as ``½‖x̂ − ŷ‖²`` (the chunks of :func:`exact_chunks`), span by span."""
    chunks = {channel: exact_chunks(blocks, channel) for channel in range(blocks.channels)}
    sums = {(j, channel): np.zeros((rows.size, len(chunks[channel]))) for j, flagged in exact.items()
            for channel, rows in flagged}
    members = sorted({int(i) for flagged in exact.values() for _, rows in flagged for i in rows})
    for start, stop, _, _ in plan.spans:
        parts = _read(source, members, start, stop, extra, set())
        for j, flagged in exact.items():
            target = _read(source, [j], start, stop, extra, set()).get(j)
            assert target is not None  # it was read in the first pass
            for channel, rows in flagged:
                inside = [c for c, (a, b) in enumerate(chunks[channel]) if start <= a and b <= stop]
                if not inside:
                    continue
                stack = torch.stack([parts[int(i)] for i in rows])
                sums[(j, channel)][:, inside] = half_square_sums(
                    target, source.summaries[j][channel], stack, np.arange(rows.size),
                    np.array([source.summaries[int(i)][channel] for i in rows]),
                    [chunks[channel][c] for c in inside], offset=start)
    for (j, channel), partial in sums.items():
        for i, value in zip(dict(exact[j])[channel], 0.5 * _pairwise(partial)):
            values[int(i)][channel, j] = value
