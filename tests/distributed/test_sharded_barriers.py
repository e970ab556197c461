"""Trajectory loss barriers under FSDP2 (dynprobe/distributed/sharded_barriers.py), 2 gloo CPU processes.

The model has a BatchNorm whose weight and bias belong to the root ``fully_shard`` group (FSDP2 keeps the root's
gathered parameters after a forward: the barrier must reshard before it loads a point) and whose running statistics
differ between the ranks (each normalizes its own half of the batch; rank 0's are the ones stored). Each spawned
test runs with a deadline: a hang (ranks disagreeing on which barriers to compute) fails instead of blocking CI.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
from torch import nn

import dynprobe
from dynprobe.distributed import sharded_barriers
from dynprobe.distributed.sharded import ShardedRunFailure
from dynprobe.distributed.sharded_barriers import agreed_seconds
from dynprobe.recording.barriers import BarrierBudget

from .. import spawned
from . import fsdp_setup
from .fsdp_setup import GLOBAL_BATCH, eval_data, shard_per_linear

fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(not dist.is_available() or not hasattr(fsdp, "fully_shard"),
                                reason="torch.distributed FSDP2 is not available")

WORLD = 2
STEPS = 8
DEADLINE_S = 150.0
ALPHAS = 11
# the budget scenario: rank r's clock says each barrier took 30·(r + 1) s; 50 s granted per snapshot, 5 α
BUDGET_S, ALPHAS_BUDGET, SECONDS_PER_BARRIER = 50.0, 5, 30.0


# ---------------------------------------------------------------------------------------------- the experiment


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(),
                         nn.Linear(12, 3))


def sharded_model() -> nn.Module:
    return shard_per_linear(make_model())  # the BatchNorm's weight and bias are the root's






def train(model: nn.Module, shard: slice, out: Path | None, probe_hook=None, **options: object):
    """The user's loop (:func:`fsdp_setup.train`)."""
    return fsdp_setup.train(model, shard, out, steps=STEPS, eval_set=eval_data(), probe_hook=probe_hook, **options)


def local_state(model: nn.Module) -> list[list[float]]:
    """This rank's shards and its buffers, as exact float lists (float32 values are exact in JSON's float64)."""
    return ([p.to_local().detach().reshape(-1).tolist() for p in model.parameters()] +
            [b.detach().reshape(-1).tolist() for b in model.buffers()])


def _shard(rank: int) -> slice:
    per_rank = GLOBAL_BATCH // WORLD
    return slice(rank * per_rank, (rank + 1) * per_rank)


def run_spawned(scenario: str, folder: Path) -> list[dict]:
    return spawned.run_spawned(__name__, scenario, folder, world=WORLD, deadline_s=DEADLINE_S)


def record_curves(result: dict) -> None:
    """Keep every barrier's curve this rank computed (wrapping the function the scheduler calls)."""
    original = sharded_barriers.loss_barrier_in_place

    def recording(*args, **kwargs):
        barrier = original(*args, **kwargs)
        result.setdefault("curves", []).append({"curve": barrier.curve.tolist(), "alphas": barrier.alphas.tolist(),
                                                "mean": barrier.mean, "linear": barrier.linear})
        return barrier

    sharded_barriers.loss_barrier_in_place = recording


class FakeClock:
    """A clock that advances ``unit`` seconds per reading: every barrier (two readings) takes ``unit`` seconds."""

    def __init__(self, unit: float) -> None:
        self.unit, self.readings = unit, 0

    def __call__(self) -> float:
        self.readings += 1
        return self.readings * self.unit


# ---------------------------------------------------------------------------------------------- scenarios


def scenario_barriers(rank: int, folder: Path, result: dict) -> None:
    bare = sharded_model()
    train(bare, _shard(rank), None)
    result["bare"] = local_state(bare)
    record_curves(result)
    model = sharded_model()
    probe = train(model, _shard(rank), folder / "run",
                  barriers=dynprobe.Barriers(alphas=ALPHAS, previous_snapshots=2, time_budget=math.inf))
    result["probed"] = local_state(model)
    result["pairs"] = probe._parts.barriers.computed_pairs


def scenario_budget(rank: int, folder: Path, result: dict) -> None:
    def slow_clock(probe: dynprobe.Probe) -> None:  # rank 1's barriers "take" twice as long as rank 0's
        probe._parts.barriers.clock = FakeClock(SECONDS_PER_BARRIER * (rank + 1))

    probe = train(sharded_model(), _shard(rank), folder / "run", probe_hook=slow_clock,
                  barriers=dynprobe.Barriers(alphas=ALPHAS_BUDGET, previous_snapshots=2, time_budget=BUDGET_S))
    result["pairs"] = probe._parts.barriers.computed_pairs
    result["tally"] = probe._parts.barriers.tally.to_event(probe._parts.barriers.budget)


def scenario_fault(rank: int, folder: Path, result: dict) -> None:
    bare = sharded_model()
    train(bare, _shard(rank), None)
    original = sharded_barriers.append_barrier
    if rank == 0:  # rank 0's write of metrics/B.jsonl fails at step 4, after both ranks evaluated the path

        def failing(root, step, older, barrier):
            if step == 4:
                raise OSError("injected: no space left on device")
            return original(root, step, older, barrier)

        sharded_barriers.append_barrier = failing
    model = sharded_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = train(model, _shard(rank), folder / "run",
                      barriers=dynprobe.Barriers(previous_snapshots=1, time_budget=math.inf))
    sharded_barriers.append_barrier = original
    result["attached"] = probe.attached
    result["steps"] = [s["step"] for s in probe.writer.snapshots]
    result["warning"] = [str(w.message) for w in caught if "detached itself" in str(w.message)]
    result["bitwise"] = local_state(model) == local_state(bare)


SCENARIOS = {"barriers": scenario_barriers, "budget": scenario_budget, "fault": scenario_fault}


# ---------------------------------------------------------------------------------------------- references


def endpoints(run: dynprobe.Run, step: int) -> dict[str, np.ndarray]:
    """θ and the buffers of the snapshot at ``step`` as load_run reads them back (float32 arrays)."""
    return {name: value.numpy() for name, value in run.state_dict(step=step).items()}


def numpy_loss(state: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    """The model's mean cross-entropy in float64 numpy (BatchNorm in eval mode, eps 1e-5)."""
    h = x @ state["0.weight"].T + state["0.bias"]
    h = (h - state["1.running_mean"]) / np.sqrt(state["1.running_var"] + 1e-5) * state["1.weight"] + state["1.bias"]
    h = np.tanh(np.tanh(h) @ state["3.weight"].T + state["3.bias"])
    logits = h @ state["5.weight"].T + state["5.bias"]
    peak = logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
    return float(np.mean(log_norm - logits[np.arange(len(y)), y]))


def float64_curve(a: dict[str, np.ndarray], b: dict[str, np.ndarray], alphas: np.ndarray, x: np.ndarray,
                  y: np.ndarray) -> np.ndarray:
    """L(α) with θ(α) = θ_b + α (θ_a − θ_b) in float64 (the integer buffer is not used in eval mode)."""
    floating = [name for name in a if a[name].dtype.kind == "f"]
    return np.array([numpy_loss({name: b[name].astype(np.float64) + alpha * (a[name].astype(np.float64) -
                                                                            b[name].astype(np.float64))
                                 for name in floating}, x, y) for alpha in alphas])


def torch_curve(a: dict[str, np.ndarray], b: dict[str, np.ndarray], alphas: np.ndarray, x: torch.Tensor,
                y: torch.Tensor) -> np.ndarray:
    """L(α) from an unsharded copy of the model loaded with ``torch.lerp(θ_b, θ_a, α)`` in float32 (plain PyTorch:
    load_state_dict, eval mode, cross-entropy per example summed in float64)."""
    model = make_model().eval()
    losses = []
    for alpha in alphas:
        state = {name: torch.lerp(torch.from_numpy(b[name]), torch.from_numpy(a[name]), float(alpha))
                 if a[name].dtype.kind == "f" else torch.from_numpy(a[name]) for name in a}
        model.load_state_dict(state)
        with torch.no_grad():
            losses.append(float(F.cross_entropy(model(x), y, reduction="none").double().sum()) / len(y))
    return np.array(losses)


def barriers_of(curve: np.ndarray, alphas: np.ndarray) -> tuple[float, float]:
    """eq. (5) and the chord barrier from a curve on a grid with both endpoints (α = 0 first, α = 1 last)."""
    loss_b, loss_a = curve[0], curve[-1]
    return float(np.max(curve - 0.5 * (loss_a + loss_b))), float(np.max(curve - (alphas * loss_a + (1 - alphas) *
                                                                                     loss_b)))


# ---------------------------------------------------------------------------------------------- tests


def test_fsdp_barriers_equal_float64_and_unsharded_computations_and_training_is_bitwise_unchanged(
        tmp_path: Path) -> None:
    results = run_spawned("barriers", tmp_path)
    for rank, result in enumerate(results):
        assert result["probed"] == result["bare"], f"rank {rank}: the barriers changed training (shards or buffers)"
    due = [[8, 6], [8, 4], [6, 4], [6, 2], [4, 2], [4, 0], [2, 0]]
    assert sorted(results[0]["pairs"], reverse=True) == due and results[0]["pairs"] == results[1]["pairs"]

    run = dynprobe.load_run(tmp_path / "run")
    assert run.status == "closed" and not [e for e in run.events if e.get("event") == "probe_error"]
    assert "every rank" in run.conventions["barriers_sharded"]
    budget = [e for e in run.events if e.get("event") == "barrier_budget"]
    assert budget[-1]["computed"]["trajectory"] == budget[-1]["due"]["trajectory"] == 7
    indices = run.eval_indices
    x, y = (t[indices] for t in eval_data())
    alphas = np.linspace(0, 1, ALPHAS)
    steps = list(run.steps)
    measured: dict[str, float] = {"curve64": 0.0, "curve32": 0.0, "B64": 0.0, "B32": 0.0}
    for (step, older), record in zip(results[0]["pairs"], results[0]["curves"]):
        a, b = endpoints(run, step), endpoints(run, older)
        curve = np.array(record["curve"])
        reference64 = float64_curve(a, b, alphas, x.double().numpy(), y.numpy())
        reference32 = torch_curve(a, b, alphas, x, y)
        i, j = steps.index(step), steps.index(older)
        stored = (run.B[i, j], run.B_linear[i, j])  # what metrics/B.jsonl holds
        assert stored == (record["mean"], record["linear"])
        # the loss along the path: float32 evaluation against float64 — relative to the loss itself
        measured["curve64"] = max(measured["curve64"], float(np.max(np.abs(curve - reference64) / reference64)))
        measured["curve32"] = max(measured["curve32"], float(np.max(np.abs(curve - reference32) / reference32)))
        # the barriers are differences of losses: their error is measured relative to the loss scale
        scale = float(np.max(reference64))
        for name, reference in (("B64", reference64), ("B32", reference32)):
            expected = barriers_of(reference, alphas)
            error = max(abs(stored[0] - expected[0]), abs(stored[1] - expected[1])) / scale
            measured[name] = max(measured[name], error)
        assert stored[0] > 1e-3  # a real barrier (B_mean ≥ ½|L_a − L_b|), not a difference of nothing
    print("barriers under FSDP vs references, max relative:", measured)
    assert measured["curve64"] <= 1e-6 and measured["B64"] <= 1e-6  # float32 evaluation of θ(α) vs float64
    assert measured["curve32"] <= 1e-6 and measured["B32"] <= 1e-6  # the same float32 path, unsharded
    # rank 1 evaluated the same path with its own BatchNorm statistics: the same pairs, other numbers
    assert len(results[1]["curves"]) == len(results[0]["curves"])


def test_fsdp_barrier_budget_is_agreed_so_every_rank_computes_the_same_barriers(tmp_path: Path) -> None:
    results = run_spawned("budget", tmp_path)
    # the budget booked the slowest rank's 60 s per barrier: 4 of the 7 due barriers fit, on both ranks
    expected = [[2, 0], [4, 2], [6, 4], [8, 6]]
    assert results[0]["pairs"] == results[1]["pairs"] == expected
    assert results[0]["tally"]["skipped"]["trajectory"] == results[1]["tally"]["skipped"]["trajectory"] == 3
    # without the agreement, rank 0 (30 s per barrier by its own clock) would have computed all 7: ranks would
    # have run different forwards (a hang)
    assert len(_alone(SECONDS_PER_BARRIER)) == 7 and _alone(2 * SECONDS_PER_BARRIER) == [tuple(p) for p in expected]
    run = dynprobe.load_run(tmp_path / "run")
    computed = np.argwhere(~np.isnan(run.B) & np.tri(len(run), k=-1, dtype=bool))  # B is symmetric
    assert sorted((int(run.steps[i]), int(run.steps[j])) for i, j in computed) == [tuple(p) for p in expected]


def test_a_barrier_that_fails_on_rank_0_detaches_the_probe_on_every_rank(tmp_path: Path) -> None:
    results = run_spawned("fault", tmp_path)
    for rank, result in enumerate(results):
        assert result["attached"] is False and result["bitwise"], rank  # training went on, unchanged
        assert result["steps"] == [0, 2, 4] and len(result["warning"]) == 1, rank
    assert "no space left" in results[0]["warning"][0]
    assert "the barrier between steps 4 and 2 failed on 1 of 2 ranks" in results[1]["warning"][0]
    run = dynprobe.load_run(tmp_path / "run")
    assert run.status == "probe_failed" and list(run.steps) == [0, 2, 4]
    assert not np.isnan(run.B[1, 0]) and np.isnan(run.B[2, 1])  # (2, 0) written; (4, 2) failed on rank 0


def _alone(seconds_per_barrier: float, snapshot_seconds: float = 0.1) -> list[tuple[int, int]]:
    """The pairs one rank would compute from its own clock (the scheduler's rule, replayed on its budget)."""
    budget, done, seen = BarrierBudget(BUDGET_S), [], []
    for step in range(0, STEPS + 1, 2):
        budget.grant(snapshot_seconds, 1)
        for older in reversed(seen[-2:]):
            if budget.fits(ALPHAS_BUDGET):
                budget.spend(seconds_per_barrier, ALPHAS_BUDGET)
                done.append((step, older))
        seen.append(step)
    return done


class _FakeRun:
    """Collectives of rank 0 of 2 whose other rank measured ``other`` seconds and reports ``failed`` failures."""

    rank, world_size = 0, 2

    def __init__(self, other: float, failed: float = 0.0) -> None:
        self.other, self.failed = other, failed

    def all_reduce(self, tensor: torch.Tensor) -> None:
        tensor += torch.tensor([0.0, self.other, self.failed], dtype=tensor.dtype)


def test_agreed_seconds_are_the_slowest_rank_s_and_a_failure_anywhere_raises_everywhere() -> None:
    cpu = torch.device("cpu")
    assert agreed_seconds(_FakeRun(3.5), 1.25, None, "a barrier", cpu) == 3.5
    assert agreed_seconds(_FakeRun(0.5), 1.25, None, "a barrier", cpu) == 1.25
    with pytest.raises(ShardedRunFailure, match="a barrier failed on 1 of 2 ranks"):
        agreed_seconds(_FakeRun(0.5, failed=1.0), 1.25, None, "a barrier", cpu)
    with pytest.raises(OSError, match="disk full"):  # the failing rank raises its own error
        agreed_seconds(_FakeRun(0.5), 1.25, OSError("disk full"), "a barrier", cpu)
