"""What the probe holds per rank under FSDP2: the C history of :class:`~dynprobe.distributed.sharded_rows.
ShardedCosineRows` (each rank its pieces of the earlier snapshots) against a single-process run's, 2 gloo ranks.

The history is the one part of the probe that grows with the run (T snapshots × P parameters); a rank's share is
P/R per snapshot, up to the rounding of dim-0 sharding (a rank holds at most ⌈d₀/R⌉ of a parameter's d₀ rows:
at most one row of each parameter more than P/R). No wall clock, no process-wide memory: the buffers' own sizes.
With ``history_memory=`` the pieces kept are bounded (the first and the newest); the others are read back from
each rank's shard files, and the rows do not change by a bit.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import dynprobe
from dynprobe.distributed.sharded_rows import ShardedCosineRows

from .. import spawned
from .test_sharded import make_model
from .test_sharded_resume import STEPS, optimizer_of, probe_of, sharded_model, train_steps

fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(not dist.is_available() or not hasattr(fsdp, "fully_shard"),
                                reason="torch.distributed FSDP2 is not available")

WORLD = 2


def scenario_held(rank: int, folder: Path, result: dict) -> None:
    model = sharded_model()
    optimizer = optimizer_of(model)
    probe = probe_of(model, optimizer, folder / "run")
    train_steps(model, optimizer, probe.watch(nn.CrossEntropyLoss()), slice(rank * 4, rank * 4 + 4), range(STEPS))
    cosine: ShardedCosineRows = probe._recorder.cosine
    result["count"] = cosine.count
    result["used"] = cosine.history.numel() * cosine.history.element_size()
    result["held"] = cosine.bytes_held
    result["local_size"] = probe._recorder.local_size
    result["C"] = probe._recorder.last_rows["C"].tolist()
    probe.close()


def scenario_bounded(rank: int, folder: Path, result: dict) -> None:
    """The same run with room for 3 pieces per rank (the smallest over the ranks is agreed), then unbounded."""
    for name, memory in (("bounded", 3), ("unbounded", None)):
        model = sharded_model()
        optimizer = optimizer_of(model)
        piece_bytes = sum(p.to_local().numel() for p in model.parameters()) * 4
        options = {} if memory is None else {"history_memory": memory * piece_bytes + rank}  # ranks differ a bit
        probe = probe_of(model, optimizer, folder / name, **options)
        train_steps(model, optimizer, probe.watch(nn.CrossEntropyLoss()), slice(rank * 4, rank * 4 + 4),
                    range(STEPS))
        cosine: ShardedCosineRows = probe._recorder.cosine
        result[name] = {"capacity": cosine.capacity, "held": cosine.bytes_held, "kept": sorted(cosine._pieces),
                        "piece_bytes": piece_bytes}
        probe.close()


SCENARIOS = {"held": scenario_held, "bounded": scenario_bounded}


def test_each_rank_holds_its_share_of_the_single_process_history(tmp_path: Path) -> None:
    results = spawned.run_spawned(__name__, "held", tmp_path, world=WORLD, deadline_s=150.0)

    model = make_model()  # the same run unsharded, in this process
    optimizer = optimizer_of(model)
    probe = probe_of(model, optimizer, tmp_path / "single")
    train_steps(model, optimizer, probe.watch(nn.CrossEntropyLoss()), slice(None), range(STEPS))
    history = probe._recorder.matrices["C"].history
    count = len(history.slots)  # every snapshot in memory (a tiny model)
    itemsize = torch.empty(0, dtype=history.dtype).element_size()
    single = count * sum(p.numel() for p in model.parameters()) * itemsize
    probe.close()

    assert count == 5 and [r["count"] for r in results] == [count] * WORLD
    # the pieces tile θ: together the ranks hold exactly what one process holds, and none more than its share
    assert sum(r["used"] for r in results) == single
    one_row_each = sum(p.numel() // p.shape[0] for p in model.parameters())  # the rounding of dim-0 sharding
    for r in results:
        assert r["used"] <= single / WORLD + count * one_row_each * itemsize
        assert r["used"] == count * r["local_size"] * itemsize
        assert r["held"] == r["used"]  # exactly the pieces kept


def test_a_bounded_history_reads_pieces_back_and_stores_the_same_rows(tmp_path: Path) -> None:
    results = spawned.run_spawned(__name__, "bounded", tmp_path, world=WORLD, deadline_s=150.0)
    for r in results:
        bounded = r["bounded"]
        assert bounded["capacity"] == 3  # the smallest over the ranks
        assert bounded["kept"] == [0, 3, 4]  # the first (the anchor) and the newest
        assert bounded["held"] == 3 * bounded["piece_bytes"]
        assert r["unbounded"]["kept"] == [0, 1, 2, 3, 4]
    bounded, unbounded = (dynprobe.load_run(tmp_path / name) for name in ("bounded", "unbounded"))
    for metric in ("C", "D"):
        np.testing.assert_array_equal(getattr(bounded, metric), getattr(unbounded, metric))
    np.testing.assert_array_equal(bounded.C_layers, unbounded.C_layers)
