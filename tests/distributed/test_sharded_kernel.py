"""The eNTK under FSDP2 (dynprobe/distributed/sharded_kernel.py), 2 CPU processes with the gloo backend.

A small MLP with a BatchNorm (its running statistics differ between the ranks, which see different halves of each
batch) is ``fully_shard``-ed per Linear and at the root, and trained with ``kernel=``; the stored kernels and S are
compared with an independent computation in this (unsharded, single) process: the model rebuilt from the θ and
buffers ``load_run`` reads back, its kernel from a naive float64 autograd loop over samples and logits (and from the
single-process engine). Spawned with a deadline: a hang fails the test instead of blocking CI.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import dynprobe
from dynprobe.distributed.sharded_kernel import whole_parameters
from dynprobe.kernels import engine as kernel_engine
from dynprobe.kernels.engine import empirical_ntk

from .. import spawned
from . import fsdp_setup
from .fsdp_setup import eval_data as _eval_data
from .fsdp_setup import part_of, shard_per_linear

fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(not dist.is_available() or not hasattr(fsdp, "fully_shard"),
                                reason="torch.distributed FSDP2 is not available")

WORLD, STEPS, DEADLINE_S = 2, 6, 150.0
PROBE_N = 12


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(),
                         nn.Linear(12, 3))


def sharded_model() -> nn.Module:
    return shard_per_linear(make_model())  # the BatchNorm's weight and bias: sharded by the root






def eval_data() -> tuple[torch.Tensor, torch.Tensor]:
    return _eval_data(48)


def train(model: nn.Module, rank: int, out: Path | None, inject=None, **options: object):
    """The user's loop (:func:`fsdp_setup.train`, rank's half of each global batch), with ``kernel=`` by default."""
    options = {"kernel": dynprobe.KernelConfig(n=PROBE_N), **options}
    return fsdp_setup.train(model, part_of(rank, WORLD), out, steps=STEPS, eval_set=eval_data(), probe_hook=inject,
                            **options)


def state_of(model: nn.Module, params: list[torch.Tensor]) -> list[list[float]]:
    """Each rank's local shards (of the DTensors the optimizer holds: the root's group may be unsharded now, its
    modules holding whole parameters, after an eval forward) and its own buffers."""
    return [p.to_local().detach().reshape(-1).tolist() for p in params] + [
        b.detach().double().reshape(-1).tolist() for b in model.buffers()]


def run_spawned(scenario: str, folder: Path) -> list[dict]:
    return spawned.run_spawned(__name__, scenario, folder, world=WORLD, deadline_s=DEADLINE_S)


# ---------------------------------------------------------------------------------------------- scenarios


def scenario_kernel(rank: int, folder: Path, result: dict) -> None:
    bare = sharded_model()
    bare_params = list(bare.parameters())
    train(bare, rank, None)
    result["bare"] = state_of(bare, bare_params)
    model = sharded_model()
    params = list(model.parameters())
    hooks = [(list(m._forward_pre_hooks), list(m._forward_hooks)) for m in model.modules()]
    probe = train(model, rank, folder / "run")
    result["probed"] = state_of(model, params)
    result["hooks_restored"] = hooks == [(list(m._forward_pre_hooks), list(m._forward_hooks))
                                         for m in model.modules()]
    # inside whole_parameters the model is a plain module: a forward on one rank alone runs no collective (an
    # FSDP hook left in would wait for the other rank until the deadline) and equals the gathered θ's forward
    registered = [(id(m), n, id(p)) for m in model.modules() for n, p in m._parameters.items()]
    x = eval_data()[0][:4]
    with whole_parameters(model, dict(zip([n for n, _ in model.named_parameters()], params))):
        result["plain"] = all(type(p) is nn.Parameter for p in model.parameters())
        if rank == 0:
            result["alone"] = model.eval()(x).tolist()
            model.train()
    result["parameters_restored"] = registered == [(id(m), n, id(p)) for m in model.modules()
                                                   for n, p in m._parameters.items()]
    model.eval()
    with torch.no_grad():
        result["through_fsdp"] = model(x).tolist()  # collective: both ranks
    model.train()
    result["steps"] = [s["step"] for s in probe.writer.snapshots]
    result["S_row"] = probe._recorder.last_rows["S"].tolist()
    result["running_mean"] = model[1].running_mean.tolist()


def scenario_faults(rank: int, folder: Path, result: dict) -> None:
    # 1. building the engine fails on rank 1 only: Probe(...) raises on both ranks, nothing waits
    model = sharded_model()
    original = kernel_engine.NTKEngine.__init__

    def failing_init(self, *args, **kwargs):
        if rank == 1:
            raise RuntimeError("injected: rank 1 cannot plan its eNTK")
        original(self, *args, **kwargs)

    kernel_engine.NTKEngine.__init__ = failing_init
    try:
        train(model, rank, folder / "refused")
    except Exception as error:  # noqa: BLE001
        result["attach_error"] = f"{type(error).__name__}: {error}"
    finally:
        kernel_engine.NTKEngine.__init__ = original
    flag = torch.ones(1)
    dist.all_reduce(flag)
    result["after"] = float(flag)

    # 2. the kernel fails on rank 1 at the step-4 snapshot: the probe detaches on both ranks, training unchanged
    bare = sharded_model()
    bare_params = list(bare.parameters())
    train(bare, rank, None)

    def inject(probe: dynprobe.Probe) -> None:
        if rank != 1:
            return
        inner = probe._kernel.engine._kernel._engine
        compute = inner.__call__

        class Failing:
            def __getattr__(self, name):
                return getattr(inner, name)

            def __call__(self, params=None):
                if probe._clock.step == 4:
                    raise RuntimeError("injected fault in rank 1's partial kernel")
                return compute(params)

        probe._kernel.engine._kernel._engine = Failing()

    model = sharded_model()
    params = list(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = train(model, rank, folder / "fault", inject=inject)
    result["fault_attached"] = probe.attached
    result["fault_steps"] = [s["step"] for s in probe.writer.snapshots]
    result["fault_warning"] = [str(w.message) for w in caught if "detached itself" in str(w.message)]
    result["fault_bitwise"] = state_of(model, params) == state_of(bare, bare_params)


def scenario_per_layer(rank: int, folder: Path, result: dict) -> None:
    train(sharded_model(), rank, folder / "layers", kernel=dynprobe.KernelConfig(n=PROBE_N, per_layer=True))


SCENARIOS = {"kernel": scenario_kernel, "faults": scenario_faults, "per_layer": scenario_per_layer}


# ---------------------------------------------------------------------------------------------- references


def naive_kernel(model: nn.Module, inputs: torch.Tensor) -> np.ndarray:
    """eq. (3), trace mode, float64: H_ij = Σ_k ∂f_k(x_i)/∂θ · ∂f_k(x_j)/∂θ, one autograd call per sample and
    logit."""
    model = model.double().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for x in inputs.double():
        out = model(x[None])[0]
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[k], params,
                                                                                        retain_graph=True)])
                                 for k in range(out.numel())]))
    jacobians = torch.stack(rows)  # (n, c, P)
    return torch.einsum("ikp,jkp->ij", jacobians, jacobians).numpy()


def kernel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """eq. (4): 1 − ⟨H_a, H_b⟩_F / (‖H_a‖_F ‖H_b‖_F)."""
    return float(1.0 - np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------------------------------------- tests


def test_fsdp_kernels_and_s_equal_an_unsharded_float64_computation_and_training_is_bitwise_unchanged(
        tmp_path: Path) -> None:
    results = run_spawned("kernel", tmp_path)
    for rank, result in enumerate(results):
        assert result["probed"] == result["bare"], f"rank {rank}: the probe changed training"
        assert result["hooks_restored"] and result["parameters_restored"] and result["plain"]
    assert results[0]["alone"] == results[0]["through_fsdp"]
    assert results[0]["steps"] == results[1]["steps"] == [0, 2, 4, 6]
    assert results[0]["S_row"] == results[1]["S_row"]  # every rank holds the same kernels, bit for bit
    assert results[0]["running_mean"] != results[1]["running_mean"]  # the ranks' buffers differ: rank 0's are used

    run = dynprobe.load_run(tmp_path / "run")
    assert run.status == "closed" and not [e for e in run.events if e.get("event") == "probe_error"]
    assert list(run.kernel_steps) == [0, 2, 4, 6]
    assert "whole θ gathered" in run.conventions["kernel"]["fsdp"]
    assert "over 2 ranks" in run.conventions["kernel"]["distributed"]
    x_eval = eval_data()[0][torch.as_tensor(run.eval_indices)]
    indices = np.load(tmp_path / "run/kernel_probe_indices.npy")
    inputs = x_eval[torch.as_tensor(indices)]
    assert not dist.is_initialized()
    references = []
    for step in run.kernel_steps:
        model = make_model()
        model.load_state_dict(run.state_dict(step=int(step)), strict=False)  # θ and rank 0's buffers
        stored = run.kernel(step=int(step))
        assert stored.shape == (PROBE_N, PROBE_N) and stored.dtype == np.float64
        engine = empirical_ntk(model, inputs).numpy()  # the single-process engine, float32 Jacobians
        reference = naive_kernel(model, inputs)
        assert relative(stored, reference) <= 1e-6, step  # measured ≤ 3.9e-8 (float32 Jacobians)
        assert relative(stored, engine) <= 1e-12, step  # the same float32 Jacobians, summed in other blocks: ≤ 6e-17
        references.append(reference)
    # S (eq. 4) from the float64 reference kernels; the stored rows are those of the stored kernels
    count = len(references)
    expected = np.array([[kernel_distance(references[i], references[j]) for j in range(count)]
                         for i in range(count)])
    off = ~np.eye(count, dtype=bool)
    assert expected[off].min() > 1e-3  # S between these snapshots: 1.1e-3 to 2.6e-2
    assert np.all(np.abs(run.S[off] - expected[off]) <= 1e-6 * expected[off]), (run.S, expected)  # ≤ 1.5e-7
    stored = [run.kernel(step=int(step)) for step in run.kernel_steps]
    from_stored = np.array([[kernel_distance(stored[i], stored[j]) for j in range(count)] for i in range(count)])
    np.testing.assert_allclose(run.S[off], from_stored[off], rtol=1e-12)  # measured 1.6e-13
    np.testing.assert_allclose(np.array(results[0]["S_row"]), run.S[-1], rtol=0, atol=0)


def test_fsdp_kernel_failures_on_one_rank_fail_every_rank_alike(tmp_path: Path) -> None:
    results = run_spawned("faults", tmp_path)
    assert "injected: rank 1 cannot plan its eNTK" in results[1]["attach_error"]
    assert "could not be built on 1 of 2 ranks" in results[0]["attach_error"]
    for result in results:
        assert result["after"] == WORLD  # no collective left half-done
        assert result["fault_attached"] is False
        assert result["fault_bitwise"]  # training went on, unchanged (θ and the FSDP hooks restored)
        assert len(result["fault_warning"]) == 1 and "failed on 1 of 2 ranks" in result["fault_warning"][0]
    assert "injected fault in rank 1's partial kernel" in results[1]["fault_warning"][0]
    run = dynprobe.load_run(tmp_path / "fault")
    assert run.status == "probe_failed" and list(run.steps) == [0, 2]


def test_whole_parameters_leaves_a_plain_module_alone() -> None:
    model = make_model()
    before = [(id(p), p.clone()) for p in model.parameters()]
    with whole_parameters(model):
        assert [id(p) for p in model.parameters()] == [i for i, _ in before]
    assert all(torch.equal(p, value) for p, (_, value) in zip(model.parameters(), before))


def test_fsdp_per_layer_kernels_equal_each_layer_s_kernel_of_an_unsharded_copy(tmp_path: Path) -> None:
    """KernelConfig(per_layer=True): each rank's layers' H_l, all-reduced as a stack: every H_l equals the
    single-process engine's per-layer kernel of the unsharded model holding the θ load_run reads back."""
    run_spawned("per_layer", tmp_path)
    run = dynprobe.load_run(tmp_path / "layers")
    assert run.status == "closed" and not [e for e in run.events if e.get("event") == "probe_error"]
    x_eval = eval_data()[0][torch.as_tensor(run.eval_indices)]
    inputs = x_eval[torch.as_tensor(np.load(tmp_path / "layers/kernel_probe_indices.npy"))]
    for step in run.kernel_steps:
        model = make_model()
        model.load_state_dict(run.state_dict(step=int(step)), strict=False)
        expected = kernel_engine.NTKEngine(model, inputs).per_layer()
        stored = run.kernel_layers(step=int(step))
        assert stored.shape == (len(expected), PROBE_N, PROBE_N)  # 3 Linear layers and the BatchNorm
        for layer, (name, kernel) in enumerate(expected.items()):
            assert relative(stored[layer], kernel.numpy()) <= 1e-12, (step, name)
        np.testing.assert_allclose(stored.sum(0), run.kernel(step=int(step)), rtol=1e-12)
