"""Ghost replicas: bitwise control, non-intrusiveness, equality with an independent re-run, replay of
schedulers / accumulation / autocast / clipping / GradScaler, faults, run-directory maps, bad input."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import dynprobe
from dynprobe import Ghosts, Perturbation, schedule
from dynprobe.ghosts.perturbation import perturb_

from .conftest import MLP, SmallCNN, assert_bitwise_equal, cnn_setup, make_data, mlp_setup, state_of, train


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


@pytest.mark.parametrize("vectorize", [False, "auto"])
@pytest.mark.parametrize("name", list(SETUPS))
def test_control_ghost_stays_bitwise_identical_for_200_steps(name, vectorize, tmp_path):
    """Sequential: the control equals the main run. "auto" may choose either path; when it vectorizes, the
    chaos maps' reference is the in-stack shadow, which the control must equal bitwise (test_ghost_stack.py)."""
    ghosts = Ghosts(at=[0, 60], perturbation=Perturbation(norm=1e-7), control=True, barrier_alphas=5,
                    vectorize=vectorize)
    model, rng, run, probe = _ghost_run(SETUPS[name], 200, tmp_path, ghosts=ghosts,
                                        schedule=schedule.at([0, 60, 100, 200]))
    mode = [e for e in run.events if e["event"] == "ghost_mode"][-1]
    assert mode["mode"] in (["sequential"] if vectorize is False else ["sequential", "vectorized"])
    assert run.manifest["ghost_mode"]["mode"] == mode["mode"]
    control = [g for g in run.ghosts if g.control]
    assert len(control) == 1 and control[0].spawn_step == 0 and control[0].realized_norm == 0
    row = run.ghosts.index(control[0])
    for metric in ("C", "L2", "D", "B"):
        values = run.chaos[metric][row]
        assert np.all(values == 0.0), f"control ghost {metric} = {values}"
    assert not any(e["event"] == "control_drift" for e in run.events)
    perturbed = [r for r, g in enumerate(run.ghosts) if not g.control]
    assert all(run.chaos["L2"][r, -1] > 0 for r in perturbed)  # the perturbed ghosts did move away


@pytest.mark.parametrize("name", list(SETUPS))
def test_main_run_with_ghosts_is_bitwise_identical_to_a_probe_free_run(name, tmp_path):
    model, optimizer, scheduler, data = SETUPS[name](seed=1)
    torch.manual_seed(99)
    train(model, optimizer, scheduler, data, 60)
    reference, reference_rng = state_of(model), torch.get_rng_state()
    ghosts = Ghosts(at=[0, 10, 30], perturbation=Perturbation(norm=1e-6), barrier_alphas=3)
    probed, rng, run, _ = _ghost_run(SETUPS[name], 60, tmp_path, ghosts=ghosts, schedule=schedule.every(7))
    assert_bitwise_equal(reference, state_of(probed))
    assert torch.equal(reference_rng, rng)
    assert len(run.ghosts) == 4


def test_ghost_equals_an_independent_rerun_from_the_perturbed_state(tmp_path):
    """Train a second model from main(t0) + ε on the same batches and dropout masks, without dynprobe."""
    spawn, steps = 5, 25
    perturbation = Perturbation(norm=1e-5, kind="l2", seed=3)
    model, optimizer, scheduler, data = mlp_onecycle_setup(seed=2, steps=steps)
    torch.manual_seed(42)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.at([steps]), errors="raise",
                           ghosts=Ghosts(at=[spawn], perturbation=perturbation, control=False, save_params=True,
                                         barrier=False, vectorize=False))
    criterion = probe.watch(nn.CrossEntropyLoss())
    batches, twin = [], {}

    def after(step):
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
    for step in range(spawn, steps):
        index = torch.randint(0, data.x_train.shape[0], (32,))
        other_optimizer.param_groups[0].update(lrs[step])
        loss = nn.functional.cross_entropy(other(data.x_train[index]), data.y_train[index])
        other_optimizer.zero_grad()
        loss.backward()
        other_optimizer.step()
    expected = torch.cat([p.detach().reshape(-1) for p in other.parameters()]).numpy()
    ghost = run.ghosts[0]
    assert ghost.spawn_step == spawn and not ghost.control
    np.testing.assert_array_equal(run.ghost_params(0, run.index_of(steps)), expected)


def test_gradient_accumulation_is_replayed(tmp_path):
    model, optimizer, _, data = mlp_setup(seed=4)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.every(10), errors="raise",
                           ghosts=Ghosts(at=[0], perturbation=Perturbation(norm=1e-6), barrier=False,
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
                           ghosts=Ghosts(at=[0], perturbation=Perturbation(norm=1e-6), barrier=False,
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
                           ghosts=Ghosts(at=[0], clip_grad_norm=0.05, barrier=False, vectorize=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _clipping_loop(probe, model, optimizer, data, 20, clip=0.05)
        probe.close()
    run = dynprobe.load_run(tmp_path / "run")
    assert np.all(run.chaos["L2"][0] == 0)


def test_undeclared_clipping_is_detected_and_the_control_drift_recorded(tmp_path):
    model, optimizer, _, data = mlp_setup(seed=6)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.every(10), ghosts=Ghosts(at=[0], barrier=False, vectorize=False))
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
                           ghosts=Ghosts(at=[0], scaler=scaler, barrier=False, vectorize=False))
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
                           schedule=schedule.every(5), ghosts=Ghosts(at=[3], control=False, barrier=False,
                                                                    perturbation=Perturbation(norm=1e30)))
    with pytest.warns(RuntimeWarning, match="diverged"):
        train(model, optimizer, scheduler, data, 12, criterion=probe.watch(nn.CrossEntropyLoss()))
        probe.close()
    run = dynprobe.load_run(tmp_path / "run")
    assert run.ghosts[0].status == "diverged"
    assert np.isnan(run.chaos["C"][0, run.index_of(10)])


def test_chaos_maps_have_one_row_per_ghost_and_nan_before_spawn(tmp_path):
    ghosts = Ghosts(at=[0, 6], perturbation=Perturbation(norm=1e-4), barrier_alphas=4, costly_every=2)
    _, _, run, _ = _ghost_run(mlp_setup, 12, tmp_path, ghosts=ghosts, schedule=schedule.at([0, 3, 6, 9, 12]))
    assert [(g.spawn_step, g.control) for g in run.ghosts] == [(0, True), (0, False), (6, False)]
    assert all(g.status == "finished" for g in run.ghosts)
    for name in ("C", "L2", "D", "eval_loss"):
        assert run.chaos[name].shape == (3, 5)
    late = run.chaos["C"][2]
    assert np.isnan(late[:2]).all() and np.isfinite(late[2:]).all()
    b = run.chaos["B"][1]  # every second comparison of this ghost has a barrier
    assert np.isfinite(b[[0, 2, 4]]).all() and np.isnan(b[[1, 3]]).all()
    spawn = [e for e in run.events if e["event"] == "ghost_spawn"][1]
    assert spawn["nominal_norm"] == pytest.approx(1e-4) and 0 < spawn["realized_norm"] <= 1.01e-4
    assert run.ghost_predictions(1, 4).shape == (96,)


def test_costly_comparisons_are_always_made_at_total_steps(tmp_path):
    # costly_every=3 would skip the 4th comparison (step 9); total_steps=9 makes the final column complete.
    ghosts = Ghosts(at=[0], perturbation=Perturbation(norm=1e-4), barrier_alphas=4, costly_every=3, vectorize=False)
    _, _, run, _ = _ghost_run(mlp_setup, 9, tmp_path, ghosts=ghosts, schedule=schedule.at([0, 3, 6, 9]),
                              total_steps=9)
    b = run.chaos["B"][1]
    assert np.isfinite(b[[0, 3]]).all() and np.isnan(b[[1, 2]]).all()


def test_ghost_metrics_match_an_independent_computation(tmp_path):
    ghosts = Ghosts(at=[2], control=False, perturbation=Perturbation(norm=1e-2), save_params=True,
                    barrier_alphas=7, vectorize=False)
    model, _, run, _ = _ghost_run(cnn_setup, 10, tmp_path, ghosts=ghosts, schedule=schedule.at([2, 10]))
    last = run.index_of(10)
    main, ghost = run.params(last).astype(np.float64), run.ghost_params(0, last).astype(np.float64)
    assert run.chaos["C"][0, last] == pytest.approx(1 - main @ ghost / np.linalg.norm(main) / np.linalg.norm(ghost),
                                                    rel=1e-9)
    assert run.chaos["L2"][0, last] == pytest.approx(np.linalg.norm(main - ghost), rel=1e-9)
    assert run.chaos["D"][0, last] == pytest.approx(np.mean(run.predictions(last) != run.ghost_predictions(0, last)))
    assert run.chaos["B"][0, last] >= 0 or np.isfinite(run.chaos["B"][0, last])


def test_explicit_step_api_trains_ghosts_too(tmp_path):
    model, optimizer, _, data = mlp_setup(seed=9)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.every(5), errors="raise",
                           ghosts=Ghosts(at=[0], barrier=False, loss_fn=nn.CrossEntropyLoss(), vectorize=False))
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
                           ghosts=Ghosts(at=[0], barrier=False, vectorize=False))
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
    (lambda: Ghosts(barrier_alphas=1), "barrier_alphas"),
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
                           ghosts=Ghosts(at=[0], barrier=False))
    with pytest.warns(RuntimeWarning, match="probe.watch"):
        train(model, optimizer, scheduler, data, 3)
    probe.close()
    assert all(g.status == "failed" for g in dynprobe.load_run(tmp_path / "r").ghosts)


def test_cnn_model_used_in_tests_exists():
    assert isinstance(SmallCNN(), nn.Module)
