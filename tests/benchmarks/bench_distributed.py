"""Cost of the probe under DDP (2 CPU processes, gloo): per-step overhead of ghosts and their one collective, and
the eNTK split over ranks against one rank computing the whole kernel. Ratios against baselines of the same run.

    python tests/benchmarks/bench_distributed.py [--width 512] [--steps 30]
"""
from __future__ import annotations

import argparse
import datetime
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dynprobe
from dynprobe.distributed.ghost_trainer import DistributedGhostTrainer
from dynprobe.distributed.kernel import ShardedKernel
from dynprobe.distributed.runtime import DistributedRun


def model_of(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))


def timed_steps(ddp: nn.Module, optimizer: torch.optim.Optimizer, criterion, steps: int, rank: int) -> float:
    times = []
    for step in range(steps):
        generator = torch.Generator().manual_seed(step * 2 + rank)
        x, y = torch.randn(128, 64, generator=generator), torch.randint(0, 10, (128,), generator=generator)
        start = time.perf_counter()
        loss = criterion(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def worker(rank: int, port: int, width: int, steps: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    eval_data = (torch.randn(256, 64, generator=torch.Generator().manual_seed(1)), torch.arange(256) % 10)

    ddp = nn.parallel.DistributedDataParallel(model_of(width))
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    baseline = timed_steps(ddp, optimizer, nn.CrossEntropyLoss(), steps, rank)

    collective: list[float] = []
    original = DistributedGhostTrainer._all_reduce

    def timed_reduce(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            collective.append(time.perf_counter() - start)

    DistributedGhostTrainer._all_reduce = timed_reduce
    ddp = nn.parallel.DistributedDataParallel(model_of(width))
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    probe = dynprobe.Probe(ddp, optimizer, eval_data=eval_data, out=Path(folder) / f"run{rank}", schedule=[0],
                           ghosts=dynprobe.Ghosts(at=[0], control=True), snapshot_on_close=False)
    with_ghosts = timed_steps(ddp, optimizer, probe.watch(nn.CrossEntropyLoss()), steps, rank)
    probe.close()
    reduce_time = statistics.median(collective[3:])

    inputs = eval_data[0][:64]
    make = lambda wrt=None: dynprobe.kernels.NTKEngine(ddp.module, inputs, wrt=wrt)  # noqa: E731
    whole, sharded = make(), ShardedKernel(DistributedRun.detect(ddp), ddp.module, make)
    whole_times, sharded_times = [], []
    for _ in range(3):
        start = time.perf_counter()
        whole()
        whole_times.append(time.perf_counter() - start)
        dist.barrier()
        start = time.perf_counter()
        sharded()
        sharded_times.append(time.perf_counter() - start)
    if rank == 0:
        params = sum(p.numel() for p in ddp.module.parameters())
        print(f"MLP width {width}: {params:,} parameters, batch 128 per rank, 2 ghosts (control + 1)")
        print(f"  DDP step without probe      {baseline * 1e3:8.2f} ms")
        print(f"  DDP step with 2 ghosts      {with_ghosts * 1e3:8.2f} ms  (x{with_ghosts / baseline:.2f})")
        print(f"  ghost all-reduce (1 call)   {reduce_time * 1e3:8.2f} ms  ({reduce_time / baseline:.2f} of a "
              f"baseline step; {2 * params * 4 / 2**20:.1f} MiB)")
        print(f"  eNTK n=64, one rank whole   {statistics.median(whole_times) * 1e3:8.1f} ms")
        print(f"  eNTK n=64, split over 2     {statistics.median(sharded_times) * 1e3:8.1f} ms  "
              f"(x{statistics.median(sharded_times) / statistics.median(whole_times):.2f})")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(port, args.width, args.steps, folder), nprocs=2)
