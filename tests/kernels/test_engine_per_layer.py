"""Per-layer eNTK: H = Σ_l H_l from one engine call, each H_l equal to the kernel of that layer's parameters alone
(the engine restricted by ``wrt=``); through the Probe, ``run.kernel_layers`` and ``run.S_layers``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import dynprobe
from dynprobe import KernelConfig, schedule
from dynprobe._util.distances import pairwise_cosine_dissimilarity
from dynprobe._util.modules import layer_slices
from dynprobe.kernels.engine import NTKEngine, empirical_ntk
from dynprobe.metrics import functions as metrics

from ..conftest import make_data
from .test_engine import make_double_case

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def layer_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Parameter names per layer — the module owning them, in first-appearance order — computed directly."""
    result: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            result.setdefault(name.rpartition(".")[0], []).append(name)
    return result


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", ["mlp", "cnn_batchnorm", "transformer", "transformer_mha", "dict_inputs"])
@pytest.mark.parametrize("mode", ["trace", "full"])
def test_layer_kernels_sum_to_the_total_and_each_equals_that_layer_alone(case, mode):
    model, inputs, output_fn = make_double_case(case)
    engine = NTKEngine(model, inputs, mode=mode, output_fn=output_fn)
    layers = engine.per_layer()
    expected_layers = layer_parameters(model)
    assert list(layers) == list(expected_layers) == [name for name, _ in layer_slices(model.named_parameters())]
    assert relative(sum(layers.values()), engine()) < 1e-12
    for layer, names in expected_layers.items():
        alone = empirical_ntk(model, inputs, mode=mode, output_fn=output_fn, wrt=names)
        assert relative(layers[layer], alone) < 1e-12, layer
        assert torch.equal(layers[layer], layers[layer].T)


def test_layer_kernels_are_exact_when_the_plan_is_chunked():
    model, inputs, _ = make_double_case("cnn_batchnorm")
    whole = NTKEngine(model, inputs).per_layer()
    with pytest.warns(UserWarning, match="max_memory"):
        tiny = NTKEngine(model, inputs, max_memory=20_000)
    assert not tiny.plan.chunks.direct and len(tiny.plan.chunks.structured_groups) > 1
    for layer, kernel in tiny.per_layer().items():
        assert relative(kernel, whole[layer]) < 1e-12, layer


def test_pairwise_cosine_dissimilarity_matches_the_metric():
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 30, generator=generator, dtype=torch.float64)
    rows[3] = 2.5 * rows[1]  # a rescaled copy: S exactly 0
    rows[4] = 0.0  # a zero vector: NaN
    result = pairwise_cosine_dissimilarity(rows.numpy())
    for i in range(4):
        for j in range(4):
            assert result[i, j] == pytest.approx(metrics.kernel_distance(rows[i], rows[j]), rel=1e-12, abs=1e-15)
    assert result[1, 3] == pytest.approx(0.0, abs=1e-16) and np.isnan(result[4]).all() and np.isnan(result[:, 4]).all()


class SmoothNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_probe_stores_per_layer_kernels_and_S_layers(tmp_path):
    torch.manual_seed(0)
    data = make_data(n_test=40)
    model = SmoothNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r",
                           schedule=schedule.at([0, 3, 6, 9]), errors="raise",
                           kernel=KernelConfig(n=12, per_layer=True, every_snapshots=1))
    criterion = probe.watch(nn.CrossEntropyLoss())
    for _ in range(9):
        index = torch.randint(0, 256, (32,))
        loss = criterion(model(data.x_train[index]), data.y_train[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probe.close()
    run = dynprobe.load_run(tmp_path / "r")
    assert run.layers == ["net.0", "net.2", "net.4"]
    x = data.x_test[torch.as_tensor(run.eval_indices[np.load(run.path / "kernel_probe_indices.npy")])]
    names = layer_parameters(model)
    for step in (0, 9):
        stored = run.kernel_layers(step=step)
        assert stored.shape == (3, 12, 12)
        np.testing.assert_allclose(stored.sum(axis=0), run.kernel(step=step), rtol=1e-12, atol=0)
        restored = SmoothNet()
        restored.load_state_dict(run.state_dict(step=step))
        for k, layer in enumerate(run.layers):
            alone = empirical_ntk(restored.double(), x.double(), wrt=names[layer]).numpy()
            np.testing.assert_allclose(stored[k], alone, rtol=1e-5, atol=1e-6 * np.abs(alone).max())
    S_layers = run.S_layers
    assert S_layers.shape == (3, 4, 4)
    for k in range(3):
        for i in range(4):
            for j in range(4):
                expected = metrics.kernel_distance(run.kernel_layers(snapshot_index=i)[k],
                                                   run.kernel_layers(snapshot_index=j)[k])
                assert S_layers[k, i, j] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert np.all(np.isfinite(S_layers)) and not np.allclose(S_layers[0], S_layers[2])
