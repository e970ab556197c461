"""``reestimate_batchnorm``: the one BatchNorm re-estimation (loss barrier, switching, eNTK), against PyTorch's own
train-mode update with ``momentum=None`` on a private copy (REPAIR's ``reset_bn_stats``)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from dynprobe._util.batchnorm import reestimate_batchnorm, running_stat_layers


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                          nn.Conv2d(4, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    with torch.no_grad():
        model.train()
        model(torch.randn(32, 3, 8, 8))  # statistics that differ from a reset
    return model.eval()


def pytorch_reference(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """A copy whose BatchNorm layers are reset and run in train mode with momentum=None over the batches.

    PyTorch's InstanceNorm has no cumulative average (momentum=None leaves its statistics unchanged): its
    expected statistics are the batch averages of the per-instance mean and unbiased variance of its inputs.
    """
    reference = copy.deepcopy(model).eval()
    instance_inputs: dict[str, list[torch.Tensor]] = {}
    for name, module in running_stat_layers(reference):
        module.reset_running_stats()
        module.momentum = None
        module.train()
        if isinstance(module, nn.InstanceNorm2d):
            module.register_forward_pre_hook(lambda m, args, name=name: instance_inputs.setdefault(name, []).append(
                args[0].detach().double()))
    with torch.no_grad():
        for x in batches:
            reference(x)
        for name, inputs in instance_inputs.items():
            module = reference.get_submodule(name)
            module.running_mean.copy_(torch.stack([x.mean(dim=(2, 3)).mean(0) for x in inputs]).mean(0))
            module.running_var.copy_(torch.stack([x.var(dim=(2, 3)).mean(0) for x in inputs]).mean(0))
            module.num_batches_tracked.fill_(len(inputs))
    return reference


def batches(count: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [2 * torch.randn(16, 3, 8, 8, generator=generator) + 0.5 for _ in range(count)]


def statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_matches_pytorch_cumulative_average_and_leaves_the_model_alone():
    model = make_model()
    data = batches()
    flags = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = reestimate_batchnorm(model, data)
    expected = statistics(pytorch_reference(model, data))
    assert set(result) == set(expected)
    for name, value in expected.items():
        assert result[name].dtype == value.dtype
        torch.testing.assert_close(result[name], value, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == flags


def test_in_place_writes_the_statistics_into_the_model_and_restores_flags():
    model = make_model()
    model[3].train()  # a per-module flag that must survive (dropout in train mode inside an eval model)
    flags = [m.training for m in model.modules()]
    data = [(x, torch.zeros(16)) for x in batches(2)]  # (inputs, targets) pairs as a DataLoader yields them
    returned = reestimate_batchnorm(model, data, in_place=True)
    for name, value in statistics(model).items():
        assert torch.equal(value, returned[name])
    assert int(model[1].num_batches_tracked) == 2
    assert [m.training for m in model.modules()] == flags


def test_forward_with_other_parameter_values_estimates_their_statistics():
    model = make_model()
    other = make_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))
    values = {**dict(other.named_parameters()), **dict(other.named_buffers())}
    data = batches()
    result = reestimate_batchnorm(model, data, forward=lambda x: functional_call(model, values, (x,)))
    expected = statistics(pytorch_reference(other, data))
    for name, value in expected.items():
        torch.testing.assert_close(result[name], value, rtol=1e-5, atol=1e-6)


def test_is_deterministic_with_dropout_and_draws_no_random_numbers():
    model = make_model()
    state = torch.get_rng_state()
    first = reestimate_batchnorm(model, batches())
    assert torch.equal(torch.get_rng_state(), state)
    second = reestimate_batchnorm(model, batches())
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_layers_the_forward_never_reaches_are_left_out_and_no_batches_is_an_error():
    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.BatchNorm1d(3), nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    result = reestimate_batchnorm(Partial(), [torch.randn(8, 3)])
    assert set(result) == {"used.running_mean", "used.running_var", "used.num_batches_tracked"}
    with pytest.raises(ValueError, match="no batches"):
        reestimate_batchnorm(make_model(), [])
