"""The prepared GPU check: one short script a session with a GPU runs (< 8 minutes on one H100), one JSON summary.

Run (from the repository root)::

    python tests/benchmarks/bench_gpu.py                # on a CUDA machine: the full check, JSON on stdout
    python tests/benchmarks/bench_gpu.py --dry-run      # anywhere (CPU): tiny sizes, the same code paths
    python tests/benchmarks/bench_gpu.py --out gpu.json --skip-tests

Measures, on ResNet-20 with CIFAR-shaped synthetic data (3×32×32, 10 classes) at batch 128, SGD with momentum:

- ``syncs``: host synchronisations per plain training step (no snapshot, spawn or status change) — the bare loop,
  the probe recording only, and 3 ghosts + the ε = 0 control, sequential and vectorized — counted with
  :class:`tests.host_syncs.HostSyncCounter` (dispatcher ops that read device values, ``.cpu()``/``.tolist()``)
  and, on CUDA, ``torch.cuda.set_sync_debug_mode("warn")``. Expected: 0 on every plain step but one read per
  ``READ_EVERY`` steps with ghosts.
- ``step_time``: wall time of the whole loop (probe construction, snapshots every ``--snapshot-every`` steps and
  ``close()`` included) of the probed loop over the bare one, median of interleaved repeats, for: recording only,
  4 ghosts + control (sequential), recording with ``KernelConfig(n=128)``.
- ``control``: under ``torch.use_deterministic_algorithms(True)`` (``CUBLAS_WORKSPACE_CONFIG`` set before CUDA
  starts): the ε = 0 control's separation curve is exactly 0 and no ``control_drift`` was recorded, and the main
  run equals a probe-free run bit for bit.
- ``entk``: ``dynprobe.empirical_ntk`` (trace, n = 128) against the PyTorch tutorial's recipe
  (``vmap(jacrev(functional_call))``, Jacobian contraction) in float64 on the same device: relative error and
  both times.
- ``rows``: the C rows per snapshot of an MLP of ~11 M parameters (``tests/benchmarks/bench_rows.py``: 40 snapshots
  every 5 steps at lr 0.01, where most entries need the cancellation-free form) against the floor (eval +
  parameter copy + save + one GEMV read of the history), with the history on the device.
- ``tests``: the device-parametrized tests on CUDA (``pytest -k cuda``), unless ``--skip-tests``.
- ``peak_memory_bytes``: ``torch.cuda.max_memory_allocated`` over the whole check.

The ratios are against a baseline measured in the same run, on the same card (named in ``device``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts: deterministic cuBLAS

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, jacrev, vmap  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import dynprobe  # noqa: E402
from dynprobe.ghosts.readings import READ_EVERY  # noqa: E402
from dynprobe.recipes.models import resnet20  # noqa: E402
from tests.benchmarks.bench_rows import run as rows_per_snapshot  # noqa: E402
from tests.host_syncs import HostSyncCounter  # noqa: E402

ROWS_WIDTHS = [3072, 2560, 1152, 10]  # 11.0 M parameters
CUDA_TESTS = ["tests/probe/test_core_host_syncs.py", "tests/ghosts/test_readings.py", "tests/probe/test_core.py",
              "tests/ghosts/test_ghost_set.py", "tests/kernels/test_engine.py", "tests/metrics/test_functions.py",
              "tests/probe/test_core_resume.py", "tests/metrics/test_barrier.py", "tests/metrics/test_interval.py",
              "tests/_util/test_distances.py"]


class TinyCNN(nn.Module):
    """The dry run's model: CIFAR-shaped inputs, BatchNorm, a few hundred parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                 nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Setup:
    def __init__(self, device: torch.device, *, dry: bool, batch: int) -> None:
        self.device, self.dry, self.batch = device, dry, batch
        generator = torch.Generator().manual_seed(0)
        n_train, n_eval = (256, 64) if dry else (4096, 1000)
        self.x = torch.randn(n_train, 3, 32, 32, generator=generator).to(device)
        self.y = torch.randint(0, 10, (n_train,), generator=generator).to(device)
        self.x_eval = torch.randn(n_eval, 3, 32, 32, generator=generator)
        self.y_eval = torch.randint(0, 10, (n_eval,), generator=generator)

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return (TinyCNN() if self.dry else resnet20()).to(self.device)

    def loop(self, steps: int, probe_kwargs: dict[str, Any] | None, *, count_from: int | None = None
             ) -> dict[str, Any]:
        """Train ``steps`` steps (with a probe when ``probe_kwargs`` is given); wall seconds, the model, the run,
        and the host syncs of each step from ``count_from`` on."""
        model = self.model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        criterion: Any = nn.CrossEntropyLoss()
        generator = torch.Generator(self.device).manual_seed(1)
        out = None
        synchronize(self.device)
        started = time.perf_counter()
        probe = None
        if probe_kwargs is not None:
            out = Path(tempfile.mkdtemp(prefix="bench_gpu_")) / "run"
            probe = dynprobe.Probe(model, optimizer, eval_data=(self.x_eval, self.y_eval), out=out, progress=False,
                                   **probe_kwargs)
            criterion = probe.watch(criterion)
        syncs = []
        for step in range(1, steps + 1):
            counter = HostSyncCounter(cuda=self.device.type == "cuda") if count_from and step >= count_from else None
            if counter is not None:
                counter.__enter__()
            index = torch.randint(0, self.x.shape[0], (self.batch,), device=self.device, generator=generator)
            loss = criterion(model(self.x[index]), self.y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if counter is not None:
                counter.__exit__(None, None, None)
                syncs.append(counter.total)
        if probe is not None:
            probe.close()
        synchronize(self.device)
        seconds = time.perf_counter() - started
        run = dynprobe.load_run(out) if out is not None else None
        return {"seconds": seconds, "model": model, "run": run, "syncs": syncs}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_syncs(setup: Setup, steps: int) -> dict[str, Any]:
    last_snapshot = 4
    configs: dict[str, dict[str, Any] | None] = {
        "bare": None,
        "probe": {"schedule": [0, last_snapshot]},
        "ghosts_sequential": {"schedule": [0, last_snapshot],
                              "ghosts": dynprobe.Ghosts(at=[1, 2, 3], control=True, vectorize=False)},
        "ghosts_vectorized": {"schedule": [0, last_snapshot],
                              "ghosts": dynprobe.Ghosts(at=[1, 2, 3], control=True, vectorize=True)},
    }
    result: dict[str, Any] = {"read_every": READ_EVERY, "plain_steps": steps}
    for name, kwargs in configs.items():
        syncs = setup.loop(last_snapshot + steps, kwargs, count_from=last_snapshot + 1)["syncs"]
        reads = [last_snapshot + 1 + k for k, count in enumerate(syncs) if count]
        result[name] = {"max_per_step": max(syncs), "mean_per_step": statistics.fmean(syncs),
                        "steps_with_syncs": reads, "syncs_on_those_steps": [c for c in syncs if c]}
    return result


def measure_step_time(setup: Setup, steps: int, repeats: int, snapshot_every: int, kernel_n: int
                      ) -> dict[str, Any]:
    schedule = dynprobe.schedule.every(snapshot_every)
    configs: dict[str, dict[str, Any] | None] = {
        "bare": None,
        "recording": {"schedule": schedule},
        "ghosts_4_and_control": {"schedule": schedule,
                                 "ghosts": dynprobe.Ghosts(at=[0, 1, 2, 3], control=True, vectorize=False)},
        "kernel": {"schedule": schedule, "kernel": dynprobe.KernelConfig(n=kernel_n)},
    }
    setup.loop(min(steps, 20), None)  # warm-up: allocator, cuDNN plans
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):  # interleaved: the machine's speed drifts
        for name, kwargs in configs.items():
            times[name].append(setup.loop(steps, kwargs)["seconds"])
    bare = statistics.median(times["bare"])
    return {"steps": steps, "snapshot_every": snapshot_every, "repeats": repeats, "bare_seconds": bare,
            **{name: {"seconds": statistics.median(t), "ratio_to_bare": statistics.median(t) / bare}
               for name, t in times.items() if name != "bare"}}


def check_control(setup: Setup, steps: int) -> dict[str, Any]:
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    try:
        bare = setup.loop(steps, None)["model"]
        probed = setup.loop(steps, {"schedule": dynprobe.schedule.every(max(steps // 3, 1)),
                                    "ghosts": dynprobe.Ghosts(at=[0], control=True, vectorize=False)})
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.benchmark = benchmark
    run = probed["run"]
    control = next(g for g in run.ghosts if g.control)
    _, l2 = run.separation(control.ghost_id)
    main_equal = all(torch.equal(a, b) for a, b in zip(bare.state_dict().values(),
                                                        probed["model"].state_dict().values()))
    return {"steps": steps, "control_separation_all_zero": bool((l2 == 0).all()), "separation_pairs": int(l2.size),
            "control_drift_events": sum(1 for e in run.events if e["event"] == "control_drift"),
            "main_run_bitwise_equal_to_probe_free_run": main_equal}


def tutorial_ntk_trace(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The torch.func tutorial's empirical NTK (Jacobian contraction), summed over the logits (trace mode)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def single(p: dict[str, torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (sample.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(single), (None, 0))(params, x)
    jac = [j.flatten(2) for j in jac.values()]
    return torch.stack([torch.einsum("Naf,Maf->NM", j, j) for j in jac]).sum(0)


def check_entk(setup: Setup, n: int) -> dict[str, Any]:
    model = setup.model().eval()
    x = setup.x[:n]
    synchronize(setup.device)
    started = time.perf_counter()
    kernel = dynprobe.empirical_ntk(model, x, mode="trace")
    synchronize(setup.device)
    engine_seconds = time.perf_counter() - started
    reference_model = setup.model().double().eval()
    reference_model.load_state_dict(model.state_dict())
    started = time.perf_counter()
    with torch.no_grad():
        reference = tutorial_ntk_trace(reference_model, x.double())
    synchronize(setup.device)
    reference_seconds = time.perf_counter() - started
    error = float(torch.linalg.matrix_norm(kernel - reference) / torch.linalg.matrix_norm(reference))
    return {"n": n, "relative_error_vs_float64_tutorial": error, "engine_seconds": engine_seconds,
            "tutorial_float64_seconds": reference_seconds}


def run_cuda_tests(timeout: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", *CUDA_TESTS]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return {"command": " ".join(command[1:]), "timed_out_after_s": timeout}
    return {"command": " ".join(command[1:]), "returncode": done.returncode,
            "summary": (done.stdout.strip().splitlines() or [""])[-1], "failures": [
                line for line in done.stdout.splitlines() if line.startswith("FAILED")][:20]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, on the CPU unless CUDA is present")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed loop (default 300; dry 12)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3; dry 1)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the CUDA tests")
    parser.add_argument("--tests-timeout", type=int, default=240)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dry = args.dry_run
    steps = args.steps or (12 if dry else 300)
    repeats = args.repeats or (1 if dry else 3)
    kernel_n = 8 if dry else 128
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
    setup = Setup(device, dry=dry, batch=16 if dry else 128)
    started = time.perf_counter()
    summary: dict[str, Any] = {
        "device": {"type": device.type, "name": name, "torch": torch.__version__, "cuda": torch.version.cuda},
        "dry_run": dry, "model": "TinyCNN" if dry else "resnet20", "batch": setup.batch,
    }
    summary["syncs"] = measure_syncs(setup, READ_EVERY + 4 if dry else 2 * READ_EVERY + 4)
    summary["step_time"] = measure_step_time(setup, steps, repeats, max(steps // 3, 1), kernel_n)
    summary["control"] = check_control(setup, 10 if dry else 100)
    summary["entk"] = check_entk(setup, kernel_n)
    summary["rows"] = rows_per_snapshot(device, 6 if dry else 40, [64, 32, 10] if dry else ROWS_WIDTHS, verbose=False)
    if device.type == "cuda":
        summary["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    if not args.skip_tests and device.type == "cuda":
        summary["tests"] = run_cuda_tests(args.tests_timeout)
    summary["seconds"] = time.perf_counter() - started
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
