"""The eNTK inside the Probe: probe set, stored kernels vs a naive autograd loop, S rows, ghost S, cone curves."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import dynprobe
from dynprobe import Ghosts, KernelConfig, schedule
from dynprobe._util.evaluation import EvalSet, balanced_subset
from dynprobe.config import Barriers
from dynprobe.recording.cadence import planned_snapshots
from dynprobe.recording.kernel_probe import KernelMeasure

from ..conftest import make_data


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
                           schedule=schedule.at([0, 2, 5, 10, 15]), kernel=KernelConfig(n=20, seed=1, lag_steps=0),
                           ghosts=Ghosts(at=[0, 5]), barriers=Barriers(ghosts=False), errors="raise")
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
        model.load_state_dict(run.state_dict(snapshot_index=index))
        expected = naive_trace_ntk(model, x).numpy()
        np.testing.assert_allclose(run.kernel(snapshot_index=index), expected, rtol=1e-5,
                                   atol=1e-6 * np.abs(expected).max())


def test_S_rows_equal_kernel_distances_of_the_stored_kernels(kernel_run):
    _, run = kernel_run
    K = np.stack([run.kernel(snapshot_index=i).ravel() for i in range(len(run))])
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
    t, v = run.kernel_velocity()  # at the most common gap (5): S between snapshots exactly 5 steps apart
    assert list(t) == [0, 5, 10] and np.array_equal(v, [run.S[0, 2], run.S[2, 3], run.S[3, 4]])
    t, v = run.kernel_velocity(2)
    assert list(t) == [0] and np.array_equal(v, [run.S[0, 1]])
    with pytest.raises(KeyError, match="not recorded"):
        run.kernel_distance_to(3)


def test_every_k_snapshots_and_nan_rows_in_between(tmp_path):
    torch.manual_seed(0)
    data = make_data(n_test=40)
    model = SmoothNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r", schedule=1,
                           kernel=KernelConfig(n=10, every_snapshots=2), errors="raise")
    for _ in range(4):
        loss = nn.functional.cross_entropy(model(data.x_train[:16]), data.y_train[:16])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probe.close()
    run = dynprobe.load_run(tmp_path / "r")
    assert list(run.kernel_steps) == [0, 2, 4]
    assert np.isnan(run.S[1]).all() and np.isfinite(run.S[np.ix_([0, 2, 4], [0, 2, 4])]).all()
    assert run.kernel(snapshot_index=1) is None


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


# ----------------------------------------------------------------------------- KernelConfig
def test_kernel_config_spellings():
    assert KernelConfig(mode="single:3") == KernelConfig(mode="single", class_index=3)
    assert KernelConfig(every_snapshots=3).to_config()["every_snapshots"] == 3
    config = KernelConfig(lag_steps=5, per_layer=True)
    assert config.to_config()["lag_steps"] == 5 and config.to_config()["probe_set"] == "eval"
    for removed in ("every", "lag"):  # one spelling per option
        with pytest.raises(TypeError):
            KernelConfig(**{removed: 5})


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"n": 1}, ValueError, r"KernelConfig\(n=\) must be an int >= 2"),
    ({"mode": "traces"}, ValueError, r"KernelConfig\(mode=\) must be one of"),
    ({"mode": "single:x"}, ValueError, r"'single:k' needs an integer"),
    ({"mode": "single:2", "class_index": 3}, ValueError, "disagree"),
    ({"mode": "single"}, ValueError, r"class_index=k, or write mode='single:k'"),
    ({"class_index": 2}, ValueError, "only used with mode='single'"),
    ({"every_snapshots": 0}, ValueError, r"every_snapshots=\) must be an int >= 1"),
    ({"bn": "train"}, ValueError, "mixes the samples"),
    ({"max_memory": -1}, ValueError, "max_memory"),
    ({"per_layer": 1}, TypeError, "per_layer"),
    ({"lag_steps": -1}, ValueError, r"lag_steps=\) must be an int >= 0"),
    ({"probe_set": "test"}, ValueError, "'eval' or 'train'"),
    ({"probe_set": "train"}, ValueError, r"needs train_data=\(inputs, targets\)"),
    ({"train_data": (torch.zeros(4, 2), torch.zeros(4))}, ValueError, "only used with probe_set='train'"),
    ({"probe_set": "train", "train_data": torch.zeros(4)}, TypeError, r"train_data=\) must be \(inputs, targets\)"),
    ({"probe_set": "train", "train_data": (torch.zeros(4, 2), torch.zeros(3))}, ValueError, "same first dimension"),
    ({"probe_set": "train", "train_data": (torch.zeros(40, 2), torch.zeros(40)), "n": 64}, ValueError,
     "more probe examples than train_data holds"),
])
def test_kernel_config_errors_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        KernelConfig(**kwargs)


# ----------------------------------------------------------------------------- cadence: every_snapshots, lag
def drive(measure: KernelMeasure, scheduled_steps: list[int], last: int) -> list[tuple[int, str, bool]]:
    """Run the probe's loop logic over steps 0..last: (step, kernel_role, scheduled) for every snapshot taken."""
    taken = []
    for step in range(last + 1):
        scheduled = step in scheduled_steps
        if scheduled or measure.snapshot_due(step):
            kernel = measure.at_snapshot(step, scheduled=scheduled)
            record = measure.snapshot_record()
            assert (kernel is None) == ("kernel_role" not in record)
            assert record.get("companion_only", False) == (not scheduled)
            taken.append((step, record.get("kernel_role"), scheduled))
    return taken


def test_lag_places_companions_and_every_snapshots_counts_scheduled_snapshots_only():
    data = make_data(n_test=40)
    model = SmoothNet()
    eval_set = EvalSet.from_user((data.x_test, data.y_test), max_examples=40, seed=0)
    measure = KernelMeasure(KernelConfig(n=8, every_snapshots=2, lag_steps=3), model, eval_set,
                            output_fn=lambda out: out, device=torch.device("cpu"))
    taken = drive(measure, [0, 1, 2, 5, 10, 12], last=16)
    # scheduled snapshot indices 0, 2, 4 (steps 0, 2, 10) are primary; companions at 3 (extra), 5 (scheduled, not
    # primary by the cadence) and 13 (extra); step 12 (index 5) has none.
    assert taken == [(0, "primary", True), (1, None, True), (2, "primary", True), (3, "companion", False),
                     (5, "companion", True), (10, "primary", True), (12, None, True), (13, "companion", False)]
    # a resumed run continues the same cadence from its records
    records = [{"step": s, "kernel": role is not None, **({"kernel_role": role} if role else {}),
                **({} if scheduled else {"companion_only": True})} for s, role, scheduled in taken[:5]]
    resumed = KernelMeasure(KernelConfig(n=8, every_snapshots=2, lag_steps=3), model, eval_set,
                            output_fn=lambda out: out, device=torch.device("cpu"))
    resumed.resume(records)
    assert [t for t in drive(resumed, [10, 12], last=16) if t[0] > 5] == taken[5:]
    # the plan estimate_cost and the disk projection use is the same cadence, companions included; the snapshot
    # at close counts as scheduled
    plan = planned_snapshots(schedule.at([0, 1, 2, 5, 10, 12]), 16, KernelConfig(n=8, every_snapshots=2, lag_steps=3),
                             snapshot_on_close=False)
    assert [(p.step, p.kernel_role) for p in plan] == [(step, role) for step, role, _ in taken]
    closing = planned_snapshots(schedule.at([0, 1, 2, 5, 10, 12]), 16, KernelConfig(n=8, lag_steps=3))
    assert [(p.step, p.kernel_role) for p in closing][-3:] == [(13, "companion"), (15, "companion"), (16, "primary")]


def test_per_layer_arrays_come_with_the_snapshot_that_measured_them():
    data = make_data(n_test=40)
    model = SmoothNet()
    eval_set = EvalSet.from_user((data.x_test, data.y_test), max_examples=40, seed=0)
    measure = KernelMeasure(KernelConfig(n=8, per_layer=True), model, eval_set, output_fn=lambda out: out,
                            device=torch.device("cpu"))
    kernel = measure.at_snapshot(0)
    arrays = measure.snapshot_arrays()
    assert list(arrays) == ["kernel_layers"] and arrays["kernel_layers"].shape == (3, 8, 8)
    np.testing.assert_allclose(arrays["kernel_layers"].sum(axis=0), kernel.numpy(), rtol=1e-12)
    assert measure.snapshot_arrays() == {}  # handed out once
    np.testing.assert_allclose(measure.measure().numpy(), kernel.numpy(), rtol=1e-12)


def test_kernel_factory_replaces_the_engine():
    data = make_data(n_test=40)
    model = SmoothNet()
    eval_set = EvalSet.from_user((data.x_test, data.y_test), max_examples=40, seed=0)
    seen = []

    def factory(make_engine):
        engine = make_engine([name for name, _ in model.named_parameters()][-2:])
        seen.append(engine)
        return engine

    measure = KernelMeasure(KernelConfig(n=8), model, eval_set, output_fn=lambda out: out,
                            device=torch.device("cpu"), kernel_factory=factory)
    assert measure.engine is seen[0] and len(measure.engine.wrt) == 2
    with pytest.raises(ValueError, match="per_layer"):
        KernelMeasure(KernelConfig(n=8, per_layer=True), model, eval_set, output_fn=lambda out: out,
                      device=torch.device("cpu"), kernel_factory=lambda make: (lambda params=None: None))


# ----------------------------------------------------------------------------- probe set: eval or train
def test_train_probe_set_draws_class_balanced_training_examples_and_says_so(tmp_path):
    torch.manual_seed(0)
    data = make_data(n_test=40)
    model = SmoothNet()
    config = KernelConfig(n=10, probe_set="train", train_data=(data.x_train, data.y_train), seed=3)
    probe = dynprobe.Probe(model, torch.optim.SGD(model.parameters(), lr=0.1), eval_data=(data.x_test, data.y_test),
                           out=tmp_path / "r", schedule=schedule.at([0]), kernel=config, errors="raise")
    probe.close()
    run = dynprobe.load_run(tmp_path / "r")
    chosen = np.load(run.path / "kernel_probe_indices.npy")
    assert np.bincount(data.y_train.numpy()[chosen], minlength=5).tolist() == [2, 2, 2, 2, 2]
    expected = naive_trace_ntk(model, data.x_train[torch.as_tensor(chosen)]).numpy()
    np.testing.assert_allclose(run.kernel(step=0), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    convention = run.manifest["conventions"]["kernel"]
    assert convention["probe_set"] == "train" and "train_data" in convention["probe_set_draw"]
    assert "train_data" not in json.dumps(run.manifest["config"]["kernel"]) or \
        run.manifest["config"]["kernel"]["probe_set"] == "train"


def test_probe_set_of_non_class_targets_is_a_seeded_uniform_draw():
    targets = torch.randn(50)
    first, second = balanced_subset(targets, 12, seed=4), balanced_subset(targets, 12, seed=4)
    assert torch.equal(first, second) and len(set(first.tolist())) == 12
    assert torch.equal(first, torch.randperm(50, generator=torch.Generator().manual_seed(4))[:12].sort().values)
    tokens = torch.randint(0, 7, (50, 6))
    assert torch.equal(balanced_subset(tokens, 12, seed=4), first)
