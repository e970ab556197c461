"""``dynprobe.config.perturbation`` and ``dynprobe.config.ghosts``: the domains their docstrings state, each
boundary on both sides, and the configuration a run records (read back equal to what was given)."""
from __future__ import annotations

import math

import pytest

from dynprobe.config.ghosts import Ghosts
from dynprobe.config.perturbation import KINDS, MAX_ULPS, Perturbation


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_takes_zero_and_a_positive_norm_and_stores_floats(kind):
    for norm in (0, 1, 3.0):
        perturbation = Perturbation(norm=norm, kind=kind, seed=2**64 - 1)
        assert perturbation.norm == float(norm) and isinstance(perturbation.norm, float)
        assert perturbation.seed == 2**64 - 1


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(kind="gaussian"), ValueError, "kind must be one of"),
    (dict(norm=True), TypeError, "must be a real number"),
    (dict(norm="1e-7"), TypeError, "must be a real number"),
    (dict(norm=-1e-9), ValueError, "finite and >= 0"),
    (dict(norm=math.nan), ValueError, "finite and >= 0"),
    (dict(norm=math.inf), ValueError, "finite and >= 0"),
    (dict(norm=1.5, kind="ulp"), ValueError, "whole number of units in the last place"),
    (dict(norm=MAX_ULPS + 1, kind="ulp"), ValueError, "at most 2\\*\\*52"),
    (dict(seed=-1), ValueError, "seed must be an integer in \\[0, 2\\*\\*64\\)"),
    (dict(seed=2**64), ValueError, "seed must be an integer"),
    (dict(seed=1.0), ValueError, "seed must be an integer"),
])
def test_a_perturbation_outside_its_domain_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        Perturbation(**kwargs)


def test_the_largest_ulp_count_is_accepted():
    assert Perturbation(norm=MAX_ULPS, kind="ulp").norm == 2.0**52


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(at=[]), ValueError, "spawns no ghost"),
    (dict(at="0,10"), TypeError, "list of spawn steps or a Schedule"),
    (dict(perturbation=1e-7), TypeError, "must be a dynprobe.Perturbation"),
    (dict(clip_grad_norm=0), ValueError, "clip_grad_norm=\\) must be a positive number"),
    (dict(clip_grad_value=math.inf), ValueError, "clip_grad_value=\\) must be a positive number"),
    (dict(scaler=object()), TypeError, "GradScaler"),
    (dict(loss_fn="ce"), TypeError, "loss_fn=\\) must be callable"),
    (dict(directions=0), ValueError, "directions"),
    (dict(lifetime_steps=0), ValueError, "lifetime_steps"),
    (dict(kernel_every_snapshots=0), ValueError, "kernel_every_snapshots"),
    (dict(divergence_ratio=1.0), ValueError, "divergence_ratio=\\) must be > 1"),
    (dict(vectorize="yes"), ValueError, "True, False or 'auto'"),
])
def test_ghosts_outside_their_domain_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        Ghosts(**kwargs)


def test_the_recorded_configuration_is_what_was_given():
    ghosts = Ghosts(at=7, perturbation=Perturbation(norm=2, kind="ulp", seed=5), directions=3, control=False,
                    clip_grad_norm=1.0, lifetime_steps=4, kernel_every_snapshots=2, save_params=True,
                    divergence_ratio=10.0, vectorize="auto")
    assert ghosts.to_config() == {
        "at": {"kind": "steps", "steps": [7]}, "perturbation": {"norm": 2.0, "kind": "ulp", "seed": 5}, "directions": 3,
        "control": False, "clip_grad_norm": 1.0, "clip_grad_value": None, "scaler": False, "lifetime_steps": 4,
        "kernel_every_snapshots": 2, "save_params": True, "divergence_ratio": 10.0, "vectorize": "auto"}
    assert ghosts.at.values == (7,)  # a single step is a one-step schedule
