"""The switching experiment (dynprobe.experiments.switching.switching_experiment) on a model that is its own
linearization: for f(x) = Wx + b, f_lin = f, so switching at any snapshot t and training on the same batches with
the same plain SGD must land where the standard run ended — the run's own final eval loss and accuracy, measured
here by hand on the run's eval examples. A second call recomputes nothing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynprobe import schedule
from dynprobe.experiments.switching import switching_experiment
from dynprobe.probe.core import Probe
from dynprobe.store.files import load_snapshot_state
from dynprobe.store.run import load_run

from ..conftest import make_data

STEPS, LR = 6, 0.5


def batch_at(data):
    def batch(step: int):
        generator = torch.Generator().manual_seed(500 + step)
        index = torch.randint(0, data.x_train.shape[0], (32,), generator=generator)
        return data.x_train[index], data.y_train[index]
    return batch


def test_switching_a_linear_model_anywhere_reproduces_the_standard_runs_end(tmp_path):
    torch.manual_seed(0)
    data = make_data((20,), seed=3)
    model = nn.Linear(20, 5)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    stream = batch_at(data)
    eval_data = (data.x_test, data.y_test)
    with Probe(model, optimizer, eval_data=eval_data, out=tmp_path / "run", eval_max=64, progress=False,
               schedule=schedule.at([0, 2, 4, STEPS]), snapshot_on_close=False):
        for step in range(STEPS):
            inputs, targets = stream(step)
            loss = F.cross_entropy(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    run = load_run(tmp_path / "run")
    indices = torch.as_tensor(run.eval_indices)
    final = load_snapshot_state(run.path, run.manifest, STEPS)
    with torch.no_grad():
        logits = torch.func.functional_call(nn.Linear(20, 5), final, (data.x_test[indices],))
    expected_loss = float(F.cross_entropy(logits, data.y_test[indices]))
    expected_accuracy = float((logits.argmax(1) == data.y_test[indices]).float().mean())

    kwargs = dict(switch_steps=[0, 2, 4, STEPS], total_steps=STEPS, progress=False,
                  optimizer_factory=lambda params: torch.optim.SGD(params, lr=LR))
    result = switching_experiment(run, lambda: nn.Linear(20, 5), stream, eval_data, **kwargs)
    assert result["switch_step"].tolist() == [0, 2, 4, STEPS]
    assert result["linearized_steps"].tolist() == [STEPS, STEPS - 2, STEPS - 4, 0]
    assert result["eval_loss"] == pytest.approx([expected_loss] * 4, rel=1e-5)
    assert result["eval_accuracy"].tolist() == [expected_accuracy] * 4
    assert not result["diverged"].any() and result["computed"] == [0, 2, 4, STEPS]
    again = switching_experiment(run, lambda: nn.Linear(20, 5), stream, eval_data, **kwargs)
    assert again["computed"] == [] and again["config_id"] == result["config_id"]
    assert again["eval_loss"].tolist() == result["eval_loss"].tolist()
