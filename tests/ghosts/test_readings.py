"""The ghosts' per-step values read in batches (dynprobe/ghosts/readings.py) record exactly what a read after every
step records: the same statuses at the same steps, the same control drift, bitwise the same separation logs, and
the user's run unchanged; a diverged ghost's extra (unread) steps are neither recorded nor raised."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import dynprobe
from dynprobe import Ghosts, Perturbation, schedule
from dynprobe.ghosts import readings

from ..conftest import assert_bitwise_equal, mlp_setup, state_of, train

STEPS = 45
EDIT_STEP = 23  # the main parameters are edited outside the optimizer: a sequential control drifts at the next step


def _run(tmp_path, name, *, vectorize, device):
    model, optimizer, scheduler, data = mlp_setup(seed=8)
    model.to(device)
    data.x_train, data.y_train = data.x_train.to(device), data.y_train.to(device)
    torch.manual_seed(5)
    # ghost 1 (ε = 1e30, spawned at 3) diverges at its first step; the others train on; ghost 3 stops at its lifetime
    ghosts = Ghosts(at=[3, 9], perturbation=Perturbation(norm=1e30), divergence_ratio=1e40, lifetime_steps=30,
                    vectorize=vectorize)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / name,
                           schedule=schedule.at([0, 40]), ghosts=ghosts, progress=False)

    def after(step: int) -> None:
        if step == EDIT_STEP:
            with torch.no_grad():
                next(model.parameters()).add_(1e-3)

    with pytest.warns(RuntimeWarning):
        train(model, optimizer, scheduler, data, STEPS, criterion=probe.watch(nn.CrossEntropyLoss()),
              after_step=after)
        probe.close()
    return state_of(model), dynprobe.load_run(tmp_path / name)


def _ghost_records(run):
    kinds = ("ghost_spawn", "ghost_status", "control_drift")
    return sorted((e["event"], e.get("ghost"), e["step"], e.get("status"), e.get("reason"), str(e.get("tensors")))
                  for e in run.events if e["event"] in kinds)


@pytest.mark.parametrize("vectorize", [False, True], ids=["sequential", "vectorized"])
def test_batched_reads_record_what_a_read_after_every_step_records(vectorize, device, tmp_path, monkeypatch):
    batched_state, batched = _run(tmp_path, "batched", vectorize=vectorize, device=device)
    monkeypatch.setattr(readings, "READ_EVERY", 1)
    every_state, every = _run(tmp_path, "every", vectorize=vectorize, device=device)
    assert_bitwise_equal(batched_state, every_state)
    assert _ghost_records(batched) == _ghost_records(every)
    statuses = {e["ghost"]: (e["status"], e["step"]) for e in batched.events if e["event"] == "ghost_status"}
    assert statuses[1] == ("diverged", 4)
    drifts = [e["step"] for e in batched.events if e["event"] == "control_drift"]
    # sequential: compared with the main run, which was edited; vectorized: with the stack's shadow, which was not
    assert drifts == ([] if vectorize else [EDIT_STEP + 1])
    for ghost in range(len(batched.ghosts)):
        steps, values = batched.separation(ghost)
        expected_steps, expected_values = every.separation(ghost)
        np.testing.assert_array_equal(steps, expected_steps)
        np.testing.assert_array_equal(values, expected_values)  # bitwise
    assert batched.separation(1)[0].tolist() == [3]  # the diverged ghost: its spawn only, no unread extra step


def test_max_abs_differences_is_zero_exactly_for_equal_tensors_and_nan_counts_as_different():
    from dynprobe._util.modules import max_abs_differences, same_tensors

    a = [torch.tensor([1.0, -0.0, 3.0]), torch.tensor([1, 2]), torch.zeros(0), torch.tensor([1.0, float("nan")]),
         torch.tensor([0.5], dtype=torch.float16), torch.tensor([1.0, 2.0], dtype=torch.float64)]
    b = [torch.tensor([1.0, 0.0, 3.5]), torch.tensor([1, 5]), torch.zeros(0), torch.tensor([1.0, float("nan")]),
         torch.tensor([0.5], dtype=torch.float16), torch.tensor([1.0, 2.0 + 2**-40], dtype=torch.float64)]
    values = max_abs_differences(a, b)
    assert values.dtype == torch.float64 and values.shape == (6,)
    assert values[[0, 1, 2, 4, 5]].tolist() == [0.5, 3.0, 0.0, 0.0, 2**-40] and values[3].isnan()
    assert same_tensors({"w": a[0]}, {"w": a[0].clone()}) and not same_tensors({"w": a[0]}, {"w": b[0]})
    assert not same_tensors({"w": a[3]}, {"w": a[3].clone()})  # NaN equals nothing (as in torch.equal)
    with pytest.raises(ValueError, match="shape"):
        max_abs_differences([torch.zeros(2)], [torch.zeros(3)])
