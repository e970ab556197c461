"""Inert parameter tensors (``dynprobe.recording.inert``): conv biases in front of BatchNorm under Adam are found —
exactly those — recorded and warned about, and the ghosts' ``L2_active`` (without them) does not show the one-step
×1e4 "amplification" that the full L2 shows."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import dynprobe
from dynprobe import Ghosts, Perturbation, schedule
from dynprobe.recording.inert import INERT_RATIO, inert_parameters

from ..conftest import cnn_setup, train

CONV_BIASES = ["features.0.bias", "features.3.bias"]  # SmallCNN: Conv2d(bias=True) → BatchNorm2d, twice


def _cnn_run(tmp_path, optimizer_class):
    model, optimizer, _, data = cnn_setup(seed=1)
    if optimizer_class is not torch.optim.Adam:
        optimizer = optimizer_class(model.parameters(), lr=3e-3)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.every(1), errors="raise",
                           ghosts=Ghosts(at=[3], control=False, perturbation=Perturbation(norm=1e-7)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, optimizer, None, data, 5, criterion=probe.watch(nn.CrossEntropyLoss()))
        probe.close()
    return dynprobe.load_run(tmp_path / "run"), [str(w.message) for w in caught if "rounding level" in str(w.message)]


def test_conv_biases_before_batchnorm_under_adam_are_inert_and_the_active_separation_does_not_jump(tmp_path):
    run, warned = _cnn_run(tmp_path, torch.optim.Adam)
    [event] = [e for e in run.events if e["event"] == "inert_parameters"]
    assert event["tensors"] == CONV_BIASES and event["step"] == 1 and event["optimizer"] == "Adam"
    assert all(0 < ratio < INERT_RATIO for ratio in event["gradient_ratio"].values())
    assert run.manifest["inert_parameters"]["tensors"] == CONV_BIASES
    assert len(warned) == 1 and "bias=False" in warned[0] and "features.0.bias" in warned[0]
    spawn, after = [e for e in run.events if e["event"] == "ghost_compare"][:2]
    assert (spawn["step"], after["step"]) == (3, 4)
    # Measured: the full separation grows ×1.1e4 in the step after the spawn (the conv biases' Adam steps follow
    # the rounding), the separation without them ×1.05.
    assert after["L2"] / spawn["L2"] > 1e3
    assert after["L2_active"] / spawn["L2_active"] < 2
    row = run.chaos["L2_active"][0]  # the chaos map of it: NaN before the spawn
    assert np.isnan(row[:3]).all() and row[3] == spawn["L2_active"] and row[4] == after["L2_active"]


def test_sgd_moves_no_tensor_on_rounding_noise(tmp_path):
    run, warned = _cnn_run(tmp_path, torch.optim.SGD)
    [event] = [e for e in run.events if e["event"] == "inert_parameters"]
    assert event["tensors"] == [] and event["optimizer"] == "SGD" and warned == []
    assert all("L2_active" not in e for e in run.events if e["event"] == "ghost_compare")
    assert np.isnan(run.chaos["L2_active"]).all()


@pytest.mark.parametrize(("gradient", "inert"), [(1e-9, True), (0.0, False), (1e-2, False)])
def test_a_tensor_is_inert_when_its_nonzero_gradient_is_at_rounding_level_under_an_adaptive_step(gradient, inert):
    weight, bias = nn.Parameter(torch.ones(50)), nn.Parameter(torch.ones(5))
    optimizer = torch.optim.Adam([weight, bias])
    named = [("weight", weight), ("bias", bias)]
    assert inert_parameters(named, optimizer) is None  # no gradient yet
    weight.grad, bias.grad = torch.full((50,), 0.1), torch.full((5,), gradient)
    assert inert_parameters(named, optimizer) == {}  # no second moment yet: Adam has not moved anything
    optimizer.step()
    assert list(inert_parameters(named, optimizer)) == (["bias"] if inert else [])
