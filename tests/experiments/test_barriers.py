"""Offline loss barriers (dynprobe.experiments.barriers.fill_barriers) and the run's eval set they use
(dynprobe.experiments._eval_set): each pair is computed once, in the asked selection and budget, its value is
max_α L((1 − α)θ_i + αθ_j) − ½(L_i + L_j) (eq. 5) recomputed here by hand, and eval data other than the run's
is refused."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from dynprobe import schedule
from dynprobe.experiments._eval_set import run_eval_set
from dynprobe.experiments.barriers import fill_barriers
from dynprobe.probe.core import Probe
from dynprobe.store.files import load_snapshot_state
from dynprobe.store.layout import barriers_path
from dynprobe.store.run import load_run

from ..conftest import MLP, mlp_setup, train


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    model, optimizer, scheduler, data = mlp_setup()
    root = tmp_path_factory.mktemp("barriers") / "run"
    with Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=root, eval_max=48,
               schedule=schedule.at([0, 2, 4, 6]), snapshot_on_close=False, progress=False):  # no online barriers
        train(model, optimizer, scheduler, data, 6, batch_size=16)
    return root, data


def pairs_on_disk(root) -> list[tuple[int, int]]:
    path = barriers_path(root)
    return [(r["i"], r["j"]) for r in map(json.loads, path.read_text().splitlines())] if path.exists() else []


def eval_loss(state: dict[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor) -> float:
    model = MLP().eval()
    with torch.no_grad():
        return float(F.cross_entropy(functional_call(model, state, (inputs,)).double(), targets))


def test_pairs_are_computed_once_in_the_asked_selection_and_budget(recorded, tmp_path):
    source, data = recorded
    root = tmp_path / "run"
    shutil.copytree(source, root)
    eval_data = (data.x_test, data.y_test)
    assert pairs_on_disk(root) == []
    kwargs = dict(alphas=3, progress=False)
    assert fill_barriers(root, MLP(), eval_data, pairs="consecutive", **kwargs) == 3
    assert pairs_on_disk(root) == [(2, 0), (4, 2), (6, 4)]
    assert fill_barriers(root, MLP(), eval_data, pairs="to_init", max_pairs=1, **kwargs) == 1  # (4, 0) of 2 left
    assert fill_barriers(root, MLP(), eval_data, pairs=[(0, 2), (6, 0)], **kwargs) == 1  # (0, 2) = (2, 0): done
    assert pairs_on_disk(root)[-2:] == [(4, 0), (6, 0)]
    assert fill_barriers(load_run(root), MLP(), eval_data, pairs="all", **kwargs) == 6 - 5
    assert fill_barriers(root, MLP(), eval_data, pairs="all", **kwargs) == 0
    assert sorted(tuple(sorted(p)) for p in pairs_on_disk(root)) == [(0, 2), (0, 4), (0, 6), (2, 4), (2, 6),
                                                                     (4, 6)]
    with pytest.raises(ValueError, match=r"not snapshots of this run: \[3\]"):
        fill_barriers(root, MLP(), eval_data, pairs=[(3, 0)], **kwargs)
    with pytest.raises(ValueError, match="pairs must be 'all', 'consecutive', 'to_init'"):
        fill_barriers(root, MLP(), eval_data, pairs="every", **kwargs)


def test_the_barrier_is_the_highest_loss_on_the_segment_above_the_endpoints_mean(recorded, tmp_path):
    source, data = recorded
    root = tmp_path / "run"
    shutil.copytree(source, root)
    run = load_run(root)
    indices = torch.as_tensor(run.eval_indices)
    inputs, targets = data.x_test[indices], data.y_test[indices]
    fill_barriers(run, MLP(), (data.x_test, data.y_test), pairs=[(6, 0)], alphas=5, progress=False)
    record = json.loads(barriers_path(root).read_text())
    theta_6, theta_0 = (load_snapshot_state(root, run.manifest, step) for step in (6, 0))
    losses = [eval_loss({k: (1 - a) * theta_6[k] + a * theta_0[k] for k in theta_6}, inputs, targets)
              for a in torch.linspace(0, 1, 5).tolist()]
    assert record["alphas"] == 5
    assert record["value"] == pytest.approx(max(losses) - (losses[0] + losses[-1]) / 2, rel=1e-4, abs=1e-6)


def test_the_eval_set_is_the_runs_examples_and_other_eval_data_is_refused(recorded):
    root, data = recorded
    run = load_run(root)
    subset = run_eval_set(run, (data.x_test, data.y_test))
    indices = torch.as_tensor(run.eval_indices)
    assert len(indices) == 48 and torch.equal(subset.targets, data.y_test[indices])
    assert torch.equal(subset.inputs, data.x_test[indices])
    changed = data.x_test.clone()
    changed[indices[0], 0] += 1.0
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        run_eval_set(run, (changed, data.y_test))
    short = int(indices.max())
    with pytest.raises(ValueError, match=f"eval_data has {short} examples but the run evaluated example {short}"):
        run_eval_set(run, (data.x_test[:short], data.y_test[:short]))
