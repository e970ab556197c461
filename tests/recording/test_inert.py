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
from dynprobe.recording.inert import INERT_RATIO, fused_parts, inert_parameters

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
    # Without inert tensors the active separation is the separation.
    compares = [e for e in run.events if e["event"] == "ghost_compare"]
    assert compares and all(e["L2_active"] == e["L2"] for e in compares)
    np.testing.assert_array_equal(run.chaos["L2_active"], run.chaos["L2"])
    assert not np.isnan(run.chaos["L2_active"][0, 3:]).any()


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


class TinyViT(nn.Module):
    """Patches → nn.MultiheadAttention (fused in_proj_bias) → LayerNorm → head: the key third of in_proj_bias has a
    rounding-level gradient (softmax ignores a shift shared by all keys), the tensor as a whole does not."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.attn = nn.MultiheadAttention(dim, num_heads=2, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], 4, 12))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.norm(h).mean(dim=1))


def _vit_run(tmp_path, optimizer_class):
    torch.manual_seed(0)
    model = TinyViT()
    optimizer = optimizer_class(model.parameters(), lr=3e-3)
    x, y = torch.randn(64, 48), torch.randint(0, 3, (64,))
    probe = dynprobe.Probe(model, optimizer, eval_data=(x[:32], y[:32]), out=tmp_path / "run",
                           schedule=schedule.every(1), errors="raise",
                           ghosts=Ghosts(at=[3], control=False, perturbation=Perturbation(norm=1e-7)))
    criterion = probe.watch(nn.CrossEntropyLoss())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(5):
            batch = slice(16 * (step % 4), 16 * (step % 4 + 1))
            optimizer.zero_grad()
            criterion(model(x[batch]), y[batch]).backward()
            optimizer.step()
        probe.close()
    return dynprobe.load_run(tmp_path / "run"), [str(w.message) for w in caught if "rounding level" in str(w.message)]


def test_the_key_third_of_multihead_attentions_fused_bias_is_inert_under_adam_and_l2_active_skips_only_it(tmp_path):
    run, warned = _vit_run(tmp_path, torch.optim.Adam)
    [event] = [e for e in run.events if e["event"] == "inert_parameters"]
    assert event["tensors"] == ["attn.in_proj_bias[16:32]"]  # the key third, nothing else
    assert run.manifest["inert_parameters"]["tensors"] == ["attn.in_proj_bias[16:32]"]
    assert len(warned) == 1 and "attn.in_proj_bias[16:32]" in warned[0]
    spawn, after = [e for e in run.events if e["event"] == "ghost_compare"][:2]
    assert after["L2"] / spawn["L2"] > 100  # Adam turns the key third's rounding noise into lr-sized steps
    assert after["L2_active"] / spawn["L2_active"] < 10


def test_sgd_moves_no_part_of_a_fused_attention_bias(tmp_path):
    run, warned = _vit_run(tmp_path, torch.optim.SGD)
    [event] = [e for e in run.events if e["event"] == "inert_parameters"]
    assert event["tensors"] == [] and warned == []


def test_a_fused_qkv_linear_is_judged_by_thirds_and_other_shapes_are_not():
    torch.manual_seed(0)
    qkv, mlp = nn.Linear(8, 24), nn.Linear(8, 30)  # the timm / nanoGPT layout; another Linear is never split
    model = nn.Sequential(qkv, mlp)
    named = list(model.named_parameters())
    assert fused_parts(model, named) == {"0.bias": [(0, 8), (8, 16), (16, 24)]}
    optimizer = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.1)
    qkv.bias.grad[8:16] = 1e-9  # the key third: rounding level
    mlp.bias.grad[10:20] = 1e-9  # the same pattern in a bias that is no fused projection
    optimizer.step()
    assert list(inert_parameters(named, optimizer, fused_parts(model, named))) == ["0.bias[8:16]"]
    qkv.bias.grad.fill_(1e-9)  # inert as a whole: named whole, not by thirds
    assert list(inert_parameters(named, optimizer, fused_parts(model, named))) == ["0.bias"]
