"""FSDP1 (``FullyShardedDataParallel``) is refused at attach, on every rank alike, with the fix named
(:func:`dynprobe.distributed.sharded.fsdp1_problem`, raised by ``DistributedRun.detect``).

Before the refusal an FSDP1 model got a misleading error from the DDP attach check: "ranks hold different parameter
values" (flat parameters, ``use_orig_params=False``) or "ranks disagree on the probe configuration" (the original
names as views of uneven slices, ``use_orig_params=True``). Two gloo ranks on the CPU, spawned with a deadline.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import dynprobe
from dynprobe.distributed.sharded import fsdp1_problem

from .. import spawned

fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
DEADLINE_S = 120.0
FIX = ("fully_shard", "ModelParallelStrategy", "FullyShardedDataParallelPlugin(fsdp_version=2)",
       "fsdp_config={'version': 2}", "not FSDPStrategy")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _attach(model: nn.Module, out: Path) -> str | None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    try:
        dynprobe.Probe(model, optimizer, eval_data=(x, x[:, :3].argmax(1)), out=out, progress=False)
    except ValueError as error:
        return str(error)
    return None


def scenario_fsdp1(rank: int, folder: Path, result: dict) -> None:
    for use_orig_params in (False, True):
        model = fsdp.FullyShardedDataParallel(_net(), device_id=torch.device("cpu"), use_orig_params=use_orig_params)
        inner = model.module
        result[f"orig_{use_orig_params}_wrapper"] = _attach(model, folder / f"run_{use_orig_params}_wrapper")
        # What a framework hands a callback: the module inside the wrapper (Lightning's FSDPStrategy).
        result[f"orig_{use_orig_params}_inner"] = _attach(inner, folder / f"run_{use_orig_params}_inner")
    flag = torch.ones(1)
    dist.all_reduce(flag)  # nothing was left half-done: the process group still works
    result["after"] = float(flag)
    # FSDP2 and plain modules are not FSDP1.
    sharded = _net()
    fsdp.fully_shard(sharded)
    result["fully_shard"] = fsdp1_problem(sharded)
    result["plain"] = fsdp1_problem(_net())


SCENARIOS = {"fsdp1": scenario_fsdp1}


def test_fsdp1_is_refused_on_every_rank_with_the_fix_named(tmp_path: Path) -> None:
    results = spawned.run_spawned(__name__, "fsdp1", tmp_path, world=WORLD, deadline_s=DEADLINE_S)
    keys = [f"orig_{orig}_{what}" for orig in (False, True) for what in ("wrapper", "inner")]
    for key in keys:
        messages = {result[key] for result in results}
        assert len(messages) == 1, f"{key}: the ranks raised different errors {messages}"
        message = messages.pop()
        assert message is not None and message.startswith("dynprobe: the model is wrapped in FSDP1"), message
        for fix in FIX:
            assert fix in message, (fix, message)
    assert all(result["after"] == WORLD for result in results)
    assert all(result["fully_shard"] is None and result["plain"] is None for result in results)
    assert not list(tmp_path.glob("run_*/*")), "a refused probe wrote into its run directory"


def test_a_plain_module_outside_torch_distributed_is_not_fsdp1() -> None:
    assert fsdp1_problem(_net()) is None
