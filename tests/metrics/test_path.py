"""``dynprobe.metrics._path``: the straight line between two states and the loss along it, against a float64
interpolation of the state dicts and a naive per-α loop over fresh copies of the model."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from dynprobe._util.tasks import ClassificationTask
from dynprobe.metrics._path import Path, path_sums


def small_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    model(torch.randn(16, 6))  # running statistics and num_batches_tracked differ between the two endpoints
    return model.eval()


def test_the_path_is_the_float64_interpolation_and_keeps_the_endpoints_exact():
    model, a, b = small_model(0), small_model(1).state_dict(), small_model(2).state_dict()
    b["1.num_batches_tracked"] = torch.tensor(7)
    path = Path.between(model, a, b)
    assert set(path.interpolated) == {k for k, v in a.items() if v.is_floating_point()}
    for alpha in (0.0, 0.25, 0.5, 0.8, 1.0):
        state = path.at(alpha)
        for name, value in a.items():
            if not value.is_floating_point():
                assert torch.equal(state[name], a[name])  # integer buffers come from params_a
                continue
            expected = (1 - alpha) * b[name].double() + alpha * a[name].double()
            np.testing.assert_allclose(state[name].double().numpy(), expected.numpy(), rtol=0, atol=1e-6)
        if alpha in (0.0, 1.0):
            endpoint = b if alpha == 0.0 else a
            assert all(torch.equal(state[n], endpoint[n]) for n in path.interpolated)
    assert not path.identical() and Path.between(model, a, a).identical()


@pytest.mark.parametrize("metric", ["loss", "error"])
def test_path_sums_equal_a_naive_loop_over_fresh_models(metric):
    model, a, b = small_model(0), small_model(1).state_dict(), small_model(2).state_dict()
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(n, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator))
               for n in (5, 9)]
    alphas = [0.0, 0.3, 0.5, 1.0]
    sums, count = path_sums(model, Path.between(model, a, b), alphas, batches, task=ClassificationTask(),
                            metric=metric, output_fn=lambda output: output)
    assert count == 14 and sums.dtype == torch.float64 and sums.shape == (4,)
    for k, alpha in enumerate(alphas):
        fresh = copy.deepcopy(model)
        fresh.load_state_dict({n: (1 - alpha) * b[n].double() + alpha * a[n].double() if a[n].is_floating_point()
                               else a[n] for n in a})
        fresh.double().eval()
        total = 0.0
        with torch.no_grad():
            for inputs, targets in batches:
                logits = fresh(inputs.double())
                if metric == "loss":
                    total += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
                else:
                    total += float((logits.argmax(dim=1) != targets).sum())
        assert float(sums[k]) == pytest.approx(total, rel=1e-5, abs=1e-5), (metric, alpha)
