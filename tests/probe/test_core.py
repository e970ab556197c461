"""Probe: two-line attach, schedule, non-intrusiveness (bitwise), explicit stepping, lifecycle, bad input."""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import dynprobe
from dynprobe import schedule
from dynprobe.metrics import interval

from ..conftest import assert_bitwise_equal, cnn_setup, make_data, mlp_setup, on_device, state_of, train


def _run(setup, steps, *, probe_kwargs=None, tmp_path=None, criterion=None):
    model, optimizer, scheduler, data = setup(seed=3)
    torch.manual_seed(1234)
    probe = None
    criterion = criterion or nn.CrossEntropyLoss()
    if probe_kwargs is not None:
        probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                               errors="raise", **probe_kwargs)
        criterion = probe.watch(criterion)
    flags = train(model, optimizer, scheduler, data, steps, criterion=criterion)
    rng = torch.get_rng_state()
    if probe is not None:
        probe.close()
    return model, flags, rng


@pytest.mark.parametrize("setup", [mlp_setup, cnn_setup], ids=["mlp-dropout-sgd-momentum-wd", "cnn-bn-adam-steplr"])
def test_probe_leaves_training_bitwise_identical(setup, device, tmp_path):
    setup = on_device(setup, device)
    reference, flags_ref, rng_ref = _run(setup, 40)
    probed, flags, rng = _run(setup, 40, probe_kwargs={"schedule": schedule.every(3) | schedule.at([1, 2]),
                                                       "kernel": dynprobe.KernelConfig(n=16, lag_steps=0),
                                                       "barriers": dynprobe.Barriers(
                                                           previous_snapshots=1, alphas=3, time_budget=math.inf)},
                              tmp_path=tmp_path)
    assert_bitwise_equal(state_of(reference), state_of(probed))
    assert torch.equal(rng_ref, rng), "the global RNG stream changed"
    assert flags == flags_ref and all(flags), "the model's train/eval mode changed"
    assert len(dynprobe.load_run(tmp_path / "run")) == 2 + 14 + 1  # steps 1, 2, every 3 from 0 to 39, final 40


def test_probe_preserves_per_module_training_flags(tmp_path):
    model, optimizer, _, data = mlp_setup()
    model.net[2].eval()  # a user may freeze one submodule's mode on purpose
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r", schedule=1)
    before = [m.training for m in model.modules()]
    loss = nn.functional.cross_entropy(model(data.x_train[:8]), data.y_train[:8])
    loss.backward()
    optimizer.step()
    assert [m.training for m in model.modules()] == before
    probe.close()


def test_snapshot_steps_follow_the_schedule_and_include_initialization(tmp_path):
    model, optimizer, scheduler, data = mlp_setup()
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r",
                           schedule=schedule.at([0, 5, 7]), snapshot_on_close=False)
    train(model, optimizer, scheduler, data, 10)
    probe.close()
    run = dynprobe.load_run(tmp_path / "r")
    np.testing.assert_array_equal(run.steps, [0, 5, 7])
    assert run.status == "closed"


def test_final_step_is_snapshotted_on_close(tmp_path):
    model, optimizer, scheduler, data = mlp_setup()
    with dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r",
                        schedule=schedule.at([0, 5])):
        train(model, optimizer, scheduler, data, 9)
    np.testing.assert_array_equal(dynprobe.load_run(tmp_path / "r").steps, [0, 5, 9])


def test_recorded_C_and_D_match_numpy_on_what_the_test_records(tmp_path):
    model, optimizer, scheduler, data = mlp_setup()
    steps = [0, 2, 5, 9, 14]
    recorded_params, recorded_preds = {}, {}

    def record(step):
        if step in steps:
            recorded_params[step] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().numpy()
            twin = copy.deepcopy(model).eval()
            with torch.no_grad():
                recorded_preds[step] = twin(data.x_test).argmax(1).numpy()

    record(0)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r",
                           schedule=schedule.at(steps))
    criterion = probe.watch(nn.CrossEntropyLoss())
    train(model, optimizer, scheduler, data, 14, criterion=criterion, after_step=record)
    probe.close()
    run = dynprobe.load_run(tmp_path / "r")
    np.testing.assert_array_equal(run.steps, steps)
    P = np.stack([recorded_params[s] for s in steps])
    norms = np.linalg.norm(P, axis=1)
    expected_C = 1 - (P @ P.T) / np.outer(norms, norms)
    np.fill_diagonal(expected_C, 0.0)
    np.testing.assert_allclose(run.C, expected_C, rtol=1e-9, atol=1e-12)
    preds = np.stack([recorded_preds[s] for s in steps])
    expected_D = (preds[:, None, :] != preds[None, :, :]).mean(axis=2)
    np.testing.assert_array_equal(run.D, expected_D)
    accuracy = np.array([(recorded_preds[s] == data.y_test.numpy()).mean() for s in steps])
    np.testing.assert_allclose(run.eval_accuracy, accuracy)
    assert np.isnan(run.train_loss[0]) and np.all(np.isfinite(run.train_loss[1:]))


def test_eval_loss_is_cross_entropy_in_eval_mode(tmp_path):
    model, optimizer, _, data = mlp_setup()
    expected = nn.functional.cross_entropy(copy.deepcopy(model).eval()(data.x_test), data.y_test).item()
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r")
    probe.close()
    assert dynprobe.load_run(tmp_path / "r").eval_loss[0] == pytest.approx(expected, rel=1e-6)


def test_eval_data_is_subsampled_with_a_seed(tmp_path):
    model, optimizer, _, data = mlp_setup()
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "a", eval_max=40)
    probe.close()
    run = dynprobe.load_run(tmp_path / "a")
    assert run.predictions(snapshot_index=0).shape == (40,) and len(set(run.eval_indices.tolist())) == 40
    other = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "b", eval_max=40)
    other.close()
    np.testing.assert_array_equal(run.eval_indices, dynprobe.load_run(tmp_path / "b").eval_indices)


def test_eval_data_from_a_shuffling_dataloader_leaves_rng_alone(tmp_path):
    model, optimizer, _, data = mlp_setup()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_test, data.y_test), batch_size=16,
                                         shuffle=True)
    rng = torch.get_rng_state()
    probe = dynprobe.Probe(model, optimizer, eval_data=loader, out=tmp_path / "r", eval_max=50)
    assert torch.equal(rng, torch.get_rng_state())
    probe.close()
    run = dynprobe.load_run(tmp_path / "r")
    assert run.predictions(snapshot_index=0).shape == (50,)


def test_dict_inputs_and_output_fn(tmp_path):
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(20, 5)

        def forward(self, features, scale):
            return {"scores": self.linear(features) * scale, "aux": torch.zeros(())}

    data = make_data()
    model = DictModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs = {"features": data.x_test, "scale": torch.ones(data.x_test.shape[0], 1)}
    with pytest.raises(ValueError, match="output_fn"):  # no .logits / ["logits"]: the default cannot find them
        dynprobe.Probe(model, optimizer, eval_data=(inputs, data.y_test), out=tmp_path / "bad")
    probe = dynprobe.Probe(model, optimizer, eval_data=(inputs, data.y_test), out=tmp_path / "r",
                           output_fn=lambda output: output["scores"])
    probe.close()
    expected = (model(**inputs)["scores"].argmax(1) == data.y_test).double().mean().item()
    assert dynprobe.load_run(tmp_path / "r").eval_accuracy[0] == pytest.approx(expected, abs=0)


def test_explicit_step_api_counts_steps_and_leaves_training_identical(tmp_path):
    reference, _, rng_ref = _run(mlp_setup, 12)
    model, optimizer, _, data = mlp_setup(seed=3)
    torch.manual_seed(1234)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r",
                           schedule=schedule.every(4), errors="raise")
    criterion = nn.CrossEntropyLoss()
    for _ in range(12):
        index = torch.randint(0, data.x_train.shape[0], (32,))
        probe.step(data.x_train[index], data.y_train[index])
        loss = criterion(model(data.x_train[index]), data.y_train[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(rng_ref, torch.get_rng_state())
    probe.close()
    assert_bitwise_equal(state_of(reference), state_of(model))
    run = dynprobe.load_run(tmp_path / "r")
    np.testing.assert_array_equal(run.steps, [0, 4, 8, 12])
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    np.testing.assert_array_equal(run.params(snapshot_index=3), expected)


def test_explicit_step_after_hook_steps_is_an_error(tmp_path):
    model, optimizer, scheduler, data = mlp_setup()
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r")
    train(model, optimizer, scheduler, data, 1)
    with pytest.raises(RuntimeError, match="top of the loop"):
        probe.step(data.x_train[:4], data.y_train[:4])
    probe.close()


def test_close_is_idempotent_and_detaches_hooks(tmp_path):
    model, optimizer, scheduler, data = mlp_setup()
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r", schedule=1)
    train(model, optimizer, scheduler, data, 3)
    probe.close()
    probe.close()
    train(model, optimizer, scheduler, data, 3)  # the hooks are gone: nothing is counted or recorded
    run = dynprobe.load_run(tmp_path / "r")
    assert run.steps.tolist() == [0, 1, 2, 3] and run.status == "closed" and run.manifest["final_step"] == 3
    assert [e["event"] for e in run.events].count("close") == 1
    assert probe.global_step == 3 and not probe.attached
    assert not optimizer._optimizer_step_post_hooks  # torch's registry: the probe's step hook was removed


def test_context_manager_marks_failed_runs(tmp_path):
    model, optimizer, scheduler, data = mlp_setup()
    with pytest.raises(ZeroDivisionError):
        with dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r"):
            train(model, optimizer, scheduler, data, 2)
            raise ZeroDivisionError
    run = dynprobe.load_run(tmp_path / "r")
    assert run.status == "failed" and run.manifest["status_reason"].startswith("ZeroDivisionError")


def test_watched_loss_is_transparent():
    model, optimizer, _, data = mlp_setup()
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=f"{tmp}/r")
        watched = probe.watch(criterion)
        out = model(data.x_train[:8])
        assert torch.equal(watched(out, data.y_train[:8]), criterion(out, data.y_train[:8]))
        assert watched.label_smoothing == 0.1
        with pytest.raises(ValueError, match="already watched"):
            probe.watch(watched)
        probe.close()


def test_internal_failure_is_recorded_warned_and_detached_by_default(tmp_path):
    model, optimizer, scheduler, data = mlp_setup()

    def broken(info):  # on_snapshot runs inside the probe's fault guard, like the probe's own work
        if info["step"] > 0:
            raise OSError("disk full")

    dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r", schedule=2,
                   on_snapshot=broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, optimizer, scheduler, data, 4)
    assert sum("detached itself" in str(w.message) for w in caught) == 1
    run = dynprobe.load_run(tmp_path / "r")
    assert run.status == "probe_failed" and run.steps.tolist() == [0, 2]  # nothing after the failure
    assert any(e["event"] == "probe_error" and "disk full" in e["error"] for e in run.events)


# ---------------------------------------------------------------------------------------------- bad input


def _probe(tmp_path, **overrides):
    model, optimizer, _, data = mlp_setup()
    kwargs = {"eval_data": (data.x_test, data.y_test), "out": tmp_path / "r"}
    kwargs.update(overrides)
    model = kwargs.pop("model", model)
    optimizer = kwargs.pop("optimizer", optimizer)
    return dynprobe.Probe(model, optimizer, **kwargs)


def test_model_without_trainable_parameters_is_rejected(tmp_path):
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        _probe(tmp_path, model=model, optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1))


def test_optimizer_of_another_model_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="does not own any of the model's trainable parameters"):
        _probe(tmp_path, optimizer=torch.optim.SGD(nn.Linear(3, 3).parameters(), lr=0.1))


def test_non_optimizer_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        _probe(tmp_path, optimizer="sgd")


def test_eval_data_with_mismatched_lengths_is_rejected(tmp_path):
    data = make_data()
    with pytest.raises(ValueError, match="same first dimension; got 96 inputs and 95 targets"):
        _probe(tmp_path, eval_data=(data.x_test, data.y_test[:-1]))


def test_eval_data_with_float_targets_is_rejected(tmp_path):
    # Real-valued targets mean regression: a classifier's (N, 5) logits do not fit them, and naming the task
    # classification refuses the targets themselves.
    data = make_data()
    with pytest.raises(ValueError, match="for regression the model's output must have the targets' shape"):
        _probe(tmp_path, eval_data=(data.x_test, data.y_test.float()))
    with pytest.raises(ValueError, match="integer class labels"):
        _probe(tmp_path, eval_data=(data.x_test, data.y_test.float()), task="classification")


def test_non_classification_output_is_rejected(tmp_path):
    model = nn.Linear(20, 1)
    data = make_data()
    with pytest.raises(ValueError, match=r"\(N, num_classes\) logits"):
        _probe(tmp_path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
               eval_data=(data.x_test, data.y_test))


def test_targets_outside_the_class_range_are_rejected(tmp_path):
    data = make_data()
    with pytest.raises(ValueError, match="class indices"):
        _probe(tmp_path, eval_data=(data.x_test, data.y_test + 10))


@pytest.mark.parametrize("bad, match", [([3, 1], "unsorted"), ([1, 1], "duplicated"), ([-1, 2], ">= 0"),
                                        (0, "k >= 1"), ("often", "Schedule")])
def test_bad_schedules_are_rejected(tmp_path, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _probe(tmp_path, schedule=bad)


def test_out_pointing_to_a_file_is_rejected(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        _probe(tmp_path, out=tmp_path / "file")


def test_out_in_an_unwritable_place_is_rejected(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if _can_write(locked):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(PermissionError, match="not writable"):
            _probe(tmp_path, out=locked / "run")
    finally:
        locked.chmod(0o700)


def _can_write(path):
    try:
        (path / ".x").write_text("")
        (path / ".x").unlink()
        return True
    except OSError:
        return False


def test_out_unwritable_because_a_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        _probe(tmp_path, out=tmp_path / "file" / "run")


def test_existing_run_without_resume_is_rejected_with_instructions(tmp_path):
    _probe(tmp_path).close()
    with pytest.raises(FileExistsError, match="resume=True"):
        _probe(tmp_path)


def test_existing_non_run_directory_is_rejected(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a dynprobe run"):
        _probe(tmp_path)


@pytest.mark.parametrize("argument, value", [("eval_max", 0), ("eval_batch_size", -1), ("errors", "ignore")])
def test_bad_options_are_rejected(tmp_path, argument, value):
    with pytest.raises(ValueError, match=argument):
        _probe(tmp_path, **{argument: value})


def _transition_run(out, every: int = 20):
    from dynprobe.recipes.mnist1d import Conv1dNet, load_mnist1d

    data = load_mnist1d(1200)
    torch.manual_seed(0)
    model = Conv1dNet(width=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # lr ÷10 at step 150: a regime change the detector must see on any CPU (at a constant lr the 30× drop of c may
    # or may not come within 300 steps: it did on one machine, not on an AVX-512 one)
    decay = torch.optim.lr_scheduler.MultiStepLR(optimizer, [150], 0.1)
    calls = []
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=out,
                           schedule=schedule.log_spaced(100, per_decade=6) | schedule.every(every),
                           on_transition=calls.append, errors="raise")
    criterion = probe.watch(nn.CrossEntropyLoss())
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        index = torch.randint(0, data.x_train.shape[0], (64,), generator=generator)
        loss = criterion(model(data.x_train[index]), data.y_train[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        decay.step()
    probe.close()
    return probe, calls, dynprobe.load_run(out)


def test_on_transition_fires_once_with_an_estimate_recorded_in_the_events(tmp_path):
    probe, calls, run = _transition_run(tmp_path / "r")
    events = [e for e in run.events if e["event"] == "transition"]
    assert len(calls) == 1 and len(events) == 1
    assert calls[0].step == events[0]["estimate"]["step"] == probe.transition.step
    assert 0 < calls[0].step < 300


def test_deferred_rows_give_the_detector_and_the_run_what_immediate_rows_give(tmp_path, monkeypatch):
    """Rows of a large history are deferred beyond the newest snapshots; the detector is given the deferred entries
    as they are computed, so it fires at the same step, and the stored C is the same within rounding."""
    _, immediate_calls, immediate = _transition_run(tmp_path / "immediate", every=5)
    monkeypatch.setattr(interval, "DEFER_BYTES", 0)  # every history counts as large
    _, deferred_calls, deferred = _transition_run(tmp_path / "deferred", every=5)
    assert len(immediate.steps) > interval.NEAR + 1 + 2 * interval.MIN_GROUP  # groups completed during the run
    assert [c.step for c in deferred_calls] == [c.step for c in immediate_calls] and deferred_calls
    np.testing.assert_allclose(deferred.C, immediate.C, rtol=1e-10, atol=1e-300)


def test_on_transition_must_be_callable(tmp_path):
    with pytest.raises(TypeError, match="on_transition"):
        _probe(tmp_path, on_transition="later")


class _RecordingLoss(nn.Module):
    """Cross-entropy that remembers every value it returned (an independent record of the training loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[float] = []

    def forward(self, logits, targets):
        loss = nn.functional.cross_entropy(logits, targets)
        self.values.append(float(loss))
        return loss


def test_train_loss_is_the_mean_of_every_watched_loss_since_the_previous_snapshot(tmp_path):
    model, optimizer, scheduler, data = mlp_setup()
    recording = _RecordingLoss()
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r",
                           schedule=[0, 3, 7, 12])
    train(model, optimizer, scheduler, data, 12, criterion=probe.watch(recording))
    probe.close()
    run = dynprobe.load_run(tmp_path / "r")
    losses = np.array(recording.values)
    expected = [np.nan, losses[0:3].mean(), losses[3:7].mean(), losses[7:12].mean()]
    np.testing.assert_allclose(run.train_loss, expected, rtol=1e-12)
    assert [s.get("train_loss_calls") for s in run.snapshots] == [0, 3, 4, 5]


def _crash(probe) -> None:
    """What a killed process leaves: the hooks gone, no close() (nothing flushed, no final snapshot)."""
    probe._closed = True
    probe._remove_hooks()
    probe.writer.close()  # the process's death releases the run's writer lock


@pytest.mark.parametrize("stop", ["clean", "crash"])
def test_train_loss_after_resuming_from_a_step_between_snapshots(tmp_path, stop):
    # Uninterrupted reference: snapshots every 5 steps, 20 steps.
    model, optimizer, scheduler, data = mlp_setup()
    reference = _RecordingLoss()
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "a", schedule=5)
    torch.manual_seed(3)
    train(model, optimizer, scheduler, data, 20, criterion=probe.watch(reference))
    probe.close()
    expected = dynprobe.load_run(tmp_path / "a").train_loss

    # Interrupted at step 12 (a checkpoint between the snapshots at 10 and 15), resumed from that checkpoint.
    model, optimizer, scheduler, data = mlp_setup()
    first = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "b", schedule=5,
                           snapshot_on_close=False)
    torch.manual_seed(3)
    train(model, optimizer, scheduler, data, 12, criterion=first.watch(_RecordingLoss()))
    checkpoint = (state_of(model), copy.deepcopy(optimizer.state_dict()), torch.get_rng_state())
    if stop == "clean":
        first.close()  # the user stops at 12: the losses of steps 11 and 12 are flushed
    else:
        _crash(first)  # killed right after the checkpoint: they are lost with the process
    model, optimizer, scheduler, data = mlp_setup()
    model.load_state_dict(checkpoint[0])
    optimizer.load_state_dict(checkpoint[1])
    torch.set_rng_state(checkpoint[2])
    second = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "b", schedule=5,
                            resume=True, resume_step=12)
    train(model, optimizer, scheduler, data, 8, criterion=second.watch(_RecordingLoss()))
    second.close()
    run = dynprobe.load_run(tmp_path / "b")
    np.testing.assert_array_equal(run.steps, [0, 5, 10, 15, 20])
    calls = [s.get("train_loss_calls") for s in run.snapshots]
    if stop == "clean":
        np.testing.assert_allclose(run.train_loss, expected, rtol=1e-12)  # exactly the uninterrupted means
        assert calls == [0, 5, 5, 5, 5]
    else:  # the stretch 11..15 covers what survived (13..15), and says so
        np.testing.assert_allclose(run.train_loss[[0, 1, 2, 4]], expected[[0, 1, 2, 4]], rtol=1e-12)
        assert calls == [0, 5, 5, 3, 5]
        np.testing.assert_allclose(run.train_loss[3], np.mean(reference.values[12:15]), rtol=1e-12)


def test_resume_refuses_a_model_that_is_not_at_the_resume_snapshot(tmp_path):
    model, optimizer, scheduler, data = mlp_setup()
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r", schedule=5)
    train(model, optimizer, scheduler, data, 10, criterion=probe.watch(nn.CrossEntropyLoss()))
    probe.close()
    fresh, optimizer, _, _ = mlp_setup()  # the user forgot to restore the checkpoint: step-0 weights
    with pytest.raises(ValueError, match="equal the snapshot at step 0: pass resume_step=0"):
        dynprobe.Probe(fresh, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r", resume=True)
    noise, optimizer, _, _ = mlp_setup()
    with torch.no_grad():
        next(noise.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="match no snapshot"):
        dynprobe.Probe(noise, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r", resume=True)
    restored, optimizer, _, _ = mlp_setup()
    restored.load_state_dict(dynprobe.load_run(tmp_path / "r").state_dict(snapshot_index=2), strict=False)
    dynprobe.Probe(restored, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r",
                   resume=True).close()


def test_resume_step_without_resume_is_an_error(tmp_path):
    model, optimizer, _, data = mlp_setup()
    with pytest.raises(ValueError, match="resume_step= is only meaningful with resume=True"):
        dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r", resume_step=3)
    assert not (tmp_path / "r").exists()


def test_parameters_added_after_attach_are_reported_once(tmp_path):
    model, optimizer, scheduler, data = mlp_setup()
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r", schedule=2)
    model.register_parameter("late", nn.Parameter(torch.zeros(3)))
    with pytest.warns(RuntimeWarning, match="1 trainable parameters were added") as caught:
        train(model, optimizer, scheduler, data, 6, criterion=probe.watch(nn.CrossEntropyLoss()))
        probe.close()
    assert sum("were added" in str(w.message) for w in caught) == 1
    assert dynprobe.load_run(tmp_path / "r").params(snapshot_index=0).shape[0] == sum(
        p.numel() for name, p in model.named_parameters() if name != "late")
