"""Ghost replicas: bitwise control, non-intrusiveness, equality with an independent re-run (parameters and separation
curve), replay of schedulers / accumulation / autocast / clipping / GradScaler, faults, run-directory maps, warnings,
configuration errors. The vectorized path has its own tests (test_ghost_stack.py); resuming, test_ghost_resume.py."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import dynprobe
from dynprobe import Ghosts, Perturbation, schedule
from dynprobe.capture.step import UnmatchedLoss
from dynprobe.ghosts import attached, ghost_set
from dynprobe.ghosts.notices import control_drift_notice, replay_notice
from dynprobe.ghosts.perturbation import perturb_
from dynprobe.ghosts.replica import NONDETERMINISTIC_CAUSE, deterministic_replay_possible

from ..conftest import MLP, assert_bitwise_equal, cnn_setup, make_data, mlp_setup, on_device, state_of, train


def mlp_onecycle_setup(seed: int = 0, steps: int = 200):
    torch.manual_seed(seed)
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=steps + 5)
    return model, optimizer, scheduler, make_data((20,), seed=seed)


SETUPS = {
    "mlp-dropout-sgd-momentum-wd-onecycle": mlp_onecycle_setup,
    "cnn-bn-adam-steplr": cnn_setup,
}


def _ghost_run(setup, steps, tmp_path, *, ghosts, criterion=None, train_kwargs=None, **probe_kwargs):
    model, optimizer, scheduler, data = setup(seed=1)
    torch.manual_seed(99)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           ghosts=ghosts, errors="raise", **probe_kwargs)
    criterion = probe.watch(criterion or nn.CrossEntropyLoss())
    train(model, optimizer, scheduler, data, steps, criterion=criterion, **(train_kwargs or {}))
    rng = torch.get_rng_state()
    probe.close()
    return model, rng, dynprobe.load_run(tmp_path / "run"), probe


@pytest.mark.parametrize("name", list(SETUPS))
def test_control_ghost_stays_bitwise_identical_for_200_steps(name, device, tmp_path):
    """The default (sequential) path: the ε = 0 control equals the main run after every step — its separation curve
    is exactly 0 at all 201 steps — and at every snapshot. (The vectorized path's control against its shadow:
    test_ghost_stack.py.)"""
    ghosts = Ghosts(at=[0, 60], perturbation=Perturbation(norm=1e-7), control=True)
    model, rng, run, probe = _ghost_run(on_device(SETUPS[name], device), 200, tmp_path, ghosts=ghosts,
                                        schedule=schedule.at([0, 60, 100, 200]))
    modes = [e for e in run.events if e["event"] == "ghost_mode"]
    assert [(m["mode"], m["reference"]) for m in modes] == [("sequential", "main")]
    assert run.manifest["ghost_mode"]["mode"] == "sequential"
    control = [g for g in run.ghosts if g.control]
    assert len(control) == 1 and control[0].spawn_step == 0 and control[0].realized_norm == 0
    row = run.ghosts.index(control[0])
    for metric in ("C", "L2", "D"):
        values = run.chaos[metric][row]
        assert np.all(values == 0.0), f"control ghost {metric} = {values}"
    steps, l2 = run.separation(control[0].ghost_id)
    np.testing.assert_array_equal(steps, np.arange(201))
    assert np.all(l2 == 0.0)
    assert not any(e["event"] == "control_drift" for e in run.events)
    perturbed = [r for r, g in enumerate(run.ghosts) if not g.control]
    assert all(run.chaos["L2"][r, -1] > 0 for r in perturbed)  # the perturbed ghosts did move away


@pytest.mark.parametrize("name", list(SETUPS))
def test_main_run_with_ghosts_is_bitwise_identical_to_a_probe_free_run(name, device, tmp_path):
    model, optimizer, scheduler, data = on_device(SETUPS[name], device)(seed=1)
    torch.manual_seed(99)
    train(model, optimizer, scheduler, data, 60)
    reference, reference_rng = state_of(model), torch.get_rng_state()
    ghosts = Ghosts(at=[0, 10, 30], perturbation=Perturbation(norm=1e-6))
    probed, rng, run, _ = _ghost_run(on_device(SETUPS[name], device), 60, tmp_path, ghosts=ghosts,
                                     schedule=schedule.every(7))
    assert_bitwise_equal(reference, state_of(probed))
    assert torch.equal(reference_rng, rng)
    assert len(run.ghosts) == 4


def test_ghost_equals_an_independent_rerun_from_the_perturbed_state(tmp_path):
    """Train a second model from main(t0) + ε on the same batches and dropout masks, without dynprobe: its final
    parameters equal the ghost's bitwise, and ‖twin_t − main_t‖₂ (numpy, float64) at every step is the ghost's
    separation curve."""
    spawn, steps = 5, 25
    perturbation = Perturbation(norm=1e-5, kind="l2", seed=3)
    model, optimizer, scheduler, data = mlp_onecycle_setup(seed=2, steps=steps)
    torch.manual_seed(42)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.at([steps]), errors="raise",
                           ghosts=Ghosts(at=[spawn], perturbation=perturbation, control=False, save_params=True))
    criterion = probe.watch(nn.CrossEntropyLoss())
    twin, main_params = {}, {}

    def after(step):
        main_params[step] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().numpy()
        if step == spawn:  # the ghost is cloned here, after update `spawn`, before the next forward
            twin["model"] = copy.deepcopy(model)
            twin["optimizer"] = copy.deepcopy(optimizer.state_dict())
            twin["rng"] = torch.get_rng_state()

    train(model, optimizer, scheduler, data, steps, criterion=criterion, after_step=after)
    probe.close()
    run = dynprobe.load_run(tmp_path / "run")

    # The independent re-run: same batches (index draws) and dropout masks, from the perturbed state.
    torch.set_rng_state(twin["rng"])
    other = twin["model"]
    with torch.no_grad():
        perturb_([p for p in other.parameters()], Perturbation(norm=1e-5, kind="l2", seed=3))
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    other_optimizer.load_state_dict(twin["optimizer"])
    dummy = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.05, momentum=0.9, weight_decay=5e-4)
    replay = torch.optim.lr_scheduler.OneCycleLR(dummy, max_lr=0.1, total_steps=steps + 5)
    lrs = []
    for _ in range(steps):
        lrs.append({k: v for k, v in replay.optimizer.param_groups[0].items() if k != "params"})
        replay.optimizer.step()
        replay.step()
    other.train()
    separation = {spawn: np.linalg.norm(_flat64(other) - main_params[spawn])}
    for step in range(spawn, steps):
        index = torch.randint(0, data.x_train.shape[0], (32,))
        other_optimizer.param_groups[0].update(lrs[step])
        loss = nn.functional.cross_entropy(other(data.x_train[index]), data.y_train[index])
        other_optimizer.zero_grad()
        loss.backward()
        other_optimizer.step()
        separation[step + 1] = np.linalg.norm(_flat64(other) - main_params[step + 1])
    expected = torch.cat([p.detach().reshape(-1) for p in other.parameters()]).numpy()
    ghost = run.ghosts[0]
    assert ghost.spawn_step == spawn and not ghost.control
    np.testing.assert_array_equal(run.ghost_params(0, step=steps), expected)
    curve_steps, curve = run.separation(0)
    np.testing.assert_array_equal(curve_steps, np.arange(spawn, steps + 1))
    np.testing.assert_allclose(curve, [separation[t] for t in curve_steps], rtol=1e-9, atol=0)
    assert curve[0] == pytest.approx(ghost.realized_norm, rel=1e-12)


def _flat64(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().numpy()


def test_gradient_accumulation_is_replayed(tmp_path):
    model, optimizer, _, data = mlp_setup(seed=4)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.every(10), errors="raise",
                           ghosts=Ghosts(at=[0], perturbation=Perturbation(norm=1e-6),
                                         vectorize=False))
    criterion = probe.watch(nn.CrossEntropyLoss())
    for _ in range(30):
        optimizer.zero_grad()
        for _ in range(3):  # three micro-batches per step, loss scaled by 1/3 outside the watched loss
            index = torch.randint(0, data.x_train.shape[0], (16,))
            (criterion(model(data.x_train[index]), data.y_train[index]) / 3).backward()
        optimizer.step()
    probe.close()
    run = dynprobe.load_run(tmp_path / "run")
    assert np.all(run.chaos["L2"][0] == 0) and np.all(run.chaos["C"][0] == 0)
    assert not any(e["event"] == "control_drift" for e in run.events)


def test_bf16_autocast_is_replayed(tmp_path):
    model, optimizer, _, data = mlp_setup(seed=5)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.every(10), errors="raise",
                           ghosts=Ghosts(at=[0], perturbation=Perturbation(norm=1e-6),
                                         vectorize=False))
    criterion = probe.watch(nn.CrossEntropyLoss())
    for _ in range(20):
        index = torch.randint(0, data.x_train.shape[0], (16,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = criterion(model(data.x_train[index]), data.y_train[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probe.close()
    run = dynprobe.load_run(tmp_path / "run")
    assert np.all(run.chaos["L2"][0] == 0)


def _clipping_loop(probe, model, optimizer, data, steps, clip):
    criterion = probe.watch(nn.CrossEntropyLoss())
    for _ in range(steps):
        index = torch.randint(0, data.x_train.shape[0], (16,))
        loss = criterion(model(data.x_train[index]), data.y_train[index])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()


def test_declared_clipping_keeps_the_control_exact(tmp_path):
    model, optimizer, _, data = mlp_setup(seed=6)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.every(10), errors="raise",
                           ghosts=Ghosts(at=[0], clip_grad_norm=0.05, vectorize=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _clipping_loop(probe, model, optimizer, data, 20, clip=0.05)
        probe.close()
    run = dynprobe.load_run(tmp_path / "run")
    assert np.all(run.chaos["L2"][0] == 0)


def test_undeclared_clipping_is_detected_and_the_control_drift_recorded(tmp_path):
    model, optimizer, _, data = mlp_setup(seed=6)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.every(10), ghosts=Ghosts(at=[0], vectorize=False))
    with pytest.warns(RuntimeWarning) as caught:
        _clipping_loop(probe, model, optimizer, data, 20, clip=0.05)
        probe.close()
    messages = " ".join(str(w.message) for w in caught)
    assert "clip_grad_norm" in messages and "control ghost drifted" in messages
    run = dynprobe.load_run(tmp_path / "run")
    events = {e["event"] for e in run.events}
    assert {"grad_edit_detected", "control_drift"} <= events
    assert run.chaos["L2"][0, -1] > 0


def test_grad_scaler_ghosts_follow_skipped_steps(tmp_path):
    scaler_cls = getattr(torch.amp, "GradScaler", None)
    if scaler_cls is None:
        pytest.skip("torch.amp.GradScaler not available")
    model, optimizer, _, data = mlp_setup(seed=7)
    scaler = scaler_cls("cpu", init_scale=2.0**40, growth_interval=3)  # huge initial scale: early steps overflow
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.every(5), errors="raise",
                           ghosts=Ghosts(at=[0], scaler=scaler, vectorize=False))
    criterion = probe.watch(nn.CrossEntropyLoss())
    main_steps = 0
    for _ in range(40):
        index = torch.randint(0, data.x_train.shape[0], (16,))
        with torch.autocast("cpu", dtype=torch.float16):
            loss = criterion(model(data.x_train[index]), data.y_train[index])
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        before = probe.global_step
        scaler.step(optimizer)
        scaler.update()
        main_steps += probe.global_step - before
    probe.close()
    assert main_steps < 40, "the test needs skipped steps"
    run = dynprobe.load_run(tmp_path / "run")
    assert np.all(run.chaos["L2"][0] == 0), run.chaos["L2"][0]


def test_a_diverging_ghost_is_marked_and_never_raises(tmp_path):
    model, optimizer, scheduler, data = mlp_setup(seed=8)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.every(5), ghosts=Ghosts(at=[3], control=False,
                                                                    perturbation=Perturbation(norm=1e30)))
    with pytest.warns(RuntimeWarning, match="diverged"):
        train(model, optimizer, scheduler, data, 12, criterion=probe.watch(nn.CrossEntropyLoss()))
        probe.close()
    run = dynprobe.load_run(tmp_path / "run")
    assert run.ghosts[0].status == "diverged"
    assert np.isnan(run.chaos["C"][0, run.snapshot_index_of(10)])


def test_chaos_maps_have_one_row_per_ghost_and_nan_before_spawn(tmp_path):
    ghosts = Ghosts(at=[0, 6], perturbation=Perturbation(norm=1e-4), kernel_every_snapshots=2)
    _, _, run, _ = _ghost_run(mlp_setup, 12, tmp_path, ghosts=ghosts, schedule=schedule.at([0, 3, 6, 9, 12]),
                              kernel=dynprobe.KernelConfig(n=8))
    assert [(g.spawn_step, g.control) for g in run.ghosts] == [(0, True), (0, False), (6, False)]
    assert all(g.status == "finished" for g in run.ghosts)
    for name in ("C", "L2", "D", "eval_loss"):
        assert run.chaos[name].shape == (3, 5)
    late = run.chaos["C"][2]
    assert np.isnan(late[:2]).all() and np.isfinite(late[2:]).all()
    s = run.chaos["S"]  # every second comparison of a ghost measures its kernel, counted from its spawn
    assert np.isfinite(s[1, [0, 2, 4]]).all() and np.isnan(s[1, [1, 3]]).all()
    assert np.isfinite(s[2, [2, 4]]).all() and np.isnan(s[2, [0, 1, 3]]).all()
    spawn = [e for e in run.events if e["event"] == "ghost_spawn"][1]
    assert spawn["nominal_norm"] == pytest.approx(1e-4) and 0 < spawn["realized_norm"] <= 1.01e-4
    assert run.ghost_predictions(1, snapshot_index=4).shape == (96,)


def test_several_directions_per_spawn_are_distinct_ghosts_with_their_own_seeds(tmp_path):
    ghosts = Ghosts(at=[0, 6], directions=3, perturbation=Perturbation(norm=1e-4, seed=10))
    _, _, run, _ = _ghost_run(mlp_setup, 12, tmp_path, ghosts=ghosts, schedule=schedule.at([0, 6, 12]))
    assert [(g.spawn_step, g.control) for g in run.ghosts] == [(0, True)] + [(0, False)] * 3 + [(6, False)] * 3
    spawns = [e for e in run.events if e["event"] == "ghost_spawn" and not e["control"]]
    assert [e["seed"] for e in spawns] == [10, 11, 12, 13, 14, 15]
    # Independently: the three directions of one spawn are different perturbations of the same θ.
    final = [run.separation(g.ghost_id)[1][-1] for g in run.ghosts[1:4]]
    assert len(set(final)) == 3 and all(v > 0 for v in final)
    assert run.manifest["config"]["ghosts"]["directions"] == 3
    with pytest.raises(ValueError, match="directions"):
        Ghosts(at=[0], directions=0)


def test_the_kernel_distance_is_always_measured_at_total_steps(tmp_path):
    # kernel_every_snapshots=3 would skip the 4th comparison (step 9); total_steps=9 completes the final column.
    ghosts = Ghosts(at=[0], perturbation=Perturbation(norm=1e-4), kernel_every_snapshots=3)
    _, _, run, _ = _ghost_run(mlp_setup, 9, tmp_path, ghosts=ghosts, schedule=schedule.at([0, 3, 6, 9]),
                              total_steps=9, kernel=dynprobe.KernelConfig(n=8))
    s = run.chaos["S"][1]
    assert np.isfinite(s[[0, 3]]).all() and np.isnan(s[[1, 2]]).all()
    assert np.all(run.chaos["S"][0][[0, 3]] == 0.0)  # the control's kernel is the main run's, exactly


def test_ghost_metrics_match_an_independent_computation(tmp_path):
    """C, L2, D and the per-layer L2 (layers = the modules owning parameters, in first-appearance order) against
    numpy on the stored parameter vectors and predictions."""
    ghosts = Ghosts(at=[2], control=False, perturbation=Perturbation(norm=1e-2), save_params=True)
    model, _, run, _ = _ghost_run(cnn_setup, 10, tmp_path, ghosts=ghosts, schedule=schedule.at([2, 10]))
    last = run.snapshot_index_of(10)
    main = run.params(snapshot_index=last).astype(np.float64)
    ghost = run.ghost_params(0, snapshot_index=last).astype(np.float64)
    assert run.chaos["C"][0, last] == pytest.approx(1 - main @ ghost / np.linalg.norm(main) / np.linalg.norm(ghost),
                                                    rel=1e-9)
    assert run.chaos["L2"][0, last] == pytest.approx(np.linalg.norm(main - ghost), rel=1e-9)
    assert run.chaos["D"][0, last] == pytest.approx(
        np.mean(run.predictions(snapshot_index=last) != run.ghost_predictions(0, snapshot_index=last)))
    squares: dict[str, float] = {}
    offset = 0
    for name, p in model.named_parameters():
        layer = name.rpartition(".")[0]
        part = slice(offset, offset + p.numel())
        squares[layer] = squares.get(layer, 0.0) + float(np.sum((main[part] - ghost[part]) ** 2))
        offset += p.numel()
    record = next(e for e in run.events if e["event"] == "ghost_compare" and e["step"] == 10)
    assert record["reference"] == "main"
    np.testing.assert_allclose(record["L2_layers"], np.sqrt(list(squares.values())), rtol=1e-9)
    assert len(record["L2_layers"]) == 5  # features.0, features.1, features.3, features.4, head


def test_explicit_step_api_trains_ghosts_too(tmp_path):
    model, optimizer, _, data = mlp_setup(seed=9)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.every(5), errors="raise",
                           ghosts=Ghosts(at=[0], loss_fn=nn.CrossEntropyLoss(), vectorize=False))
    criterion = nn.CrossEntropyLoss()
    for _ in range(15):
        index = torch.randint(0, data.x_train.shape[0], (16,))
        probe.step(data.x_train[index], data.y_train[index])
        loss = criterion(model(data.x_train[index]), data.y_train[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probe.close()
    run = dynprobe.load_run(tmp_path / "run")
    assert list(run.steps) == [0, 5, 10, 15]
    assert np.all(run.chaos["L2"][0] == 0) and np.all(run.chaos["L2"][1, 1:] > 0)


def test_models_computing_their_own_loss(tmp_path):
    class SelfLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = MLP()

        def forward(self, x, labels=None):
            logits = self.net(x)
            loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
            return {"logits": logits, "loss": loss}

    torch.manual_seed(0)
    model, data = SelfLoss(), make_data()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.every(5), errors="raise", loss_from_output=True,
                           ghosts=Ghosts(at=[0], vectorize=False))
    for _ in range(10):
        index = torch.randint(0, data.x_train.shape[0], (16,))
        out = model(data.x_train[index], labels=data.y_train[index])
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    probe.close()
    run = dynprobe.load_run(tmp_path / "run")
    assert np.all(run.chaos["L2"][0] == 0) and run.chaos["L2"][1, -1] > 0


# ---------------------------------------------------------------------------------------------- bad input


def _probe(tmp_path, ghosts, **kwargs):
    model, optimizer, _, data = mlp_setup()
    return dynprobe.Probe(model, kwargs.pop("optimizer", optimizer), eval_data=(data.x_test, data.y_test),
                          out=tmp_path / "r", ghosts=ghosts, **kwargs)


def test_spawn_steps_beyond_the_run_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="beyond total_steps=100"):
        _probe(tmp_path, Ghosts(at=[0, 500]), total_steps=100)


@pytest.mark.parametrize("make, match", [
    (lambda: Perturbation(norm=-1), ">= 0"),
    (lambda: Perturbation(kind="gaussian"), "kind must be one of"),
    (lambda: Ghosts(at=[5, 2]), "unsorted"),
    (lambda: Ghosts(perturbation=1e-7), "Perturbation"),
    (lambda: Ghosts(clip_grad_norm=-1.0), "clip_grad_norm"),
    (lambda: Ghosts(at=[]), r"at=\[\]\) spawns no ghost"),
    (lambda: Ghosts(lifetime_steps=0), "lifetime_steps"),
    (lambda: Ghosts(kernel_every_snapshots=0), "kernel_every_snapshots"),
    (lambda: Ghosts(vectorize="yes"), "vectorize"),
    (lambda: Perturbation(norm=2.0**53, kind="ulp"), "at most 2\\*\\*52"),
])
def test_bad_ghost_configurations_are_rejected(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_optimizer_that_cannot_be_cloned_for_ghosts_is_rejected(tmp_path):
    model, _, _, data = mlp_setup()
    extra = nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD(list(model.parameters()) + [extra], lr=0.1)
    with pytest.raises(ValueError, match="optimizer over the model's parameters only"):
        dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r",
                       ghosts=Ghosts(at=[0]))


def test_ghosts_must_be_a_ghosts_object(tmp_path):
    with pytest.raises(TypeError, match="dynprobe.Ghosts"):
        _probe(tmp_path, ghosts=[0, 100])


def test_unwatched_loss_marks_ghosts_failed_with_a_clear_warning(tmp_path):
    model, optimizer, scheduler, data = mlp_setup()
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r",
                           ghosts=Ghosts(at=[0]))
    with pytest.warns(RuntimeWarning, match="probe.watch"):
        train(model, optimizer, scheduler, data, 3)
    probe.close()
    assert all(g.status == "failed" for g in dynprobe.load_run(tmp_path / "r").ghosts)


def test_the_no_capture_warning_says_whether_the_watched_loss_was_called_and_an_argument_from_the_output_stops():
    unrelated = UnmatchedLoss("none of the watched loss's arguments is the model's output", from_output=False)
    kind, message, reason = replay_notice(False, [unrelated, unrelated])
    assert kind == "no-capture" and "backpropagated 2 time(s)" in message and "probe.watch" not in message
    assert "probe.watch(criterion)" in replay_notice(False, [])[1]  # no watched loss at all: wrap it
    assert replay_notice(True, [unrelated]) is None  # other calls were replayed
    computed = UnmatchedLoss("argument 0 is computed from the model's output (MulBackward0)", from_output=True)
    assert replay_notice(True, [unrelated, computed]) == (
        "loss-from-output", f"dynprobe: the ghosts cannot replay the watched loss: {computed.reason}", computed.reason)


def test_the_default_is_the_exact_sequential_path():
    assert Ghosts().vectorize is False


def test_ghosts_has_no_second_spelling_of_any_option():
    for removed in ("lifetime", "costly_every", "barrier", "barrier_alphas", "spawn_steps"):
        assert removed not in Ghosts.__dataclass_fields__
        with pytest.raises(TypeError):
            Ghosts(at=[0], **{removed: 1})


def test_closure_optimizers_are_refused_for_ghosts_at_construction(tmp_path):
    model, _, _, data = mlp_setup()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"LBFGS.*closure"):
        dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r",
                       ghosts=Ghosts(at=[0]))


@pytest.mark.parametrize("in_optimizer", [False, True])
def test_parameters_added_after_attach_stop_the_ghosts_with_a_clear_reason(tmp_path, in_optimizer):
    """Before: a spawn after the change (step 4) failed the whole probe and left the ghosts 'alive'. Now the ghosts
    stop at the first step that sees it, later spawns are skipped, and the main recording goes on."""
    model, optimizer, scheduler, data = mlp_setup()
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r",
                           schedule=schedule.every(2), ghosts=Ghosts(at=[0, 4]))
    criterion = probe.watch(nn.CrossEntropyLoss())
    train(model, optimizer, scheduler, data, 2, criterion=criterion)
    model.extra = nn.Linear(3, 3)  # a new submodule after attach
    if in_optimizer:
        optimizer.add_param_group({"params": model.extra.parameters()})
    with pytest.warns(RuntimeWarning, match="changed after the probe attached"):
        train(model, optimizer, scheduler, data, 4, criterion=criterion)
    probe.close()
    run = dynprobe.load_run(tmp_path / "r")
    assert [(g.status, g.status_step) for g in run.ghosts] == [("failed", 3), ("failed", 3)]
    assert all("extra.weight" in g.reason for g in run.ghosts)
    [changed] = [e for e in run.events if e["event"] == "model_changed"]
    assert changed["added"] == ["extra.weight", "extra.bias"] and changed["optimizer_changed"] is in_optimizer
    assert [e["step"] for e in run.events if e["event"] == "ghost_spawn_skipped"] == [4]
    assert not [e for e in run.events if e["event"] == "probe_error"] and run.status == "closed"
    assert list(run.steps) == [0, 2, 4, 6]


def test_parameters_added_just_before_the_final_snapshot_stop_the_ghosts_there(tmp_path):
    model, optimizer, scheduler, data = mlp_setup()
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r",
                           schedule=schedule.every(2), ghosts=Ghosts(at=[0]))
    train(model, optimizer, scheduler, data, 3, criterion=probe.watch(nn.CrossEntropyLoss()))
    model.extra = nn.Linear(3, 3)
    with pytest.warns(RuntimeWarning, match="changed after the probe attached"):
        probe.close()  # the final snapshot at step 3 compares no ghost with the changed model
    run = dynprobe.load_run(tmp_path / "r")
    assert [(g.status, g.status_step) for g in run.ghosts] == [("failed", 3), ("failed", 3)]
    assert all("changed after the probe attached" in g.reason for g in run.ghosts) and run.status == "closed"


def test_a_perturbation_below_the_autocast_precision_is_reported_with_a_magnitude_that_survives(tmp_path):
    def bf16_run(perturbation, name):
        model, optimizer, _, data = mlp_setup(seed=5)
        probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / name,
                               schedule=schedule.every(5), ghosts=Ghosts(at=[0, 2], perturbation=perturbation))
        criterion = probe.watch(nn.CrossEntropyLoss())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(5):
                index = torch.randint(0, data.x_train.shape[0], (16,))
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = criterion(model(data.x_train[index]), data.y_train[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            probe.close()
        return [w for w in caught if "resolution of bfloat16" in str(w.message)], dynprobe.load_run(tmp_path / name)

    tiny, run = bf16_run(Perturbation(norm=1e-7), "tiny")
    assert len(tiny) == 1 and tiny[0].filename == __file__
    assert "Perturbation(norm=65536, kind='ulp')" in str(tiny[0].message)
    events = [e for e in run.events if e["event"] == "perturbation_below_precision"]  # one per spawn, warned once
    assert [(e["dtype"], e["ghosts"]) for e in events] == [("bfloat16", [1]), ("bfloat16", [2])]
    spawns = [e for e in run.events if e["event"] == "ghost_spawn" and not e["control"]]
    assert all(e["changed_at"]["bfloat16"] < 0.01 * e["total"] for e in spawns)
    surviving, run = bf16_run(Perturbation(norm=65536, kind="ulp"), "ulp")
    assert surviving == []
    spawns = [e for e in run.events if e["event"] == "ghost_spawn" and not e["control"]]
    assert all(e["changed_at"]["bfloat16"] == e["total"] for e in spawns)  # one bf16 ulp: every coordinate moves


def test_a_compiled_model_is_named_at_attach_and_in_the_drift_causes(tmp_path):
    model, optimizer, scheduler, data = mlp_setup()
    compiled = torch.compile(model, backend="eager")
    with pytest.warns(RuntimeWarning, match=r"compiled \(torch.compile\)") as caught:
        probe = dynprobe.Probe(compiled, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r",
                               schedule=schedule.every(2), ghosts=Ghosts(at=[0]))
    assert any(w.filename == __file__ for w in caught if "torch.compile" in str(w.message))
    probe.close()
    causes, message = control_drift_notice("main", 3, {"net.0.weight": 1e-3}, grad_edit_detected=False,
                                           compiled=True)
    assert "torch.compile" in causes[0] and "torch.compile" in message
    causes, _ = control_drift_notice("main", 3, {"net.0.weight": 1e-3}, grad_edit_detected=False, compiled=False)
    assert any("torch.compile" in cause for cause in causes)  # a compiled submodule stays a possible cause


def test_nondeterministic_gpu_kernels_are_said_at_attach_and_lead_the_drift_causes(tmp_path, monkeypatch):
    """On CUDA without deterministic algorithms (simulated here: the rule says whether a replay can be exact)."""
    assert deterministic_replay_possible(torch.device("cpu"))
    monkeypatch.setattr(ghost_set, "deterministic_replay_possible", lambda device: False)
    monkeypatch.setattr(attached, "deterministic_replay_possible", lambda device: False)
    model, optimizer, scheduler, data = mlp_setup()
    with pytest.warns(RuntimeWarning, match="use_deterministic_algorithms"):
        probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r",
                               schedule=schedule.every(2), ghosts=Ghosts(at=[0]))
    probe.close()
    run = dynprobe.load_run(tmp_path / "r")
    assert [e["cause"] for e in run.events if e["event"] == "nondeterministic_device"] == [NONDETERMINISTIC_CAUSE]
    causes, message = control_drift_notice("main", 3, {"net.0.weight": 1e-3}, grad_edit_detected=True,
                                           compiled=False, nondeterministic=True)
    assert causes[0] == NONDETERMINISTIC_CAUSE and "CUBLAS_WORKSPACE_CONFIG" in message


def test_one_realized_norm_warning_for_many_ghosts_at_the_users_line(tmp_path):
    model, optimizer, scheduler, data = mlp_setup()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r",
                               schedule=schedule.every(2), ghosts=Ghosts(at=[0, 2, 4], perturbation=Perturbation(1e-9)))
        train(model, optimizer, scheduler, data, 6, criterion=probe.watch(nn.CrossEntropyLoss()))
        probe.close()
    realized = [w for w in caught if "survived float rounding" in str(w.message)]
    assert len(realized) == 1 and realized[0].filename == __file__
    assert "later spawns are not warned about again" in str(realized[0].message)


def test_a_run_with_ghosts_leaks_no_internal_warning(tmp_path):
    """A perturbation that survives rounding, a watched loss, snapshots with kernels: nothing to warn about."""
    model, optimizer, scheduler, data = mlp_setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r",
                               schedule=schedule.every(3), kernel=dynprobe.KernelConfig(n=8),
                               ghosts=Ghosts(at=[0, 3], perturbation=Perturbation(norm=1e-3)))
        train(model, optimizer, scheduler, data, 6, criterion=probe.watch(nn.CrossEntropyLoss()))
        probe.close()
    assert all(g.status == "finished" for g in dynprobe.load_run(tmp_path / "r").ghosts)


# ---------------------------------------------------------------------------------------------- resuming


def _resume_setup():
    model, optimizer, _, data = mlp_setup(seed=3)
    torch.manual_seed(11)
    return model, optimizer, data


RESUME_GHOSTS = Ghosts(at=[0, 4, 8, 12], perturbation=Perturbation(norm=1e-3), save_params=True)


def _resume_probe(model, optimizer, data, out, **kwargs):
    return dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=out, schedule=2,
                          ghosts=RESUME_GHOSTS, errors="raise", **kwargs)


def test_resuming_with_ghosts_equals_the_uninterrupted_run_for_every_ghost_not_interrupted(tmp_path):
    """Interrupted at step 11 (snapshots up to 10), restarted from a checkpoint of step 8: the ghosts alive at 8 end
    as ``interrupted`` there with their rows and separation curves ending there; the ghost due exactly at 8 is
    re-created, and the one due at 12 spawned once; both are bitwise the uninterrupted run's."""
    model, optimizer, data = _resume_setup()
    probe = _resume_probe(model, optimizer, data, tmp_path / "whole")
    train(model, optimizer, None, data, 16, criterion=probe.watch(nn.CrossEntropyLoss()))
    probe.close()
    whole = dynprobe.load_run(tmp_path / "whole")

    model, optimizer, data = _resume_setup()
    probe = _resume_probe(model, optimizer, data, tmp_path / "run")
    criterion = probe.watch(nn.CrossEntropyLoss())
    train(model, optimizer, None, data, 8, criterion=criterion)
    checkpoint = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), torch.get_rng_state())
    train(model, optimizer, None, data, 3, criterion=criterion)
    probe._closed = True  # a killed process: no close(), its hooks and its lock die with it
    for handle in probe._handles:
        handle.remove()
    probe.writer.close()

    model.load_state_dict(checkpoint[0])
    optimizer.load_state_dict(checkpoint[1])
    torch.set_rng_state(checkpoint[2])
    with pytest.warns(UserWarning, match=r"ghosts \[0, 1, 2\] alive at the interruption"):
        probe = _resume_probe(model, optimizer, data, tmp_path / "run", resume=True, resume_step=8)
    train(model, optimizer, None, data, 8, criterion=probe.watch(nn.CrossEntropyLoss()))
    probe.close()
    run = dynprobe.load_run(tmp_path / "run")

    def identity(g):
        return g.ghost_id, g.spawn_step, g.control, g.kind, g.seed, g.nominal_norm, g.realized_norm, g.changed

    assert [identity(g) for g in run.ghosts] == [identity(g) for g in whole.ghosts]
    assert [(g.status, g.status_step) for g in run.ghosts] == [("interrupted", 8)] * 3 + [("finished", 16)] * 2
    assert len([e for e in run.events if e["event"] == "ghost_spawn"]) == 5  # every spawn recorded exactly once
    np.testing.assert_array_equal(run.steps, whole.steps)
    for row, ghost in enumerate(run.ghosts):
        steps, l2 = run.separation(ghost.ghost_id)
        whole_steps, whole_l2 = whole.separation(ghost.ghost_id)
        if ghost.status == "interrupted":
            kept = whole_steps <= 8
            np.testing.assert_array_equal(steps, whole_steps[kept])
            np.testing.assert_array_equal(l2, whole_l2[kept])
        else:
            np.testing.assert_array_equal(steps, whole_steps)
            np.testing.assert_array_equal(l2, whole_l2)
        for metric in ("C", "L2", "D", "eval_loss"):
            expected = whole.chaos[metric][row].copy()
            if ghost.status == "interrupted":
                expected[whole.steps > 8] = np.nan
            np.testing.assert_array_equal(run.chaos[metric][row], expected, err_msg=f"ghost {ghost.ghost_id} {metric}")
    for ghost in (3, 4):
        np.testing.assert_array_equal(run.ghost_params(ghost, step=16), whole.ghost_params(ghost, step=16))


def test_a_ghost_equal_to_the_main_run_reuses_its_evaluation_and_a_perturbed_one_is_evaluated(tmp_path, monkeypatch):
    from dynprobe.ghosts import comparison

    evaluated = []
    original = comparison.compare_ghost

    def counting(index, module, params, reference, **kwargs):
        evaluate = kwargs["evaluate"]
        kwargs["evaluate"] = lambda m: evaluated.append(index) or evaluate(m)
        return original(index, module, params, reference, **kwargs)

    monkeypatch.setattr("dynprobe.ghosts.sequential.SequentialTrainer.comparer", staticmethod(counting))
    ghosts = Ghosts(at=[0], perturbation=Perturbation(norm=1e-3))
    _, _, run, _ = _ghost_run(mlp_setup, 12, tmp_path, ghosts=ghosts, schedule=schedule.at([0, 6, 12]))
    compares = [e for e in run.events if e["event"] == "ghost_compare"]
    control = [e for e in compares if e["ghost"] == 0]
    perturbed = [e for e in compares if e["ghost"] == 1]
    assert len(control) == len(perturbed) == 3
    assert all(e["evaluation"].startswith("the reference's") and e["D"] == 0.0 for e in control)
    assert all("evaluation" not in e for e in perturbed) and evaluated == [1, 1, 1]
    for k, step in enumerate(run.steps):  # the control's loss is the main run's, exactly
        assert run.chaos["eval_loss"][0, k] == run.eval_loss[k]
    np.testing.assert_array_equal(run.ghost_predictions(0, step=12), run.predictions(step=12))
