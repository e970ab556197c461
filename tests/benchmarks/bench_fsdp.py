"""Per-snapshot cost of the probe under FSDP2 (``fully_shard``, gloo, CPU) at 1 and 2 ranks, against a training
step of the same run and against the unsharded probe on one process (the baselines of the same run).

A snapshot at every step for ``--steps`` steps; the cost of a snapshot is the probed step's median time minus the
bare step's. Its parts are timed too: the eval forward (collective), the C row (partial sums + all-reduces) and
``torch.distributed.checkpoint.save`` of the shards, and with ``--kernel n`` the eNTK on n probe examples at every
snapshot (under FSDP: θ gathered, each rank differentiating its share of the layers, one all-reduce).

    python tests/benchmarks/bench_fsdp.py [--width 512] [--steps 12] [--kernel 0]
"""
from __future__ import annotations

import argparse
import datetime
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard

import dynprobe


def model_of(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))


def sharded(model: nn.Module) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def step_times(model: nn.Module, optimizer: torch.optim.Optimizer, criterion, steps: int, rank: int,
               world: int) -> list[float]:
    times = []
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(128, 64, generator=generator), torch.randint(0, 10, (128,), generator=generator)
        part = slice(rank * 128 // world, (rank + 1) * 128 // world)
        start = time.perf_counter()
        loss = criterion(model(x[part]), y[part])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def eval_data() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(256, 64, generator=torch.Generator().manual_seed(1)), torch.arange(256) % 10


def timed(record: list[float], function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            record.append(time.perf_counter() - start)
    return wrapper


def measure(model: nn.Module, out: Path, steps: int, rank: int, world: int, kernel: int = 0) -> dict[str, float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    bare = statistics.median(step_times(model, optimizer, nn.CrossEntropyLoss(), steps, rank, world)[2:])
    probe = dynprobe.Probe(model, optimizer, eval_data=eval_data(), out=out, schedule=1, progress=False,
                           kernel=dynprobe.KernelConfig(n=kernel) if kernel else None)
    recorder = probe._recorder
    rows: list[float] = []
    saves: list[float] = []
    kernels: list[float] = []
    if kernel:  # the kernel's whole call (the gather, the partial kernel, the all-reduce) (bench only)
        probe._kernel.engine = timed(kernels, probe._kernel.engine)
    if hasattr(recorder, "cosine"):  # the sharded recorder: time its parts (bench only)
        recorder.cosine.row = timed(rows, recorder.cosine.row)
        recorder._save_shards = timed(saves, recorder._save_shards)
    probed = step_times(model, optimizer, probe.watch(nn.CrossEntropyLoss()), steps, rank, world)
    probe.close()
    return {"bare_step_s": bare, "snapshot_s": statistics.median(probed[2:]) - bare,
            "row_s": statistics.median(rows[2:]) if rows else float("nan"),
            "dcp_save_s": statistics.median(saves[2:]) if saves else float("nan"),
            "kernel_s": statistics.median(kernels[2:]) if kernels else float("nan")}


def worker(rank: int, world: int, port: int, width: int, steps: int, folder: str, kernel: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    result = measure(sharded(model_of(width)), Path(folder) / f"fsdp_{world}", steps, rank, world, kernel)
    if rank == 0:
        (Path(folder) / f"fsdp_{world}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--kernel", type=int, default=0, help="eNTK probe examples (0: no kernel)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        plain = measure(model_of(args.width), Path(folder) / "plain", args.steps, 0, 1, args.kernel)
        results = {"unsharded, 1 process": plain}
        for world in (1, 2):
            mp.start_processes(worker, args=(world, free_port(), args.width, args.steps, folder, args.kernel),
                               nprocs=world, start_method="spawn")
            results[f"fully_shard, {world} rank(s)"] = json.loads((Path(folder) / f"fsdp_{world}.json").read_text())
    parameters = sum(p.numel() for p in model_of(args.width).parameters())
    kernel = f", eNTK n={args.kernel}" if args.kernel else ""
    print(f"MLP width {args.width} ({parameters:,} parameters), eval set 256{kernel}, a snapshot at each of "
          f"{args.steps} steps (medians; CPU, gloo, 1 thread per rank)")
    for name, r in results.items():
        print(f"  {name:22s} step {r['bare_step_s'] * 1e3:7.1f} ms   snapshot {r['snapshot_s'] * 1e3:7.1f} ms "
              f"(×{r['snapshot_s'] / r['bare_step_s']:.1f} a step, ×{r['snapshot_s'] / plain['snapshot_s']:.2f} the "
              f"unsharded snapshot)   C row {r['row_s'] * 1e3:6.2f} ms   DCP save {r['dcp_save_s'] * 1e3:6.1f} ms"
              + (f"   eNTK {r['kernel_s'] * 1e3:7.1f} ms" if args.kernel else ""))


if __name__ == "__main__":
    main()
