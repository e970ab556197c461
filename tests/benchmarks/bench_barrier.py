"""Benchmark of dynprobe.loss_barrier: overhead over bare forwards, and the vmap-over-α alternative.

Run: ``python tests/benchmarks/bench_barrier.py [--repeats 7]``. For each model (the demo's Conv1dNet, a
100-wide MLP, a 32-wide MLP), on 2,000 examples (500 for the small MLP) and 30 α, three timings are interleaved
(A, B, C, A, B, C, ...; this machine's speed drifts between minutes) and the medians are printed as ratios:

* ``barrier / forwards``: ``loss_barrier`` against the bare cost of its 30 passes over the data (one per α; the
  grid holds both endpoints) through the model's own ``forward`` in eval mode with the loss: the price of
  interpolation, ``functional_call`` and the bookkeeping.
* ``vmap / barrier``: the same 30 α evaluated in chunks of 10 with ``torch.func.vmap`` over stacked interpolated
  states (the alternative the module docstring says was measured and not adopted); > 1 means the loop is faster.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from dynprobe.metrics.barrier import loss_barrier
from dynprobe.recipes.mnist1d import Conv1dNet


def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(40, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def bare_forwards(model: nn.Module, x: torch.Tensor, y: torch.Tensor, passes: int, batch_size: int) -> None:
    with torch.no_grad():
        for _ in range(passes):
            for start in range(0, x.shape[0], batch_size):
                F.cross_entropy(model(x[start : start + batch_size]), y[start : start + batch_size])


def vmapped_barrier_curve(model, state_a, state_b, x, y, alphas, chunk: int, batch_size: int) -> torch.Tensor:
    sums = []
    with torch.no_grad():
        for c in range(0, alphas.numel(), chunk):
            weights = alphas[c : c + chunk]
            stacked, dims = {}, {}
            for name, a in state_a.items():
                if a.is_floating_point():
                    shape = (weights.numel(), *a.shape)
                    view = weights.view(-1, *[1] * a.dim())
                    stacked[name], dims[name] = torch.lerp(state_b[name].expand(shape), a.expand(shape), view), 0
                else:
                    stacked[name], dims[name] = a, None
            call = vmap(lambda state, inputs: functional_call(model, state, (inputs,)), in_dims=(dims, None))
            total = torch.zeros(weights.numel(), dtype=torch.float64)
            for start in range(0, x.shape[0], batch_size):
                logits = call(stacked, x[start : start + batch_size])
                targets = y[start : start + batch_size].repeat(weights.numel())
                losses = F.cross_entropy(logits.flatten(0, 1), targets, reduction="none").view(weights.numel(), -1)
                total += losses.double().sum(1)
            sums.append(total / x.shape[0])
    return torch.cat(sums)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = [
        ("Conv1dNet(width=32)", lambda: Conv1dNet(), (1, 40), 2000),
        ("MLP(width=100)", lambda: mlp(100), (40,), 2000),
        ("MLP(width=32)", lambda: mlp(32), (40,), 500),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 30 alphas, batch_size 1024")
    for label, build, shape, n in cases:
        model, other = build().eval(), build().eval()
        state_a = {k: v.detach() for k, v in model.state_dict().items()}
        state_b = {k: v.detach() for k, v in other.state_dict().items()}
        x, y = torch.randn(n, *shape), torch.randint(0, 10, (n,))
        alphas = torch.linspace(0, 1, 30, dtype=torch.float32)
        reference = loss_barrier(model, state_a, state_b, (x, y)).curve
        check = vmapped_barrier_curve(model, state_a, state_b, x, y, alphas, 10, 1024).numpy()
        assert abs(check - reference).max() < 1e-5, "the vmap variant must compute the same curve"
        runs = {
            "forwards": lambda: bare_forwards(model, x, y, 30, 1024),
            "barrier": lambda: loss_barrier(model, state_a, state_b, (x, y)),
            "vmap": lambda: vmapped_barrier_curve(model, state_a, state_b, x, y, alphas, 10, 1024),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        median = {name: statistics.median(values) for name, values in times.items()}
        print(
            f"{label:22s} n={n:5d}  barrier {median['barrier'] * 1e3:7.1f} ms   "
            f"barrier/forwards {median['barrier'] / median['forwards']:.2f}   "
            f"vmap/barrier {median['vmap'] / median['barrier']:.2f}"
        )


if __name__ == "__main__":
    main()
