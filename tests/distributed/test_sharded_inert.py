"""The inert check's sums and the active ranges under FSDP2 (dynprobe/distributed/sharded_inert.py), on one process:
pieces of tensors split by rows as dim-0 shards are, their sums added by hand. The 2-rank run with a bias in front
of a BatchNorm is tests/distributed/test_sharded_ghosts.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dynprobe.distributed import sharded_inert
from dynprobe.distributed.sharded_inert import flat_range, local_ranges, rows_sharded, sharded_mean_squares
from dynprobe.recording.inert import mean_squares


class _Run:
    """Collectives of one process (the all-reduce of a single rank)."""

    rank, world_size = 0, 1

    def all_reduce(self, tensor: torch.Tensor) -> None:
        pass


def test_plain_tensors_are_one_range_and_their_mean_squares_are_the_single_process_ones() -> None:
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, generator=generator, requires_grad=True), torch.randn(6, generator=generator,
                                                                                       requires_grad=True)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    assert [flat_range(p) for p in params] == [(0, 12), (0, 6)] and rows_sharded(params)
    pieces = [("a", params[0], None), ("b", params[1], None), ("b", params[1], (2, 4))]
    np.testing.assert_allclose(sharded_mean_squares(_Run(), torch.device("cpu"))(pieces).numpy(),
                               mean_squares(pieces).numpy(), rtol=1e-15)


def test_sums_over_row_pieces_add_up_to_the_whole_mean_squares(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two "ranks" holding rows [0, 2) and [2, 4) of a (4, 3) gradient and a fused bias of 6 (thirds of 2)."""
    generator = torch.Generator().manual_seed(1)
    weight = _with_grad(torch.randn(4, 3, generator=generator))
    bias = _with_grad(torch.randn(6, generator=generator))
    whole = [("w", weight, None), ("b", bias, None), ("b", bias, (2, 4))]
    expected = mean_squares(whole)
    total = torch.zeros(3, dtype=torch.float64)
    for rank in range(2):
        ranges = {id(weight): (rank * 6, rank * 6 + 6), id(bias): (rank * 3, rank * 3 + 3)}
        shards = {id(weight.grad): weight.grad[2 * rank:2 * rank + 2], id(bias.grad): bias.grad[3 * rank:3 * rank + 3]}
        monkeypatch.setattr(sharded_inert, "flat_range", lambda p, ranges=ranges: ranges[id(p)])
        monkeypatch.setattr(sharded_inert, "local_tensor", lambda t, shards=shards: shards[id(t)])
        sums: list[torch.Tensor] = []

        class Run:
            def all_reduce(self, tensor: torch.Tensor) -> None:
                sums.append(tensor.clone())

        counts = torch.tensor([12.0, 6.0, 2.0], dtype=torch.float64)
        sharded_mean_squares(Run(), torch.device("cpu"))(whole)
        total += sums[0] / counts
    np.testing.assert_allclose(total.numpy(), expected.numpy(), rtol=1e-14)


def test_active_slices_map_to_the_columns_of_each_rank_s_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    params = [torch.zeros(4, 3), torch.zeros(6)]  # vec θ: 12 + 6 entries
    active = [slice(0, 12), slice(14, 18)]  # all of the first tensor, the bias without its entries 0 and 1 ... 2, 3
    for ranges, expected in (([(0, 6), (0, 3)], [(0, 6), (8, 9)]),  # rank 0: rows 0-1, bias entries 0-2
                             ([(6, 12), (3, 6)], [(0, 6), (6, 9)])):  # rank 1: rows 2-3, bias entries 3-5
        by_id = dict(zip(map(id, params), ranges))
        monkeypatch.setattr(sharded_inert, "flat_range", lambda p, by_id=by_id: by_id[id(p)])
        assert local_ranges(params, active) == expected


def _with_grad(t: torch.Tensor) -> torch.Tensor:
    p = t.clone().requires_grad_()
    p.grad = torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel()))
    return p
