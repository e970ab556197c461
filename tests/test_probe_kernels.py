"""The eNTK inside the Probe: probe set, stored kernels vs a naive autograd loop, S rows, ghost S, cone curves."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import dynprobe
from dynprobe import Ghosts, KernelConfig, schedule

from .conftest import make_data


class SmoothNet(nn.Module):
    """tanh activations: the float32 engine and the float64 reference agree without ReLU-kink flips."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 5))

    def forward(self, x):
        return self.net(x)


def naive_trace_ntk(model, x):
    """Σ_k J_k J_kᵀ by one autograd.grad per (sample, logit), in float64."""
    model = model.double().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1].double())[0]
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[k], params,
                                                                                         retain_graph=True)])
                                 for k in range(out.shape[0])]))
    J = torch.stack(rows)  # n, c, P
    return torch.einsum("ikp,jkp->ij", J, J)


@pytest.fixture()
def kernel_run(tmp_path):
    torch.manual_seed(0)
    data = make_data(n_test=60)
    model = SmoothNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r",
                           schedule=schedule.at([0, 2, 5, 10, 15]), kernel=KernelConfig(n=20, seed=1),
                           ghosts=Ghosts(at=[0, 5], barrier=False), errors="raise")
    criterion = probe.watch(nn.CrossEntropyLoss())
    for _ in range(15):
        index = torch.randint(0, 256, (32,))
        loss = criterion(model(data.x_train[index]), data.y_train[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probe.close()
    return data, dynprobe.load_run(tmp_path / "r")


def test_stored_kernels_match_a_naive_float64_loop_on_the_restored_snapshot(kernel_run):
    data, run = kernel_run
    probe_indices = np.load(run.path / "kernel_probe_indices.npy")
    x = data.x_test[torch.as_tensor(run.eval_indices[probe_indices])]
    for index in (0, 3):
        model = SmoothNet()
        model.load_state_dict(run.state_dict(index))
        expected = naive_trace_ntk(model, x).numpy()
        np.testing.assert_allclose(run.kernel(index), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_S_rows_equal_kernel_distances_of_the_stored_kernels(kernel_run):
    _, run = kernel_run
    K = np.stack([run.kernel(i).ravel() for i in range(len(run))])
    unit = K / np.linalg.norm(K, axis=1, keepdims=True)
    expected = 1 - unit @ unit.T
    np.fill_diagonal(expected, 0)
    np.testing.assert_allclose(run.S, expected, atol=1e-12)
    assert run.has_kernels and list(run.kernel_steps) == [0, 2, 5, 10, 15]


def test_probe_set_is_class_balanced_and_seeded(kernel_run):
    data, run = kernel_run
    probe_indices = np.load(run.path / "kernel_probe_indices.npy")
    labels = data.y_test.numpy()[run.eval_indices[probe_indices]]
    counts = np.bincount(labels, minlength=5)
    available = np.bincount(data.y_test.numpy(), minlength=5)
    assert counts.sum() == 20 and np.all((counts >= np.minimum(4, available)))


def test_ghost_S_is_zero_for_the_control_and_positive_otherwise(kernel_run):
    _, run = kernel_run
    control, perturbed = run.chaos["S"][0], run.chaos["S"][1]
    assert np.all(control == 0.0)
    assert np.all(perturbed[1:] > 0)


def test_cone_curves(kernel_run):
    _, run = kernel_run
    t, s = run.kernel_distance_to(5)
    assert list(t) == [0, 2, 5, 10, 15] and s[2] == 0 and np.all(s[[0, 1, 3, 4]] > 0)
    t, v = run.kernel_velocity()
    assert list(t) == [0, 2, 5, 10] and np.allclose(v, [run.S[i, i + 1] / (run.steps[i + 1] - run.steps[i])
                                                        for i in range(4)])
    t, v = run.kernel_velocity(5)
    assert list(t) == [0, 5, 10]
    with pytest.raises(KeyError, match="not recorded"):
        run.kernel_distance_to(3)


def test_every_k_snapshots_and_nan_rows_in_between(tmp_path):
    torch.manual_seed(0)
    data = make_data(n_test=40)
    model = SmoothNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r", schedule=1,
                           kernel=KernelConfig(n=10, every=2), errors="raise")
    for _ in range(4):
        loss = nn.functional.cross_entropy(model(data.x_train[:16]), data.y_train[:16])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probe.close()
    run = dynprobe.load_run(tmp_path / "r")
    assert list(run.kernel_steps) == [0, 2, 4]
    assert np.isnan(run.S[1]).all() and np.isfinite(run.S[np.ix_([0, 2, 4], [0, 2, 4])]).all()
    assert run.kernel(1) is None


def test_probe_set_larger_than_the_eval_set_is_rejected(tmp_path):
    data = make_data(n_test=30)
    model = SmoothNet()
    with pytest.raises(ValueError, match=r"KernelConfig\(n=64\)"):
        dynprobe.Probe(model, torch.optim.SGD(model.parameters(), lr=0.1), eval_data=(data.x_test, data.y_test),
                       out=tmp_path / "r", kernel=KernelConfig(n=64))


def test_kernel_must_be_a_kernel_config(tmp_path):
    data = make_data()
    model = SmoothNet()
    with pytest.raises(TypeError, match="KernelConfig"):
        dynprobe.Probe(model, torch.optim.SGD(model.parameters(), lr=0.1), eval_data=(data.x_test, data.y_test),
                       out=tmp_path / "r", kernel=128)
