"""Overhead of a probe recording every 100 steps, as a wall-time ratio against the same loop without it.

Run: ``python tests/benchmarks/bench_overhead.py [--steps 1000] [--repeats 5] [--eval-n 1000]``

Workload: the demo's 1-D CNN (Conv1dNet, width 32, BatchNorm) on MNIST-1D, SGD momentum, batch 128, eval set
of ``--eval-n`` MNIST-1D test examples. Repetitions are interleaved (A, B, A, B, ...) because this machine's
speed drifts between minutes; the ratio of medians is reported, and the per-pair ratios too. The probed
timing includes everything the probe costs: construction (step-0 snapshot), hooks, snapshots, ``close()``.
Target (issue 2): ratio <= 1.03.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import torch
from torch import nn

import dynprobe
from dynprobe.recipes.mnist1d import Conv1dNet, load_mnist1d


def train(data, steps: int, *, probe_dir: str | None, eval_n: int) -> float:
    torch.manual_seed(0)
    model = Conv1dNet(width=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, data.x_train.shape[0], (128,), generator=generator) for _ in range(steps)]
    started = time.perf_counter()
    probe = None
    if probe_dir is not None:
        probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test[:eval_n], data.y_test[:eval_n]),
                               out=probe_dir, schedule=dynprobe.schedule.every(100), errors="raise")
        criterion = probe.watch(criterion)
    for index in batches:
        loss = criterion(model(data.x_train[index]), data.y_train[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if probe is not None:
        probe.close()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eval-n", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mnist1d()
    train(data, 50, probe_dir=None, eval_n=args.eval_n)  # warm-up
    plain, probed = [], []
    for r in range(args.repeats):
        root = tempfile.mkdtemp(prefix="dynprobe-bench-")
        try:
            plain.append(train(data, args.steps, probe_dir=None, eval_n=args.eval_n))
            probed.append(train(data, args.steps, probe_dir=f"{root}/run", eval_n=args.eval_n))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"repeat {r}: without {plain[-1]:.3f} s, with probe {probed[-1]:.3f} s, "
              f"ratio {probed[-1] / plain[-1]:.4f}")
    ratio = statistics.median(probed) / statistics.median(plain)
    pairs = sorted(b / a for a, b in zip(plain, probed))
    print(f"\n{args.steps} steps, probe every 100 steps ({args.steps // 100 + 1} snapshots), eval set {args.eval_n}, "
          f"{args.threads} threads")
    print(f"median without probe {statistics.median(plain):.3f} s, with probe {statistics.median(probed):.3f} s")
    print(f"overhead ratio (median/median): {ratio:.4f}   per-pair ratios: {', '.join(f'{p:.3f}' for p in pairs)}")
    print(f"target <= 1.03: {'met' if ratio <= 1.03 else 'NOT met'}")


if __name__ == "__main__":
    main()
