"""What the probe costs on a real-size model with default settings, and where the time goes.

Run: ``python tests/benchmarks/bench_cost.py [--steps 60] [--threads 2]``

Workload (issue 16's user run): torchvision ResNet-18 (11.2 M parameters, 10 classes) on FakeData 3×32×32
images, batch 32 from a shuffling DataLoader with 2 workers, SGD (momentum 0.9, weight decay 5e-4), 60 steps;
the probe with default settings — default schedule, default ``Barriers()`` (11 α, ghost barriers within the
automatic budget, forced at the last step), eval set = a FakeData loader of 2,000 images (``eval_max``) — and
``Ghosts(at=[0, 20, 40])`` (three perturbed ghosts plus the ε = 0 control; a third and two thirds of ``--steps``),
``total_steps=60``.

Each configuration runs in its own child process (peak RSS from ``VmHWM``): the bare loop, then the probed loop.
The probed child times the ghosts' own training steps (``GhostSet.train_step``), each snapshot and its parts, and
one evaluation of the eval set (median of 3, after training). Reported:

* the floor: Σ over snapshots of (1 + live ghosts) × one evaluation — evaluating the main model and each live
  ghost once per snapshot;
* the probe's time beyond the ghosts' own training = probed − bare − ghost training; target ≤ 2 × the floor;
* the end-to-end ratio probed / bare (58× on the tree issue 16 was filed against), disk and peak RSS.

The machine is shared: note ``uptime`` with the numbers (printed first).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

EVAL_N = 2000
BATCH = 32


def spawns(steps: int) -> list[int]:
    """Three ghosts, at 0, a third and two thirds of the run (0, 20, 40 for 60 steps)."""
    return [0, steps // 3, 2 * steps // 3]


def make_loaders():
    import torchvision
    from torchvision import transforms

    to_tensor = transforms.ToTensor()
    train = torchvision.datasets.FakeData(size=4096, image_size=(3, 32, 32), num_classes=10, transform=to_tensor,
                                          random_offset=0)
    evaluation = torchvision.datasets.FakeData(size=EVAL_N, image_size=(3, 32, 32), num_classes=10,
                                               transform=to_tensor, random_offset=10**6)
    generator = torch.Generator().manual_seed(0)
    train_loader = torch.utils.data.DataLoader(train, batch_size=BATCH, shuffle=True, num_workers=2,
                                               generator=generator, persistent_workers=False)
    eval_loader = torch.utils.data.DataLoader(evaluation, batch_size=256, shuffle=False)
    return train_loader, eval_loader


def make_model():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return model, optimizer


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def child(mode: str, steps: int, out: str) -> dict:
    import dynprobe
    from dynprobe._util.evaluation import EvalSet, evaluate
    from dynprobe.ghosts.ghost_set import GhostSet
    from dynprobe.probe.core import Probe
    from dynprobe.recording.barriers import BarrierScheduler
    from dynprobe.recording.snapshot import SnapshotRecorder

    timings: dict[str, float] = {"ghost_train": 0.0, "ghost_spawn": 0.0, "snapshot": 0.0, "measure": 0.0,
                                 "ghost_compare": 0.0, "commit": 0.0, "barriers": 0.0, "barriers_close": 0.0,
                                 "barrier_evals": 0.0}

    calls: dict[str, list[float]] = {key: [] for key in timings}

    def timed(owner, name, key):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                calls[key].append(time.perf_counter() - started)
                timings[key] += calls[key][-1]
        setattr(owner, name, wrapper)

    for owner, name, key in ((GhostSet, "train_step", "ghost_train"), (GhostSet, "spawn_due", "ghost_spawn"),
                             (Probe, "_snapshot", "snapshot"),
                             (SnapshotRecorder, "measure", "measure"), (GhostSet, "compare", "ghost_compare"),
                             (SnapshotRecorder, "commit", "commit"), (BarrierScheduler, "on_snapshot", "barriers"),
                             (BarrierScheduler, "_barrier", "barrier_evals"),
                             (BarrierScheduler, "close", "barriers_close")):
        timed(owner, name, key)

    train_loader, eval_loader = make_loaders()
    model, optimizer = make_model()
    criterion = nn.CrossEntropyLoss()
    projected = None
    if mode == "probe":  # the announced price, measured before attaching (not part of the timed run)
        projected = dynprobe.estimate_cost(model, optimizer, eval_loader, total_steps=steps, console=False,
                                           ghosts=dynprobe.Ghosts(at=spawns(steps), vectorize=False))
    started = time.perf_counter()
    probe = None
    if mode == "probe":
        probe = dynprobe.Probe(model, optimizer, eval_data=eval_loader, out=out, total_steps=steps,
                               ghosts=dynprobe.Ghosts(at=spawns(steps), vectorize=False))
        criterion = probe.watch(criterion)
    model.train()
    step = 0
    while step < steps:
        for x, y in train_loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    if probe is not None:
        probe.close()
    total = time.perf_counter() - started
    result = {"mode": mode, "seconds": total, "peak_rss": peak_rss_bytes(), **timings}
    if mode == "probe":
        run = dynprobe.load_run(out)
        live = np.isfinite(run.chaos["C"]).sum(axis=0)  # live ghosts compared at each snapshot
        eval_set = EvalSet.from_user(eval_loader, max_examples=2000, seed=0)
        seconds = []
        for _ in range(3):
            begin = time.perf_counter()
            evaluate(model, eval_set, batch_size=256)
            seconds.append(time.perf_counter() - begin)
        budget = [e for e in run.events if e.get("event") == "barrier_budget"]
        result.update(
            snapshots=len(run), live=live.tolist(), eval_seconds=statistics.median(seconds),
            measure_calls=calls["measure"], barrier_eval_calls=len(calls["barrier_evals"]),
            disk=sum(f.stat().st_size for f in run.path.rglob("*") if f.is_file()),
            barrier_budget=budget[-1] if budget else None,
            projected_seconds=projected.seconds_total, projected_disk=projected.bytes_total,
            projected_training_factor=projected.ghost_training_factor,
            ghost_B=int(np.isfinite(run.chaos["B"]).sum()),
        )
    return result


def run_child(mode: str, steps: int, threads: int, out: str) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--steps", str(steps), "--threads", str(threads),
               "--out", out]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["bare", "probe"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.out)))
        return
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(f"torch {torch.__version__}, {args.threads} threads, ResNet-18 on FakeData 3x32x32, {args.steps} steps, "
          f"ghosts at {spawns(args.steps)} (+ the control), default schedule and Barriers()")
    directory = tempfile.mkdtemp(prefix="dynprobe-bench-cost-")
    try:  # bare, probed, bare: this machine's speed drifts, the faster bare run is the reference
        bare_runs = [run_child("bare", args.steps, args.threads, os.path.join(directory, "bare"))]
        probed = run_child("probe", args.steps, args.threads, os.path.join(directory, "run"))
        bare_runs.append(run_child("bare", args.steps, args.threads, os.path.join(directory, "bare2")))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    bare = min(bare_runs, key=lambda r: r["seconds"])
    # The floor, in the run's own conditions (DataLoader workers prefetching, machine load): each snapshot's
    # evaluation of the main model, once more for every live ghost.
    floor = sum(t * (1 + n) for t, n in zip(probed["measure_calls"], probed["live"]))
    quiet_floor = probed["eval_seconds"] * sum(1 + n for n in probed["live"])
    beyond = probed["seconds"] - bare["seconds"] - probed["ghost_train"]
    # The same, from the probed run's own instrumented parts (independent of the bare runs' speed).
    measured = probed["snapshot"] + probed["barriers_close"] + probed["ghost_spawn"]
    other = probed["snapshot"] - probed["measure"] - probed["ghost_compare"] - probed["commit"] - probed["barriers"]
    bare_seconds = ", ".join(f"{r['seconds']:.1f}" for r in bare_runs)
    print(f"\nbare loop:  {bare['seconds']:.1f} s (runs: {bare_seconds} s), peak RSS {bare['peak_rss'] / 1e9:.2f} GB")
    print(f"with probe: {probed['seconds']:.1f} s, peak RSS {probed['peak_rss'] / 1e9:.2f} GB, "
          f"disk {probed['disk'] / 1e6:.0f} MB, {probed['snapshots']} snapshots")
    print(f"end-to-end ratio: {probed['seconds'] / bare['seconds']:.1f}x (issue 16 measured 58x before)")
    print(f"\none evaluation of the eval set ({EVAL_N} images): {statistics.median(probed['measure_calls']):.2f} s "
          f"during the run (median over snapshots), {probed['eval_seconds']:.2f} s after it (no loader workers)")
    print(f"floor (main + each live ghost, once per snapshot): {floor:.1f} s "
          f"({sum(1 + n for n in probed['live'])} evaluations; {quiet_floor:.1f} s at the after-run speed)")
    print(f"probe beyond the ghosts' own training: {beyond:.1f} s = {beyond / floor:.2f} x the floor (target <= 2; "
          f"{beyond / quiet_floor:.2f} x the after-run floor)")
    print(f"  from the probed run's own parts (snapshots, spawns, final barriers): {measured:.1f} s = "
          f"{measured / floor:.2f} x the floor")
    print(f"estimate_cost projected {probed['projected_seconds']:.0f} s of snapshots and barriers, "
          f"{probed['projected_disk'] / 1e6:.0f} MB, training x{probed['projected_training_factor']:.2f}; measured "
          f"{probed['snapshot'] + probed['barriers_close']:.0f} s, {probed['disk'] / 1e6:.0f} MB")
    print("\nwhere the time goes (probed run):")
    rows = [("training steps (bare loop)", bare["seconds"]),
            ("ghosts' own training steps", probed["ghost_train"]),
            ("snapshots: main evaluation (+ eNTK)", probed["measure"]),
            ("snapshots: ghost evaluations and comparisons", probed["ghost_compare"]),
            ("snapshots: writing θ, predictions, metric rows", probed["commit"]),
            ("snapshots: loss barriers", probed["barriers"]),
            (f"  of which evaluating the paths ({probed['barrier_eval_calls']} barriers)", probed["barrier_evals"]),
            ("snapshots: other", other),
            ("final ghost barriers at close()", probed["barriers_close"]),
            ("everything else (hooks, attach, close, noise)", probed["seconds"] - bare["seconds"]
             - probed["ghost_train"] - probed["snapshot"] - probed["barriers_close"])]
    for name, seconds in rows:
        print(f"  {name:<50} {seconds:8.1f} s")
    budget = probed["barrier_budget"] or {}
    print(f"\nbarriers: {budget.get('computed')} computed, {budget.get('skipped')} skipped, "
          f"{budget.get('identical_endpoints')} exact zeros (the control), {probed['ghost_B']} ghost B values")


if __name__ == "__main__":
    main()
