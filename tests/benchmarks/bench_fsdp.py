"""Per-snapshot cost and per-rank memory of the probe under FSDP2 (``fully_shard``, gloo, CPU) at 1, 2 and 4 ranks,
against a training step of the same run and against the unsharded probe on one process (the baselines of the same
run).

A snapshot at every step for ``--steps`` steps; the cost of a snapshot is the probed step's median time minus the
bare step's. Its parts are timed too: the C row (partial sums + all-reduces) and ``torch.distributed.checkpoint.save``
of the shards, and with ``--kernel n`` the eNTK on n probe examples at every snapshot (under FSDP: θ gathered, each
rank differentiating its share of the layers, one all-reduce).

Memory, per rank (the largest over the ranks):

* **held** — the bytes the probe keeps between snapshots, read off its buffers at the end of the run: the C history
  (:attr:`ShardedCosineRows.bytes_held`, this rank's pieces of every snapshot, as allocated; unsharded: the
  :class:`~dynprobe.store.history.VectorHistory` of C) and the earlier predictions kept for D (the same on every
  rank: they are not sharded). This isolates the probe exactly — nothing of the model, the optimizer or the
  allocator — and is the part that grows with the run (T·P/R numbers).
* **peak +** — how much the process's peak resident memory (``ru_maxrss``) rose while the probed steps ran, after
  the bare steps had reached their own peak: an upper bound on the probe's transient peak (evaluation activations,
  float64 temporaries of the C row, DCP's write buffers) plus what it holds, inflated by allocator slack (freed
  memory the C allocator keeps). A process-wide number, so noisier than *held*.

    python tests/benchmarks/bench_fsdp.py [--width 512] [--steps 12] [--ranks 1 2 4] [--kernel 0]
"""
from __future__ import annotations

import argparse
import datetime
import json
import resource
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


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def held_bytes(recorder) -> tuple[int, int, int]:
    """(C history allocated, C history used, D predictions) bytes the probe holds (module docstring)."""
    if hasattr(recorder, "cosine"):  # the sharded recorder
        history = recorder.cosine.history
        return (recorder.cosine.bytes_held, history.numel() * history.element_size(),
                recorder.disagreement.history.bytes_held)
    c = recorder.matrices["C"].history
    row = 0 if c.bytes_held == 0 else c.bytes_held // c._buffer.shape[0]
    return c.bytes_held, len(c.slots) * row, recorder.matrices["D"].history.bytes_held


def measure(model: nn.Module, out: Path, steps: int, rank: int, world: int, probed: bool, kernel: int = 0
            ) -> dict[str, float]:
    """Bare steps (the timing baseline), then the same number of steps with the probe (``probed``) or bare again
    (the memory baseline: the same process's peak without the probe)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    bare = statistics.median(step_times(model, optimizer, nn.CrossEntropyLoss(), steps, rank, world)[2:])
    if not probed:
        step_times(model, optimizer, nn.CrossEntropyLoss(), steps, rank, world)
        return {"peak_rss_bytes": peak_rss_bytes()}
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
    probed_times = step_times(model, optimizer, probe.watch(nn.CrossEntropyLoss()), steps, rank, world)
    held, used, predictions = held_bytes(recorder)
    snapshots = len(probe.writer.snapshots)
    probe.close()
    return {"bare_step_s": bare, "snapshot_s": statistics.median(probed_times[2:]) - bare,
            "row_s": statistics.median(rows[2:]) if rows else float("nan"),
            "dcp_save_s": statistics.median(saves[2:]) if saves else float("nan"),
            "kernel_s": statistics.median(kernels[2:]) if kernels else float("nan"),
            "history_held_bytes": held, "history_used_bytes": used, "predictions_bytes": predictions,
            "snapshots": snapshots, "peak_rss_bytes": peak_rss_bytes()}


def worker(rank: int, world: int | None, port: int, width: int, steps: int, folder: str, probed: bool,
           kernel: int) -> None:
    """One rank of a ``fully_shard`` run over ``world`` ranks, or (``world=None``) the unsharded model in a plain
    process; each in a fresh process, so that its peak memory is its own."""
    torch.set_num_threads(1)
    name = f"{'fsdp_' + str(world) if world else 'plain'}_{'probed' if probed else 'bare'}"
    if world is None:
        result = measure(model_of(width), Path(folder) / name, steps, 0, 1, probed, kernel)
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
        result = measure(sharded(model_of(width)), Path(folder) / name, steps, rank, world, probed, kernel)
    (Path(folder) / f"{name}_{rank}.json").write_text(json.dumps(result))
    if world is not None:
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int | None, width: int, steps: int, folder: str, kernel: int) -> list[dict[str, float]]:
    """Every rank's results, with ``peak_rise_bytes``: its peak resident memory minus that of the same rank of the
    same run without the probe."""
    results = {}
    for probed in (False, True):
        ranks = world or 1
        mp.start_processes(worker, args=(world, free_port(), width, steps, folder, probed, kernel), nprocs=ranks,
                           start_method="spawn")
        name = f"{'fsdp_' + str(world) if world else 'plain'}_{'probed' if probed else 'bare'}"
        results[probed] = [json.loads((Path(folder) / f"{name}_{rank}.json").read_text()) for rank in range(ranks)]
    return [{**probed, "peak_rise_bytes": probed["peak_rss_bytes"] - bare["peak_rss_bytes"]}
            for bare, probed in zip(results[False], results[True])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--kernel", type=int, default=0, help="eNTK probe examples (0: no kernel)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = {"unsharded, 1 process": run(None, args.width, args.steps, folder, args.kernel)}
        for world in args.ranks:
            results[f"fully_shard, {world} rank(s)"] = run(world, args.width, args.steps, folder, args.kernel)
    plain = results["unsharded, 1 process"][0]
    parameters = sum(p.numel() for p in model_of(args.width).parameters())
    print(f"MLP width {args.width} ({parameters:,} parameters), eval set 256, a snapshot at each of {args.steps} "
          "steps (medians; CPU, gloo, 1 thread per rank; rank 0's times, the largest memory over the ranks)")
    mib = 2**20
    for name, ranks in results.items():
        r = ranks[0]
        used = max(x["history_used_bytes"] for x in ranks)
        print(f"  {name:22s} step {r['bare_step_s'] * 1e3:7.1f} ms   snapshot {r['snapshot_s'] * 1e3:7.1f} ms "
              f"(×{r['snapshot_s'] / r['bare_step_s']:.1f} a step, ×{r['snapshot_s'] / plain['snapshot_s']:.2f} the "
              f"unsharded snapshot)   C row {r['row_s'] * 1e3:6.2f} ms   DCP save {r['dcp_save_s'] * 1e3:6.1f} ms"
              + (f"   eNTK {r['kernel_s'] * 1e3:7.1f} ms" if args.kernel else ""))
        print(f"  {'':22s} held: C history {used / mib:6.2f} MiB for {r['snapshots']} snapshots "
              f"(×{used / plain['history_used_bytes']:.3f} unsharded; allocated "
              f"{max(x['history_held_bytes'] for x in ranks) / mib:.2f} MiB), D predictions "
              f"{max(x['predictions_bytes'] for x in ranks) / mib:5.2f} MiB   peak RSS + "
              f"{max(x['peak_rise_bytes'] for x in ranks) / mib:6.1f} MiB")


if __name__ == "__main__":
    main()
