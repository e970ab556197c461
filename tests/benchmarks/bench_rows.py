"""Rows at the floor: the per-snapshot cost of the interval rows against the floor of a snapshot, in the same run.

Run: ``python tests/benchmarks/bench_rows.py [--device cpu|cuda] [--snapshots 40]`` (set ``OMP_NUM_THREADS``; the
number of torch threads is printed).

The setting of issue 23: an 8.5 M-parameter MLP (3072-2048-1088-10) trained with SGD at lr 0.01 on random data
(batch 32), a snapshot every 5 steps, 40 snapshots: nearby snapshots, so most C entries are below 6e-5 (the late
training case). The recorder runs with a synchronous writer so that everything a snapshot costs is on the clock:

* ``cost``  = the measurement (eval pass + parameter copy) + the commit (files saved + the C and D rows, with the
  deferred C entries completed in groups of 16 on the snapshot that completes a group: amortized in the mean);
* ``floor`` = the same measurement + the same file saves + one float32 GEMV over the history held at that snapshot
  (a read of it at memory speed), timed right after the run.

On the CPU every time is the process's CPU time (``time.process_time``: this machine is shared, and wall time
counts the other users' work); on a GPU, wall time with the device synchronized.

Printed: per-snapshot means of each part and the ratios cost / floor and rows / GEMV. The issue's target is
cost / floor ≤ 1.5.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dynprobe._util.evaluation import EvalSet
from dynprobe._util.modules import trainable_parameters
from dynprobe.metrics.interval import PairwiseMatrix
from dynprobe.recording.snapshot import SnapshotRecorder
from dynprobe.store.manifest import build_manifest
from dynprobe.store.writer import RunWriter

WIDTHS = [3072, 2048, 1088, 10]  # 8.53 M parameters


def mlp(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def clock_for(device: torch.device):
    """CPU time on the CPU (the bench runs single-threaded unless told otherwise), wall time on a GPU."""
    return time.perf_counter if device.type == "cuda" else time.process_time


class RowClock:
    """Wraps :meth:`PairwiseMatrix.update` to time the rows (C and D, deferred completions included)."""

    def __init__(self, now) -> None:
        self.seconds, self.now = 0.0, now
        self._update = PairwiseMatrix.update

    def __enter__(self) -> RowClock:
        clock, update = self, self._update

        def timed(matrix: PairwiseMatrix, vector):
            started = clock.now()
            try:
                return update(matrix, vector)
            finally:
                if matrix.history.device.type == "cuda":
                    torch.cuda.synchronize()
                clock.seconds += clock.now() - started

        PairwiseMatrix.update = timed
        return self

    def __exit__(self, *exc) -> None:
        PairwiseMatrix.update = self._update


def run(device: torch.device, snapshots: int, widths: list[int] | None = None, *, verbose: bool = True
        ) -> dict[str, float]:
    """Record ``snapshots`` snapshots of an MLP of ``widths`` (default :data:`WIDTHS`) and return the per-snapshot
    costs (seconds) against the floor; prints the table when ``verbose``."""
    torch.manual_seed(0)
    model = mlp(widths or WIDTHS).to(device)
    p = sum(q.numel() for q in model.parameters())
    generator = torch.Generator().manual_seed(0)
    widths = widths or WIDTHS
    x = torch.randn(6096, widths[0], generator=generator)
    y = (x @ torch.randn(widths[0], widths[-1], generator=generator)).argmax(1)
    x_train, y_train = x[:4096].to(device), y[:4096].to(device)
    out = Path(tempfile.mkdtemp(prefix="bench_rows_"))
    try:
        eval_set = EvalSet.from_user((x[4096:], y[4096:]), max_examples=2000, seed=0)
        named = trainable_parameters(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        manifest = build_manifest(model=model, named_params=named, optimizer=optimizer, eval_set=eval_set,
                                  num_classes=10, storage_dtype=torch.float32, device=device, config={},
                                  conventions={})
        writer = RunWriter(out / "run", manifest, resume=False)
        recorder = SnapshotRecorder(writer, model, [q for _, q in named], eval_set, device=device,
                                    storage_dtype=torch.float32, output_fn=lambda o: o, eval_batch_size=256,
                                    history_memory=(snapshots + 4) * p * 4)
        measure_s, commit_s, rows_s = [], [], []
        batches = torch.Generator().manual_seed(1)
        now = clock_for(device)
        with RowClock(now) as clock:
            for k in range(snapshots):
                started = now()
                data = recorder.measure(5 * k)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                measured = now()
                before = clock.seconds
                recorder.commit(data, {})
                committed = now()
                measure_s.append(measured - started)
                commit_s.append(committed - measured)
                rows_s.append(clock.seconds - before)
                for _ in range(5):
                    index = torch.randint(0, 4096, (32,), generator=batches).to(device)
                    optimizer.zero_grad()
                    nn.functional.cross_entropy(model(x_train[index]), y_train[index]).backward()
                    optimizer.step()
        matrix = recorder.matrices["C"]
        stack = matrix.history.resident()[1]
        flat = recorder.flat_params()
        gemv_s = []
        for k in range(snapshots):  # the read of the history held when snapshot k arrived (k vectors)
            view = stack[:k]
            times = []
            for _ in range(2):
                started = now()
                torch.mv(view, flat)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(now() - started)
            gemv_s.append(min(times))
        started = now()
        matrix.complete()  # the entries still pending at the end (the probe completes them at close)
        close_s = now() - started
        lower = matrix.compute()[np.tril_indices(snapshots, -1)]
        cost = np.add(measure_s, commit_s)
        save = np.subtract(commit_s, rows_s)
        floor = np.add(np.add(measure_s, save), gemv_s)
        result = {"parameters": p, "snapshots": snapshots, "rows_s_mean": float(np.mean(rows_s)),
                  "gemv_s_mean": float(np.mean(gemv_s)), "cost_s_mean": float(np.mean(cost)),
                  "floor_s_mean": float(np.mean(floor)), "cost_over_floor": float(cost.sum() / floor.sum()),
                  "cost_over_floor_with_close": float((cost.sum() + close_s) / floor.sum()),
                  "rows_over_gemv": float(np.sum(rows_s) / np.sum(gemv_s)), "close_s": close_s,
                  "share_below_6e-5": float(np.mean(lower < 6e-5))}
        writer.close()
        if not verbose:
            return result
        print(f"device {device}, torch threads {torch.get_num_threads()}, OMP_NUM_THREADS "
              f"{os.environ.get('OMP_NUM_THREADS')}, load {os.getloadavg()}")
        print(f"P = {p / 1e6:.2f} M, {snapshots} snapshots every 5 steps, lr 0.01; C entries < 6e-5: "
              f"{np.mean(lower < 6e-5):.0%} (median C {np.median(lower):.1e}, smallest {lower.min():.1e}); "
              f"per-layer channels {matrix.metric.channels - 1}")
        print("| per snapshot (mean) | eval + copy s | save s | rows s | GEMV s | cost s | floor s | cost / floor "
              "| rows / GEMV |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| all {snapshots} | {np.mean(measure_s):.3f} | {np.mean(save):.3f} | {np.mean(rows_s):.3f} | "
              f"{np.mean(gemv_s):.4f} | {np.mean(cost):.3f} | {np.mean(floor):.3f} | "
              f"{cost.sum() / floor.sum():.2f} | {np.sum(rows_s) / np.sum(gemv_s):.1f} |")
        print(f"rows in all: {np.sum(rows_s):.2f} s (+ {close_s:.2f} s completing the pending entries at close); "
              f"the slowest snapshot: {cost.max():.3f} s (cost / floor with the close: "
              f"{(cost.sum() + close_s) / floor.sum():.2f})")
        return result
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--snapshots", type=int, default=40)
    args = parser.parse_args()
    run(torch.device(args.device), args.snapshots)


if __name__ == "__main__":
    main()
