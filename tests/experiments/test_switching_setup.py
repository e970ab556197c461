"""The switching experiment's checked inputs (dynprobe.experiments._switching_setup), with stand-in runs: switch
steps sorted, deduplicated and limited to stored snapshots before total_steps; learning rates one per group per
step; a restored optimizer state is a copy, never the caller's tensors; the lr check warns exactly at the steps
that disagree; and the configuration id changes with what makes two results incomparable, not with key order."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from dynprobe.experiments._switching_setup import (
    abbreviated,
    checked_switch_steps,
    config_id,
    learning_rates,
    load_optimizer_state,
    warn_on_lr_mismatch,
)

RUN = SimpleNamespace(steps=np.array([0, 5, 10, 20, 40]))


def test_switch_steps_are_sorted_unique_stored_snapshots_not_after_total_steps():
    assert checked_switch_steps(RUN, [20, 0, np.int64(5), 20], total_steps=40) == [0, 5, 20]
    with pytest.raises(ValueError, match=r"switch_steps \[7, 30\] are not snapshot steps of the run"):
        checked_switch_steps(RUN, [0, 7, 30], total_steps=40)
    with pytest.raises(ValueError, match=r"total_steps=15 is smaller than switch steps \[20, 40\]"):
        checked_switch_steps(RUN, [5, 20, 40], total_steps=15)
    with pytest.raises(ValueError, match="switch_steps is empty"):
        checked_switch_steps(RUN, [], total_steps=40)
    with pytest.raises(TypeError, match="list of snapshot steps; got str"):
        checked_switch_steps(RUN, "0,5", total_steps=40)


def test_long_step_lists_are_abbreviated_with_their_count():
    assert abbreviated(list(range(12))) == str(list(range(12)))
    assert abbreviated(list(range(0, 200, 10))) == "[0, 10, 20, 30, 40, 50, …, 170, 180, 190] (20 steps)"


def test_learning_rates_are_one_finite_rate_per_group_for_every_step():
    assert learning_rates(None, 3, 2) is None
    assert learning_rates(lambda s: 0.1 / (s + 1), 3, 2) == [[0.1, 0.1], [0.05, 0.05], [0.1 / 3, 0.1 / 3]]
    assert learning_rates(lambda s: (0.1, 0.01 * s), 2, 2) == [[0.1, 0.0], [0.1, 0.01]]
    for bad in (lambda s: float("nan"), lambda s: -0.1, lambda s: True, lambda s: (0.1,), lambda s: "0.1"):
        with pytest.raises(ValueError, match="must be a finite learning rate >= 0 or a list of 2"):
            learning_rates(bad, 3, 2)


def test_a_restored_optimizer_state_is_a_copy_of_the_callers_checkpoint():
    model = nn.Linear(2, 1)
    source = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    source.step()
    checkpoint = source.state_dict()
    saved = {k: v["momentum_buffer"].clone() for k, v in checkpoint["state"].items()}
    target = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    load_optimizer_state(target, lambda t: checkpoint, 5)
    model(torch.ones(1, 2)).sum().backward()
    target.step()  # updates the loaded momentum in place
    for k, v in checkpoint["state"].items():
        assert torch.equal(v["momentum_buffer"], saved[k])  # the caller's checkpoint is untouched
    with pytest.raises(TypeError, match=r"optimizer_state_at\(5\) must return an optimizer.state_dict\(\)"):
        load_optimizer_state(target, lambda t: {"state": {}}, 5)
    adam = torch.optim.Adam(nn.Linear(3, 3).parameters())
    with pytest.raises(ValueError, match=r"optimizer_state_at\(5\) does not fit the optimizer"):
        load_optimizer_state(adam, lambda t: checkpoint, 5)


def test_the_lr_check_warns_at_exactly_the_steps_that_disagree():
    run = SimpleNamespace(lr=np.array([[0.1], [0.1], [0.05], [np.nan]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_on_lr_mismatch(run, [[0.1], [0.1], [0.05], [0.05]], 4)  # agrees (step 3 not recorded)
    with pytest.warns(RuntimeWarning, match=r"disagrees .* at steps \[1, 2\]"):
        warn_on_lr_mismatch(run, [[0.1], [0.2], [0.5], [0.05]], 4)
    with pytest.warns(RuntimeWarning, match="lr_at is None"):
        warn_on_lr_mismatch(run, None, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_on_lr_mismatch(SimpleNamespace(lr=np.full((3, 1), 0.1)), None, 3)  # constant: nothing to continue


def test_the_config_id_ignores_key_order_and_sees_every_value():
    config = {"total_steps": 100, "optimizer": {"class": "SGD", "lr": 0.1}, "dropout": "off"}
    reordered = {"dropout": "off", "optimizer": {"lr": 0.1, "class": "SGD"}, "total_steps": 100}
    assert config_id(config) == config_id(reordered) and len(config_id(config)) == 12
    assert config_id({**config, "total_steps": 101}) != config_id(config)
    assert config_id({**config, "optimizer": {"class": "SGD", "lr": 0.2}}) != config_id(config)
