"""Online loss barriers (the budgeted scheduler of ghost and trajectory barriers) and offline completion, against
a brute-force α loop."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import dynprobe
from dynprobe import schedule
from dynprobe._util.evaluation import EvalSet
from dynprobe.config import Barriers
from dynprobe.recording.barriers import BarrierBudget, BarrierScheduler

from ..conftest import cnn_setup, train


def brute_force_barrier(model, state_a, state_b, x, y, alphas=30, *, linear=False):
    """Per α: a fresh copy of the model loaded with the interpolated state, evaluated in eval mode."""
    losses = []
    for alpha in np.linspace(0, 1, alphas):
        twin = copy.deepcopy(model)
        mixed = {}
        for name, a in state_a.items():
            b = state_b[name]
            mixed[name] = (torch.lerp(b.double(), a.double(), float(alpha)).to(a.dtype)
                           if a.is_floating_point() else a)
        twin.load_state_dict(mixed, strict=False)
        twin.eval()
        with torch.no_grad():
            losses.append(nn.functional.cross_entropy(twin(x).double(), y).item())
    if linear:  # α = 1 (the last point) is state_a
        grid = np.linspace(0, 1, alphas)
        return max(value - (a * losses[-1] + (1 - a) * losses[0]) for a, value in zip(grid, losses))
    return max(losses) - 0.5 * (losses[0] + losses[-1])


@pytest.fixture()
def run_with_barriers(tmp_path):
    model, optimizer, scheduler, data = cnn_setup(seed=2)
    barriers = Barriers(alphas=11, ghosts=False, previous_snapshots=1, time_budget=math.inf)
    with dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r",
                        schedule=schedule.at([0, 3, 10, 20]), barriers=barriers):
        train(model, optimizer, scheduler, data, 20)
    return model, data, dynprobe.load_run(tmp_path / "r")


def test_online_barriers_cover_consecutive_pairs_and_match_brute_force(run_with_barriers):
    model, data, run = run_with_barriers
    B = run.B
    assert np.isfinite(np.diag(B, -1)).all() and np.isnan(B[3, 0]) and np.all(np.diag(B) == 0)
    a, b = run.state_dict(snapshot_index=2), run.state_dict(snapshot_index=1)
    expected = brute_force_barrier(model, a, b, data.x_test, data.y_test, alphas=11)
    assert B[2, 1] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    linear = brute_force_barrier(model, a, b, data.x_test, data.y_test, alphas=11, linear=True)
    assert run.B_linear[2, 1] == pytest.approx(linear, rel=1e-5, abs=1e-6)
    assert np.isfinite(np.diag(run.B_linear, -1)).all() and np.all(np.diag(run.B_linear, -1) <= np.diag(B, -1) + 1e-12)


def test_fill_barriers_completes_the_matrix(run_with_barriers):
    model, data, run = run_with_barriers
    added = dynprobe.fill_barriers(run.path, model, (data.x_test, data.y_test), alphas=11, progress=False)
    assert added == 3  # 6 pairs, 3 consecutive ones computed online
    filled = dynprobe.load_run(run.path)
    B = filled.B
    assert np.isfinite(B).all() and np.allclose(B, B.T)
    a, b = run.state_dict(snapshot_index=3), run.state_dict(snapshot_index=0)
    expected = brute_force_barrier(model, a, b, data.x_test, data.y_test, alphas=11)
    assert B[3, 0] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    linear = brute_force_barrier(model, a, b, data.x_test, data.y_test, alphas=11, linear=True)
    assert filled.B_linear[3, 0] == pytest.approx(linear, rel=1e-5, abs=1e-6)  # both values from every barrier
    assert dynprobe.fill_barriers(run.path, model, (data.x_test, data.y_test), progress=False) == 0


def test_fill_barriers_rejects_other_eval_data(run_with_barriers):
    model, data, run = run_with_barriers
    with pytest.raises(ValueError, match="differs from the run's eval set"):
        dynprobe.fill_barriers(run.path, model, (data.x_test + 1, data.y_test), progress=False)


def test_fill_barriers_rejects_unknown_steps(run_with_barriers):
    model, data, run = run_with_barriers
    with pytest.raises(ValueError, match="not snapshots"):
        dynprobe.fill_barriers(run.path, model, (data.x_test, data.y_test), pairs=[(3, 4)], progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"alphas": 1}, "alphas=\\) must be an int >= 2"),
    ({"ghosts": 1}, "ghosts=\\) must be True or False"),
    ({"previous_snapshots": -1}, "previous_snapshots=\\) must be an int >= 0"),
    ({"every_snapshots": 0}, "every_snapshots=\\) must be an int >= 1"),
    ({"time_budget": -1.0}, "time_budget=\\) must be None"),
    ({"time_budget": float("nan")}, "time_budget=\\) must be None"),
])
def test_barriers_configuration_fails_early(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Barriers(**kwargs)


# ------------------------------------------------------------------------------------------- the scheduler


class MemorySink:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def event(self, kind: str, /, **fields) -> None:
        self.events.append((kind, fields))

    def of(self, kind: str) -> list[dict]:
        return [fields for name, fields in self.events if name == kind]


def ghost_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(40, 6, generator=generator), torch.randint(0, 3, (40,), generator=generator)
    main = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ghost = {k: v + 0.3 * torch.randn(v.shape, generator=generator) for k, v in main.items()}
    return model, EvalSet.from_user((x, y), max_examples=100, seed=0), main, ghost


def scheduler_for(config: Barriers, **kwargs):
    model, eval_set, main, ghost = ghost_setup()
    sink = MemorySink()
    scheduler = BarrierScheduler(config, sink=sink, model=model, eval_set=eval_set, output_fn=lambda out: out,
                                 batch_size=64, **kwargs)
    return scheduler, sink, model, eval_set, main, ghost


def test_ghost_barriers_match_loss_barrier_and_the_control_is_exactly_zero_without_evaluating():
    scheduler, sink, model, eval_set, main, ghost = scheduler_for(Barriers(alphas=5, time_budget=math.inf))
    scheduler.after_snapshot(4, main, [(0, main, dict(main)), (1, main, ghost)], snapshot_steps=[0, 4],
                             snapshot_seconds=0.1)
    control, perturbed = sink.of("ghost_barrier")
    assert control == {"ghost": 0, "step": 4, "alphas": 5, "B": 0.0, "B_linear": 0.0, "argmax_alpha": None,
                       "argmax_alpha_linear": None}
    expected = dynprobe.loss_barrier(model, main, ghost, (eval_set.inputs, eval_set.targets), alphas=5)
    assert perturbed["B"] == expected.mean and perturbed["B_linear"] == expected.linear
    assert perturbed["argmax_alpha"] == expected.argmax_alpha_mean
    scheduler.close(4, [])
    budget = sink.of("barrier_budget")[0]
    assert budget["due"]["ghost"] == 2 and budget["computed"]["ghost"] == 2 and budget["identical_endpoints"] == 1


def test_a_zero_budget_computes_only_the_final_ghost_barriers():
    scheduler, sink, _, _, main, ghost = scheduler_for(Barriers(alphas=3, time_budget=0), final_step=8)
    for step in (0, 4, 8):
        scheduler.after_snapshot(step, main, [(1, main, ghost)], snapshot_steps=[0, 4, 8][: step // 4 + 1],
                                 snapshot_seconds=1.0)
    assert [e["step"] for e in sink.of("ghost_barrier")] == [8]
    scheduler.close(8, [(1, main, ghost)])  # already has its final barrier: not computed twice
    assert len(sink.of("ghost_barrier")) == 1
    assert sink.of("barrier_budget")[0]["skipped"] == {"ghost": 2, "trajectory": 0}


def test_close_computes_the_final_ghost_barrier_when_the_last_snapshot_did_not_know_it_was_final():
    scheduler, sink, _, _, main, ghost = scheduler_for(Barriers(alphas=3, time_budget=0))
    scheduler.after_snapshot(5, main, [(1, main, ghost)], snapshot_steps=[5], snapshot_seconds=1.0)
    assert not sink.of("ghost_barrier")
    scheduler.close(6, [(1, main, ghost)])  # steps were taken after the last snapshot: no barrier for a stale state
    assert not sink.of("ghost_barrier")
    scheduler, sink, _, _, main, ghost = scheduler_for(Barriers(alphas=3, time_budget=0))
    scheduler.after_snapshot(5, main, [(1, main, ghost)], snapshot_steps=[5], snapshot_seconds=1.0)
    scheduler.close(5, [(1, main, ghost)])
    assert [e["step"] for e in sink.of("ghost_barrier")] == [5]


def test_every_snapshots_thins_ghost_barriers_per_ghost():
    scheduler, sink, _, _, main, ghost = scheduler_for(Barriers(alphas=3, every_snapshots=2, time_budget=math.inf))
    for step in range(5):
        ghosts = [(1, main, ghost)] + ([(2, main, ghost)] if step >= 1 else [])
        scheduler.after_snapshot(step, main, ghosts, snapshot_steps=list(range(step + 1)), snapshot_seconds=0.0)
    by_ghost = {g: [e["step"] for e in sink.of("ghost_barrier") if e["ghost"] == g] for g in (1, 2)}
    assert by_ghost == {1: [0, 2, 4], 2: [1, 3]}  # counted from each ghost's own first snapshot


def test_the_budget_grants_carries_over_and_books_measured_costs():
    budget = BarrierBudget(2.0)
    budget.grant(10.0, models_evaluated=5)
    assert budget.seconds_per_alpha == 2.0 and budget.credit == 2.0  # first guess: the snapshot's time per model
    assert budget.fits(1) and not budget.fits(2)
    budget.spend(1.0, evaluations=1)
    assert budget.seconds_per_alpha == 1.5 and budget.credit == 1.0
    budget.grant(10.0, models_evaluated=5)  # unspent time carries over
    assert budget.credit == 3.0 and budget.fits(2) and not budget.fits(3)
    automatic = BarrierBudget(None)
    automatic.grant(4.0, models_evaluated=2)
    assert automatic.credit == 2.0  # half of the snapshot's own time
    unlimited = BarrierBudget(math.inf)
    unlimited.grant(0.0, 1)
    assert unlimited.fits(10**6)
    assert BarrierBudget(0.0).fits(0)  # a barrier that evaluates nothing (identical endpoints) always fits
    reserving = BarrierBudget(3.0)
    reserving.grant(1.0, 1)  # one second per evaluation
    assert reserving.fits(3) and not reserving.fits(3, reserve=1)


def test_with_a_known_last_step_credit_is_kept_for_the_final_ghost_barriers():
    # Before any barrier is timed, an evaluation is guessed at the snapshot's time per model (0.5 s / 2 = 0.25 s):
    # a 5-α barrier (1.25 s) fits a 2 s budget, but not with another 5 evaluations kept for the final step.
    for final_step, expected in ((8, []), (None, [0])):
        scheduler, sink, _, _, main, ghost = scheduler_for(Barriers(alphas=5, time_budget=2.0), final_step=final_step)
        scheduler.after_snapshot(0, main, [(1, main, ghost)], snapshot_steps=[0], snapshot_seconds=0.5)
        assert [e["step"] for e in sink.of("ghost_barrier")] == expected, final_step
