"""Assembling a probe (dynprobe.probe.assembly.assemble): a new run starts at step 0 with its eval indices stored
and θ = the model's trainable parameters; θ is stored in float64 only when the model has float64 parameters; and a
failure after the run sink was opened leaves no hook on the model and the run's lock released."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dynprobe
from dynprobe.probe import assembly
from dynprobe.probe.assembly import ProbeClock, assemble
from dynprobe.probe.options import ProbeOptions
from dynprobe.store.layout import EVAL_INDICES, run_array_path

from ..conftest import mlp_setup


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks)
               for m in model.modules())


def eval_data(data):
    return data.x_test, data.y_test


def test_a_new_run_starts_at_step_zero_with_theta_the_trainable_parameters(tmp_path):
    model, optimizer, _, data = mlp_setup()
    first = next(model.parameters())
    first.requires_grad_(False)  # frozen: not part of θ
    clock = ProbeClock()
    parts = assemble(ProbeOptions(eval_max=40, progress=False), model, optimizer, eval_data=eval_data(data),
                     out=tmp_path / "run", clock=clock, owner=object())
    try:
        expected = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert [n for n, _ in parts.named_params] == [n for n, _ in expected]
        assert all(p is q for (_, p), (_, q) in zip(parts.named_params, expected))
        assert clock.step == 0 and clock.busy  # busy until the probe has attached
        assert parts.storage_dtype == torch.float32 and parts.ghosts is None and parts.handles == []
        indices = np.load(run_array_path(parts.sink.root, EVAL_INDICES))
        assert len(indices) == 40 == len(set(indices.tolist())) and indices.max() < len(data.y_test)
    finally:
        parts.sink.close()


def test_float64_parameters_are_stored_in_float64(tmp_path):
    model, _, _, data = mlp_setup()
    model.double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    parts = assemble(ProbeOptions(eval_max=16, progress=False), model, optimizer,
                     eval_data=(data.x_test.double(), data.y_test), out=tmp_path / "run", clock=ProbeClock(),
                     owner=object())
    parts.sink.close()
    assert parts.storage_dtype == torch.float64


def test_a_failure_after_the_sink_opened_removes_the_hooks_and_releases_the_run(tmp_path, monkeypatch):
    model, optimizer, _, data = mlp_setup()
    opened = []
    real_open_run = assembly.open_run
    monkeypatch.setattr(assembly, "open_run", lambda *a, **k: opened.append(real_open_run(*a, **k)) or opened[-1])

    def fail(dist):  # called after the ghosts' hooks are in place
        raise RuntimeError("planted failure")

    monkeypatch.setattr(assembly, "warn_comm_hook", fail)
    options = ProbeOptions(eval_max=16, progress=False, ghosts=dynprobe.Ghosts(at=[0]))
    before = hook_count(model)
    with pytest.raises(RuntimeError, match="planted failure"):
        assemble(options, model, optimizer, eval_data=eval_data(data), out=tmp_path / "run", clock=ProbeClock(),
                 owner=object())
    assert hook_count(model) == before
    assert len(opened) == 1 and opened[0].closed
