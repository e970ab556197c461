"""The command line: show, demo, exit codes."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import dynprobe
from dynprobe.cli import main

from .conftest import mlp_setup, train


@pytest.fixture()
def run_dir(tmp_path):
    model, optimizer, scheduler, data = mlp_setup()
    with dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r", schedule=3):
        train(model, optimizer, scheduler, data, 9)
    return tmp_path / "r"


def test_show_prints_the_summary(run_dir, capsys):
    assert main(["show", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "dynprobe run" in out and "Trajectory" in out and "closed" in out


def test_show_on_a_non_run_exits_3(tmp_path, capsys):
    assert main(["show", str(tmp_path)]) == 3
    assert "not a dynprobe run" in capsys.readouterr().err


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--steps", "0"])
    assert exit_info.value.code == 2


def test_help_works_for_every_command():
    for command in ([], ["demo"], ["show"]):
        result = subprocess.run([sys.executable, "-m", "dynprobe.cli", *command, "--help"], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0 and "usage" in result.stdout


def test_demo_runs_end_to_end_on_a_few_steps(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert main(["demo", "--steps", "40", "--ghosts", "2", "--kernel-n", "16", "--out", str(tmp_path / "demo")]) == 0
    torch.set_num_threads(threads)
    run = dynprobe.load_run(tmp_path / "demo")
    assert run.steps[-1] == 40 and run.status == "closed"
    assert [g.spawn_step for g in run.ghosts] == [0, 0, 25] and run.has_kernels
    assert (tmp_path / "demo" / "report.html").stat().st_size > 10_000
    assert "Run directory" in capsys.readouterr().out


def test_demo_never_overwrites_an_existing_run(tmp_path):
    quick = ["demo", "--steps", "5", "--ghosts", "0", "--kernel-n", "0", "--no-report", "--out", str(tmp_path / "demo")]
    assert main(quick) == 0
    assert main(quick) == 0
    assert dynprobe.load_run(tmp_path / "demo-2").steps[-1] == 5
