"""Scenarios run on ``world`` gloo processes on the CPU, with a deadline: a hang fails the test instead of blocking
CI. A test module defines ``SCENARIOS = {name: function(rank, folder, result)}``; each rank writes its ``result``
dict as JSON, and a crash comes back as its traceback."""
from __future__ import annotations

import datetime
import gc
import importlib
import json
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, port: int, module: str, scenario: str, folder: str, world: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    result: dict = {}
    try:
        importlib.import_module(module).SCENARIOS[scenario](rank, Path(folder), result)
    except Exception:  # noqa: BLE001 - reported to the parent through the result file
        result["crash"] = traceback.format_exc()
    finally:
        (Path(folder) / f"result_{scenario}_{rank}.json").write_text(json.dumps(result))
        gc.collect()  # release wrappers that hold the process group while the peer is still connected
        dist.barrier()
        dist.destroy_process_group()


def run_spawned(module: str, scenario: str, folder: Path, *, world: int, deadline_s: float) -> list[dict]:
    """Run ``module.SCENARIOS[scenario]`` on ``world`` ranks; every rank's result, after checking none crashed."""
    context = mp.start_processes(_entry, args=(_free_port(), module, scenario, str(folder), world), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"scenario {module}:{scenario} did not finish within {deadline_s:.0f} s (a deadlock?)")
    results = [json.loads((folder / f"result_{scenario}_{rank}.json").read_text()) for rank in range(world)]
    for rank, result in enumerate(results):
        assert "crash" not in result, f"rank {rank} crashed:\n{result['crash']}"
    return results
