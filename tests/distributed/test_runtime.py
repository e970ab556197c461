"""``dynprobe.distributed.runtime`` outside a multi-rank run (the multi-rank paths run in test_runtime_ddp.py's spawned
processes): no process group or a single rank is a plain run with a real writer; what DDP does not support is
reported; a module is unwrapped only from a DistributedDataParallel."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dynprobe.config import Ghosts
from dynprobe.distributed.runtime import DistributedRun, check_supported, open_run_writer, unwrap_model, warn_comm_hook
from dynprobe.store.layout import MANIFEST
from dynprobe.store.writer import RunWriter

from ..small_runs import manifest


def test_without_a_multi_rank_group_the_probe_writes_a_plain_run(tmp_path):
    model = nn.Linear(2, 2)
    assert not dist.is_initialized()
    assert DistributedRun.detect(model) is None
    writer = open_run_writer(None, tmp_path / "run", manifest(), params=list(model.parameters()), resume=False,
                             resume_step=None)
    assert isinstance(writer, RunWriter) and (tmp_path / "run" / MANIFEST).exists()
    writer.close()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert DistributedRun.detect(model) is None  # one rank: nothing to coordinate
    finally:
        dist.destroy_process_group()


def test_what_ddp_does_not_support_is_reported_and_unwrapping_only_unwraps_ddp():
    assert check_supported(None) == [] and check_supported(Ghosts(at=[0])) == []
    (problem,) = check_supported(Ghosts(at=[0], scaler=torch.amp.GradScaler("cpu", enabled=False)))
    assert "Ghosts(scaler=...) is not supported under torch.distributed" in problem
    model = nn.Sequential(nn.Linear(2, 2))
    assert unwrap_model(model) is model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_comm_hook(None)
        warn_comm_hook(DistributedRun(0, 2, None))


@pytest.mark.parametrize(("rank", "writer"), [(0, True), (1, False), (3, False)])
def test_only_rank_zero_writes(rank, writer):
    assert DistributedRun(rank, 4, None).is_writer is writer
