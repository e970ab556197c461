"""Inert parameter tensors under FSDP2 (:mod:`dynprobe.recording.inert`), from each rank's shards.

The inert check compares the mean square of each tensor's gradient (and of each third of a fused attention bias)
with the whole gradient's. Under ``fully_shard`` every gradient is a DTensor: rank r holds rows of each tensor,
i.e. one contiguous range of its flattened entries (:func:`flat_range`: ``Shard(0)`` placements). A mean square is
a sum over entries divided by a count, so each rank sums the squares of its entries in every piece (a part
``(start, stop)`` intersected with its range) and one SUM all-reduce gives every mean square on every rank — the
same decisions everywhere.

The ghosts' ``L2_active`` (the separation without the inert tensors and parts) needs the same mapping the other
way: :func:`local_ranges` turns slices of ``vec(θ)`` into column ranges of this rank's piece.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .sharded import Collectives, local_tensor, whole_to_local

__all__ = ["flat_range", "local_ranges", "rows_sharded", "sharded_mean_squares"]


def rows_sharded(params: Sequence[torch.Tensor]) -> bool:
    """Whether every parameter is sharded along dim 0 (FSDP2's default), so that each shard is one contiguous range
    of the flattened entries (:func:`flat_range`)."""
    return all(all(getattr(placement, "dim", 0) == 0 for placement in getattr(p, "placements", ())) for p in params)


def flat_range(p: torch.Tensor) -> tuple[int, int]:
    """The range ``[start, stop)`` of ``p``'s flattened entries that this rank's shard holds (all of them for a
    plain tensor). Dim-0 sharding keeps whole rows, so the shard is one contiguous range of the row-major order
    (:func:`rows_sharded`)."""
    local = local_tensor(p)
    if local is p:
        return 0, p.numel()
    if local.numel() == 0:
        return 0, 0
    first_row = int(whole_to_local(p, torch.arange(p.shape[0]))[0])
    start = first_row * (p.numel() // p.shape[0])
    return start, start + local.numel()


def sharded_mean_squares(run: Collectives, device: torch.device
                         ) -> Callable[[list[tuple[str, torch.Tensor, tuple[int, int] | None]]], torch.Tensor]:
    """The ``squares_of`` of :class:`~dynprobe.recording.inert.InertWatch` for an FSDP2 model: every piece's mean
    square from the ranks' sums of squares, one all-reduce (collective: every rank calls it at the same snapshot)."""

    def squares_of(pieces: list[tuple[str, torch.Tensor, tuple[int, int] | None]]) -> torch.Tensor:
        sums = torch.zeros(len(pieces), dtype=torch.float64, device=device)
        counts = torch.tensor([float(p.numel() if part is None else part[1] - part[0]) for _, p, part in pieces],
                              dtype=torch.float64)
        for index, (_, p, part) in enumerate(pieces):
            start, stop = flat_range(p)
            low, high = (start, stop) if part is None else (max(start, part[0]), min(stop, part[1]))
            if high > low:
                grad = local_tensor(p.grad).detach().reshape(-1)[low - start:high - start].double()
                sums[index] = grad.square().sum().to(device)
        run.all_reduce(sums)
        return sums.cpu() / counts

    return squares_of


def local_ranges(params: Sequence[torch.Tensor], slices: Sequence[slice]) -> list[tuple[int, int]]:
    """The column ranges of this rank's piece (:func:`~dynprobe.distributed.sharded.local_piece` of ``params``)
    that hold the entries of ``vec(θ)`` in ``slices`` (global offsets, e.g. the active slices of
    :func:`dynprobe.ghosts.comparison.active_slices`)."""
    ranges: list[tuple[int, int]] = []
    offset, local_offset = 0, 0
    for p in params:
        start, stop = flat_range(p)
        for part in slices:
            low, high = max(part.start, offset + start), min(part.stop, offset + stop)
            if high > low:
                ranges.append((local_offset + low - offset - start, local_offset + high - offset - start))
        offset += p.numel()
        local_offset += stop - start
    return ranges
