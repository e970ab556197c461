"""How the eNTK engine calls the model (dynprobe.kernels._calling.ModelCall): the probe inputs are validated and
copied, a slice of samples gives the model's own output on those rows, logits are flattened per sample, and a
forward that mixes samples is refused."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dynprobe.kernels._calling import ModelCall


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.linear(x) * scale + y


class CentersTheBatch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=0, keepdim=True)  # each sample's output depends on the others


def values_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def test_a_slice_of_samples_gives_the_models_output_on_those_rows():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), torch.randn(6, 4)
    call = ModelCall.prepare(model, x, None, torch.device("cpu"))
    assert call.n == 6 and call.positional
    x.add_(100.0)  # the call holds its own copy of the probe inputs
    expected = model(x - 100.0)
    torch.testing.assert_close(call.forward(values_of(model), slice(2, 5)), expected[2:5])
    single = call.single(4)
    assert single.n == 1
    torch.testing.assert_close(single.forward(values_of(model), slice(0, 1)), expected[4:5])


def test_keyword_inputs_pass_tensors_per_sample_and_constants_unchanged():
    torch.manual_seed(1)
    model = TwoInputs()
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    call = ModelCall.prepare(model, {"x": x, "y": y, "scale": 3.0}, None, torch.device("cpu"))
    assert not call.positional and dict(call.constants) == {"scale": 3.0} and set(call.batched) == {"x", "y"}
    torch.testing.assert_close(call.forward(values_of(model), slice(1, 3)), model(x[1:3], y[1:3], scale=3.0))


@pytest.mark.parametrize("inputs, error, match", [
    ({"x": torch.zeros(4, 3), "y": torch.zeros(5, 2)}, ValueError, "same first"),
    ({"x": torch.zeros(4, 3), "y": torch.tensor(1.0)}, ValueError, "same first"),
    ({"scale": 2.0}, ValueError, "no tensor values"),
    (torch.zeros(0, 3), ValueError, "no samples"),
    ([torch.zeros(2, 3)], TypeError, "tensor or a mapping"),
])
def test_malformed_probe_inputs_are_refused(inputs, error, match):
    with pytest.raises(error, match=match):
        ModelCall.prepare(nn.Linear(3, 2), inputs, None, torch.device("cpu"))


def test_logits_are_selected_then_flattened_per_sample():
    call = ModelCall.prepare(nn.Identity(), torch.zeros(2, 1), lambda out: out["logits"], torch.device("cpu"))
    output = {"logits": torch.arange(12.0).reshape(2, 2, 3)}
    torch.testing.assert_close(call.to_logits(output, 2), torch.arange(12.0).reshape(2, 6))
    with pytest.raises(ValueError, match="samples on their first dimension"):
        call.to_logits({"logits": torch.zeros(3, 2)}, 2)
    with pytest.raises(TypeError, match="not a tensor of logits"):
        call.selected({"logits": (torch.zeros(2),)})


def test_a_forward_that_mixes_samples_is_refused_and_an_independent_one_gives_its_output_shape():
    x = torch.randn(5, 4)
    mixing = ModelCall.prepare(CentersTheBatch(), x, None, torch.device("cpu"))
    with pytest.raises(ValueError, match="depends on the other samples"):
        mixing.check_independence({})
    model = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)))
    independent = ModelCall.prepare(model, x, None, torch.device("cpu"))
    assert independent.check_independence(values_of(model)) == (2, 3)
