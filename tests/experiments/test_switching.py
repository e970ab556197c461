"""Tests of dynprobe.switching_experiment: standard training to t, linearized training from θ_t to T (Fig. 6).

The reference for a switch point is written here independently of dynprobe.experiments.linear: the model's Jacobian at
θ_t materialized by ``torch.func.jacrev`` in float64 on every batch, f_lin = f(θ_t) + J(θ_t)(θ − θ_t), the
cross-entropy gradient Jᵀ(softmax(f_lin) − onehot(y))/B written out by hand, and SGD with momentum and weight
decay as hand-written update rules.
"""
from __future__ import annotations

import copy
import hashlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

import dynprobe
from dynprobe import schedule
from dynprobe.store.records import read_switching_results

from ..conftest import MLP, SmallCNN, make_data

STEPS = 12
SNAPSHOTS = [0, 2, 4, 8, 12]
BATCH = 16
MOMENTUM = 0.9


def lr_schedule(step: int) -> float:
    """A step schedule, so that continuing it at the switch step is observable."""
    return 0.1 if step < 6 else 0.03


class Stream:
    """The standard run's batches by step (seeded by the step), counting how often a batch was asked for."""

    def __init__(self, data, batch_size: int = BATCH) -> None:
        self.data, self.batch_size, self.calls = data, batch_size, 0

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        generator = torch.Generator().manual_seed(1000 + step)
        index = torch.randint(0, self.data.x_train.shape[0], (self.batch_size,), generator=generator)
        return self.data.x_train[index], self.data.y_train[index]


class ReplayedIterable:
    """A re-iterable stream: every ``iter()`` yields the whole stream from batch 0."""

    def __init__(self, batch_at, steps: int) -> None:
        self.batch_at, self.steps = batch_at, steps

    def __iter__(self):
        return (self.batch_at(step) for step in range(self.steps))


class Setup:
    def __init__(self, root: Path, make_model, shape, *, lr=lr_schedule, weight_decay: float = 0.0, seed: int = 0):
        self.make_model, self.lr, self.weight_decay = make_model, lr, weight_decay
        self.data = make_data(shape, n_train=128, n_test=64, classes=5, seed=seed)
        self.stream = Stream(self.data)
        self.optimizer_states: dict[int, dict] = {}
        torch.manual_seed(seed)
        model = make_model()
        optimizer = self.optimizer(model.parameters())
        with dynprobe.Probe(model, optimizer, eval_data=(self.data.x_test, self.data.y_test), out=root,
                            schedule=schedule.at(SNAPSHOTS)) as probe:
            criterion = probe.watch(nn.CrossEntropyLoss())
            model.train()
            for step in range(STEPS):
                if step in SNAPSHOTS:
                    self.optimizer_states[step] = copy.deepcopy(optimizer.state_dict())
                for group in optimizer.param_groups:
                    group["lr"] = lr(step)
                x, y = self.stream(step)
                loss = criterion(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        self.run = dynprobe.load_run(root)
        self.stream.calls = 0

    def optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=0.1, momentum=MOMENTUM, weight_decay=self.weight_decay)

    @property
    def eval_data(self):
        return self.data.x_test, self.data.y_test

    def switch(self, switch_steps, **overrides):
        arguments = dict(switch_steps=switch_steps, total_steps=STEPS, optimizer_factory=self.optimizer,
                         lr_at=self.lr, progress=False)
        arguments.update(overrides)
        train_loader = arguments.pop("train_loader", self.stream)
        return dynprobe.switching_experiment(self.run, self.make_model, train_loader, self.eval_data, **arguments)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is as fast, and on a busy 2-core machine two threads' OpenMP barriers
    were measured to make a small conv2d ~150× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def mlp_run(tmp_path) -> Setup:
    return Setup(tmp_path / "mlp", MLP, (20,))


@pytest.fixture(scope="module")
def untouched_mlp_run(tmp_path_factory) -> Setup:
    """Shared by the tests whose calls fail before writing anything (checked at the end of the module)."""
    return Setup(tmp_path_factory.mktemp("shared") / "mlp", MLP, (20,))


@pytest.fixture()
def cnn_run(tmp_path) -> Setup:
    return Setup(tmp_path / "cnn", lambda: SmallCNN(classes=5), (3, 8, 8), weight_decay=1e-2)


def snapshot_model(setup: Setup, step: int) -> nn.Module:
    model = setup.make_model()
    model.load_state_dict(setup.run.state_dict(step=step), strict=False)
    return model.double().eval()


def reference_switch(setup: Setup, t: int, *, weight_decay: float = 0.0, weight_decay_on: str = "theta",
                     momentum_buffers: dict[str, torch.Tensor] | None = None,
                     buffers: dict[str, torch.Tensor] | None = None) -> tuple[float, float]:
    """Linearized training from θ_t to STEPS with a materialized float64 Jacobian; (eval loss, eval accuracy)."""
    model = snapshot_model(setup, t)
    buffers = {name: b.double() if b.is_floating_point() else b
               for name, b in (buffers or dict(model.named_buffers())).items()}
    base = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    theta = {name: p.clone() for name, p in base.items()}
    velocity = ({name: momentum_buffers[name].double().clone() for name in base} if momentum_buffers is not None
                else None)

    def f(params, x):
        return functional_call(model, {**params, **buffers}, (x,))

    def linearized(x):
        jacobian = jacrev(f)(base, x)
        out = f(base, x)
        for name in base:
            out = out + torch.einsum("bcp,p->bc", jacobian[name].flatten(2), (theta[name] - base[name]).reshape(-1))
        return out, jacobian

    for step in range(t, STEPS):
        x, y = setup.stream(step)
        logits, jacobian = linearized(x.double())
        residual = (torch.softmax(logits, dim=1) - F.one_hot(y, logits.shape[1]).double()) / x.shape[0]
        new_velocity = {}
        for name in base:
            grad = torch.einsum("bcp,bc->p", jacobian[name].flatten(2), residual).reshape(base[name].shape)
            decayed = theta[name] if weight_decay_on == "theta" else theta[name] - base[name]
            grad = grad + weight_decay * decayed
            new_velocity[name] = grad if velocity is None else MOMENTUM * velocity[name] + grad
        velocity = new_velocity
        for name in base:
            theta[name] = theta[name] - setup.lr(step) * velocity[name]
    logits, _ = linearized(setup.data.x_test.double())
    loss = F.cross_entropy(logits, setup.data.y_test).item()
    accuracy = (logits.argmax(1) == setup.data.y_test).double().mean().item()
    return loss, accuracy


def files_outside_switching(root: Path) -> dict[str, str]:
    """Relative path → SHA-1 of every file (``"dir"`` for folders), outside ``switching/``."""
    return {path.relative_to(root).as_posix(): hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            for path in sorted(root.rglob("*")) if path.relative_to(root).parts[0] != "switching"}


# ---------------------------------------------------------------------------------------------- results


def test_one_result_per_switch_step_in_the_run_directory_with_conventions(mlp_run):
    result = mlp_run.switch([0, 4, 8, 12])
    assert result["switch_step"].tolist() == [0, 4, 8, 12]
    assert result["linearized_steps"].tolist() == [12, 8, 4, 0]
    assert result["computed"] == [0, 4, 8, 12]
    lines = (mlp_run.run.path / "switching" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4
    switching = dynprobe.load_run(mlp_run.run.path).switching
    assert switching["switch_step"].tolist() == [0, 4, 8, 12]
    np.testing.assert_array_equal(switching["eval_loss"], result["eval_loss"])
    np.testing.assert_array_equal(switching["eval_accuracy"], result["eval_accuracy"])
    records = read_switching_results(mlp_run.run)
    assert [r["anchor"] for r in records] == ["lazy", None, None, "standard"]
    first = records[0]
    assert first["config"]["weight_decay_on"] == "theta" and first["config"]["optimizer"]["class"] == "SGD"
    assert first["config"]["optimizer_state"].startswith("fresh")
    assert "frozen" in first["conventions"]["batchnorm"] and first["conventions"]["dropout"] == "off"
    assert first["lr_at_switch"] == [0.1] and records[2]["lr_at_switch"] == [0.03]
    assert all(r["status"] == "finished" for r in records)


def test_lazy_anchor_matches_materialized_jacobian_reference(mlp_run):
    result = mlp_run.switch([0])
    loss, accuracy = reference_switch(mlp_run, 0)
    assert result["eval_loss"][0] == pytest.approx(loss, rel=1e-5)
    assert result["eval_accuracy"][0] == pytest.approx(accuracy)


def test_middle_switch_continues_the_lr_schedule_from_the_switch_step(mlp_run):
    result = mlp_run.switch([4, 8])
    for i, t in enumerate([4, 8]):
        loss, accuracy = reference_switch(mlp_run, t)
        assert result["eval_loss"][i] == pytest.approx(loss, rel=1e-5)
        assert result["eval_accuracy"][i] == pytest.approx(accuracy)
    # and it is not the schedule restarted at step 0 (lr 0.1 for the first 6 linearized steps)
    with pytest.warns(RuntimeWarning, match="lr_at disagrees"):
        restarted = mlp_run.switch([4], lr_at=lambda s: lr_schedule(max(0, s - 4)))
    assert restarted["eval_loss"][0] != pytest.approx(result["eval_loss"][0], rel=1e-5)


@pytest.mark.parametrize("weight_decay_on", ["theta", "delta"])
def test_batchnorm_network_uses_snapshot_statistics_and_weight_decay_placement(cnn_run, weight_decay_on):
    result = cnn_run.switch([8], weight_decay_on=weight_decay_on)
    loss, accuracy = reference_switch(cnn_run, 8, weight_decay=1e-2, weight_decay_on=weight_decay_on)
    assert result["eval_loss"][0] == pytest.approx(loss, rel=1e-5)
    assert result["eval_accuracy"][0] == pytest.approx(accuracy)


def batchnorm_statistics_by_hand(setup: Setup, t: int, steps: range) -> dict[str, torch.Tensor]:
    """Per-channel batch mean and unbiased variance of each BatchNorm input, averaged over the batches of
    ``steps`` (BatchNorm layers normalizing with batch statistics, as when they are re-estimated)."""
    model = snapshot_model(setup, t)
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in norms}
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].detach()))
             for name, m in norms.items()]
    for m in norms.values():
        m.train()
    with torch.no_grad():
        for step in steps:
            model(setup.stream(step)[0].double())
    for hook in hooks:
        hook.remove()
    statistics = {}
    for name, inputs in seen.items():
        statistics[f"{name}.running_mean"] = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0)
        statistics[f"{name}.running_var"] = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in inputs]).mean(0)
        statistics[f"{name}.num_batches_tracked"] = torch.tensor(len(inputs))
    return statistics


@pytest.mark.parametrize("t, batches, steps", [(0, 3, range(0, 3)), (8, 6, range(6, 12))])  # 8: the last 6
def test_reset_bn_batches_re_estimates_statistics_on_the_stream_from_the_switch_step(cnn_run, t, batches, steps):
    result = cnn_run.switch([t], reset_bn_batches=batches)
    statistics = batchnorm_statistics_by_hand(cnn_run, t, steps)
    assert not torch.allclose(statistics["features.1.running_var"],  # the snapshot's own statistics differ
                              cnn_run.run.state_dict(step=t)["features.1.running_var"].double())
    loss, accuracy = reference_switch(cnn_run, t, weight_decay=1e-2, buffers=statistics)
    assert result["eval_loss"][0] == pytest.approx(loss, rel=1e-5)
    assert result["eval_accuracy"][0] == pytest.approx(accuracy)
    assert "re-estimated" in result["config"]["bn"]


def test_standard_anchor_is_the_snapshot_at_T_evaluated_as_it_is(cnn_run):
    result = cnn_run.switch([STEPS])
    model = snapshot_model(cnn_run, STEPS)
    with torch.no_grad():
        logits = model(cnn_run.data.x_test.double())
    assert result["eval_loss"][0] == pytest.approx(F.cross_entropy(logits, cnn_run.data.y_test).item(), rel=1e-5)
    assert result["eval_accuracy"][0] == (logits.argmax(1) == cnn_run.data.y_test).double().mean().item()
    assert result["eval_loss"][0] == pytest.approx(cnn_run.run.eval_loss[-1], rel=1e-6)  # the probe's own number
    assert cnn_run.stream.calls <= 1  # nothing trained (batch 0 identifies the stream)


def test_restored_optimizer_state_continues_the_momentum(mlp_run):
    saved = copy.deepcopy(mlp_run.optimizer_states[4])
    result = mlp_run.switch([4], optimizer_state_at=mlp_run.optimizer_states.__getitem__)
    for i, entry in saved["state"].items():  # the caller's checkpoint is not updated in place
        assert torch.equal(mlp_run.optimizer_states[4]["state"][i]["momentum_buffer"], entry["momentum_buffer"])
    names = [name for name, p in mlp_run.make_model().named_parameters() if p.requires_grad]
    buffers = {name: mlp_run.optimizer_states[4]["state"][i]["momentum_buffer"] for i, name in enumerate(names)}
    loss, accuracy = reference_switch(mlp_run, 4, momentum_buffers=buffers)
    assert result["eval_loss"][0] == pytest.approx(loss, rel=1e-5)
    fresh_loss, _ = reference_switch(mlp_run, 4)
    assert result["eval_loss"][0] != pytest.approx(fresh_loss, rel=1e-5)
    assert read_switching_results(mlp_run.run)[0]["config"]["optimizer_state"].startswith("restored")


# ---------------------------------------------------------------------------------------------- resuming


def test_second_call_computes_nothing_and_returns_identical_results(mlp_run):
    first = mlp_run.switch([0, 4, 12])
    path = mlp_run.run.path / "switching" / "results.jsonl"
    before = path.read_bytes()
    mlp_run.stream.calls = 0
    second = mlp_run.switch([0, 4, 12])
    assert second["computed"] == [] and path.read_bytes() == before
    assert mlp_run.stream.calls == 1  # batch 0 only, to identify the stream
    for key in ("switch_step", "eval_loss", "eval_accuracy", "train_loss", "linearized_steps"):
        np.testing.assert_array_equal(first[key], second[key])
    assert first["config_id"] == second["config_id"]


def test_resumed_call_computes_only_the_missing_switch_steps(mlp_run):
    first = mlp_run.switch([0, 8])
    second = mlp_run.switch([0, 2, 8, 12])
    assert second["computed"] == [2, 12]
    assert len(read_switching_results(mlp_run.run)) == 4
    np.testing.assert_array_equal(second["eval_loss"][[0, 2]], first["eval_loss"])


def test_record_torn_by_a_kill_is_recomputed(mlp_run):
    mlp_run.switch([0, 8])
    path = mlp_run.run.path / "switching" / "results.jsonl"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"switch_step": 4, "total_st')  # the process was killed mid-append
    result = mlp_run.switch([0, 4, 8])
    assert result["computed"] == [4]
    assert [r["switch_step"] for r in read_switching_results(mlp_run.run)] == [0, 8, 4]


def test_another_configuration_is_computed_again(mlp_run):
    theta = mlp_run.switch([4])
    delta = mlp_run.switch([4], weight_decay_on="delta",
                           optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1, momentum=MOMENTUM, weight_decay=0.1))
    assert delta["computed"] == [4] and delta["config_id"] != theta["config_id"]
    assert len(read_switching_results(mlp_run.run)) == 2
    assert len(read_switching_results(mlp_run.run, config_id=theta["config_id"])) == 1


def test_run_files_before_the_experiment_stay_byte_identical(mlp_run):
    before = files_outside_switching(mlp_run.run.path)
    mlp_run.switch([0, 8, 12])
    assert files_outside_switching(mlp_run.run.path) == before
    added = {p.relative_to(mlp_run.run.path).as_posix() for p in mlp_run.run.path.rglob("*")} - set(before)
    assert added == {"switching", "switching/results.jsonl"}


# ---------------------------------------------------------------------------------------------- data stream


def test_iterable_and_sequence_streams_give_the_callables_results_bitwise(mlp_run, tmp_path):
    expected = mlp_run.switch([0, 4, 8])
    for kind, loader in (("iterable", ReplayedIterable(mlp_run.stream, STEPS)),
                         ("sequence", [mlp_run.stream(s) for s in range(STEPS)])):
        copy_root = tmp_path / kind
        shutil.copytree(mlp_run.run.path, copy_root, ignore=shutil.ignore_patterns("switching"))
        result = dynprobe.switching_experiment(
            copy_root, mlp_run.make_model, loader, mlp_run.eval_data, switch_steps=[0, 4, 8], total_steps=STEPS,
            optimizer_factory=mlp_run.optimizer, lr_at=lr_schedule, progress=False)
        assert result["computed"] == [0, 4, 8]
        np.testing.assert_array_equal(result["eval_loss"], expected["eval_loss"])
        assert result["config_id"] == expected["config_id"]


def test_stream_that_changes_between_passes_is_rejected(mlp_run):
    def reshuffled(step):  # draws from the global RNG: a different batch on every call
        index = torch.randint(0, mlp_run.data.x_train.shape[0], (BATCH,))
        return mlp_run.data.x_train[index], mlp_run.data.y_train[index]

    with pytest.raises(ValueError, match="different batch for step 0"):
        mlp_run.switch([0], train_loader=reshuffled)


# ---------------------------------------------------------------------------------------------- side effects


def test_global_rng_is_untouched(mlp_run):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    mlp_run.switch([0, 12])
    assert torch.equal(torch.get_rng_state(), state)


def test_learning_rate_different_from_the_runs_is_warned_about(mlp_run):
    with pytest.warns(RuntimeWarning, match="lr_at disagrees"):
        mlp_run.switch([8], lr_at=lambda s: 0.05)
    with pytest.warns(RuntimeWarning, match="lr_at is None"):
        mlp_run.switch([8], lr_at=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        mlp_run.switch([8])  # the run's own schedule: no warning


@pytest.mark.filterwarnings("ignore:dynprobe. the run's learning rate changed")
def test_divergence_is_recorded_with_a_warning(mlp_run):
    def squared_logits(output, targets):  # quadratic in θ for the linearized model: a large lr blows it up
        return (output ** 2).mean()

    with pytest.warns(RuntimeWarning, match="diverged"):
        result = mlp_run.switch([0], loss_fn=squared_logits,
                                optimizer_factory=lambda p: torch.optim.SGD(p, lr=1e6, momentum=MOMENTUM), lr_at=None)
    assert result["diverged"].tolist() == [True]
    record = read_switching_results(mlp_run.run)[0]
    assert record["status"] == "diverged" and 1 <= record["diverged_at"] <= STEPS


def test_progress_bar_runs(mlp_run):
    assert mlp_run.switch([8, 12], progress=True)["computed"] == [8, 12]


# ---------------------------------------------------------------------------------------------- bad input


def _one_shot(setup):
    return iter([setup.stream(s) for s in range(STEPS)])


@pytest.mark.parametrize("overrides, error, match", [
    (dict(switch_steps=[0, 5]), ValueError, r"switch_steps \[5\] are not snapshot steps"),
    (dict(switch_steps=[0, 12], total_steps=8), ValueError, "total_steps=8 is smaller than switch steps"),
    (dict(switch_steps=[]), ValueError, "switch_steps is empty"),
    (dict(switch_steps=[True]), TypeError, "every switch step must be an int"),
    (dict(switch_steps="all"), TypeError, "switch_steps must be a list"),
    (dict(total_steps=-1), ValueError, "total_steps must be an int >= 0"),
    (dict(weight_decay_on="both"), ValueError, "weight_decay_on must be one of"),
    (dict(optimizer_factory=lambda p: p), TypeError, "must return a torch.optim.Optimizer"),
    (dict(optimizer_factory=lambda p: torch.optim.SGD(p[:1], lr=0.1)), ValueError, "exactly one param group"),
    (dict(lr_at=lambda s: -1.0), ValueError, r"lr_at\(0\) must be a finite learning rate"),
    (dict(lr_at=lambda s: [0.1, 0.1]), ValueError, "a list of 1"),
    (dict(lr_at=0.1), TypeError, "lr_at must be callable"),
    (dict(loss_fn=lambda out, y: out), TypeError, "scalar tensor"),
    (dict(optimizer_state_at=lambda t: {}), TypeError, "must return an optimizer.state_dict"),
    (dict(reset_bn_batches=2), ValueError, "has no BatchNorm layer"),
    (dict(reset_bn_batches=STEPS + 1), ValueError, "exceeds the stream's total_steps"),
    (dict(train_loader="data"), TypeError, "train_loader must be the run's data stream"),
    (dict(train_loader=lambda s: (torch.zeros(3, 20),)), TypeError, "batch 0 is a tuple of length 1"),
])
def test_bad_arguments_raise_clear_errors(untouched_mlp_run, overrides, error, match):
    overrides = dict(overrides)
    with pytest.raises(error, match=match):
        untouched_mlp_run.switch(overrides.pop("switch_steps", [0]), **overrides)


def test_bad_streams_models_and_eval_data_raise_clear_errors(untouched_mlp_run):
    setup = untouched_mlp_run
    with pytest.raises(TypeError, match="one-shot iterator"):
        setup.switch([0], train_loader=_one_shot(setup))
    with pytest.raises(TypeError, match="pair of tensors"):
        setup.switch([0], train_loader=(setup.data.x_train, setup.data.y_train))
    with pytest.raises(ValueError, match="holds 3 batches"):
        setup.switch([0], train_loader=[setup.stream(s) for s in range(3)])
    with pytest.raises(ValueError, match="ran out after 5 batches"):
        setup.switch([0], train_loader=ReplayedIterable(setup.stream, 5))

    def experiment(run=setup.run, make_model=MLP, eval_data=setup.eval_data):
        return dynprobe.switching_experiment(run, make_model, setup.stream, eval_data, switch_steps=[0],
                                             total_steps=STEPS, optimizer_factory=setup.optimizer, lr_at=lr_schedule)

    with pytest.raises(ValueError, match="fingerprint mismatch"):
        experiment(eval_data=(setup.data.x_test + 1, setup.data.y_test))
    with pytest.raises(ValueError, match="trainable parameters differ from the run's"):
        experiment(make_model=lambda: MLP(width=8))
    with pytest.raises(TypeError, match="make_model must be a callable returning a fresh model"):
        experiment(make_model=MLP())
    with pytest.raises(dynprobe.RunFormatError):
        experiment(run=setup.run.path / "missing")


def test_failed_calls_wrote_nothing(untouched_mlp_run):
    assert not (untouched_mlp_run.run.path / "switching").exists()
