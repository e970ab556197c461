"""The vectorized ghost path (``Ghosts(vectorize=True | "auto")``): stacked optimizers vs per-replica optimizers,
the in-stack control vs the ε = 0 shadow, vectorized vs sequential ghosts, faults in one row, the mode choice
and its record in the run, non-intrusiveness."""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import dynprobe
from dynprobe import Ghosts, Perturbation, schedule
from dynprobe.capture.step import AutocastState, ForwardCall, LossCall, MicroBatch, RngState, Substitution
from dynprobe.ghosts import vectorized as vectorized_trainer
from dynprobe.ghosts._stack_optimizers import AliasOptimizers, StackedOptimizer, is_elementwise
from dynprobe.ghosts.stack import GhostStack, ReplicaState
from dynprobe.ghosts.vectorized import SHADOW
from dynprobe.store.manifest import GHOST_MODE_CONVENTIONS

from ..conftest import MLP, SmallCNN, assert_bitwise_equal, cnn_setup, make_data, mlp_setup, state_of, train
from .test_ghost_set import mlp_onecycle_setup

SETUPS = {
    "mlp-dropout-sgd-momentum-wd-onecycle": mlp_onecycle_setup,
    "cnn-bn-adam-steplr": cnn_setup,
}


def cnn_sgd_setup(seed: int = 0):
    """CNN + BatchNorm with SGD: unlike Adam, SGD does not blow rounding noise in zero-gradient coordinates (the
    conv biases in front of BatchNorm) up to lr-sized steps, so vectorized and sequential ghosts stay close."""
    torch.manual_seed(seed)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return model, optimizer, None, make_data((3, 8, 8), seed=seed)


def _run(setup, steps, tmp_path, *, ghosts, name="run", after_step=None, **probe_kwargs):
    model, optimizer, scheduler, data = setup(seed=1)
    torch.manual_seed(99)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / name,
                           ghosts=ghosts, errors="raise", **probe_kwargs)
    criterion = probe.watch(nn.CrossEntropyLoss())
    train(model, optimizer, scheduler, data, steps, criterion=criterion,
          after_step=(lambda step: after_step(step, probe)) if after_step else None)
    rng = torch.get_rng_state()
    probe.close()
    return model, rng, dynprobe.load_run(tmp_path / name)


def _events(run, kind):
    return [e for e in run.events if e["event"] == kind]


# ---------------------------------------------------------------------------------------------- optimizers


class NormalizedSGD(torch.optim.Optimizer):
    """p ← p − lr·g/‖g‖ per tensor: not elementwise (a stacked tensor's norm would mix replicas)."""

    def __init__(self, params, lr=0.01):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    state["steps"] = state.get("steps", 0) + 1
                    p.add_(p.grad / p.grad.norm().clamp_min(1e-12), alpha=-group["lr"])


OPTIMIZERS = {
    "sgd-momentum-wd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "sgd-nesterov": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=1e-2, momentum=0.5),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=1e-2),
    "adamax": lambda params: torch.optim.Adamax(params, lr=1e-2),
    "nadam": lambda params: torch.optim.NAdam(params, lr=1e-2),
    "radam": lambda params: torch.optim.RAdam(params, lr=1e-2),
}
SHAPES = [(4, 3), (3,), (2, 2, 3)]


def _replicas(make_optimizer, count, warm_steps, generator):
    """``count`` replicas with different parameters, each with its own optimizer that already took
    ``warm_steps`` steps (so the stack has state to merge)."""
    replicas = []
    for _ in range(count):
        params = [torch.randn(shape, generator=generator).requires_grad_() for shape in SHAPES]
        optimizer = make_optimizer(params)
        for _ in range(warm_steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
        replicas.append(ReplicaState(params, [], optimizer))
    return replicas


def _stack_params(replicas):
    with torch.no_grad():
        return [torch.stack([r.params[k].detach() for r in replicas]).requires_grad_() for k in range(len(SHAPES))]


def _step_both(stacked_optimizer, stacked, replicas, main, generator):
    for k, tensor in enumerate(stacked):
        grads = [torch.randn(tensor.shape[1:], generator=generator) for _ in replicas]
        tensor.grad = torch.stack(grads)
        for replica, grad in zip(replicas, grads):
            replica.params[k].grad = grad.clone()
    stacked_optimizer.sync(main)
    stacked_optimizer.step()
    for replica in replicas:
        for group, main_group in zip(replica.optimizer.param_groups, main.param_groups):
            group.update({key: value for key, value in main_group.items() if key != "params"})
        replica.optimizer.step()


def _assert_rows_equal(stacked, replicas):
    for row, replica in enumerate(replicas):
        for tensor, p in zip(stacked, replica.params):
            assert torch.equal(tensor[row], p), f"row {row} differs"


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_stacked_optimizer_equals_per_replica_optimizers_bitwise(kind):
    generator = torch.Generator().manual_seed(0)
    make = OPTIMIZERS[kind]
    replicas = _replicas(make, 3, warm_steps=2, generator=generator)
    main_params = [torch.zeros(shape, requires_grad=True) for shape in SHAPES]
    main = make(main_params)  # the "main" optimizer: a scheduler changes its hyper-parameters below
    assert is_elementwise(main)
    stacked = _stack_params(replicas)
    optimizer = StackedOptimizer(main, main_params)
    optimizer.rebuild(stacked, [], copy.deepcopy(replicas))
    for step in range(12):
        main.param_groups[0]["lr"] *= 0.8  # any hyper-parameter the main's scheduler sets is followed
        if "betas" in main.param_groups[0]:
            main.param_groups[0]["betas"] = (0.9 - 0.01 * step, 0.999)
        elif "momentum" in main.param_groups[0] and main.param_groups[0]["momentum"]:
            main.param_groups[0]["momentum"] = 0.9 - 0.02 * step
        _step_both(optimizer, stacked, replicas, main, generator)
        _assert_rows_equal(stacked, replicas)
        if step == 5:  # drop the middle row: the others keep their state
            with torch.no_grad():
                stacked = [t.detach()[[0, 2]].clone().requires_grad_() for t in stacked]
            optimizer.rebuild(stacked, [0, 2], [])
            del replicas[1]
    # a row exported out of the stack is an optimizer of the user's class with that row's state
    exported_params = [t[1].detach().clone().requires_grad_() for t in stacked]
    exported = optimizer.export(1, exported_params)
    assert type(exported) is type(main)
    for p, q in zip(exported_params, replicas[1].params):
        for key, value in replicas[1].optimizer.state[q].items():
            other = exported.state[p][key]
            assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value


def test_stacked_optimizer_refuses_an_optimizer_with_per_tensor_statistics():
    params = [torch.zeros(3, requires_grad=True)]
    assert not is_elementwise(NormalizedSGD(params))
    with pytest.raises(ValueError, match="stacked optimizer is exact only for"):
        StackedOptimizer(NormalizedSGD(params), params)


def test_alias_optimizers_equal_per_replica_optimizers_bitwise_for_a_non_elementwise_optimizer():
    generator = torch.Generator().manual_seed(1)
    replicas = _replicas(NormalizedSGD, 3, warm_steps=1, generator=generator)
    main_params = [torch.zeros(shape, requires_grad=True) for shape in SHAPES]
    main = NormalizedSGD(main_params, lr=0.05)
    stacked = _stack_params(replicas)
    optimizer = AliasOptimizers(main, main_params)
    optimizer.rebuild(stacked, [], copy.deepcopy(replicas))
    for _ in range(6):
        _step_both(optimizer, stacked, replicas, main, generator)
        _assert_rows_equal(stacked, replicas)
    # the same stack stepped by one stacked NormalizedSGD would mix rows (the per-tensor norm): the test can fail
    mixed = [t.detach().clone().requires_grad_() for t in stacked]
    for t in mixed:
        t.grad = torch.randn(t.shape, generator=generator)
    per_row = [[t[r].detach().clone().requires_grad_() for t in mixed] for r in range(3)]
    for r, params in enumerate(per_row):
        for p, t in zip(params, mixed):
            p.grad = t.grad[r].clone()
        NormalizedSGD(params, lr=0.05).step()
    NormalizedSGD(mixed, lr=0.05).step()
    assert not all(torch.equal(t[r], p) for r, params in enumerate(per_row) for t, p in zip(mixed, params))


# ---------------------------------------------------------------------------------------------- the stack


@pytest.mark.parametrize("name", list(SETUPS))
def test_in_stack_control_stays_bitwise_equal_to_the_shadow_for_200_steps(name, tmp_path):
    checked = {}

    def after(step, probe):
        if step in (1, 100, 200):
            stack = probe._ghosts.trainer.stack
            control = next(g.ghost_id for g in probe._ghosts.ghosts if g.control)
            checked[step] = stack.differences(control, SHADOW)  # parameters and buffers, every row tensor

    ghosts = Ghosts(at=[0, 60], perturbation=Perturbation(norm=1e-7), control=True,
                    vectorize=True)
    _, _, run = _run(SETUPS[name], 200, tmp_path, ghosts=ghosts, schedule=schedule.at([0, 60, 100, 200]),
                     after_step=after)
    assert checked == {1: {}, 100: {}, 200: {}}
    control = [g for g in run.ghosts if g.control]
    assert len(control) == 1 and control[0].realized_norm == 0
    row = run.ghosts.index(control[0])
    for metric in ("C", "L2", "D"):
        assert np.all(run.chaos[metric][row] == 0.0), f"control {metric} = {run.chaos[metric][row]}"
    assert not _events(run, "control_drift")
    assert all(run.chaos["L2"][r, -1] > 0 for r, g in enumerate(run.ghosts) if not g.control)
    mode = _events(run, "ghost_mode")
    assert [m["mode"] for m in mode] == ["vectorized"] and mode[0]["reference"] == "shadow"
    assert run.manifest["ghost_mode"]["mode"] == "vectorized"
    assert run.conventions["ghosts"] == GHOST_MODE_CONVENTIONS["vectorized"]
    # From the first stacked step on (at step 0 the ghosts are still clones of the main run, the shadow's twin),
    # each snapshot records how far the shadow drifted from the main run.
    assert [d["step"] for d in _events(run, "shadow_drift")] == [60, 100, 200]


def _gaps(vectorized, sequential):
    """Per perturbed ghost and snapshot after its spawn: ‖θ'_vectorized − θ'_sequential‖ relative to the ghost's own
    signal ‖θ'_sequential − θ_main‖ (float64), and the vectorized ghost's separation from its shadow relative to the
    sequential one's from the main run."""
    gaps, signals = [], []
    for ghost in [g.ghost_id for g in sequential.ghosts if not g.control]:
        for index, step in enumerate(sequential.steps):
            if step <= sequential.ghosts[ghost].spawn_step:
                continue
            v = vectorized.ghost_params(ghost, snapshot_index=index).astype(np.float64)
            s = sequential.ghost_params(ghost, snapshot_index=index).astype(np.float64)
            signal = np.linalg.norm(s - sequential.params(snapshot_index=index).astype(np.float64))
            gaps.append(np.linalg.norm(v - s) / signal)
            signals.append(vectorized.chaos["L2"][ghost, index] / sequential.chaos["L2"][ghost, index])
    return np.array(gaps), np.array(signals)


def test_vectorized_mlp_ghosts_equal_sequential_ghosts_up_to_a_small_fraction_of_their_signal(tmp_path):
    """No BatchNorm: the vmapped kernels differ from the plain ones only in the last bit of a few matmuls, so the
    two modes' ghosts differ by a tiny fraction of what ε did to them."""
    ghosts = dict(at=[0, 10], perturbation=Perturbation(norm=1e-4), save_params=True)
    sched = schedule.every(10)
    _, _, vectorized = _run(mlp_onecycle_setup, 40, tmp_path, ghosts=Ghosts(**ghosts, vectorize=True),
                            name="v", schedule=sched)
    _, _, sequential = _run(mlp_onecycle_setup, 40, tmp_path, ghosts=Ghosts(**ghosts, vectorize=False),
                            name="s", schedule=sched)
    assert [m["mode"] for m in _events(vectorized, "ghost_mode")] == ["vectorized"]
    gaps, signals = _gaps(vectorized, sequential)
    # measured (CPU, torch 2.14): 0 where the vmapped matmuls round like the plain ones, at most 1.9e-3 on an
    # AVX-512 AMD EPYC where they do not (40 steps amplify a last-bit difference, as they amplify ε)
    assert len(gaps) == 7 and gaps.max() < 1e-2, gaps
    np.testing.assert_allclose(signals, 1.0, rtol=1e-4)


def test_vectorized_cnn_batchnorm_ghosts_equal_sequential_ghosts_up_to_a_fraction_of_their_signal(tmp_path):
    """BatchNorm: the vmapped reductions differ from the plain ones, so the shadow drifts from the main run (and the
    vectorized ghosts from the sequential ones) — still well below the ghosts' own separation."""
    ghosts = dict(at=[0, 5], perturbation=Perturbation(norm=1e-4), save_params=True)
    sched = schedule.every(5)
    _, _, vectorized = _run(cnn_sgd_setup, 20, tmp_path, ghosts=Ghosts(**ghosts, vectorize=True), name="v",
                            schedule=sched)
    _, _, sequential = _run(cnn_sgd_setup, 20, tmp_path, ghosts=Ghosts(**ghosts, vectorize=False), name="s",
                            schedule=sched)
    gaps, signals = _gaps(vectorized, sequential)
    assert len(gaps) == 7 and gaps.max() < 0.02, gaps  # measured: at most 4e-3
    np.testing.assert_allclose(signals, 1.0, rtol=2e-3)  # measured: within 3e-4
    drift = _events(vectorized, "shadow_drift")
    assert 0 < drift[-1]["max_abs_diff"] < 1e-4  # the shadow does drift from the main run (BN), a little
    assert all(d["L2"] < d["smallest_ghost_L2"] and not d["exceeds_ghost_signal"] for d in drift)
    compared = [e for e in vectorized.events if e["event"] == "ghost_compare"]
    # at step 0 the ghosts are still copies of the main run (the stack is built at the first step)
    assert all(e["reference"] == ("main" if e["step"] == 0 else "shadow") for e in compared)
    assert all(("reference_L2" in e) == (e["step"] > 0) for e in compared)


def test_a_shadow_drift_larger_than_the_ghost_signal_is_recorded_and_warned_about(tmp_path):
    """Adam blows the vmapped BatchNorm kernels' rounding up to lr-sized steps: the shadow leaves the main run by more
    than the ghosts' separation from it — the case where vectorized chaos maps measure the kernels, not ε."""
    ghosts = Ghosts(at=[0, 5], perturbation=Perturbation(norm=1e-6), vectorize=True)
    with pytest.warns(RuntimeWarning, match=r"shadow .* more than the smallest ghost separation") as caught:
        _, _, run = _run(cnn_setup, 15, tmp_path, ghosts=ghosts, schedule=schedule.every(5))
    assert [w.filename for w in caught if "shadow" in str(w.message)] == [train.__code__.co_filename]
    drift = _events(run, "shadow_drift")
    exceeding = [d for d in drift if d["exceeds_ghost_signal"]]
    assert exceeding and all(d["L2"] > d["smallest_ghost_L2"] for d in exceeding)
    for d in drift:  # the smallest separation of a perturbed ghost from the shadow at that snapshot
        separations = [e["L2"] for e in run.events if e["event"] == "ghost_compare" and e["step"] == d["step"]
                       and not run.ghosts[e["ghost"]].control]
        assert d["smallest_ghost_L2"] == min(separations)


def _mlp_loop(probe, model, optimizer, data, steps, *, accumulate=1, autocast=False, clip=None):
    criterion = probe.watch(nn.CrossEntropyLoss())
    for _ in range(steps):
        optimizer.zero_grad()
        for _ in range(accumulate):
            index = torch.randint(0, data.x_train.shape[0], (16,))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = criterion(model(data.x_train[index]), data.y_train[index])
            (loss / accumulate).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()


@pytest.mark.parametrize("variant", ["accumulation", "declared-clipping", "undeclared-clipping"])
def test_the_stack_replays_what_shapes_the_step(variant, tmp_path):
    """The shadow is the stack's copy of the main run: it may only drift in the last bits (vmapped kernels).
    Undeclared clipping, which the ghosts cannot see, shows that the check can fail."""
    model, optimizer, _, data = mlp_setup(seed=4)
    declared = 0.05 if variant == "declared-clipping" else None
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.every(10), errors="raise",
                           ghosts=Ghosts(at=[0], clip_grad_norm=declared, vectorize=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _mlp_loop(probe, model, optimizer, data, 30, accumulate=3 if variant == "accumulation" else 1,
                  clip=0.05 if "clipping" in variant else None)
        probe.close()
    run = dynprobe.load_run(tmp_path / "run")
    drift = max(d["max_abs_diff"] for d in _events(run, "shadow_drift"))
    if variant == "undeclared-clipping":
        assert drift > 1e-3
    else:
        assert drift < 1e-5, drift
        assert np.all(run.chaos["L2"][0] == 0)


def test_the_stack_replays_the_recorded_autocast_state():
    """bf16 autocast recorded at the main forward is re-entered inside vmap. Checked exactly with dyadic numbers:
    the inputs are (1 + 2⁻¹⁰)·2ᵏ, exact in fp32 and fp16 but rounded to 2ᵏ in bf16, the weights are powers of two,
    so the matmul and the mean error are exact in every precision and the stacked loss must equal, bit for bit,
    a float64 computation from the inputs rounded to the recorded autocast dtype."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.5, 2.0, 1.0]]))
    x = (1 + 2.0 ** -10) * 2.0 ** torch.randint(-1, 2, (16, 4), generator=generator).float()
    y = torch.zeros(16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def mean_error(output, target):
        return (output.squeeze(-1).float() - target).mean()

    def micro_batch(autocast):
        call = ForwardCall((x,), {}, RngState.capture(), autocast, ())
        return MicroBatch(call, LossCall((None, y), {}, call, (Substitution((("index", 0),), ()),), autocast))

    def float64_loss(dtype):
        rounded = x.to(dtype).double()
        return float(((rounded @ model.weight.detach().double().T).squeeze(-1) - y.double()).mean())

    stack = GhostStack(model, optimizer)
    stack.extend(["a", "b"], [ReplicaState.copy_of(model, optimizer), ReplicaState.copy_of(model, optimizer)])
    fp32 = micro_batch(AutocastState())
    bf16 = micro_batch(AutocastState((("cpu", torch.bfloat16),)))
    stacked_fp32 = stack.forward_backward([fp32], loss_fn=mean_error, loss_from_output=None)
    stacked_bf16 = stack.forward_backward([bf16], loss_fn=mean_error, loss_from_output=None)
    expected = {dtype: float64_loss(dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)}
    assert expected[torch.bfloat16] != expected[torch.float32] == expected[torch.float16]  # the witness separates
    assert float(stacked_fp32[0, 0]) == expected[torch.float32]
    assert float(stacked_bf16[0, 0]) == expected[torch.bfloat16]
    assert torch.equal(stacked_bf16[0, 0], stacked_bf16[0, 1])


def test_explicit_step_api_with_vectorized_ghosts(tmp_path):
    model, optimizer, _, data = mlp_setup(seed=9)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.every(5), errors="raise",
                           ghosts=Ghosts(at=[0], loss_fn=nn.CrossEntropyLoss(), vectorize=True))
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
    assert np.all(run.chaos["L2"][0] == 0) and np.all(run.chaos["L2"][1, 1:] > 0)
    assert max(d["max_abs_diff"] for d in _events(run, "shadow_drift")) < 1e-5


def test_non_elementwise_optimizer_trains_as_per_replica_rows(tmp_path):
    model, _, _, data = mlp_setup(seed=2)
    optimizer = NormalizedSGD(model.parameters(), lr=0.01)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.every(10), errors="raise",
                           ghosts=Ghosts(at=[0], vectorize=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _mlp_loop(probe, model, optimizer, data, 20)
        probe.close()
    run = dynprobe.load_run(tmp_path / "run")
    assert _events(run, "ghost_mode")[0]["optimizer"] == "per_replica"
    assert np.all(run.chaos["L2"][0] == 0) and run.chaos["L2"][1, -1] > 0
    assert max(d["max_abs_diff"] for d in _events(run, "shadow_drift")) < 1e-5


# ---------------------------------------------------------------------------------------------- faults


def test_a_diverging_row_marks_only_that_ghost_and_never_raises(tmp_path):
    """ε = 1e30 makes ghost 1's loss non-finite at its first stacked step (divergence_ratio=1e40 keeps the
    spawn-time norm check from stopping it earlier); the control, a row of the same stack, trains on."""
    model, optimizer, scheduler, data = mlp_setup(seed=8)
    torch.manual_seed(5)
    train(model, optimizer, scheduler, data, 12)
    reference = state_of(model)
    model, optimizer, scheduler, data = mlp_setup(seed=8)
    torch.manual_seed(5)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.every(5),
                           ghosts=Ghosts(at=[3], perturbation=Perturbation(norm=1e30),
                                         divergence_ratio=1e40, vectorize=True))
    rows = {}

    def after(step):
        stack = probe._ghosts.trainer.stack
        rows[step] = list(stack.keys) if stack is not None else None

    with pytest.warns(RuntimeWarning, match="diverged"):
        train(model, optimizer, scheduler, data, 12, criterion=probe.watch(nn.CrossEntropyLoss()), after_step=after)
        probe.close()
    assert_bitwise_equal(reference, state_of(model))
    run = dynprobe.load_run(tmp_path / "run")
    control, ghost = run.ghosts
    assert control.control and control.status == "finished" and control.status_step == 12
    assert ghost.status == "diverged" and ghost.status_step == 4
    # its non-finite flag stays on the device until the next read (here step 5's snapshot): recorded at step 4,
    # the row leaves the stack at that read
    assert rows[4] == [SHADOW, 0, 1] and rows[5] == [SHADOW, 0] and rows[12] == [SHADOW, 0]
    assert run.separation(1)[0].tolist() == [3]  # its spawn pair only: steps 4 and 5 are not recorded
    assert np.all(run.chaos["C"][0, run.snapshot_index_of(5):] == 0)
    assert np.isnan(run.chaos["C"][1, run.snapshot_index_of(5):]).all()
    assert not _events(run, "control_drift")


def test_a_failing_stacked_step_after_the_first_marks_the_ghosts_failed_and_never_raises(tmp_path, monkeypatch):
    model, optimizer, scheduler, data = mlp_setup(seed=3)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.every(5), ghosts=Ghosts(at=[0], vectorize=True))
    calls = {"n": 0}
    original = GhostStack.train_step

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated kernel failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GhostStack, "train_step", flaky)
    with pytest.warns(RuntimeWarning, match="failed"):
        train(model, optimizer, scheduler, data, 8, criterion=probe.watch(nn.CrossEntropyLoss()))
        probe.close()
    run = dynprobe.load_run(tmp_path / "run")
    assert [(g.status, g.status_step) for g in run.ghosts] == [("failed", 3), ("failed", 3)]
    assert "simulated kernel failure" in run.ghosts[0].reason


# ---------------------------------------------------------------------------------------------- choosing


class ItemControlFlow(nn.Module):
    """Data-dependent Python control flow: cannot run under vmap."""

    def __init__(self):
        super().__init__()
        self.net = MLP()

    def forward(self, x):
        out = self.net(x)
        return out * 2 if out.sum().item() > 0 else out


def test_vectorize_true_on_a_model_that_cannot_be_vmapped_fails_at_construction(tmp_path):
    torch.manual_seed(0)
    model, data = ItemControlFlow(), make_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"vectorize=True.*cannot be trained as a torch.func.vmap stack.*"
                                         r"vectorize=False"):
        dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                       ghosts=Ghosts(at=[0], vectorize=True))


def test_vectorize_true_with_a_grad_scaler_fails_at_construction(tmp_path):
    model, optimizer, _, data = mlp_setup()
    with pytest.raises(ValueError, match="vectorize=True.*scaler"):
        dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                       ghosts=Ghosts(at=[0], vectorize=True, scaler=torch.amp.GradScaler("cpu")))


def test_vectorize_true_falls_back_to_sequential_when_the_first_stacked_step_fails(tmp_path):
    """The model passes the construction check, but the watched loss calls .item(), which vmap cannot run."""

    def loss_with_item(output, target):
        loss = nn.functional.cross_entropy(output, target)
        return loss * 2 if loss.item() > 1e9 else loss

    model, optimizer, _, data = mlp_setup(seed=3)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.every(5), errors="raise",
                           ghosts=Ghosts(at=[0], vectorize=True))
    criterion = probe.watch(loss_with_item)
    with pytest.warns(RuntimeWarning, match="fall back to the sequential path.*first stacked step failed"):
        for _ in range(10):
            index = torch.randint(0, data.x_train.shape[0], (16,))
            loss = criterion(model(data.x_train[index]), data.y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        probe.close()
    run = dynprobe.load_run(tmp_path / "run")
    assert [(m["mode"], m["step"]) for m in _events(run, "ghost_mode")] == [("vectorized", 1), ("sequential", 1)]
    assert run.manifest["ghost_mode"]["reference"] == "main"
    assert run.conventions["ghosts"] == GHOST_MODE_CONVENTIONS["sequential"]
    assert [g.status for g in run.ghosts] == ["finished", "finished"]
    assert np.all(run.chaos["L2"][0] == 0) and run.chaos["L2"][1, -1] > 0  # exact control vs the main run


def test_auto_falls_back_to_sequential_for_a_model_that_cannot_be_vmapped(tmp_path):
    torch.manual_seed(0)
    model, data = ItemControlFlow(), make_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.every(5), errors="raise", ghosts=Ghosts(at=[0], vectorize="auto"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback is recorded, not warned about, and nothing raises
        _mlp_loop(probe, model, optimizer, data, 10)
        probe.close()
    run = dynprobe.load_run(tmp_path / "run")
    (mode,) = _events(run, "ghost_mode")
    assert mode["mode"] == "sequential" and "cannot be vmapped" in mode["reason"] and mode["step"] == 1
    assert run.manifest["ghost_mode"] == {"mode": "sequential", "reference": "main", "step": 1}
    assert run.conventions["ghosts"] == GHOST_MODE_CONVENTIONS["sequential"]
    assert np.all(run.chaos["L2"][0] == 0) and run.chaos["L2"][1, -1] > 0  # exact control vs the main run


class WorkClock:
    """The vectorized trainer's clock in these tests: it advances only by the work the model does, one second per
    forward of one replica (its weights are ``nn.Parameter``s: a deep copy trained sequentially) and
    ``stack_seconds`` per forward of the vmapped stack (``functional_call`` swaps in plain stacked tensors). So the
    two trial steps of "auto" take a known time: ``ghosts`` seconds sequentially, ``stack_seconds`` as a stack."""

    def __init__(self, stack_seconds: float) -> None:
        self.now, self.stack_seconds = 0.0, stack_seconds

    def perf_counter(self) -> float:
        return self.now

    def __deepcopy__(self, memo):  # every copy of the model advances the one clock
        return self


class ClockedMLP(MLP):
    def __init__(self, clock: WorkClock) -> None:
        super().__init__()
        self.clock = clock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one_replica = isinstance(self.net[0].weight, nn.Parameter)
        self.clock.now += 1.0 if one_replica else self.clock.stack_seconds
        return super().forward(x)


def clocked_setup(clock: WorkClock, *, onecycle: bool):
    """``mlp_setup`` / ``mlp_onecycle_setup`` with a :class:`ClockedMLP` (same initial weights: the clock draws
    no random numbers)."""

    def setup(seed: int = 0):
        model, optimizer, scheduler, data = (mlp_onecycle_setup if onecycle else mlp_setup)(seed)
        clocked = ClockedMLP(clock)
        clocked.load_state_dict(model.state_dict())
        optimizer = torch.optim.SGD(clocked.parameters(), **{k: v for k, v in optimizer.defaults.items()
                                                               if k in ("lr", "momentum", "weight_decay")})
        if scheduler is not None:
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=205)
        return clocked, optimizer, scheduler, data

    return setup


# (stack seconds, the mode): 2 ghosts (one perturbed, the control) take 2 s sequentially; the documented rule is
# "vectorized only below 0.9× the sequential time", i.e. below 1.8 s (dyadic seconds: the clock sums them exactly).
CLOCKED_CHOICES = [(1.0, "vectorized"), (1.75, "vectorized"), (1.875, "sequential"), (3.0, "sequential")]


@pytest.mark.parametrize(("stack_seconds", "expected"), CLOCKED_CHOICES)
def test_auto_chooses_by_measured_step_time_and_records_the_choice(stack_seconds, expected, tmp_path,
                                                                     monkeypatch):
    clock = WorkClock(stack_seconds)
    monkeypatch.setattr(vectorized_trainer, "time", clock)  # the trainer's clock, not the trainer
    ghosts = Ghosts(at=[0, 5], perturbation=Perturbation(norm=1e-6), vectorize="auto")
    _, _, run = _run(clocked_setup(clock, onecycle=False), 12, tmp_path, ghosts=ghosts,
                     schedule=schedule.every(4))
    (mode,) = _events(run, "ghost_mode")
    assert mode["mode"] == expected and mode["requested"] == "auto" and mode["step"] == 1
    assert mode["ghosts"] == 2
    assert mode["sequential_seconds"] == 2.0 and mode["vectorized_seconds"] == stack_seconds
    assert mode["reason"].startswith("measured")
    assert run.manifest["ghost_mode"]["mode"] == expected
    assert run.conventions["ghosts"] == GHOST_MODE_CONVENTIONS[expected]
    assert bool(_events(run, "shadow_drift")) == (expected == "vectorized")
    assert np.all(run.chaos["L2"][0] == 0) and np.all(run.chaos["L2"][1:, -1] > 0)


def test_auto_measures_again_once_twice_as_many_ghosts_are_live(tmp_path, monkeypatch):
    """A stack step costs 2.5 s whatever its rows: slower than 2 sequential ghosts (2 s), faster than 0.9 × 4 s.
    So: sequential for 2 ghosts, then at the spawn that makes 4 a new measurement chooses the stack. The clones
    are absorbed exactly (afterwards they equal a purely sequential run's ghosts up to a tiny fraction of what ε
    did to them)."""
    clock = WorkClock(2.5)
    monkeypatch.setattr(vectorized_trainer, "time", clock)
    ghosts = dict(at=[0, 3, 6], perturbation=Perturbation(norm=1e-4), save_params=True)
    _, _, run = _run(clocked_setup(clock, onecycle=True), 12, tmp_path, ghosts=Ghosts(**ghosts, vectorize="auto"),
                     schedule=schedule.every(3))
    monkeypatch.undo()
    _, _, sequential = _run(mlp_onecycle_setup, 12, tmp_path, ghosts=Ghosts(**ghosts, vectorize=False), name="s",
                            schedule=schedule.every(3))
    modes = _events(run, "ghost_mode")
    assert [(m["mode"], m["step"], m["ghosts"]) for m in modes] == [("sequential", 1, 2), ("vectorized", 7, 4)]
    assert [(m["sequential_seconds"], m["vectorized_seconds"]) for m in modes] == [(2.0, 2.5), (4.0, 2.5)]
    assert "measured again when 4 ghosts are live" in modes[0]["reason"]
    assert run.manifest["ghost_mode"] == {"mode": "vectorized", "reference": "shadow", "step": 7}
    assert [d["step"] for d in _events(run, "shadow_drift")] == [9, 12]
    assert np.all(run.chaos["C"][0] == 0) and not _events(run, "control_drift")
    gaps, signals = _gaps(run, sequential)
    assert len(gaps) == 9 and gaps.max() < 1e-4, gaps  # ghosts 1-3 at the snapshots after their spawn
    np.testing.assert_allclose(signals, 1.0, rtol=1e-4)


def test_auto_measures_with_the_real_clock(tmp_path):
    """The unpatched path: both trial steps are timed (positive seconds) and the choice is recorded in the event,
    the manifest and the conventions alike. (Which mode wins depends on the machine: the rule itself is checked
    with a work clock above.)"""
    ghosts = Ghosts(at=[0, 1], perturbation=Perturbation(norm=1e-6), vectorize="auto")
    _, _, run = _run(mlp_setup, 6, tmp_path, ghosts=ghosts, schedule=schedule.every(3))
    (mode,) = _events(run, "ghost_mode")
    assert mode["sequential_seconds"] > 0 and mode["vectorized_seconds"] > 0 and mode["ghosts"] == 2
    assert run.manifest["ghost_mode"]["mode"] == mode["mode"]
    assert run.conventions["ghosts"] == GHOST_MODE_CONVENTIONS[mode["mode"]]


@pytest.mark.parametrize("case", ["single-ghost", "grad-scaler", "undeclared-grad-edits", "non-elementwise"])
def test_auto_rules_choose_sequential_with_a_reason(case, tmp_path):
    model, optimizer, _, data = mlp_setup(seed=6)
    if case == "non-elementwise":
        optimizer = NormalizedSGD(model.parameters(), lr=0.01)
    config = {"single-ghost": dict(control=False),
              "grad-scaler": dict(scaler=torch.amp.GradScaler("cpu", enabled=False))}.get(case, {})
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.every(5), ghosts=Ghosts(at=[0], vectorize="auto", **config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _mlp_loop(probe, model, optimizer, data, 5, clip=0.05 if case == "undeclared-grad-edits" else None)
        probe.close()
    run = dynprobe.load_run(tmp_path / "run")
    (mode,) = _events(run, "ghost_mode")
    expected = {"single-ghost": "single ghost", "grad-scaler": "GradScaler",
                "undeclared-grad-edits": "gradient edits", "non-elementwise": "NormalizedSGD"}[case]
    assert mode["mode"] == "sequential" and expected in mode["reason"], mode["reason"]


# ---------------------------------------------------------------------------------------------- the run


@pytest.mark.parametrize("name", list(SETUPS))
def test_main_run_with_vectorized_ghosts_is_bitwise_identical_to_a_probe_free_run(name, tmp_path):
    model, optimizer, scheduler, data = SETUPS[name](seed=1)
    torch.manual_seed(99)
    train(model, optimizer, scheduler, data, 60)
    reference, reference_rng = state_of(model), torch.get_rng_state()
    ghosts = Ghosts(at=[0, 10, 30], perturbation=Perturbation(norm=1e-6), vectorize=True)
    probed, rng, run = _run(SETUPS[name], 60, tmp_path, ghosts=ghosts, schedule=schedule.every(7))
    assert_bitwise_equal(reference, state_of(probed))
    assert torch.equal(reference_rng, rng)
    assert len(run.ghosts) == 4 and _events(run, "ghost_mode")[0]["mode"] == "vectorized"


def _assert_ghost_records_match_float64_references(run, data):
    """Every ghost entry of the chaos maps and every stored ghost prediction against an independent computation
    from the stored parameters: L2 and C (eq. 1) in float64 numpy against the main run's parameters — exact for a
    sequential ghost, within the shadow's own recorded distance from the main run (``reference_L2``, the triangle
    inequality) for a vectorized one — D as the numpy fraction of differing predictions, and the predictions as
    the argmax of a fresh MLP loaded with the ghost's parameters, evaluated in eval mode on the eval examples."""
    model = MLP().eval()
    inputs = data.x_test[torch.from_numpy(run.eval_indices.astype(np.int64))]
    records = {(e["ghost"], e["step"]): e for e in _events(run, "ghost_compare")}
    checked = 0
    for ghost in run.ghosts:
        for position, step in enumerate(run.steps):
            if np.isnan(run.chaos["L2"][ghost.ghost_id, position]):
                continue
            theta_ghost = run.ghost_params(ghost.ghost_id, snapshot_index=position).astype(np.float64)
            theta_main = run.params(snapshot_index=position).astype(np.float64)
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(torch.from_numpy(theta_ghost).float(), model.parameters())
                predictions = model(inputs).argmax(dim=-1).numpy()
            np.testing.assert_array_equal(run.ghost_predictions(ghost.ghost_id, snapshot_index=position), predictions)
            distance = np.sqrt(np.sum((theta_ghost - theta_main) ** 2))
            cosine = theta_ghost @ theta_main / (np.linalg.norm(theta_ghost) * np.linalg.norm(theta_main))
            record = records[(ghost.ghost_id, int(step))]
            if record["reference"] == "main":
                assert run.chaos["L2"][ghost.ghost_id, position] == pytest.approx(distance, rel=1e-9, abs=1e-15)
                assert run.chaos["C"][ghost.ghost_id, position] == pytest.approx(1 - cosine, rel=1e-4, abs=1e-15)
                disagreement = np.mean(predictions != run.predictions(snapshot_index=position))
                assert run.chaos["D"][ghost.ghost_id, position] == pytest.approx(disagreement, abs=1e-12)
            else:
                drift = record["reference_L2"]
                # The control is the shadow (L2 = 0, θ_main − θ_shadow is all there is); for a perturbed ghost the
                # drift is small next to its signal, so the triangle inequality below says something.
                assert run.chaos["L2"][ghost.ghost_id, position] == 0 if ghost.control else drift < 1e-2 * distance
                assert abs(run.chaos["L2"][ghost.ghost_id, position] - distance) <= drift * (1 + 1e-9)
            checked += 1
    return checked


def test_run_ghosts_and_chaos_maps_look_the_same_in_both_modes(tmp_path):
    # ε = 0.3: large enough that the ghosts' predictions differ from the main run's (D > 0), so the check of the
    # stored ghost predictions can tell them from the main run's.
    ghosts = dict(at=[0, 6], perturbation=Perturbation(norm=0.3), lifetime_steps=8, save_params=True)
    sched = schedule.at([0, 3, 6, 9, 12, 16])
    runs = {}
    for vectorize in (True, False):
        # Every due barrier computed: within the default time budget which ones fit depends on the machine's load.
        _, _, runs[vectorize] = _run(mlp_setup, 16, tmp_path, ghosts=Ghosts(**ghosts, vectorize=vectorize),
                                     name=f"run-{vectorize}", schedule=sched,
                                     barriers=dynprobe.Barriers(time_budget=math.inf))
    vectorized, sequential = runs[True], runs[False]

    def described(run):
        return [(g.ghost_id, g.spawn_step, g.control, g.kind, g.seed, g.nominal_norm, g.changed, g.status,
                 g.status_step) for g in run.ghosts]

    assert described(vectorized) == described(sequential)
    assert [g.status for g in vectorized.ghosts] == ["finished"] * 3
    assert [g.status_step for g in vectorized.ghosts] == [8, 8, 14]
    assert set(vectorized.chaos) == set(sequential.chaos)
    for name in vectorized.chaos:
        assert vectorized.chaos[name].shape == sequential.chaos[name].shape == (3, 6)
        np.testing.assert_array_equal(np.isnan(vectorized.chaos[name]), np.isnan(sequential.chaos[name]),
                                      err_msg=name)
    data = mlp_setup(seed=1)[3]
    assert _assert_ghost_records_match_float64_references(sequential, data) == 9
    assert _assert_ghost_records_match_float64_references(vectorized, data) == 9
    assert np.nanmax(sequential.chaos["D"]) > 0
    # The two modes differ only by the vmapped kernels' last bits, amplified chaotically over a few steps.
    np.testing.assert_allclose(vectorized.chaos["L2"], sequential.chaos["L2"], rtol=1e-3)
