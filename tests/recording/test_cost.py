"""What the probe costs, announced: ``estimate_cost`` before attaching, the progress line during slow snapshots."""
from __future__ import annotations

import io
import time

import pytest
import torch
from rich.console import Console

import dynprobe
from dynprobe import estimate_cost, schedule
from dynprobe.config import Barriers
from dynprobe.recording import progress as progress_module
from dynprobe.recording.progress import SnapshotProgress

from ..conftest import mlp_setup, train


def test_estimate_projects_the_schedule_ghosts_and_disk_of_a_real_run(tmp_path):
    model, optimizer, scheduler, data = mlp_setup(seed=0)
    ghosts = dynprobe.Ghosts(at=[0, 5], vectorize=False)
    plan = dict(schedule=schedule.at([0, 5, 10]), ghosts=ghosts, barriers=Barriers(alphas=3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    out = io.StringIO()
    estimate = estimate_cost(model, optimizer, (data.x_test, data.y_test), total_steps=10,
                             console=Console(file=out, width=120), **plan)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "projected cost" in out.getvalue() and "projected cost" in str(estimate)
    assert estimate.steps == [0, 5, 10] and estimate.live_ghosts == [2, 3, 3]  # the control + one ghost, then two
    assert estimate.ghost_training_factor == pytest.approx(1 + (10 + 10 + 5) / 10)
    numel = sum(p.numel() for p in model.parameters())
    n = data.y_test.shape[0]
    assert estimate.bytes_per_snapshot[0] == numel * 4 + n * 2 + 2 * n * 4  # θ, int16 labels, the ghosts' labels
    assert estimate.barriers["ghost"] >= 2  # the final ones at least (the control's costs nothing)
    # The projection is close to what a real run with the same configuration writes.
    with dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r", total_steps=10,
                        **{k: v for k, v in plan.items() if k != "barriers"}) as probe:
        train(model, optimizer, scheduler, data, 10, criterion=probe.watch(torch.nn.CrossEntropyLoss()))
    written = sum(f.stat().st_size for f in (tmp_path / "r" / "snapshots").rglob("*") if f.is_file())
    assert 0.7 < written / estimate.bytes_total < 1.5, (written, estimate.bytes_total)


def test_estimate_counts_every_direction_of_a_spawn_as_a_ghost():
    model, optimizer, _, data = mlp_setup(seed=0)
    estimate = estimate_cost(model, optimizer, (data.x_test, data.y_test), total_steps=10,
                             schedule=schedule.at([0, 5, 10]), ghosts=dynprobe.Ghosts(at=[0, 5], directions=3),
                             console=None)
    assert estimate.live_ghosts == [4, 7, 7]  # the control + three directions, then three more
    assert estimate.ghost_training_factor == pytest.approx(1 + (10 + 3 * 10 + 3 * 5) / 10)


def test_estimate_validates_and_can_stay_silent():
    model, optimizer, _, data = mlp_setup(seed=0)
    with pytest.raises(ValueError, match="total_steps must be an int >= 1"):
        estimate_cost(model, optimizer, (data.x_test, data.y_test), total_steps=0, console=False)
    estimate = estimate_cost(model, optimizer, (data.x_test, data.y_test), total_steps=3, console=False,
                             kernel=dynprobe.KernelConfig(n=8))
    assert estimate.seconds_per_kernel is not None and estimate.snapshots >= 2
    assert estimate.seconds_total >= sum(estimate.seconds_per_snapshot)


class ManualClock:
    """The progress module's clock in these tests: it moves only when the test says how long a phase took, so the
    durations and the printed line are exact (the wall-clock version is ``tests/benchmarks/bench_progress.py``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_progress_line_only_for_slow_snapshots_and_a_summary_line_in_logs(monkeypatch):
    clock = ManualClock()
    monkeypatch.setattr(progress_module, "time", clock)
    log = io.StringIO()
    progress = SnapshotProgress(delay=1.0, console=Console(file=log, force_terminal=False, width=200))
    with progress.snapshot(7):
        progress.phase("evaluating")
        clock.advance(0.5)
    assert log.getvalue() == ""  # faster than the delay: nothing
    assert progress.last_durations == {"measuring": 0.0, "evaluating": 0.5}
    with progress.snapshot(8):
        clock.advance(0.25)
        progress.phase("evaluating")
        clock.advance(0.5)
        progress.phase("barriers", "main ↔ ghost 1 (11 α)")
        clock.advance(1.5)
        progress.phase("evaluating")  # a phase entered twice adds up
        clock.advance(0.0625)
    assert progress.last_durations == {"measuring": 0.25, "evaluating": 0.5625, "barriers": 1.5}
    assert log.getvalue() == ("dynprobe: snapshot at step 8 took 2.3 s (measuring 0.2 s, evaluating 0.6 s, "
                              "barriers 1.5 s)\n")
    printed = log.getvalue()
    with progress.snapshot(9):
        progress.phase("kernel")
        clock.advance(1.0)  # exactly the delay: not slower than it
    assert log.getvalue() == printed
    with progress.snapshot(10):
        progress.phase("kernel")
        clock.advance(1.0)
        progress.phase("ghosts")
        clock.advance(0.03125)  # below 0.05 s: not listed
    assert log.getvalue() == printed + "dynprobe: snapshot at step 10 took 1.0 s (kernel 1.0 s)\n"


def _wait_for(condition, what: str, limit_s: float = 30.0) -> None:
    """Wait until ``condition()`` (a guard against hanging, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {limit_s} s"
        time.sleep(0.01)


def test_progress_line_on_a_terminal_shows_the_phase_and_disappears():
    screen = io.StringIO()
    progress = SnapshotProgress(delay=0.0, console=Console(file=screen, force_terminal=True, width=200))
    with progress.snapshot(3):
        progress.phase("barriers", "step 3 ↔ step 2 (11 α)")
        _wait_for(lambda: "dynprobe · step 3 · barriers: step 3 ↔ step 2 (11 α)" in screen.getvalue(),
                  "the progress line")
    silent = SnapshotProgress(enabled=False, delay=0.0, console=Console(file=io.StringIO(), force_terminal=True))
    with silent.snapshot(1):
        pass
    assert silent.console.file.getvalue() == ""
    assert set(silent.last_durations) == {"measuring"} and silent.last_durations["measuring"] >= 0


def test_the_estimate_follows_the_probes_kernel_cadence_companions_included(tmp_path):
    model, optimizer, scheduler, data = mlp_setup(seed=0)
    config = dict(schedule=schedule.at([0, 4, 8]), kernel=dynprobe.KernelConfig(n=8, every_snapshots=2, lag_steps=1))
    estimate = estimate_cost(model, optimizer, (data.x_test, data.y_test), total_steps=10, console=False, **config)
    with dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r", **config) as probe:
        train(model, optimizer, scheduler, data, 10, criterion=probe.watch(torch.nn.CrossEntropyLoss()))
    run = dynprobe.load_run(tmp_path / "r")
    assert estimate.steps == run.steps.tolist() == [0, 1, 4, 8, 9, 10]  # companions of the primaries 0 and 8
    with_kernel = [b for b, step in zip(estimate.bytes_per_snapshot, estimate.steps) if step in run.kernel_steps]
    without = [b for b, step in zip(estimate.bytes_per_snapshot, estimate.steps) if step not in run.kernel_steps]
    assert min(with_kernel) > max(without)
