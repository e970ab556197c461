"""Ghosts under FSDP2 (dynprobe/distributed/sharded_ghosts.py, sharded_compare.py, sharded_slot.py), 2 gloo CPU
ranks: the main run bit for bit unchanged, the ε = 0 control exactly the main run, each rank's perturbation
exactly its part of the one-process perturbation, and every comparison against float64 numpy from the gathered
whole tensors and a forward of an unsharded copy.

The model has BatchNorm (buffers the ghosts keep apart from the main run's) and dropout (the replayed RNG); the
optimizer is AdamW (state the ghosts copy, sharded).
"""
from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import dynprobe
from dynprobe.distributed import sharded_ghosts
from dynprobe.distributed.sharded_compare import local_separation_squares, local_sums
from dynprobe.distributed.sharded_slot import MainModelSlot
from dynprobe.ghosts.perturbation import Perturbation, Shards, perturb_
from dynprobe.kernels.engine import empirical_ntk
from dynprobe.metrics.barrier import loss_barrier

from .. import spawned
from ..host_syncs import HostSyncCounter
from . import fsdp_setup
from .fsdp_setup import part_of, shard_per_linear

fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(not dist.is_available() or not hasattr(fsdp, "fully_shard"),
                                reason="torch.distributed FSDP2 is not available")

WORLD = 2
STEPS = 6
SEED = 11  # Ghosts(perturbation=...) seed of the first perturbed ghost
NORM = 1e-3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 12),
                         nn.Tanh(), nn.Linear(12, 3))


def sharded_model() -> nn.Module:
    return shard_per_linear(make_model())


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return fsdp_setup.global_batch(step, seed=2000)


def eval_data() -> tuple[torch.Tensor, torch.Tensor]:
    return fsdp_setup.eval_data(48)


def shard_of(rank: int) -> slice:
    return part_of(rank, WORLD)








def local_shards(model: nn.Module) -> list[list[float]]:
    return [p.to_local().detach().reshape(-1).tolist() for p in model.parameters()] + \
        [b.reshape(-1).tolist() for b in model.buffers()]


def whole(tensors: list[torch.Tensor]) -> list[float]:
    return torch.cat([t.full_tensor().detach().reshape(-1).double() for t in tensors]).tolist()


def train(rank: int, out: Path | None, *, on_attach=None, before_close=None, ghosts=None, sgd: bool = False,
          count: dict | None = None, **options: object) -> nn.Module:
    """The user's loop (AdamW, dropout in train mode); with ``out`` the two probe lines are added. ``count``: the
    host synchronisations of iteration 2 (a plain step: no snapshot, no spawn) go into ``count["syncs"]``."""
    torch.manual_seed(100 + rank)  # dropout masks differ per rank, as in real data-parallel training
    model = sharded_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if sgd else \
        torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    criterion, probe = nn.CrossEntropyLoss(), None
    if out is not None:
        probe = dynprobe.Probe(model, optimizer, eval_data=eval_data(), out=out, schedule=2, total_steps=STEPS,
                               ghosts=ghosts or dynprobe.Ghosts(at=[0, 2], perturbation=Perturbation(
                                   norm=NORM, kind="l2", seed=SEED)), **options)
        criterion = probe.watch(criterion)
        if on_attach is not None:
            on_attach(probe)
    for step in range(STEPS):
        x, y = global_batch(step)
        with HostSyncCounter() as counter:
            loss = criterion(model(x[shard_of(rank)]), y[shard_of(rank)])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if count is not None and step == 2:
            count["syncs"], count["where"] = counter.total, dict(counter.where)
    if probe is not None:
        if before_close is not None:
            before_close(probe)
        probe.close()
    return model


def unsharded_state(theta: np.ndarray, buffers: dict) -> dict[str, torch.Tensor]:
    """Parameters (a gathered vec θ) and buffers by name, for the unsharded model of :func:`make_model`."""
    model = make_model()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.tensor(theta, dtype=torch.float32), model.parameters())
        for name, buffer in model.named_buffers():
            buffer.copy_(torch.tensor(buffers[name], dtype=buffer.dtype))
    return {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}


# ---------------------------------------------------------------------------------------------- scenarios


def scenario_ghosts(rank: int, folder: Path, result: dict) -> None:
    result["bare"] = local_shards(train(rank, None))

    def at_attach(probe: dynprobe.Probe) -> None:  # the ghosts spawned at step 0: θ + ε, gathered whole
        ghosts = probe._ghosts.ghosts
        result["spawned"] = {g.ghost_id: whole(g.replica.params) for g in ghosts}
        result["control_id"] = next(g.ghost_id for g in ghosts if g.control)
        result["main_at_spawn"] = whole(list(probe.model.parameters()))

    def at_end(probe: dynprobe.Probe) -> None:  # everything at step STEPS, gathered whole (collectives)
        ghosts = probe._ghosts.live
        result["final_ghosts"] = {g.ghost_id: whole(g.replica.params) for g in ghosts}
        result["final_ghost_buffers"] = {g.ghost_id: {n: b.tolist() for n, b in g.replica.buffers.items()}
                                         for g in ghosts}
        result["final_main"] = whole(list(probe.model.parameters()))
        result["final_main_buffers"] = {n: b.tolist() for n, b in probe.model.named_buffers()}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = train(rank, folder / "run", on_attach=at_attach, before_close=at_end, ghosts=dynprobe.Ghosts(
            at=[0, 2], perturbation=Perturbation(norm=NORM, kind="l2", seed=SEED), save_params=True))
    result["probed"] = local_shards(model)
    result["warnings"] = [str(w.message) for w in caught if "dynprobe" in str(w.message)]


def scenario_fault(rank: int, folder: Path, result: dict) -> None:
    """A ghost step raises on rank 1 only, after the collectives (the optimizer step of ghost 1 at step 3)."""
    result["bare"] = local_shards(train(rank, None))
    original = sharded_ghosts.step_optimizer

    def failing(replica, **kwargs):
        if rank == 1 and failing.probe._clock.step == 3 and replica is failing.probe._ghosts.ghosts[1].replica:
            raise RuntimeError("injected fault in rank 1's ghost step")
        return original(replica, **kwargs)

    def keep(probe: dynprobe.Probe) -> None:
        failing.probe = probe

    sharded_ghosts.step_optimizer = failing
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            model = train(rank, folder / "fault", on_attach=keep)
    finally:
        sharded_ghosts.step_optimizer = original
    result["probed"] = local_shards(model)


def scenario_syncs(rank: int, folder: Path, result: dict) -> None:
    """Host synchronisations of a plain step (SGD: AdamW's step counters are host reads of its own), without and
    with the probe and its ghosts."""
    bare, probed = {}, {}
    train(rank, None, sgd=True, count=bare)
    train(rank, folder / "syncs", sgd=True, count=probed)
    result["bare"], result["probed"], result["where"] = bare["syncs"], probed["syncs"], probed["where"]


def scenario_kernel(rank: int, folder: Path, result: dict) -> None:
    """Ghosts with the eNTK: S of each ghost at the last snapshot; the ghosts' θ and rank 0's buffers gathered."""
    def at_end(probe: dynprobe.Probe) -> None:
        result["final_ghosts"] = {g.ghost_id: whole(g.replica.params) for g in probe._ghosts.live}
        result["final_ghost_buffers"] = {g.ghost_id: {n: b.tolist() for n, b in g.replica.buffers.items()}
                                         for g in probe._ghosts.live}

    train(rank, folder / "kernel", before_close=at_end, sgd=True, ghosts=dynprobe.Ghosts(at=[0], perturbation=(
        Perturbation(norm=0.5, kind="l2", seed=SEED))), kernel=dynprobe.KernelConfig(n=12))  # S well above 0


SCENARIOS = {"ghosts": scenario_ghosts, "kernel": scenario_kernel, "fault": scenario_fault, "syncs": scenario_syncs}


def run_spawned(scenario: str, folder: Path) -> list[dict]:
    return spawned.run_spawned(__name__, scenario, folder, world=WORLD, deadline_s=150.0)


# ---------------------------------------------------------------------------------------------- tests


def test_fsdp_ghosts_leave_training_unchanged_and_match_float64_and_an_unsharded_forward(tmp_path: Path) -> None:
    results = run_spawned("ghosts", tmp_path)
    for rank, result in enumerate(results):
        assert result["probed"] == result["bare"], f"rank {rank}: the probe changed training"
    first = results[0]
    assert results[1]["spawned"] == first["spawned"] and results[1]["final_ghosts"] == first["final_ghosts"]
    assert [w for w in first["warnings"] if "rounding level" not in w] == []  # only the inert tensor's warning
    run = dynprobe.load_run(tmp_path / "run")
    assert not [e for e in run.events if e.get("event") in ("probe_error", "control_drift")]
    assert run.manifest["ghost_mode"]["mode"] == "sequential"
    control = first["control_id"]
    # the inert check from the ranks' shards: the Linear bias in front of the BatchNorm (AdamW moves it on rounding
    # noise), found at the first snapshot after a step, from the all-reduced gradient sums
    inert = [e for e in run.events if e.get("event") == "inert_parameters"]
    assert len(inert) == 1 and inert[0]["tensors"] == ["0.bias"] and inert[0]["step"] == 2
    assert 0 < inert[0]["gradient_ratio"]["0.bias"] < 1e-5

    # the spawn: rank r's shards of each ghost are rank r's part of what one process makes of the whole θ
    unsharded = make_model()
    params = [p for p in unsharded.parameters() if p.requires_grad]
    np.testing.assert_array_equal(first["main_at_spawn"], torch.cat([p.detach().reshape(-1).double() for p in
                                                                     params]).numpy())
    spawns = {e["ghost"]: e for e in run.events if e.get("event") == "ghost_spawn"}
    for ghost_id, gathered in first["spawned"].items():
        ghost_id = int(ghost_id)
        copy = make_model()
        tensors = [p for p in copy.parameters() if p.requires_grad]
        norm = 0.0 if ghost_id == control else NORM
        seed = 0 if ghost_id == control else SEED + ghost_id - 1  # the perturbed ghosts' seeds count up
        report = perturb_(tensors, Perturbation(norm=norm, kind="l2", seed=seed))
        expected = torch.cat([t.detach().reshape(-1).double() for t in tensors]).numpy()
        if int(spawns[ghost_id]["spawn_step"]) == 0:  # a later spawn perturbs the step-2 θ (checked below)
            np.testing.assert_array_equal(np.array(gathered), expected)
            assert spawns[ghost_id]["realized_norm"] == pytest.approx(report.realized_norm, rel=1e-15)
            assert spawns[ghost_id]["changed"] == report.changed

    # the comparisons at the last snapshot against float64 numpy from the gathered whole tensors
    main = np.array(first["final_main"])
    records = {e["ghost"]: e for e in run.events if e.get("event") == "ghost_compare" and e["step"] == STEPS}
    barriers = {e["ghost"]: e for e in run.events if e.get("event") == "ghost_barrier" and e["step"] == STEPS}
    assert barriers[control]["B"] == 0.0 and barriers[control]["argmax_alpha"] is None  # not evaluated: exactly 0
    assert set(records) == {int(k) for k in first["final_ghosts"]}
    offsets = [(s["offset"], s["offset"] + s["numel"]) for s in run.manifest["model"]["parameters"]]
    for ghost_id, gathered in first["final_ghosts"].items():
        ghost = np.array(gathered)
        record = records[int(ghost_id)]
        if int(ghost_id) == control:  # the ε = 0 control is the main run, bit for bit, all the way
            np.testing.assert_array_equal(ghost, main)
            assert record["L2"] == 0 and record["C"] == 0 and record["D"] == 0
            assert "reference's" in record["evaluation"]
            steps, l2 = run.separation(control)
            assert len(steps) == STEPS + 1 and not l2.any()
            continue
        # Ghosts(save_params=True): each rank's shards of the ghost, read back whole (no process group here)
        np.testing.assert_array_equal(run.ghost_params(int(ghost_id), step=STEPS), ghost.astype(np.float32))
        l2 = np.linalg.norm(ghost - main)
        cosine = 0.5 * np.sum((ghost / np.linalg.norm(ghost) - main / np.linalg.norm(main)) ** 2)
        assert record["L2"] == pytest.approx(l2, rel=1e-12) and l2 > 0
        # L2_active: without the inert bias in front of the BatchNorm (offsets[1]: "0.bias")
        active = np.concatenate([ghost[:offsets[1][0]] - main[:offsets[1][0]], ghost[offsets[1][1]:] -
                                 main[offsets[1][1]:]])
        assert record["L2_active"] == pytest.approx(np.linalg.norm(active), rel=1e-12)
        assert record["L2_active"] < record["L2"]
        assert record["C"] == pytest.approx(cosine, rel=1e-9)
        layers = [np.linalg.norm(ghost[a:b] - main[a:b]) for a, b in
                  [(offsets[0][0], offsets[1][1]), (offsets[2][0], offsets[3][1]), (offsets[4][0], offsets[5][1]),
                   (offsets[6][0], offsets[7][1])]]
        np.testing.assert_allclose(record["L2_layers"], layers, rtol=1e-12)
        _, curve = run.separation(int(ghost_id))
        # the curve subtracts in float32 (exact within a factor 2, Sterbenz; this ghost moved far: one rounding on
        # some coordinates, as on one process): measured 7e-9 relative
        assert curve[-1] == pytest.approx(l2, rel=1e-7)
        # D and the ghost's predictions: an unsharded copy holding the gathered ghost θ and its buffers
        copy = make_model()
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.tensor(ghost, dtype=torch.float32), copy.parameters())
            for name, buffer in copy.named_buffers():
                buffer.copy_(torch.tensor(first["final_ghost_buffers"][ghost_id][name], dtype=buffer.dtype))
        copy.eval()
        x, _ = eval_data()
        with torch.no_grad():
            preds = copy(x).argmax(-1).numpy()
        np.testing.assert_array_equal(run.ghost_predictions(int(ghost_id), step=STEPS), preds)
        main_preds = run.predictions(step=STEPS)
        assert record["D"] == pytest.approx(np.mean(preds != main_preds), abs=1e-15)
        # B (eq. 5) between the main run and the ghost, forced at the last step: the single-process loss_barrier on
        # unsharded copies holding the gathered θ and rank 0's buffers (the barrier's evaluation is rank 0's too)
        main_state = unsharded_state(main, first["final_main_buffers"])
        ghost_state = unsharded_state(ghost, first["final_ghost_buffers"][ghost_id])
        expected = loss_barrier(make_model(), main_state, ghost_state, eval_data(), alphas=barriers[int(ghost_id)]
                                ["alphas"])
        assert barriers[int(ghost_id)]["B"] == pytest.approx(expected.mean, rel=1e-12)  # measured: bit for bit
        assert barriers[int(ghost_id)]["argmax_alpha"] == expected.argmax_alpha_mean


def test_a_ghost_fault_on_one_rank_stops_that_ghost_on_every_rank(tmp_path: Path) -> None:
    results = run_spawned("fault", tmp_path)
    for rank, result in enumerate(results):
        assert result["probed"] == result["bare"], f"rank {rank}"
    run = dynprobe.load_run(tmp_path / "fault")
    assert run.status == "closed" and not [e for e in run.events if e.get("event") == "probe_error"]
    statuses = {e["ghost"]: e for e in run.events if e.get("event") == "ghost_status"}
    assert statuses[1]["status"] == "failed" and statuses[1]["step"] == 3
    assert statuses[1]["reason"] == "an exception on another rank"  # rank 0 writes the run: it did not raise
    others = [e for e in run.events if e.get("event") == "ghost_compare" and e["step"] == STEPS]
    assert {e["ghost"] for e in others} == {0, 2}  # the control and the ghost spawned at step 2 went on


def test_the_s_of_fsdp_ghosts_equals_the_kernel_of_an_unsharded_copy(tmp_path: Path) -> None:
    results = run_spawned("kernel", tmp_path)
    run = dynprobe.load_run(tmp_path / "kernel")
    assert not [e for e in run.events if e.get("event") in ("probe_error", "control_drift")]
    records = {e["ghost"]: e for e in run.events if e.get("event") == "ghost_compare" and e["step"] == STEPS}
    assert records[0]["S"] <= 1e-15  # the control: the main run's kernel
    x_eval = eval_data()[0][torch.as_tensor(run.eval_indices)]
    inputs = x_eval[torch.as_tensor(np.load(tmp_path / "kernel/kernel_probe_indices.npy"))]
    main_kernel = run.kernel(step=STEPS)
    copy = make_model()  # the ghost: its gathered θ, rank 0's ghost buffers (the kernel uses rank 0's)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.tensor(results[0]["final_ghosts"]["1"], dtype=torch.float32),
                                            copy.parameters())
        for name, buffer in copy.named_buffers():
            buffer.copy_(torch.tensor(results[0]["final_ghost_buffers"]["1"][name], dtype=buffer.dtype))
    ghost_kernel = empirical_ntk(copy, inputs).numpy().astype(np.float64)
    expected = 1.0 - np.sum(main_kernel * ghost_kernel) / (np.linalg.norm(main_kernel) * np.linalg.norm(ghost_kernel))
    assert expected > 1e-4 and records[1]["S"] == pytest.approx(expected, rel=1e-6), (records[1]["S"], expected)


def test_a_plain_step_with_fsdp_ghosts_never_waits_for_the_device(tmp_path: Path) -> None:
    """The ghosts' flags and separations stay per rank on the device until a batched read, where one all-reduce sums
    them: a plain step adds no host read (and no collective of the probe's own)."""
    for result in run_spawned("syncs", tmp_path):
        assert result["probed"] == result["bare"], result["where"]


# ---------------------------------------------------------------------------------------------- one process


class ThreadSum:
    """An all-reduce (SUM) between threads, one per simulated rank."""

    def __init__(self, world: int) -> None:
        self.barrier, self.values = threading.Barrier(world), [None] * world

    def for_rank(self, rank: int):
        def all_reduce(values: torch.Tensor) -> None:
            self.values[rank] = values.clone()
            self.barrier.wait()
            total = sum(self.values[1:], self.values[0].clone())
            self.barrier.wait()
            values.copy_(total)
        return all_reduce


def test_a_sharded_perturbation_is_each_piece_of_the_whole_one() -> None:
    """Row pieces of tensors (split as FSDP2 shards dim 0) perturbed with Shards, one thread per simulated rank:
    each piece equals its rows of the whole perturbation, and every rank's report equals the whole report."""
    torch.manual_seed(3)
    tensors = [torch.randn(5, 3), torch.zeros(4), torch.randn(2, 2, 2), torch.randn(1, 3)]  # the last: one rank
    for kind, norm in (("l2", 1e-3), ("relative", 1e-4), ("ulp", 2), ("single_coord", 0.5), ("per_coord", 1e-3)):
        whole_copy = [t.clone() for t in tensors]
        report = perturb_(whole_copy, Perturbation(norm=norm, kind=kind, seed=5))
        pieces: list[list[torch.Tensor]] = [[torch.chunk(t, 2)[rank].clone() if len(torch.chunk(t, 2)) > rank
                                             else t[:0].clone() for t in tensors] for rank in range(2)]
        reports: list = [None, None]
        reduce = ThreadSum(2)

        def perturb_rank(rank: int) -> None:
            def local(index: int, whole: torch.Tensor) -> torch.Tensor:
                chunks = torch.chunk(whole, 2)
                return chunks[rank] if len(chunks) > rank else whole[:0]
            shards = Shards([t.shape for t in tensors], local, reduce.for_rank(rank))
            reports[rank] = perturb_(pieces[rank], Perturbation(norm=norm, kind=kind, seed=5), shards=shards)

        threads = [threading.Thread(target=perturb_rank, args=(rank,)) for rank in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for index, t in enumerate(whole_copy):
            assert torch.equal(torch.cat([pieces[0][index], pieces[1][index]]), t), (kind, index)
        for mine in reports:
            assert mine.changed == report.changed and mine.total == report.total, kind
            assert mine.realized_norm == pytest.approx(report.realized_norm, rel=1e-14), kind
            assert mine.nominal_norm == pytest.approx(report.nominal_norm, rel=1e-14), kind


def test_local_sums_and_separation_squares_add_up_to_the_whole() -> None:
    generator = torch.Generator().manual_seed(0)
    x, g = torch.randn(300, generator=generator), torch.randn(300, generator=generator)
    bounds_0, bounds_1 = [(0, 100), (100, 150)], [(0, 120), (120, 150)]
    first = local_sums(x[:150], g[:150], bounds_0) + local_sums(x[150:], g[150:], bounds_1)
    xd, gd = x.double().numpy(), g.double().numpy()
    assert float(first[0]) == pytest.approx(np.dot(xd, xd), rel=1e-14)
    assert float(first[1]) == pytest.approx(np.dot(gd, gd), rel=1e-14)
    assert float(first[2] + first[3]) == pytest.approx(np.sum((xd - gd) ** 2), rel=1e-14)
    near = x + 1e-3 * g  # a ghost: within a factor 2 of x, so the float32 differences are exact (Sterbenz)
    nd = near.double().numpy()
    assert float(local_separation_squares([near], [x])) == pytest.approx(np.sum((nd - xd) ** 2), rel=1e-14)
    g[3] = float("nan")
    assert float(local_sums(x, g, [(0, 300)])[-1]) == 1


def test_the_main_model_slot_restores_values_buffers_and_gradient_tensors_bit_for_bit() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    params = list(model.parameters())
    model(torch.randn(5, 3)).sum().backward()
    before = [p.detach().clone() for p in params] + [b.clone() for b in model.buffers()]
    grads = [p.grad for p in params]
    other = [nn.Parameter(p.detach() + 1) for p in params]
    buffers = {n: b.clone() + 2 for n, b in model.named_buffers()}
    with MainModelSlot(model, params).holding(other, buffers, train=True):
        assert torch.equal(params[0], other[0])
        model(torch.randn(5, 3)).sum().backward()
    assert all(o.grad is not None for o in other) and buffers["1.num_batches_tracked"] == 4  # moved to the state
    assert all(p.grad is g for p, g in zip(params, grads))
    after = [p.detach() for p in params] + list(model.buffers())
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    with pytest.raises(RuntimeError, match="inside"), MainModelSlot(model, params).holding(other, buffers,
                                                                                             train=False):
        raise RuntimeError("inside")
    assert all(torch.equal(a, b) for a, b in zip(before, [p.detach() for p in params] + list(model.buffers())))
