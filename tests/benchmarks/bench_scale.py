"""Scale: the probe's per-snapshot cost, disk reads and memory at 1 M–100 M parameters and up to 300 snapshots.

Run: ``python tests/benchmarks/bench_scale.py [--parts in_memory,spilled,projection,memory,large] [--quick]``

Parts (each prints one table; ``uptime`` is printed with each, this machine is shared):

``in_memory``   MLPs of 1 M and 8.6 M parameters trained on random data (batch 32, a snapshot every 5 steps,
                T = 100 snapshots, eval set of 2,000 examples, whole history in memory). On the training thread a
                snapshot costs the eval pass + the parameter copy + the metric rows (its files go to the
                background writer). Past 256 MiB of history the rows' older entries are deferred and computed 16
                rows at a time, so the cost is the mean over the last 32 snapshots (the completing snapshot's own
                cost is printed too). Compared with the same-run floor = one read of the history at memory speed (a
                float32 GEMV over it) + one eval pass + one parameter copy, and with the landed code's C row at the
                same T (float64 history, ``½‖u_i − u_j‖²`` per pair; per pair × T).
``spilled``     P = 15 M (the size the issue gives the paper's VGG-16) and 33.6 M (this package's VGG-16-BN recipe),
                T = 300, ``history_memory`` = 1 GiB: bytes read back from the run directory by the new history
                (blocks) and by the landed one (every spilled vector at every snapshot), counted by running both
                histories' read schedules at full scale with a counting loader (arithmetic stubbed: the schedule of
                reads does not depend on it). Then, with real files and real rows at P = 1 M and the same 17-vector
                budget, ``run.C`` at close against an in-memory computation, and the bytes read there.
``projection``  VGG-16-BN (``dynprobe.recipes.models.vgg16_bn``, 33.6 M parameters) on 3×32×32 inputs: the measured
                step time at batch 128, eval pass (2,000 examples) and parameter copy; per-pair costs of the new
                rows (dot-product and cancellation-free entries) and of the landed ones; disk read and write speed
                of a parameter file. Per-snapshot cost at T = 50, 150, 300 from those (the default
                ``history_memory``; spilled vectors read once per block) and, for the landed code (512 MiB of float64
                history, every other vector read back at every snapshot, files written on the training thread);
                the overhead of the paper's 64k-step run with the default schedule, projected from them.
``memory``      peak memory of the probe in a child process (VmHWM − the RSS before the first snapshot) at P = 14.7 M,
                ``history_memory`` = 1 GiB, 40 snapshots (spilled), against history_memory + 3 parameter vectors + the
                eval set.
``large``       an 84 M-parameter MLP, history of 10 snapshots in memory: C row cost against the read floor.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import nn

from dynprobe._util.evaluation import EvalSet, evaluate
from dynprobe._util.modules import flatten_parameters, trainable_parameters
from dynprobe.metrics import interval as interval_module
from dynprobe.metrics._blocked import Blocks, cosine_rows, dot_products, squared_norms
from dynprobe.metrics._spans import ColumnPass
from dynprobe.metrics.functions import cosine_dissimilarity_to_many
from dynprobe.metrics.interval import MIN_GROUP, NEAR, CosineMetric, PairwiseMatrix
from dynprobe.recipes.models import vgg16_bn
from dynprobe.recording.background import BackgroundWriter
from dynprobe.recording.snapshot import SnapshotRecorder, default_history_memory
from dynprobe.schedule import default_schedule
from dynprobe.store.files import atomic_save_npy, load_npy
from dynprobe.store.history import VectorHistory
from dynprobe.store.manifest import build_manifest
from dynprobe.store.run import load_run
from dynprobe.store.writer import RunWriter

GiB = 2**30


def uptime() -> str:
    return os.getloadavg().__repr__()


def best(function: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


# ------------------------------------------------------------------------------------------ the landed code

def landed_cosine_to_many(x: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """The landed ``cosine_dissimilarity_to_many`` (float64 unit vectors, ½‖u_i − u_j‖² per pair, 32 MB blocks)."""
    x64 = x.detach().to(torch.float64).reshape(-1)
    x_unit = x64 / x64.norm()
    rows = ys.reshape(ys.shape[0], -1)
    out = torch.empty(rows.shape[0], dtype=torch.float64)
    block = max(1, 2**22 // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], block):
        chunk = rows[start: start + block].to(torch.float64)
        unit = chunk / chunk.norm(dim=1, keepdim=True)
        out[start: start + block] = 0.5 * (unit - x_unit).square().sum(dim=-1)
    return out


class LandedHistory:
    """The landed ``VectorHistory``'s read schedule: the first vectors that fit (float64) stay in memory, every
    later one is read back from disk at every snapshot."""

    def __init__(self, dim: int, memory_budget: int, load: Callable[[int], object]) -> None:
        self.capacity = memory_budget // (dim * 8)
        self.count, self.resident, self.on_disk, self.load = 0, 0, [], load

    def snapshot(self) -> None:
        for index in self.on_disk:  # chunks(): every on-disk vector, at every snapshot
            self.load(index)
        if not self.on_disk and self.resident < self.capacity:
            self.resident += 1
        else:
            self.on_disk.append(self.count)
        self.count += 1


# ------------------------------------------------------------------------------------------ helpers

def mlp(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def recorder_for(model: nn.Module, eval_data, out: Path, history_memory: int | None, *, background: bool = True):
    eval_set = EvalSet.from_user(eval_data, max_examples=2000, seed=0)
    named = trainable_parameters(model)
    manifest = build_manifest(model=model, named_params=named, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                              eval_set=eval_set, num_classes=10, storage_dtype=torch.float32,
                              device=torch.device("cpu"), config={}, conventions={})
    sink = RunWriter(out, manifest, resume=False)
    writer = BackgroundWriter(sink) if background else sink
    recorder = SnapshotRecorder(writer, model, [p for _, p in named], eval_set, device=torch.device("cpu"),
                                storage_dtype=torch.float32, output_fn=lambda o: o, eval_batch_size=256,
                                history_memory=history_memory)
    return recorder, writer, eval_set


def random_classification(dim: int, n_train: int, n_test: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, dim, generator=generator)
    teacher = torch.randn(dim, 10, generator=generator)
    y = (x @ teacher).argmax(1)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


# ------------------------------------------------------------------------------------------ in memory

def part_in_memory(quick: bool) -> None:
    print(f"\n## in_memory (load {uptime()})")
    print("| P | T | eval s | copy s | rows s | floor: read s | per-snapshot s | / floor | landed row s | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    snapshots = 30 if quick else 100
    for widths in ([3072, 320, 10], [3072, 2048, 1152, 10]):
        torch.manual_seed(0)
        model = mlp(widths)
        p = sum(q.numel() for q in model.parameters())
        x_train, y_train, x_test, y_test = random_classification(3072, 4096, 2000)
        out = Path(tempfile.mkdtemp(prefix="bench_scale_"))
        try:
            recorder, writer, eval_set = recorder_for(model, (x_test, y_test), out / "run",
                                                      history_memory=(snapshots + 4) * p * 4)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
            generator = torch.Generator().manual_seed(1)
            costs = []
            for k in range(snapshots):
                started = time.perf_counter()
                data = recorder.measure(5 * k)
                measured = time.perf_counter()
                recorder.commit(data, {})
                costs.append((time.perf_counter() - started, measured - started, time.perf_counter() - measured))
                for _ in range(5):
                    index = torch.randint(0, 4096, (32,), generator=generator)
                    optimizer.zero_grad()
                    nn.functional.cross_entropy(model(x_train[index]), y_train[index]).backward()
                    optimizer.step()
            writer.flush()
            history = recorder.matrices["C"].history
            stack = history.resident()[1]
            x = recorder.flat_params()
            read = best(lambda: torch.mv(stack, x))
            eval_s = best(lambda: evaluate(model, eval_set, output_fn=lambda o: o, batch_size=256,
                                           device=torch.device("cpu")), 2)
            copy_s = best(lambda: flatten_parameters(recorder.params, torch.float32))
            # the mean over the last 2 groups of deferred rows (each completion lands on one snapshot: amortized)
            last = costs[-2 * MIN_GROUP :]
            per_snapshot = float(np.mean([c[0] for c in last]))
            rows_s = float(np.mean([c[2] for c in last]))
            spike = float(np.max([c[0] for c in last]))
            floor = read + eval_s + copy_s
            # the landed C row at the same T: float64 history, per pair × T
            k = 8
            landed_stack = torch.stack([stack[i].to(torch.float64) for i in range(k)])
            landed_pair = best(lambda: landed_cosine_to_many(x, landed_stack), 2) / k
            landed_row = landed_pair * snapshots
            landed_snapshot = landed_row + eval_s + copy_s
            c = recorder.matrices["C"].compute()
            lower = c[np.tril_indices(snapshots, -1)]
            exact = float(np.mean(lower < 6.2e-5))
            print(f"| {p / 1e6:.2f} M | {snapshots} | {eval_s:.3f} | {copy_s:.4f} | {rows_s:.3f} | {read:.3f} | "
                  f"{per_snapshot:.3f} | {per_snapshot / floor:.2f} | {landed_row:.2f} | "
                  f"{landed_snapshot / per_snapshot:.1f}× | (entries in the exact form: {exact:.0%}; the snapshot "
                  f"completing a group: {spike:.3f} s)")
            writer.close()
            recorder = writer = stack = landed_stack = None
            gc.collect()
        finally:
            shutil.rmtree(out, ignore_errors=True)


# ------------------------------------------------------------------------------------------ spilled

def _no_arithmetic():
    """Patches that keep the read schedule of C's history and drop the arithmetic (the bytes read do not depend
    on the values): in-memory rows, norms and the column-span sums return zeros of the right shapes."""
    def rows(v, v_norms, stack, stack_norms, blocks):
        return np.zeros((blocks.channels, stack.shape[0])), np.ones(blocks.channels)

    return [mock.patch.object(interval_module, "cosine_rows", rows),
            mock.patch.object(interval_module, "squared_norms", lambda v, blocks: np.ones(blocks.channels)),
            mock.patch.object(ColumnPass, "norm_sums", lambda self, span, v: np.ones(
                (1, self.spans[span][3] - self.spans[span][2]))),
            mock.patch.object(ColumnPass, "products", lambda self, span, targets, group: np.zeros(
                (targets.shape[0], group.shape[0], self.spans[span][3] - self.spans[span][2])))]


def count_reads(p: int, snapshots: int, budget: int) -> tuple[int, int]:
    """Bytes read back by the new history and by the landed one over a run of ``snapshots``."""
    shared = np.zeros(p, dtype=np.float32)
    landed_bytes = [0]

    def landed_load(index):
        landed_bytes[0] += p * 4  # the landed loader read the whole float32 params.npy
        return None

    landed = LandedHistory(p, budget, landed_load)
    folder = Path(tempfile.mkdtemp(prefix="bench_scale_rows_"))
    patches = _no_arithmetic()
    try:
        for patch in patches:
            patch.start()
        history = VectorHistory("cpu", dtype=torch.float32, memory_budget=budget, load=lambda i: shared,
                                load_columns=lambda i, start, stop: shared[start:stop])
        matrix = PairwiseMatrix("C", CosineMetric(p), history)  # the rows are not stored: only reads are counted
        vector = torch.zeros(p)
        for _ in range(snapshots):
            matrix.update(vector)
            landed.snapshot()
        matrix.complete()
        return history.bytes_loaded, landed_bytes[0]
    finally:
        for patch in patches:
            patch.stop()
        shutil.rmtree(folder, ignore_errors=True)


def part_spilled(quick: bool) -> None:
    print(f"\n## spilled (load {uptime()})")
    print("| P | T | history_memory | new: GB read | landed: GB read | ratio |")
    print("|---|---|---|---|---|---|")
    for p in (15_000_000, 33_646_666):
        new, landed = count_reads(p, 300, GiB)
        print(f"| {p / 1e6:.1f} M | 300 | 1 GiB | {new / 1e9:.0f} | {landed / 1e9:.0f} | 1/{landed / new:.1f} |")
    # real files, real rows, P = 1 M, the same 17-vector budget
    snapshots = 60 if quick else 300
    torch.manual_seed(0)
    model = mlp([3072, 320, 10])
    p = sum(q.numel() for q in model.parameters())
    x_train, y_train, x_test, y_test = random_classification(3072, 4096, 2000)
    out = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        recorder, writer, _ = recorder_for(model, (x_test[:256], y_test[:256]), out / "run",
                                           history_memory=17 * p * 4)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        generator = torch.Generator().manual_seed(1)
        started = time.perf_counter()
        for k in range(snapshots):
            recorder.commit(recorder.measure(5 * k), {})
            for _ in range(5):
                index = torch.randint(0, 4096, (32,), generator=generator)
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x_train[index]), y_train[index]).backward()
                optimizer.step()
        recorder.materialize()
        writer.close()
        elapsed = time.perf_counter() - started
        run = load_run(out / "run")
        flats = torch.stack([torch.from_numpy(np.array(run.params(snapshot_index=i))) for i in range(len(run))])
        reference = np.stack([cosine_dissimilarity_to_many(f, flats).numpy() for f in flats])
        with np.errstate(invalid="ignore", divide="ignore"):
            relative = np.abs(run.C - reference) / np.abs(reference)
        worst = float(np.nanmax(np.where(reference >= 1e-9, relative, 0)))
        zeros_ok = bool(np.all(run.C[reference == 0] == 0))
        _, landed = count_reads(p, snapshots, 17 * p * 4 * 2)  # the landed history held 17 float32-sized vectors
        print(f"\nreal files, P = {p / 1e6:.2f} M, T = {snapshots}, 17 vectors in memory: run.C complete at close: "
              f"{bool(np.isfinite(run.C).all())}; max relative difference to the in-memory computation "
              f"(C ≥ 1e-9): {worst:.1e}; exact zeros kept: {zeros_ok}; read back {recorder.bytes_loaded / 1e9:.2f} GB "
              f"(landed schedule at the same budget: {landed / 1e9:.2f} GB); {elapsed:.0f} s")
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ------------------------------------------------------------------------------------------ projection

def part_projection(quick: bool) -> None:
    print(f"\n## projection: VGG-16-BN, 64k steps at batch 128, default schedule (load {uptime()})")
    torch.manual_seed(0)
    model = vgg16_bn()
    p = sum(q.numel() for q in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))

    def step():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()
    step_s = best(step, 2 if quick else 3)
    n_eval = 512 if quick else 2000
    eval_set = EvalSet.from_user((torch.randn(n_eval, 3, 32, 32), torch.randint(0, 10, (n_eval,))),
                                 max_examples=n_eval, seed=0)
    eval_s = best(lambda: evaluate(model, eval_set, output_fn=lambda o: o, batch_size=256,
                                   device=torch.device("cpu")), 1) * 2000 / n_eval
    params = [q for q in model.parameters()]
    copy_s = best(lambda: flatten_parameters(params, torch.float32))
    flat = flatten_parameters(params, torch.float32)
    # per-pair costs on a stack of 12 snapshots of a random walk
    k = 12
    stack = torch.stack([flat + 1e-3 * torch.randn(p) for _ in range(k)])
    blocks = Blocks(p)
    read_pair = best(lambda: torch.mv(stack, flat)) / k
    dot_pair = best(lambda: dot_products(flat, stack, blocks)) / k
    stack_norms = np.stack([squared_norms(row, blocks) for row in stack])
    exact_pair = best(lambda: cosine_rows(flat, squared_norms(flat, blocks), stack, stack_norms, blocks), 2) / k
    # a group product against 40 earlier snapshots (the history of a late snapshot holds hundreds)
    group = torch.stack([flat + 1e-3 * torch.randn(p) for _ in range(MIN_GROUP)])
    targets = torch.cat([stack] + [stack + 1e-3 * torch.randn(p) for _ in range(2)] + [stack[:4]])
    plan = ColumnPass(blocks, MIN_GROUP, device=torch.device("cpu"), max_columns=p)
    group_pair = best(lambda: [plan.products(s, targets[:, a:b], group[:, a:b])
                               for s, (a, b, _, _) in enumerate(plan.spans)], 2) / (len(targets) * MIN_GROUP)
    group = targets = None
    landed_stack = stack[:3].to(torch.float64)
    landed_pair = best(lambda: landed_cosine_to_many(flat, landed_stack), 2) / 3
    landed_stack = None
    folder = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        files = []
        write_s = []
        for i in range(4):
            path = folder / f"params_{i}.npy"
            started = time.perf_counter()
            atomic_save_npy(path, stack[i].numpy())
            write_s.append(time.perf_counter() - started)
            files.append(path)
        read_file_s = best(lambda: [np.array(load_npy(f)) for f in files], 2) / len(files)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    write_file_s = float(np.median(write_s))
    stack = None
    gc.collect()
    exact_fraction = 0.1  # entries below the switch threshold (6e-5); the 8.6 M MLP run measures it (in_memory)
    pair_new = (1 - exact_fraction) * dot_pair + exact_fraction * (dot_pair + exact_pair)
    budget = default_history_memory("cpu")
    capacity = budget // (p * 4)
    block = max(capacity - 1, MIN_GROUP)  # rows completed together (the ring is capacity - 1)
    landed_resident = (512 * 2**20) // (p * 8)

    def cost_new(t: int) -> float:
        far = max(0, t - capacity) if t > capacity else 0
        beyond_ring = max(0, block - (capacity - 1)) if far else 0  # the group's rows read back with the far ones
        near = min(t, NEAR + 1)  # computed at once; the others in the group products (a vector is > 256 MiB / 2)
        pairs = near * pair_new + (t - near) * (group_pair + exact_fraction * exact_pair)
        return eval_s + copy_s + pairs + (far + beyond_ring) * read_file_s / block

    def cost_landed(t: int) -> float:
        on_disk = max(0, t - landed_resident)
        return eval_s + copy_s + t * landed_pair + on_disk * read_file_s * 1.5 + write_file_s

    def floor(t: int) -> float:
        return eval_s + copy_s + t * read_pair

    print(f"P = {p / 1e6:.1f} M; step (batch 128) {step_s:.2f} s; eval pass (2,000 examples) {eval_s:.2f} s; "
          f"parameter copy {copy_s:.3f} s")
    print(f"per pair: read {read_pair * 1e3:.1f} ms, dot-product entry {dot_pair * 1e3:.1f} ms (in a group product "
          f"of {MIN_GROUP} rows: {group_pair * 1e3:.1f} ms), cancellation-free "
          f"entry {exact_pair * 1e3:.1f} ms (assumed for {exact_fraction:.0%} of entries), landed entry "
          f"{landed_pair * 1e3:.1f} ms; a params file: read {read_file_s:.2f} s, write {write_file_s:.2f} s; "
          f"default history_memory {budget / GiB:.1f} GiB = {capacity} vectors (rows completed in groups of {block})")
    print("| T | floor s | new s | landed s | landed / new |")
    print("|---|---|---|---|---|")
    for t in (50, 150, 300):
        new, landed = cost_new(t), cost_landed(t)
        print(f"| {t} | {floor(t):.1f} | {new:.1f} | {landed:.1f} | {landed / new:.1f} |")
    steps = default_schedule().steps(64000)
    training = 64000 * step_s
    new_total = sum(cost_new(t) for t in range(len(steps)))
    landed_total = sum(cost_landed(t) for t in range(len(steps)))
    print(f"{len(steps)} snapshots; training {training / 3600:.1f} h; probe today (landed) {landed_total / 3600:.1f} h "
          f"(+{landed_total / training:.0%}); after {new_total / 3600:.1f} h (+{new_total / training:.0%})")


# ------------------------------------------------------------------------------------------ memory

MEMORY_CHILD = r"""
import sys, time, numpy as np, torch
sys.path.insert(0, sys.argv[2])
from tests.benchmarks.bench_scale import mlp, recorder_for, random_classification, GiB
from pathlib import Path

def rss(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1]) * 1024

torch.manual_seed(0)
model = mlp([3072, 4096, 512, 10])
p = sum(q.numel() for q in model.parameters())
_, _, x_test, y_test = random_classification(3072, 16, 2000)
recorder, writer, eval_set = recorder_for(model, (x_test, y_test), Path(sys.argv[1]), history_memory=GiB)
params = list(model.parameters())
baseline = rss("VmRSS:")
for k in range(int(sys.argv[3])):
    recorder.commit(recorder.measure(k), {})
    with torch.no_grad():
        for q in params:
            q.add_(torch.randn_like(q), alpha=1e-3 * 0.97**k)
recorder.materialize()
writer.close()
print(p, baseline, rss("VmHWM:"), recorder.bytes_loaded, eval_set.inputs.numel() * 4)
"""


def part_memory(quick: bool) -> None:
    print(f"\n## memory (load {uptime()})")
    out = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        root = Path(__file__).resolve().parents[2]
        snapshots = 20 if quick else 40
        result = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(out / "run"), str(root), str(snapshots)],
                                capture_output=True, text=True, check=True)
        p, baseline, peak, loaded, eval_bytes = map(int, result.stdout.split())
        allowed = GiB + 3 * p * 4 + eval_bytes
        print(f"P = {p / 1e6:.1f} M, {snapshots} snapshots, history_memory = 1 GiB: probe peak "
              f"{(peak - baseline) / 2**20:.0f} MiB (VmHWM − RSS before the first snapshot); allowed: "
              f"history_memory + 3 vectors + eval set = {allowed / 2**20:.0f} MiB; read back {loaded / 1e9:.1f} GB")
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ------------------------------------------------------------------------------------------ large

def part_large(quick: bool) -> None:
    print(f"\n## large (load {uptime()})")
    available = default_history_memory("cpu") * 4
    p = 3072 * 16384 + 16384 + 16384 * 2048 + 2048 + 2048 * 10 + 10
    t = 6 if quick else 10
    if (t + 3) * p * 4 > 0.8 * available:
        print(f"skipped: {t} snapshots of {p / 1e6:.0f} M float32 parameters ({(t + 3) * p * 4 / GiB:.1f} GiB) do "
              f"not fit the {available / GiB:.1f} GiB available")
        return
    torch.manual_seed(0)
    x = torch.randn(p)
    history = VectorHistory("cpu", dtype=torch.float32, memory_budget=(t + 1) * p * 4, load=lambda i: None)
    metric = CosineMetric(p, [slice(0, 3072 * 16384 + 16384), slice(3072 * 16384 + 16384, p)])
    matrix = PairwiseMatrix("C", metric, history)
    for _ in range(t):
        x.add_(torch.randn(p), alpha=0.01)
        history.append(x, metric.summary(x))
    stack = history.resident()[1]
    read = best(lambda: torch.mv(stack, x))
    new = x + 0.01 * torch.randn(p)
    started = time.perf_counter()
    matrix.update(new)
    row = time.perf_counter() - started
    print(f"P = {p / 1e6:.0f} M, T = {t}: C row (whole + 2 layers) {row:.2f} s; one read of the history "
          f"{read:.2f} s; ratio {row / read:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="in_memory,spilled,projection,memory,large")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    args = parser.parse_args()
    parts = {"in_memory": part_in_memory, "spilled": part_spilled, "projection": part_projection,
             "memory": part_memory, "large": part_large}
    for name in args.parts.split(","):
        parts[name](args.quick)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"(peak RSS of this process so far: {peak:.1f} GiB)")


if __name__ == "__main__":
    main()
