"""ShardedLine (dynprobe/distributed/sharded_path.py) on one process: θ(α) written in place, the model put back.

A plain module stands in for the FSDP2 one (its parameters are their own "local shards"); the spawned FSDP runs are
in tests/distributed/test_sharded_barriers.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dynprobe.distributed.sharded import reshard
from dynprobe.distributed.sharded_path import ShardedLine, floating_buffers
from dynprobe.metrics.barrier import loss_barrier, loss_barrier_in_place


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3))
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 5))  # running statistics that differ from the defaults
    return model


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in list(model.named_parameters()) + list(model.named_buffers())}


def test_the_line_loads_lerp_of_each_tensor_and_puts_the_model_back_bit_for_bit() -> None:
    model, older = make_model(0), make_model(1)
    a, b = state_of(model), state_of(older)
    piece = torch.cat([p.detach().reshape(-1) for p in older.parameters()])
    line = ShardedLine(model, list(model.parameters()), piece, floating_buffers(older))
    with line:
        line.load(0.3)
        for name, t in state_of(model).items():
            expected = torch.lerp(b[name], a[name], 0.3) if t.is_floating_point() else a[name]
            assert torch.equal(t, expected), name  # integer buffers (num_batches_tracked) keep θ_a's
        line.load(0.0)
        assert all(torch.equal(t, b[name]) for name, t in state_of(model).items() if t.is_floating_point())
        line.load(1.0)
        assert all(torch.equal(t, a[name]) for name, t in state_of(model).items())
        line.load(0.7)
    assert all(torch.equal(t, a[name]) for name, t in state_of(model).items())
    with pytest.raises(RuntimeError, match="inside"), line:  # put back on an error, too
        line.load(0.5)
        raise RuntimeError("inside the block")
    assert all(torch.equal(t, a[name]) for name, t in state_of(model).items())
    reshard(model)  # no FSDP module: nothing to do


def test_the_in_place_barrier_equals_the_functional_one() -> None:
    model, older = make_model(0), make_model(1)
    generator = torch.Generator().manual_seed(3)
    data = (torch.randn(40, 5, generator=generator), torch.randint(0, 3, (40,), generator=generator))
    piece = torch.cat([p.detach().reshape(-1) for p in older.parameters()])
    line = ShardedLine(model, list(model.parameters()), piece, floating_buffers(older))
    with line:
        in_place = loss_barrier_in_place(model, line.load, data, alphas=9, batch_size=16,
                                         interpolated="the test's line")
    functional = loss_barrier(model, state_of(model), state_of(older), data, alphas=9, batch_size=16)
    np.testing.assert_array_equal(in_place.curve, functional.curve)
    assert (in_place.mean, in_place.linear) == (functional.mean, functional.linear) and in_place.mean > 0
    assert in_place.conventions["interpolated"] == "the test's line" and "in place" in in_place.conventions["mode"]


def test_a_piece_of_the_wrong_size_is_refused() -> None:
    model = make_model(0)
    with pytest.raises(ValueError, match="has 3 entries but this rank's shards have"):
        ShardedLine(model, list(model.parameters()), torch.zeros(3), floating_buffers(model))
