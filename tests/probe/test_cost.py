"""``dynprobe.estimate_cost`` takes every ``Probe`` option (``ProbeOptions``, one declaration), validates it as
``Probe`` does, and passes on those that change the cost."""
from __future__ import annotations

import dataclasses
import inspect

import pytest

import dynprobe
from dynprobe import Barriers, Ghosts, KernelConfig, schedule
from dynprobe.probe.cost import estimate_cost
from dynprobe.probe.options import ProbeOptions, option_names

from ..conftest import mlp_setup

# A valid value other than the default for every option: the test fails when an option is added without one here.
NON_DEFAULT = {
    "schedule": schedule.at([0, 2, 4]), "kernel": KernelConfig(n=4), "ghosts": Ghosts(at=[2]),
    "loss_from_output": True, "total_steps": 4, "resume": True, "resume_step": 2, "eval_max": 16,
    "eval_batch_size": 8, "output_fn": lambda output: output, "seed": 3, "barriers": Barriers(alphas=2),
    "task": "classification", "progress": False, "durable": True, "record_command": True, "history_memory": 1 << 20,
    "snapshot_on_close": False, "on_transition": lambda estimate: None, "on_snapshot": lambda record: None,
    "errors": "raise",
}


def test_every_probe_option_is_accepted_and_shown_in_the_signature():
    assert set(NON_DEFAULT) == set(option_names())
    model, optimizer, _, data = mlp_setup(seed=0)
    options = {k: v for k, v in NON_DEFAULT.items() if k != "total_steps"}
    estimate = estimate_cost(model, optimizer, (data.x_test, data.y_test), total_steps=4, console=False, **options)
    assert estimate.steps == [0, 2, 4] and estimate.kernel_mode is not None and estimate.live_ghosts[-1] == 2
    shown = inspect.signature(dynprobe.estimate_cost).parameters
    assert set(option_names()) <= set(shown) and shown["total_steps"].default is inspect.Parameter.empty
    assert {f.name: f.default for f in dataclasses.fields(ProbeOptions) if f.name != "total_steps"} == {
        name: shown[name].default for name in option_names() if name != "total_steps"}


def test_options_are_validated_as_probe_validates_them():
    model, optimizer, _, data = mlp_setup(seed=0)
    eval_data = (data.x_test, data.y_test)
    with pytest.raises(TypeError, match=r"estimate_cost\(\) got unknown option\(s\) \['ghost'\]"):
        estimate_cost(model, optimizer, eval_data, total_steps=4, console=False, ghost=Ghosts(at=[2]))
    with pytest.raises(ValueError, match="errors must be 'warn' or 'raise'"):
        estimate_cost(model, optimizer, eval_data, total_steps=4, console=False, errors="ignore")
    with pytest.raises(ValueError, match="beyond total_steps=4"):
        estimate_cost(model, optimizer, eval_data, total_steps=4, console=False, ghosts=Ghosts(at=[9]))
    with pytest.raises(TypeError, match="loss_from_output must be True"):
        estimate_cost(model, optimizer, eval_data, total_steps=4, console=False, loss_from_output=1.5)
