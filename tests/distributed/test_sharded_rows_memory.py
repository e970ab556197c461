"""What the probe holds per rank under FSDP2: the C history of :class:`~dynprobe.distributed.sharded_rows.
ShardedCosineRows` (each rank its pieces of the earlier snapshots) against a single-process run's, 2 gloo ranks.

The history is the one part of the probe that grows with the run (T snapshots × P parameters); a rank's share is
P/R per snapshot, up to the rounding of dim-0 sharding (a rank holds at most ⌈d₀/R⌉ of a parameter's d₀ rows:
at most one row of each parameter more than P/R). No wall clock, no process-wide memory: the buffers' own sizes.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

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
    probe.close()


SCENARIOS = {"held": scenario_held}


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
        # allocated: rows for max(4, 2·count) pieces at most
        assert r["used"] <= r["held"] <= max(4, 2 * count) * r["local_size"] * itemsize
