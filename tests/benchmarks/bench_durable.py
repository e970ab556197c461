"""What fsync at commit points (``RunWriter(durable=True)``) costs per snapshot.

Run: ``python tests/benchmarks/bench_durable.py [--snapshots 20] [--params 10000000]``

Two workloads, each with ``durable=False`` then ``durable=True``, in the same temporary folder (same filesystem):

* **probe / small MLP**: the test suite's MLP (1.9 k parameters, 96 eval examples), a snapshot every 2 steps for
  ``2 × --snapshots`` steps; the per-snapshot cost is the probe's own ``duration_s`` of each committed snapshot
  (eval, rows, files, commit) plus the commit itself, measured around ``RunWriter.commit_snapshot``;
* **writer / P-parameter vector** (default 10 M, float32 = 40 MB): exactly the files and rows of one snapshot —
  params.npy, buffers.npz, preds.npy (10 k labels), a C and a D row — then the commit, timed end to end.

Reported: median per-snapshot time of each mode and the durable overhead in % of the non-durable snapshot. The
machine is shared: ``uptime`` is printed first; the figures are for the filesystem of ``--dir``.
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import dynprobe  # noqa: E402
from dynprobe.distributed import runtime  # noqa: E402
from dynprobe.store.rows import TriangularRows  # noqa: E402
from dynprobe.store.writer import RunWriter  # noqa: E402
from tests.conftest import mlp_setup, train  # noqa: E402
from tests.small_runs import manifest  # noqa: E402


def probe_run(folder: Path, durable: bool, snapshots: int) -> float:
    """Median seconds per snapshot of the probe on the small MLP (snapshot duration + commit)."""
    commits: list[float] = []
    original = RunWriter.commit_snapshot

    def timed_commit(self, record):
        started = time.perf_counter()
        original(self, record)
        commits.append(time.perf_counter() - started)

    RunWriter.commit_snapshot = timed_commit
    runtime.RunWriter = functools.partial(RunWriter, durable=durable)  # the probe's writer, durable or not
    try:
        model, optimizer, scheduler, data = mlp_setup()
        out = folder / f"mlp_{durable}"
        with dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=out, schedule=2):
            train(model, optimizer, scheduler, data, 2 * snapshots)
    finally:
        RunWriter.commit_snapshot = original
        runtime.RunWriter = RunWriter
    run = dynprobe.load_run(out)
    durations = [float(s["duration_s"]) for s in run.snapshots[1:]]
    return statistics.median(d + c for d, c in zip(durations, commits[1:]))


def writer_run(folder: Path, durable: bool, snapshots: int, params: int) -> float:
    """Median seconds to write and commit one snapshot of a ``params``-entry float32 vector."""
    rng = np.random.default_rng(0)
    theta = rng.normal(size=params).astype(np.float32)
    preds = rng.integers(0, 10, size=10_000).astype(np.int16)
    times = []
    with RunWriter(folder / f"vector_{durable}", manifest(), resume=False, durable=durable) as writer:
        for k in range(snapshots):
            started = time.perf_counter()
            writer.save_array(k, "params", theta)
            writer.save_arrays(k, "buffers", {"running_mean": theta[:2]})
            writer.save_array(k, "preds", preds)
            for name in ("C", "D"):
                TriangularRows(writer.rows_path(name)).append(np.zeros(k + 1), k)
            writer.commit_snapshot({"step": k})
            times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=20)
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--dir", default=None, help="folder on the filesystem to measure (default: a temp folder)")
    args = parser.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    torch.set_num_threads(2)
    folder = Path(tempfile.mkdtemp(prefix="bench_durable_", dir=args.dir))
    try:
        rows = []
        for label, measure in (("probe, MLP 1.9k params", lambda d: probe_run(folder, d, args.snapshots)),
                               (f"writer, {args.params / 1e6:g} M-parameter vector",
                                lambda d: writer_run(folder, d, args.snapshots, args.params))):
            plain, durable = measure(False), measure(True)
            rows.append((label, plain, durable))
        print(f"{'workload':34s} {'per snapshot':>14s} {'durable':>10s} {'overhead':>9s}")
        for label, plain, durable in rows:
            print(f"{label:34s} {plain * 1e3:11.2f} ms {durable * 1e3:7.2f} ms "
                  f"{100 * (durable - plain) / plain:8.1f} %")
        print(f"filesystem of {folder}: {os.statvfs(folder).f_bsize}-byte blocks")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
