"""Kernel defaults that work (issue 24, items 3 and 4): the velocity lag chosen from the schedule and run length,
``logit_sum`` for outputs with many coordinates, and ``estimate_cost`` timing the cheaper mode beside the chosen
one with a progress line while it measures."""
from __future__ import annotations

import functools
import io

import pytest
import torch
from rich.console import Console
from torch import nn

import dynprobe
from dynprobe import schedule
from dynprobe.config import KernelConfig
from dynprobe.config.kernel import default_lag_steps
from dynprobe.recording import cost
from dynprobe.recording.cadence import planned_snapshots
from dynprobe.recording.progress import SnapshotProgress

from ..conftest import mlp_setup
from ..report.test_summary_texts import shown


@pytest.mark.parametrize(("plan", "total", "lag"), [
    (schedule.default_schedule(), 20_000, 250),  # the linear tail's spacing: its companions cost nothing
    (schedule.default_schedule(), 2_000, 250),
    (schedule.default_schedule(), 800, 100),  # at most an eighth of the run
    (schedule.default_schedule(), None, 250),  # length unknown: the spacing over the first 10,000 steps
    (schedule.log_spaced(200, per_decade=4) | schedule.every(200), 2_000, 200),
    (schedule.at([0, 1, 2, 3, 4, 5]), 5, 2),  # never 1, however dense the schedule
])
def test_default_lag_is_the_coarsest_schedule_spacing_capped_at_an_eighth_of_the_run(plan, total, lag):
    assert default_lag_steps(plan, total) == lag


def test_default_lag_is_never_one_step():
    assert min(default_lag_steps(schedule.default_schedule(), total) for total in range(1, 3000, 7)) >= 2


def test_default_lag_gives_a_velocity_pair_at_every_primary_kernel_snapshot():
    plan = schedule.default_schedule()
    config = KernelConfig().with_default_lag(plan, 2000)
    snapshots = planned_snapshots(plan, 2000, config)
    primary = [p.step for p in snapshots if p.kernel_role == "primary"]
    kernel_steps = {p.step for p in snapshots if p.kernel_role is not None}
    paired = [t for t in primary if t + config.lag_steps in kernel_steps]
    assert config.lag_steps == 250 and paired == [t for t in primary if t + 250 <= 2000]
    assert max(paired) >= 1500  # the velocity reaches the end of the run, not just its first steps


@pytest.mark.parametrize(("task", "mode"), [("classification", "trace"), ("tokens", "logit_sum"),
                                            ("regression", "logit_sum")])
def test_mode_defaults_to_the_tasks_mode_and_says_it_chose_it(task, mode):
    config = KernelConfig(n=8).for_task(task)
    assert config.mode == mode and config.to_config()["chosen"] == ["mode"]
    given = KernelConfig(n=8, mode="trace").for_task(task)
    assert given.mode == "trace" and given.chosen == ()


def test_lag_zero_opts_out_of_companions_and_negative_lags_are_refused():
    assert KernelConfig(lag_steps=0).with_default_lag(schedule.default_schedule(), 2000).lag_steps == 0
    with pytest.raises(ValueError, match=r"lag_steps=\) must be an int >= 0"):
        KernelConfig(lag_steps=-1)
    with pytest.raises(ValueError, match="only used with mode='single'; got mode=None"):
        KernelConfig(class_index=2)


def test_a_regression_probe_records_logit_sum_and_the_chosen_lag_and_show_says_so(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 6))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 4), torch.randn(64, 6)
    probe = dynprobe.Probe(model, optimizer, eval_data=(x[:32], y[:32]), out=tmp_path / "r", total_steps=24,
                           schedule=schedule.every(4), kernel=KernelConfig(n=8), progress=False)
    criterion = probe.watch(nn.MSELoss())
    for step in range(24):
        index = torch.arange(step % 4 * 8, step % 4 * 8 + 8) + 32
        loss = criterion(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probe.close()
    run = dynprobe.load_run(tmp_path / "r")
    kernel = run.config["kernel"]
    assert kernel["mode"] == "logit_sum" and kernel["lag_steps"] == 3 and kernel["chosen"] == ["mode", "lag_steps"]
    assert run.kernel_lag_steps == 3 and run.kernel_velocity()[0].size >= 6
    text = " ".join(shown(run).split())
    assert "mode logit_sum (the default for regression outputs)" in text
    assert "S(t, t+3) on companion snapshots 3 steps later (Δ chosen from the schedule and run length" in text


def test_estimate_cost_prints_the_logit_sum_cost_beside_trace_and_a_progress_line(monkeypatch):
    monkeypatch.setattr(cost, "SnapshotProgress", functools.partial(SnapshotProgress, delay=0.0))
    model, optimizer, _, data = mlp_setup()
    out = io.StringIO()
    estimate = dynprobe.estimate_cost(model, optimizer, (data.x_test, data.y_test), total_steps=100,
                                  schedule=schedule.at([0, 50, 100]), kernel=KernelConfig(n=8),
                                  console=Console(file=out, width=140))
    assert estimate.kernel_mode == "trace" and estimate.cheaper_mode == "logit_sum"
    # the default lag, 100 // 8 = 12, adds companions at 12 and 62 to the three scheduled kernels
    assert estimate.seconds_per_cheaper_kernel is not None and estimate.kernels == 5
    printed = out.getvalue()
    assert "one eNTK (mode 'trace'; 5 in the schedule)" in printed
    assert "with KernelConfig(mode='logit_sum') instead" in printed
    assert "dynprobe: estimate_cost, timing one snapshot took" in printed  # phases under 0.05 s are not listed


def test_estimate_cost_of_a_token_model_needs_no_cheaper_row():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 11))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, 11, (16, 5))
    estimate = dynprobe.estimate_cost(model, optimizer, (tokens, tokens), total_steps=10, kernel=KernelConfig(n=4),
                                  console=False)
    assert estimate.kernel_mode == "logit_sum" and estimate.seconds_per_cheaper_kernel is None
    assert "instead" not in str(estimate)
