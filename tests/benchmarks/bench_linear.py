"""Benchmark of dynprobe.linearize: the cost of a linearized training step against a standard one.

Run: ``python tests/benchmarks/bench_linear.py [--repeats 15] [--steps 10] [--batch-size 128]``. On the demo's
Conv1dNet (MNIST-1D-shaped random inputs (N, 1, 40), 10 classes), SGD with momentum 0.9 and weight decay 5e-4,
three training loops are timed in interleaved repetitions (A, B, C, A, B, C, ...; this machine's speed drifts
between minutes), each repetition ``--steps`` steps of forward + cross-entropy + backward + optimizer step:

* ``standard``: the model itself in train mode (BatchNorm with batch statistics);
* ``linearized (θ)``: ``linearize(model)``, one ``torch.func.jvp`` per forward;
* ``linearized (δ)``: ``linearize(model, weight_decay_on="delta")``.

It prints the median time per step and the ratios linearized / standard (the target is ≤ 3).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dynprobe.experiments.linear import linearize
from dynprobe.recipes.mnist1d import Conv1dNet


def training_loop(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int):
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def run() -> None:
        for _ in range(steps):
            loss = F.cross_entropy(module(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Conv1dNet().train()
    lin_theta = linearize(model)
    lin_delta = linearize(model, weight_decay_on="delta")
    x, y = torch.randn(args.batch_size, 1, 40), torch.randint(0, 10, (args.batch_size,))
    loops = {
        "standard": training_loop(model, x, y, args.steps),
        "linearized (θ)": training_loop(lin_theta, x, y, args.steps),
        "linearized (δ)": training_loop(lin_delta, x, y, args.steps),
    }
    for run in loops.values():  # warm-up: allocator, kernels, forward-AD decompositions
        run()
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.repeats):
        for name, run in loops.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / args.steps)
    median = {name: statistics.median(values) for name, values in times.items()}
    parameters = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Conv1dNet ({parameters} parameters), "
          f"batch {args.batch_size}, SGD momentum; median of {args.repeats} interleaved repetitions "
          f"x {args.steps} steps")
    for name, value in median.items():
        ratio = "" if name == "standard" else f"   ratio to standard {value / median['standard']:.2f}"
        print(f"  {name:16s} {value * 1e3:7.2f} ms/step{ratio}")


if __name__ == "__main__":
    main()
