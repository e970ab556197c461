"""``dynprobe.config.barriers`` and ``dynprobe.config.kernel``: each documented bound on both sides, the
``single:k`` spelling, which barriers a probe has to compute, and the recorded configuration."""
from __future__ import annotations

import math

import pytest
import torch

from dynprobe.config.barriers import Barriers
from dynprobe.config.kernel import KERNEL_MODES, KernelConfig


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(alphas=1), "alphas"), (dict(ghosts=1), "ghosts=\\) must be True or False"),
    (dict(previous_snapshots=-1), "previous_snapshots"), (dict(every_snapshots=0), "every_snapshots"),
    (dict(time_budget=-0.5), "time_budget"), (dict(time_budget=math.nan), "time_budget"),
    (dict(time_budget=True), "time_budget"),
])
def test_barriers_outside_their_domain_are_refused(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        Barriers(**kwargs)


def test_which_barriers_a_probe_computes_and_the_recorded_budget():
    assert Barriers(alphas=2, previous_snapshots=0, every_snapshots=1, time_budget=0).alphas == 2  # the minimums
    for ghosts in (True, False):
        for previous in (0, 3):
            barriers = Barriers(ghosts=ghosts, previous_snapshots=previous)
            assert barriers.enabled == (ghosts or previous > 0)
            for with_ghosts in (True, False):
                assert barriers.active(with_ghosts) == ((ghosts and with_ghosts) or previous > 0)
    budgets = [Barriers(time_budget=b).to_config()["time_budget"] for b in (None, math.inf, 0, 2)]
    assert budgets == ["auto", "inf", 0.0, 2.0]


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(n=1), ValueError, "n"),
    (dict(mode=3), TypeError, "must be a string"),
    (dict(mode="diagonal"), ValueError, "must be one of"),
    (dict(mode="single"), ValueError, "needs the logit to differentiate"),
    (dict(mode="single:x"), ValueError, "needs an integer logit index"),
    (dict(mode="single:2", class_index=3), ValueError, "disagree"),
    (dict(mode="trace", class_index=1), ValueError, "only used with mode='single'"),
    (dict(mode="single", class_index=-1), ValueError, "class_index"),
    (dict(every_snapshots=0), ValueError, "every_snapshots"),
    (dict(bn="train"), ValueError, "train-mode BatchNorm mixes the samples"),
    (dict(max_memory=0), ValueError, "max_memory"),
    (dict(per_layer=1), TypeError, "per_layer=\\) must be True or False"),
    (dict(lag_steps=-1), ValueError, "lag_steps"),
    (dict(probe_set="test"), ValueError, "probe_set=\\) must be 'eval' or 'train'"),
    (dict(probe_set="train"), ValueError, "needs train_data"),
    (dict(train_data=(torch.zeros(4, 2), torch.zeros(4))), ValueError, "only used with probe_set='train'"),
    (dict(probe_set="train", train_data=(torch.zeros(4, 2), torch.zeros(3))), ValueError, "same first dimension"),
    (dict(n=8, probe_set="train", train_data=(torch.zeros(4, 2), torch.zeros(4))), ValueError, "more probe examples"),
])
def test_a_kernel_config_outside_its_domain_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        KernelConfig(**kwargs)


@pytest.mark.parametrize("mode", KERNEL_MODES)
def test_every_mode_and_the_single_k_spelling_are_accepted(mode):
    config = KernelConfig(mode=mode, class_index=2 if mode == "single" else None, n=2, every_snapshots=1,
                          max_memory=1, lag_steps=1)
    assert config.mode == mode
    assert KernelConfig(mode="single:4") == KernelConfig(mode="single", class_index=4)
    assert KernelConfig(mode="single:4").class_index == 4
    train = KernelConfig(n=4, probe_set="train", train_data=(torch.zeros(4, 2), torch.zeros(4)))
    assert train.probe_set == "train"
