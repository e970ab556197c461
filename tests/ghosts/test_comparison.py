"""The slices of vec θ that ``L2_active`` measures (``dynprobe.ghosts.comparison.active_slices``): whole inert
tensors and inert parts ``name[start:stop]`` are left out, exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dynprobe.ghosts.comparison import active_slices


def _kept(model: nn.Module, inert: list[str]) -> list[int]:
    theta = torch.arange(sum(p.numel() for p in model.parameters()))
    return torch.cat([theta[part] for part in active_slices(model, inert)]).tolist()


def test_active_slices_leave_out_exactly_the_inert_tensors_and_parts():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 6))  # vec θ: 0.weight 0-5, 0.bias 6-8, 1.weight 9-26, 1.bias
    everything = list(range(33))
    assert _kept(model, []) == everything
    assert _kept(model, ["0.bias"]) == [i for i in everything if not 6 <= i < 9]
    assert _kept(model, ["1.bias[2:4]"]) == [i for i in everything if i not in (29, 30)]
    assert _kept(model, ["1.bias[0:2]", "0.weight", "1.bias[4:6]"]) == list(range(6, 27)) + [29, 30]


def test_an_inert_name_that_is_no_parameter_is_an_error():
    with pytest.raises(ValueError, match="not trainable parameters"):
        active_slices(nn.Linear(2, 3), ["attn.in_proj_bias[0:4]"])
