"""Trajectory loss barriers: the online budget and offline completion, against a brute-force α loop."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import dynprobe
from dynprobe import schedule

from .conftest import cnn_setup, train


def brute_force_barrier(model, state_a, state_b, x, y, alphas=30):
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
    return max(losses) - 0.5 * (losses[0] + losses[-1])


@pytest.fixture()
def run_with_barriers(tmp_path):
    model, optimizer, scheduler, data = cnn_setup(seed=2)
    with dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r",
                        schedule=schedule.at([0, 3, 10, 20]), trajectory_barriers=1, barrier_alphas=11):
        train(model, optimizer, scheduler, data, 20)
    return model, data, dynprobe.load_run(tmp_path / "r")


def test_online_barriers_cover_consecutive_pairs_and_match_brute_force(run_with_barriers):
    model, data, run = run_with_barriers
    B = run.B
    assert np.isfinite(np.diag(B, -1)).all() and np.isnan(B[3, 0]) and np.all(np.diag(B) == 0)
    expected = brute_force_barrier(model, run.state_dict(2), run.state_dict(1), data.x_test, data.y_test, alphas=11)
    assert B[2, 1] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_fill_barriers_completes_the_matrix(run_with_barriers):
    model, data, run = run_with_barriers
    added = dynprobe.fill_barriers(run.path, model, (data.x_test, data.y_test), alphas=11, progress=False)
    assert added == 3  # 6 pairs, 3 consecutive ones computed online
    B = dynprobe.load_run(run.path).B
    assert np.isfinite(B).all() and np.allclose(B, B.T)
    expected = brute_force_barrier(model, run.state_dict(3), run.state_dict(0), data.x_test, data.y_test, alphas=11)
    assert B[3, 0] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert dynprobe.fill_barriers(run.path, model, (data.x_test, data.y_test), progress=False) == 0


def test_fill_barriers_rejects_other_eval_data(run_with_barriers):
    model, data, run = run_with_barriers
    with pytest.raises(ValueError, match="differs from the run's eval set"):
        dynprobe.fill_barriers(run.path, model, (data.x_test + 1, data.y_test), progress=False)


def test_fill_barriers_rejects_unknown_steps(run_with_barriers):
    model, data, run = run_with_barriers
    with pytest.raises(ValueError, match="not snapshots"):
        dynprobe.fill_barriers(run.path, model, (data.x_test, data.y_test), pairs=[(3, 4)], progress=False)
