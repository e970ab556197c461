"""Planning an eNTK computation (dynprobe.kernels._planning): the cotangent rows are the hand-built one-hot,
ones or label rows, and a plan's chunks cover every output row and every differentiated parameter exactly once,
within the memory budget whenever it says it fits."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from dynprobe.kernels._calling import ModelCall
from dynprobe.kernels._planning import cotangent_rows, make_plan

CPU = torch.device("cpu")


def rows_for(mode: str, n: int = 3, c: int = 4, **kwargs) -> torch.Tensor:
    options = dict(dtype=torch.float64, device=CPU, class_index=None, labels=None, output_mask=None)
    return cotangent_rows(mode, n, c, **{**options, **kwargs})


def test_cotangent_rows_are_the_hand_built_rows_of_each_mode():
    n, c = 3, 4
    trace = rows_for("trace")
    assert trace.shape == (c, n, c)
    for k in range(c):
        for i in range(n):
            assert trace[k, i].tolist() == [1.0 if j == k else 0.0 for j in range(c)]
    assert torch.equal(rows_for("full"), trace)
    assert rows_for("logit_sum").tolist() == [[[1.0] * c] * n]
    assert rows_for("single", class_index=2).tolist() == [[[0.0, 0.0, 1.0, 0.0]] * n]
    labels = torch.tensor([3, 0, 1])
    assert rows_for("true_class", labels=labels).tolist() == [[[0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]]]


def test_masked_output_coordinates_are_zeroed_and_rows_zero_for_every_sample_dropped_except_in_full():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    trace = rows_for("trace", output_mask=mask)
    assert trace.shape[0] == 3  # logit 2 is absent from every sample
    expected = [[[float(j == k and mask[i, j]) for j in range(4)] for i in range(3)] for k in (0, 1, 3)]
    assert trace.tolist() == expected
    full = rows_for("full", output_mask=mask)
    assert full.shape == (4, 3, 4) and full[2].abs().sum() == 0  # full keeps every (sample, logit) index of H


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 16)
        self.second = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.scale = nn.Parameter(torch.ones(4))  # a bare parameter: the generic path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x))))) * self.scale


@pytest.mark.parametrize("method", ["auto", "generic"])
@pytest.mark.parametrize("mode", ["trace", "full", "logit_sum"])
@pytest.mark.parametrize("max_memory", [1 << 14, 1 << 16, 1 << 17, 1 << 30])
def test_the_chunks_cover_every_row_and_parameter_exactly_once_within_the_budget(method, mode, max_memory):
    torch.manual_seed(0)
    model, n, c = Net(), 6, 4
    call = ModelCall.prepare(model, torch.randn(n, 5), None, CPU)
    values = {name: p.detach() for name, p in model.named_parameters()}
    wrt = [name for name, _ in model.named_parameters()]
    rows = rows_for(mode, n, c, dtype=torch.float32)
    plan = make_plan(call, values, wrt=wrt, method=method, full=mode == "full", rows=rows,
                     identity_rows=mode != "logit_sum", num_outputs=c, dtype=torch.float32,
                     max_memory=max_memory, layer_of={name: name.rsplit(".", 1)[0] for name in wrt})
    chunks = plan.chunks
    assert sorted(r for chunk in chunks.row_chunks for r in chunk) == list(range(rows.shape[0]))
    units_used = Counter(k for group in chunks.structured_groups for k in group)
    assert sorted(units_used) == list(range(len(chunks.units))) and set(units_used.values()) <= {1}
    structured = {name for unit in chunks.units for name in unit.parameter_names}
    generic = Counter(plan.generic_names)
    assert set(generic.values()) <= {1} and not structured & set(generic)
    assert structured | set(generic) == set(wrt)
    if method == "generic":
        assert not structured
    else:
        assert "scale" in generic and {"head.weight", "first.bias"} <= structured
    assert 1 <= chunks.sample_chunk <= n
    if chunks.fits:
        assert chunks.estimated_bytes <= max_memory
    if max_memory == 1 << 30:
        assert chunks.fits
    assert plan.size == (n * c if mode == "full" else n)
    assert plan.layers == ("scale", "first", "second", "head")  # named_parameters() order: own parameters first
    for unit, layer in zip(chunks.units, plan.unit_layers):
        assert all(name.startswith(plan.layers[layer] + ".") for name in unit.parameter_names)
    assert {name: plan.layers[layer] for name, layer in plan.generic_layers.items()} == {
        name: name.rsplit(".", 1)[0] for name in generic}
