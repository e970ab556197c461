"""The generic eNTK path (dynprobe.kernels._generic): every strategy writes the per-sample Jacobian of v_k·f(x_i)
with respect to the named parameters, checked against a brute-force loop of one backward pass per sample and
output row."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dynprobe.kernels._calling import ModelCall
from dynprobe.kernels._generic import GENERIC_STRATEGIES, write_generic_jacobian


class SharedWeights(nn.Module):
    """A weight used twice (no structured rule applies) and a bare parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.gain = nn.Parameter(torch.tensor([0.5, -1.5, 2.0]))
        self.unused = nn.Parameter(torch.ones(2))  # its Jacobian is zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.tanh(self.linear(x))) * self.gain


def brute_force_jacobian(model: nn.Module, x: torch.Tensor, names: list[str], rows: torch.Tensor | None,
                         ) -> torch.Tensor:
    """(n, R, Σ numel): for each sample and row, one ordinary backward through the model."""
    params = dict(model.named_parameters())
    out = []
    for i in range(x.shape[0]):
        logits = model(x[i : i + 1]).reshape(-1)
        cotangents = torch.eye(logits.numel(), dtype=logits.dtype) if rows is None else rows[i]
        per_row = []
        for v in cotangents:
            grads = torch.autograd.grad(v @ logits, [params[n] for n in names], retain_graph=True,
                                        allow_unused=True)
            per_row.append(torch.cat([torch.zeros(params[n].numel(), dtype=x.dtype) if g is None else g.reshape(-1)
                                      for n, g in zip(names, grads)]))
        out.append(torch.stack(per_row))
    return torch.stack(out)


@pytest.mark.parametrize("strategy", GENERIC_STRATEGIES)
@pytest.mark.parametrize("with_rows", [False, True])
def test_every_strategy_writes_the_per_sample_jacobian(strategy, with_rows):
    torch.manual_seed(0)
    model, x = SharedWeights().double(), torch.randn(5, 3, dtype=torch.float64)
    names = ["gain", "linear.weight", "unused", "linear.bias"]  # columns follow this order
    rows = torch.randn(5, 2, 3, dtype=torch.float64) if with_rows else None
    expected = brute_force_jacobian(model, x, names, rows)
    call = ModelCall.prepare(model, x, None, torch.device("cpu"))
    values = {name: value.detach() for name, value in model.named_parameters()}
    samples = slice(1, 4)
    out = torch.full((3, expected.shape[1], expected.shape[2]), torch.nan, dtype=torch.float64)
    write_generic_jacobian(strategy, call, values, names, samples, None if rows is None else rows[samples], out)
    torch.testing.assert_close(out, expected[samples], rtol=1e-10, atol=1e-12)
