"""The single parts a probe is assembled from (dynprobe.probe.parts): the background-writer threshold in bytes,
the loss a Hugging Face-style output carries, the bit-exact check of a resumed model against the run's snapshot,
and the one warning about parameters added after attach."""
from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from dynprobe.probe.parts import (
    BACKGROUND_WRITE_BYTES,
    background_writes,
    check_resumed_parameters,
    output_loss,
    warn_about_new_parameters,
)


def test_snapshots_are_written_in_the_background_from_sixteen_mebibytes_of_stored_theta():
    assert BACKGROUND_WRITE_BYTES == 16 * 2**20
    floats = 4 * 2**20  # float32 elements in 16 MiB
    assert background_writes([torch.empty(floats - 5), torch.empty(5)], torch.float32)
    assert not background_writes([torch.empty(floats - 1)], torch.float32)
    assert background_writes([torch.empty(floats // 2)], torch.float64)  # 8 bytes each in storage
    assert not background_writes([torch.empty(floats // 2 - 1, dtype=torch.float64)], torch.float64)


def test_the_output_loss_is_read_from_an_attribute_or_a_key():
    loss = torch.tensor(1.5)
    assert output_loss(SimpleNamespace(loss=loss, logits=None)) is loss
    assert output_loss({"loss": loss}) is loss
    for bad in ({"logits": loss}, SimpleNamespace(loss=1.5), (loss,)):
        with pytest.raises(TypeError, match="needs outputs with a .loss tensor"):
            output_loss(bad)


class Writer:
    """A run holding snapshots of θ at the given steps."""

    def __init__(self, stored: dict[int, np.ndarray]) -> None:
        self.stored, self.root = stored, Path("/runs/a")
        self.snapshots = [{"step": step} for step in stored]

    def snapshot_params(self, step: int) -> np.ndarray:
        return self.stored[step]

    def find_matching_snapshot(self, flat: np.ndarray) -> int | None:
        return next((s for s, v in self.stored.items() if np.array_equal(v, flat)), None)


def test_a_resumed_model_must_hold_the_runs_parameters_bit_for_bit():
    params = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    theta = np.array([1.0, 2.0, 3.0])
    older = np.array([1.0, 2.0, 2.5])
    check_resumed_parameters(Writer({10: older, 20: theta}), params, 20)  # equal: continue
    check_resumed_parameters(Writer({10: older}), params, 15)  # no snapshot at 15: nothing to compare
    nudged = theta.copy()
    nudged[2] = np.nextafter(np.float32(3.0), np.float32(4.0))  # one float32 ulp away
    with pytest.raises(ValueError, match="they equal the snapshot at step 20: pass resume_step=20"):
        check_resumed_parameters(Writer({20: theta, 30: nudged}), params, 30)
    with pytest.raises(ValueError, match="they match no snapshot of the run"):
        check_resumed_parameters(Writer({10: older}), params, 10)


def test_parameters_added_after_attach_are_named_once():
    model = nn.Sequential(nn.Linear(2, 2))
    attached = list(model.named_parameters())
    warned: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_about_new_parameters(model, attached, warned)  # nothing new
        model.append(nn.Linear(2, 1))
        model[1].bias.requires_grad_(False)  # frozen: not part of θ either way
    with pytest.warns(RuntimeWarning, match=r"1 trainable parameters were added .* '1.weight'.* the 2 tensors"):
        warn_about_new_parameters(model, attached, warned)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_about_new_parameters(model, attached, warned)  # once per probe
