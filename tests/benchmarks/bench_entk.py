"""eNTK engine benchmark: dynprobe vs a naive loop, the torch.func tutorial's Jacobian contraction, and a floor.

Run: ``python tests/benchmarks/bench_entk.py`` (about 6 minutes on 2 CPU threads; ``--quick`` for one round).

Everything is measured in one run, on the same inputs, with ``torch.set_num_threads(2)``, and interleaved: each
round times every method once (A, B, C, A, B, C, ...), after one untimed warm-up call each, so that the
machine's speed drift (up to 1.8× between minutes on a shared host) hits all methods alike. Before each round
the script waits (≤ 90 s) for the 1-minute load average to drop below 1.5, since other jobs on the host can
slow one method of a round several-fold. Each ratio is printed twice: from the per-method best time over the
rounds (least disturbed; the verdicts use the less favourable of the two) and as the median of per-round
paired ratios. CPU utilization (process CPU time / wall time) shows how much of the 2 threads each method
got. Baselines:

* (a) naive: per-sample forward, one ``torch.autograd.grad`` per (sample, logit), J stacked, H = J Jᵀ.
* (b) tutorial: ``vmap(jacrev(fnet_single), chunk_size=8)`` over samples, then one einsum per parameter
  (``Naf,Maf->NM`` for trace, ``Naf,Mbf->NMab`` for full), as in the PyTorch "Neural Tangent Kernels" tutorial.
* (c) floor: t(batched forward + backward of the c one-hot cotangents with ``is_grads_batched=True``) +
  t(one float32 GEMM of the n²·c·P contraction, ``X @ Xᵀ`` for X of shape (n, c·P)).
* step: one training step (forward + backward + SGD) at batch 128, the unit of "step-equivalents".

dynprobe is timed as ``engine(params)`` on a reused :class:`~dynprobe.kernels.NTKEngine` (the Probe's use: one
engine, a call per snapshot); its construction (planning) time is printed separately.

Peak memory: the resident-set high-water mark (``VmHWM``; ``ru_maxrss`` survives fork + exec) of a fresh
subprocess that builds the model and inputs, records its RSS, then runs one computation; "extra" = peak − that
RSS. (tracemalloc does not see torch's CPU allocations; the RSS counts everything the process touched, including
the allocator's and oneDNN's own buffers.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

from dynprobe.kernels.engine import NTKEngine
from dynprobe.recipes.models import resnet20

THREADS = 2


# ----------------------------------------------------------------------------- models and data
def make_resnet(n: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = resnet20()
    with torch.no_grad():  # a few training steps' worth of BN statistics, so eval mode is not trivial
        model.train()
        model(torch.randn(256, 3, 32, 32))
    model.eval()
    return model, torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def make_mlp(n: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10)).eval()
    return model, torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


MODELS = {"resnet20": make_resnet, "mlp": make_mlp}


def mode_options(mode: str, n: int) -> dict:
    if mode == "single":
        return {"class_index": 3}
    if mode == "true_class":
        return {"targets": torch.arange(n) % 10}
    return {}


# ----------------------------------------------------------------------------- baselines
def tutorial_ntk(model: nn.Module, x: torch.Tensor, mode: str, options: dict) -> torch.Tensor:
    """The torch.func tutorial's ``empirical_ntk_jacobian_contraction`` (chunk 8), reduced per mode."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fnet_single(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(fnet_single), (None, 0), chunk_size=8)(params, x)
    jac = [j.flatten(2) for j in jac.values()]  # (n, c, P_tensor) each
    if mode == "logit_sum":
        jac = [j.sum(1, keepdim=True) for j in jac]
    elif mode == "single":
        jac = [j[:, options["class_index"]].unsqueeze(1) for j in jac]
    elif mode == "true_class":
        jac = [j[torch.arange(x.shape[0]), options["targets"]].unsqueeze(1) for j in jac]
    if mode == "full":
        return sum(torch.einsum("Naf,Mbf->NMab", j, j) for j in jac)
    return sum(torch.einsum("Naf,Maf->NM", j, j) for j in jac)


def naive_ntk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(a): one forward per sample, one autograd.grad per (sample, logit); trace mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1])[0]
        for k in range(out.shape[0]):
            grads = torch.autograd.grad(out[k], params, retain_graph=k + 1 < out.shape[0])
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    jac = torch.stack(rows).view(x.shape[0], -1)  # (n, c·P): the trace kernel is J Jᵀ
    return (jac @ jac.T).double()


class Floor:
    """(c): batched forward + c-cotangent backward (is_grads_batched) + the contraction GEMM, timed apart."""

    def __init__(self, model: nn.Module, x: torch.Tensor, rows: int) -> None:
        self.model, self.x = model, x
        self.params = [p for p in model.parameters() if p.requires_grad]
        c = model(x[:1]).shape[1]
        self.cotangents = torch.eye(c).unsqueeze(1).expand(c, x.shape[0], c).contiguous()
        count = sum(p.numel() for p in self.params)
        self.matrix = torch.randn(x.shape[0], rows * count)  # the trace contraction: (n, c·P) @ (c·P, n)

    def backward(self) -> None:
        out = self.model(self.x)
        torch.autograd.grad(out, self.params, self.cotangents, is_grads_batched=True)

    def gemm(self) -> None:
        self.matrix @ self.matrix.T


def make_step(model_factory, n_step: int = 128):
    model, probe = model_factory(n_step)
    model.train()
    x = torch.randn(n_step, *probe.shape[1:])
    y = torch.randint(0, 10, (n_step,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


# ----------------------------------------------------------------------------- timing
def wait_for_quiet(limit: float, patience: float) -> None:
    """Wait (at most ``patience`` s) until the 1-minute load average is below ``limit`` (a shared host)."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        with open("/proc/loadavg") as loadavg:
            if float(loadavg.read().split()[0]) < limit:
                return
        time.sleep(5)


class Timings:
    """Wall-clock seconds and CPU utilization (process CPU time / wall time; 2.0 = both threads busy)."""

    def __init__(self, names) -> None:
        self.wall = {name: [] for name in names}
        self.utilization = {name: [] for name in names}

    def best(self, name: str) -> float:
        return min(self.wall[name])

    def ratio(self, numerator: str, denominator: str) -> tuple[float, float]:
        """(ratio of the per-method best times, median of the per-round paired ratios)."""
        paired = statistics.median(a / b for a, b in zip(self.wall[numerator], self.wall[denominator]))
        return self.best(numerator) / self.best(denominator), paired


def interleaved(methods: dict, rounds: int, quiet: float = 1.5, patience: float = 90.0) -> Timings:
    """Warm up each method once, then ``rounds`` rounds of A, B, C, ... (each round after the host quiets down)."""
    for fn in methods.values():  # warm-up: oneDNN primitives, page faults, vmap tracing
        fn()
    timings = Timings(methods)
    for _ in range(rounds):
        wait_for_quiet(quiet, patience)
        for name, fn in methods.items():
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            wall = time.perf_counter() - start
            timings.wall[name].append(wall)
            timings.utilization[name].append((time.process_time() - cpu) / wall)
    return timings


def row(label: str, value, target: str = "", ok: bool | None = None) -> None:
    """One result line; ``value`` is a number or (best-time ratio, median paired ratio)."""
    verdict = "" if ok is None else ("  ok" if ok else "  MISSED")
    if isinstance(value, tuple):
        text = f"{value[0]:>9.3f} (paired median {value[1]:.3f})"
    else:
        text = f"{value:>9.3f}"
    print(f"  {label:<60} {text}  {target}{verdict}")


def summary(times: Timings) -> None:
    print("  best seconds: " + ", ".join(f"{k} {times.best(k):.3f}" for k in times.wall))
    print("  median CPU utilization (2.0 = both threads busy): "
          + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in times.utilization.items()))


# ----------------------------------------------------------------------------- memory (subprocess)
def memory_child(spec: dict) -> None:
    torch.set_num_threads(THREADS)
    model, x = MODELS[spec["model"]](spec["n"])

    def status(field: str) -> int:
        with open("/proc/self/status") as lines:
            return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field))

    def rss() -> int:
        return status("VmRSS:")

    base = rss()
    options = mode_options(spec["mode"], spec["n"])
    if spec["method"] == "dynprobe":
        engine = NTKEngine(model, x, mode=spec["mode"], **options)
        engine()
        estimate = engine.plan.chunks.estimated_bytes
    elif spec["method"] == "tutorial":
        tutorial_ntk(model, x, spec["mode"], options)
        estimate = None
    else:
        naive_ntk(model, x)
        estimate = None
    # VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across fork + exec, so a child of a large parent
    # (this script, after the timing sections) reported the parent's RSS (7.1 GB) as its own peak.
    peak = status("VmHWM:")
    print(json.dumps({"extra": peak - base, "estimate": estimate}))


def peak_memory(model: str, n: int, mode: str, method: str) -> dict:
    spec = json.dumps({"model": model, "n": n, "mode": mode, "method": method})
    result = subprocess.run([sys.executable, __file__, "--memory-child", spec], capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- sections
def add_floor(times: Timings) -> None:
    times.wall["floor"] = [b + g for b, g in zip(times.wall["floor_backward"], times.wall["floor_gemm"])]
    times.utilization["floor"] = times.utilization["floor_backward"]


def resnet_trace(rounds: int, with_naive: bool) -> None:
    print("\nResNet-20 (269,722 params), mode='trace', n=128, float32 Jacobians, float64 H")
    model, x = make_resnet(128)
    start = time.perf_counter()
    engine = NTKEngine(model, x)
    planning = time.perf_counter() - start
    floor = Floor(model, x, rows=10)
    methods = {"dynprobe": engine, "tutorial": lambda: tutorial_ntk(model, x, "trace", {}),
               "floor_backward": floor.backward, "floor_gemm": floor.gemm, "step": make_step(make_resnet),
               "per_layer": engine.per_layer}
    if with_naive:
        methods["naive"] = lambda: naive_ntk(model, x)
    times = interleaved(methods, rounds)
    add_floor(times)
    print(f"  engine planning (once): {planning:.2f} s; plan: {engine.plan.chunks.describe()}")
    summary(times)
    steps = times.ratio("dynprobe", "step")
    row("dynprobe time / training step (step-equivalents)", steps, "target <= 12", max(steps) <= 12)
    versus_floor = times.ratio("dynprobe", "floor")
    row("dynprobe / floor (c)", versus_floor, "target <= 1.15", max(versus_floor) <= 1.15)
    row("tutorial (b) / floor (c)", times.ratio("tutorial", "floor"))
    row("speed-up vs tutorial (b)", times.ratio("tutorial", "dynprobe"))
    row("per-layer kernels (every H_l) / total H", times.ratio("per_layer", "dynprobe"))
    if with_naive:
        row("speed-up vs naive loop (a)", times.ratio("naive", "dynprobe"))
    print("  phases of the last dynprobe call (s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in engine.last_timings.items() if v))
    # The two float32 computations of one kernel differ where ReLU masks flip at kinks (see the module docs).
    h_ours, h_tutorial = engine(), tutorial_ntk(model, x, "trace", {}).double()
    row("relative difference dynprobe vs tutorial (float32 ReLU net)",
        float((h_ours - h_tutorial).norm() / h_tutorial.norm()))


def resnet_small_n(rounds: int) -> None:
    print("\nResNet-20, mode='trace', n=64")
    model, x = make_resnet(64)
    engine = NTKEngine(model, x)
    times = interleaved({"dynprobe": engine, "tutorial": lambda: tutorial_ntk(model, x, "trace", {})}, rounds)
    summary(times)
    speedup = times.ratio("tutorial", "dynprobe")
    row("speed-up vs tutorial (b)", speedup, "target >= 1.1", min(speedup) >= 1.1)


def resnet_full(rounds: int) -> None:
    print("\nResNet-20, mode='full', n=128 (H is 1280×1280)")
    model, x = make_resnet(128)
    engine = NTKEngine(model, x, mode="full")
    count = sum(p.numel() for p in model.parameters())
    jacobian = torch.randn(128 * 10, count)
    contraction: list[float] = []

    def dynprobe() -> None:
        engine()
        contraction.append(engine.last_timings["contraction"])

    times = interleaved({"dynprobe": dynprobe, "matmul": lambda: jacobian @ jacobian.T,
                         "step": make_step(make_resnet)}, rounds)
    flops = 2.0 * (128 * 10) ** 2 * count
    print(f"  plan: {engine.plan.chunks.describe()}")
    summary(times)
    print("  phases of the last dynprobe call (s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in engine.last_timings.items() if v))
    steps = times.ratio("dynprobe", "step")
    row("dynprobe time / training step (step-equivalents)", steps, "target <= 25", max(steps) <= 25)
    timed = contraction[1:]  # the timed rounds (the first call was the warm-up)
    rate = (min(times.wall["matmul"]) / min(timed),
            statistics.median(m / c for m, c in zip(times.wall["matmul"], timed)))
    row("contraction rate / same-run matmul rate (nominal 2(nc)²P flops)", rate, "target >= 0.85", min(rate) >= 0.85)
    row("same-run float32 matmul rate, best (GFLOP/s)", flops / times.best("matmul") / 1e9)


def resnet_logit_sum(rounds: int) -> None:
    print("\nResNet-20, mode='logit_sum', n=128")
    model, x = make_resnet(128)
    engine = NTKEngine(model, x, mode="logit_sum")
    times = interleaved({"dynprobe": engine, "tutorial": lambda: tutorial_ntk(model, x, "logit_sum", {}),
                         "step": make_step(make_resnet)}, rounds)
    summary(times)
    steps = times.ratio("dynprobe", "step")
    row("dynprobe time / training step (step-equivalents)", steps, "target <= 2.5", max(steps) <= 2.5)
    row("speed-up vs tutorial (b)", times.ratio("tutorial", "dynprobe"))


def mlp_modes(rounds: int) -> None:
    print("\nMLP 784-512-512-10 (669,706 params), n=128, every mode")
    model, x = make_mlp(128)
    for mode in ("trace", "logit_sum", "full", "single", "true_class"):
        options = mode_options(mode, 128)
        engine = NTKEngine(model, x, mode=mode, **options)
        times = interleaved({"dynprobe": engine, "tutorial": lambda: tutorial_ntk(model, x, mode, options)},
                            rounds)
        speedup = times.ratio("tutorial", "dynprobe")
        row(f"{mode}: speed-up vs tutorial (b) (dynprobe best {times.best('dynprobe') * 1e3:.1f} ms)",
            speedup, "target >= 100", min(speedup) >= 100)


def memory_section(quick: bool) -> None:
    print("\nPeak extra memory (RSS high-water mark of a fresh subprocess, MiB)")
    specs = [("resnet20", 512, "trace", "dynprobe", 1e9), ("resnet20", 128, "trace", "dynprobe", None),
             ("resnet20", 128, "full", "dynprobe", None), ("resnet20", 128, "trace", "tutorial", None)]
    if not quick:
        specs.append(("mlp", 128, "trace", "tutorial", None))
        specs.append(("mlp", 128, "trace", "dynprobe", None))
    for model, n, mode, method, limit in specs:
        result = peak_memory(model, n, mode, method)
        estimate = f" (planner estimate {result['estimate'] / 2**20:.0f} MiB)" if result["estimate"] else ""
        ok = None if limit is None else result["extra"] < limit
        row(f"{model} {mode} n={n} {method}{estimate}", result["extra"] / 2**20,
            "target < 1 GB (953.7 MiB)" if limit else "", ok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed round per comparison")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-naive", action="store_true", help="skip the naive loop (12 s per call)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="sections: trace small_n full logit_sum mlp memory")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return
    torch.set_num_threads(THREADS)
    rounds = 1 if args.quick else args.rounds
    sections = {
        "trace": lambda: resnet_trace(rounds, not args.skip_naive),
        "small_n": lambda: resnet_small_n(rounds),
        "full": lambda: resnet_full(max(1, rounds - 1)),
        "logit_sum": lambda: resnet_logit_sum(rounds),
        "mlp": lambda: mlp_modes(max(1, rounds - 1)),
        "memory": lambda: memory_section(args.quick),
    }
    print(f"torch {torch.__version__}, {THREADS} threads; ratios are medians of per-round ratios over "
          f"interleaved rounds")
    for name in args.only or sections:
        sections[name]()


if __name__ == "__main__":
    main()
