"""The CIFAR-10 paper recipe end to end on torchvision FakeData (no download): a tiny smoke run of the example."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import dynprobe

pytest.importorskip("torchvision")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cifar10_paper.py"


def _example():
    spec = importlib.util.spec_from_file_location("cifar10_paper", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ResNet-20 with eNTK, ghosts and barriers on the CPU: ~1–2 minutes
def test_paper_recipe_runs_on_fake_data_and_writes_a_loadable_run_and_report(tmp_path):
    out = _example().main(["--fake-size", "64", "--max-iterations", "6", "--kernel-n", "8", "--device", "cpu",
                           "--num-workers", "0", "--out", str(tmp_path / "run")])
    run = dynprobe.load_run(out)
    assert run.status == "closed"
    assert run.steps[0] == 0 and run.steps[-1] == 6
    assert np.isfinite(np.diag(run.C)).all() and (np.diag(run.C) == 0).all()
    # of the recipe's spawn steps only 0 is ≤ 6: the ε=0 control and one perturbed ghost
    assert run.has_kernels and [(g.spawn_step, g.control) for g in run.ghosts] == [(0, True), (0, False)]
    assert run.chaos["C"][0, -1] == 0.0
    assert (Path(out) / "report.html").stat().st_size > 10_000


def test_example_refuses_to_run_without_data(tmp_path):
    with pytest.raises(SystemExit, match="--data"):
        _example().main(["--out", str(tmp_path / "run")])
