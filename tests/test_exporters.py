"""Scalar exporters: the per-snapshot numbers equal what ``load_run`` gives (computed here independently from the
stored matrices and chaos maps), reach TensorBoard's event files and a W&B-like run, and never stop training."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

import dynprobe
from dynprobe.exporters import Exporter, TensorBoardExporter, WandbExporter, check_exporters, snapshot_scalars


class Recording(Exporter):
    def __init__(self) -> None:
        super().__init__(prefix="p/")
        self.points: list[tuple[int, dict[str, float]]] = []

    def write(self, scalars, step):
        self.points.append((step, scalars))


def _train(tmp_path, on_snapshot, steps: int = 12, kernel: bool = True) -> dynprobe.Run:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    probe = dynprobe.Probe(model, optimizer, eval_data=(x, y), out=tmp_path / "run", schedule=[0, 1, 3, 6, 9, 12],
                           kernel=dynprobe.KernelConfig(n=8, every_snapshots=2, lag_steps=0) if kernel else None,
                           ghosts=dynprobe.Ghosts(at=[0, 3], perturbation=dynprobe.Perturbation(1e-3, "l2"),
                                                  vectorize=False),
                           barriers=dynprobe.Barriers(ghosts=False),
                           on_snapshot=on_snapshot, errors="raise")
    criterion = probe.watch(nn.functional.cross_entropy)
    for step in range(steps):
        batch = torch.randint(0, 64, (16,))
        loss = criterion(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probe.close()
    return dynprobe.load_run(tmp_path / "run")


def _expected(run: dynprobe.Run, k: int) -> dict[str, float]:
    """The dashboard numbers of snapshot k, from the stored run (loops over the matrices, no exporter code)."""
    steps = [int(s) for s in run.steps]
    expected = {"C_init": run.C[k, 0], "eval_loss": run.eval_loss[k], "eval_accuracy": run.eval_accuracy[k]}
    if k > 0:
        expected.update(C_prev=run.C[k, k - 1], D_prev=run.D[k, k - 1])
    else:
        del expected["C_init"]
    kernel_rows = [j for j in range(len(steps)) if not math.isnan(run.S[j, j])]
    if k in kernel_rows and kernel_rows.index(k) > 0:
        so_far = [steps[j] for j in kernel_rows if j <= k]
        gaps = [b - a for a, b in zip(so_far, so_far[1:])]
        lag = min(gaps, key=lambda g: (-gaps.count(g), g))  # most common gap so far, the smallest on a tie
        partner = [j for j in kernel_rows if steps[j] == steps[k] - lag]
        if partner:
            expected["kernel_velocity"] = run.S[k, partner[0]]  # S at the fixed lag, not divided by it
        expected["kernel_distance_init"] = run.S[k, kernel_rows[0]]
    for ghost in run.ghosts:
        for name in ("C", "L2", "D", "S"):
            value = run.chaos[name][ghost.ghost_id, k]
            if not math.isnan(value):
                expected[f"ghost/{ghost.ghost_id:03d}/{name}"] = value
    if not math.isnan(run.train_loss[k]):
        expected["train_loss"] = run.train_loss[k]
    return expected


def test_exported_scalars_equal_the_run_arrays(tmp_path):
    recorder = Recording()
    run = _train(tmp_path, recorder)
    assert [step for step, _ in recorder.points] == [int(s) for s in run.steps]
    kernel_points = 0
    for k, (step, scalars) in enumerate(recorder.points):
        expected = {"p/" + name: value for name, value in _expected(run, k).items()}
        assert scalars.keys() == expected.keys(), (step, sorted(set(scalars) ^ set(expected)))
        for name, value in expected.items():
            assert scalars[name] == pytest.approx(value, rel=1e-12, abs=0), (step, name)
        kernel_points += "p/kernel_velocity" in scalars
    # Kernels at steps 0, 3 and 9 (every=2): the lag is 3 (the gaps 3 and 6 tie), so only step 3 has a partner.
    assert kernel_points == 1
    control = next(g.ghost_id for g in run.ghosts if g.control)
    assert all(scalars[f"p/ghost/{control:03d}/C"] == 0 for _, scalars in recorder.points)


def test_snapshot_scalars_kernel_velocity_skips_snapshots_without_kernel():
    nan = float("nan")
    info = {"step": 30, "steps": [0, 10, 20, 30], "rows": {"S": np.array([0.5, nan, 0.2, 0.0]),
                                                           "C": np.array([0.1, 0.05, 0.01, 0.0])},
            "C_prev": 0.01, "D_prev": None, "eval_loss": float("inf"), "transition": None}
    scalars = snapshot_scalars(info)
    # Kernel steps 0, 20, 30: gaps 20 and 10 tie, the lag is 10: S(20, 30), not divided by the gap.
    assert scalars["kernel_velocity"] == 0.2 and scalars["kernel_distance_init"] == 0.5
    assert snapshot_scalars({**info, "kernel_lag_steps": 30})["kernel_velocity"] == 0.5
    assert "kernel_velocity" not in snapshot_scalars({**info, "kernel_lag_steps": 7})
    assert scalars["C_init"] == 0.1 and "D_prev" not in scalars and "eval_loss" not in scalars
    info["rows"]["S"] = np.array([0.5, nan, 0.2, nan])  # no kernel at this snapshot
    assert "kernel_velocity" not in snapshot_scalars(info)

    class Estimate:
        step = 20

    info["transition"] = Estimate()
    assert snapshot_scalars(info)["transition_step"] == 20


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exporter = TensorBoardExporter(tmp_path / "tb")
    run = _train(tmp_path, exporter, kernel=False)
    exporter.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "dynprobe/C_prev" in tags and any(t.startswith("dynprobe/ghost/") for t in tags)
    c_prev = events.Scalars("dynprobe/C_prev")
    assert [e.step for e in c_prev] == [int(s) for s in run.steps[1:]]
    expected = [run.C[k, k - 1] for k in range(1, len(run.steps))]
    np.testing.assert_allclose([e.value for e in c_prev], expected, rtol=1e-6)  # TensorBoard stores float32


def test_wandb_exporter_logs_against_its_own_step_axis(tmp_path):
    class FakeRun:
        def __init__(self):
            self.logged, self.defined = [], []

        def log(self, data):
            self.logged.append(dict(data))

        def define_metric(self, name, step_metric=None):
            self.defined.append((name, step_metric))

    fake = FakeRun()
    run = _train(tmp_path, WandbExporter(run=fake), kernel=False)
    assert fake.defined == [("dynprobe/step", None), ("dynprobe/*", "dynprobe/step")]
    assert [entry["dynprobe/step"] for entry in fake.logged] == [int(s) for s in run.steps]
    assert fake.logged[-1]["dynprobe/C_prev"] == pytest.approx(run.C[-1, -2], rel=1e-12)


def test_missing_packages_and_bad_names_are_clear_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoardExporter("somewhere")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        WandbExporter()
    with pytest.raises(ImportError, match="pip install wandb"):
        check_exporters(["wandb"])
    with pytest.raises(ValueError, match="exporters="):
        check_exporters(["tensorbored"])
    with pytest.raises(ValueError, match="log_dir"):
        TensorBoardExporter(None)


def test_a_failing_exporter_warns_once_and_training_goes_on(tmp_path):
    class Broken(Exporter):
        calls = 0

        def write(self, scalars, step):
            Broken.calls += 1
            raise OSError("disk full")

    with pytest.warns(RuntimeWarning, match="Broken failed"):
        run = _train(tmp_path, Broken(), kernel=False)
    assert Broken.calls == 1 and run.status == "closed" and len(run.steps) == 6


def test_core_package_imports_no_dashboard_or_framework():
    import subprocess

    code = ("import sys, dynprobe, dynprobe.exporters; "
            "bad = [m for m in ('tensorboard', 'wandb', 'lightning', 'pytorch_lightning', 'transformers') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
