"""The probe under torch.distributed (DDP), 2 CPU processes with the gloo backend (dynprobe/distributed/).

Each test spawns two processes (``torch.multiprocessing``) that train a tiny MLP under DistributedDataParallel on
halves of the same global batches, with a deadline: a hang fails the test instead of blocking CI. Results come
back as JSON files written by the test workers themselves (never by the probe on rank 1).
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
from dynprobe.distributed.kernel import partition_modules
from dynprobe.distributed.sink import NullSink
from dynprobe.store.sink import RunSink

from .. import spawned

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
GLOBAL_BATCH = 8
STEPS = 8
DEADLINE_S = 120.0


# ---------------------------------------------------------------------------------------------- the experiment


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=generator)
    y = torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator)
    return x, y


def eval_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(64, 6, generator=generator), torch.arange(64) % 3


PER_LAYER_KERNEL = dynprobe.KernelConfig(n=12, per_layer=True)


def probe_options(**overrides: object) -> dict:
    options = dict(
        eval_data=eval_data(), schedule=2, total_steps=STEPS,
        kernel=dynprobe.KernelConfig(n=12),
        ghosts=dynprobe.Ghosts(at=[2], perturbation=dynprobe.Perturbation(norm=1e-2, seed=3), control=True),
    )
    options.update(overrides)
    return options


def train(model: nn.Module, probe_model: nn.Module, out: Path, shard: slice, loss_fn=None, **overrides: object
          ) -> dynprobe.Probe:
    optimizer = torch.optim.SGD(probe_model.parameters(), lr=0.2, momentum=0.9)
    probe = dynprobe.Probe(probe_model, optimizer, out=out, **probe_options(**overrides))
    criterion = probe.watch(loss_fn or nn.CrossEntropyLoss())
    for step in range(STEPS):
        x, y = global_batch(step)
        loss = criterion(model(x[shard]), y[shard])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probe.close()
    return probe


# ---------------------------------------------------------------------------------------------- spawning


def run_spawned(scenario: str, folder: Path) -> list[dict]:
    return spawned.run_spawned(__name__, scenario, folder, world=WORLD, deadline_s=DEADLINE_S)


def _ddp(model: nn.Module) -> nn.Module:
    return nn.parallel.DistributedDataParallel(model)


def _shard(rank: int) -> slice:
    per_rank = GLOBAL_BATCH // WORLD
    return slice(rank * per_rank, (rank + 1) * per_rank)


# ---------------------------------------------------------------------------------------------- scenarios


def scenario_train(rank: int, folder: Path, result: dict) -> None:
    model = make_model()
    ddp = _ddp(model)
    out = folder / f"run_rank{rank}"  # rank 1 gets its own path: it must stay absent
    probe = train(ddp, ddp, out, _shard(rank), kernel=PER_LAYER_KERNEL)
    result["writer"] = type(probe.writer).__name__
    result["steps"] = [s["step"] for s in probe.writer.snapshots]
    result["params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()
    result["statuses"] = [g.status for g in probe._ghosts.ghosts]


def scenario_faults(rank: int, folder: Path, result: dict) -> None:
    """A ghost raises on rank 1 only; then, in a second run, a ghost's loss is NaN on rank 1 only."""
    for fault in ("exception", "nan"):
        model = make_model()
        ddp = _ddp(model)
        holder: dict = {}

        def loss_fn(output: torch.Tensor, target: torch.Tensor, fault: str = fault) -> torch.Tensor:
            probe = holder.get("probe")
            in_ghost = probe is not None and probe._clock.busy
            if rank == 1 and in_ghost and probe.global_step == 4:
                if fault == "exception":
                    raise RuntimeError("injected ghost fault on rank 1")
                return nn.functional.cross_entropy(output, target) * float("nan")
            return nn.functional.cross_entropy(output, target)

        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.2)
        probe = dynprobe.Probe(ddp, optimizer, out=folder / f"fault_{fault}_rank{rank}",
                               **probe_options(kernel=None, ghosts=dynprobe.Ghosts(at=[1], control=True)))
        holder["probe"] = probe
        criterion = probe.watch(loss_fn)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the ghost-fault warnings are expected here
            for step in range(STEPS):
                x, y = global_batch(step)
                loss = criterion(ddp(x[_shard(rank)]), y[_shard(rank)])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        probe.close()
        result[fault] = [g.status for g in probe._ghosts.ghosts]
        result[f"{fault}_closed_step"] = probe.global_step


def scenario_mismatch(rank: int, folder: Path, result: dict) -> None:
    model = make_model()
    ddp = _ddp(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.2)
    attach_to = ddp if rank == 0 else ddp.module
    try:
        dynprobe.Probe(attach_to, optimizer, out=folder / f"wrap_{rank}", **probe_options(ghosts=None))
    except ValueError as error:
        result["wrapper_error"] = str(error)
    schedule = 2 if rank == 0 else 3
    try:
        dynprobe.Probe(ddp, optimizer, out=folder / f"config_{rank}", **probe_options(ghosts=None, schedule=schedule))
    except ValueError as error:
        result["config_error"] = str(error)
    try:
        dynprobe.Probe(ddp, optimizer, out=folder / f"resume_{rank}", resume=True, **probe_options(ghosts=None))
    except ValueError as error:
        result["resume_error"] = str(error)
    # The process group is still usable after these errors: no collective was left half-done.
    flag = torch.ones(1)
    dist.all_reduce(flag)
    result["after"] = float(flag)


def scenario_batchnorm(rank: int, folder: Path, result: dict) -> None:
    """BatchNorm under DDP (broadcast_buffers, gradient_as_bucket_view): ghosts take rank 0's buffers as DDP does,
    and the eNTK assembled over ranks uses rank 0's running statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))
    ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    probe = train(ddp, ddp, folder / f"bn_rank{rank}", _shard(rank))
    if rank == 0:
        inputs = eval_data()[0][probe._kernel.indices]
        result["kernel_direct"] = dynprobe.empirical_ntk(model, inputs).tolist()
    result["params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()


def scenario_robustness(rank: int, folder: Path, result: dict) -> None:
    scenario_mismatch(rank, folder, result)
    scenario_faults(rank, folder, result)


SCENARIOS = {"train": scenario_train, "robustness": scenario_robustness, "batchnorm": scenario_batchnorm}


# ---------------------------------------------------------------------------------------------- tests


def test_ddp_run_matches_a_single_process_run_over_the_same_global_batches(tmp_path: Path) -> None:
    results = run_spawned("train", tmp_path)
    assert [r["writer"] for r in results] == ["RunWriter", "NullSink"]
    assert results[0]["steps"] == results[1]["steps"] == [0, 2, 4, 6, 8]
    assert results[0]["params"] == results[1]["params"]  # replicated
    assert not (tmp_path / "run_rank1").exists(), "rank 1 must not write anything"

    reference_model = make_model()
    train(reference_model, reference_model, tmp_path / "single", slice(None), kernel=PER_LAYER_KERNEL)
    ddp_run, single = dynprobe.load_run(tmp_path / "run_rank0"), dynprobe.load_run(tmp_path / "single")
    assert ddp_run.status == "closed" and ddp_run.manifest["distributed"]["world_size"] == WORLD
    np.testing.assert_array_equal(ddp_run.steps, single.steps)
    np.testing.assert_allclose(ddp_run.params(snapshot_index=-1), single.params(snapshot_index=-1), atol=1e-5)
    np.testing.assert_allclose(ddp_run.C, single.C, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(ddp_run.S, single.S, atol=1e-6, rtol=1e-4)
    assert np.abs(ddp_run.D - single.D).max() <= 1 / 64  # an argmax tie flip at most
    # The full kernel was assembled from the two ranks' parameter shares.
    np.testing.assert_allclose(ddp_run.kernel(snapshot_index=-1), single.kernel(snapshot_index=-1), rtol=1e-4,
                               atol=1e-8)
    assert "distributed" in ddp_run.conventions["kernel"]
    # ... and each layer's kernel (KernelConfig(per_layer=True)): every layer within one rank's share
    layers = ddp_run.kernel_layers(snapshot_index=-1)
    assert layers.shape[0] == 3
    np.testing.assert_allclose(layers, single.kernel_layers(snapshot_index=-1), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(layers.sum(0), ddp_run.kernel(snapshot_index=-1), rtol=1e-12)

    # Ghosts: sequential, the ε=0 control stays exactly on the main run; the perturbed ghost matches the
    # single-process ghost (its gradients were averaged over the global batch).
    assert ddp_run.manifest["ghost_mode"]["mode"] == "sequential"
    control = [i for i, g in enumerate(ddp_run.ghosts) if g.control]
    perturbed = [i for i, g in enumerate(ddp_run.ghosts) if not g.control]
    assert control and perturbed
    assert all(g.status == "finished" for g in ddp_run.ghosts)
    compared = ~np.isnan(ddp_run.chaos["C"][control[0]])
    assert compared.sum() == 4  # steps 2, 4, 6, 8
    assert np.all(ddp_run.chaos["C"][control[0]][compared] == 0.0)
    assert np.all(ddp_run.chaos["L2"][control[0]][compared] == 0.0)
    assert not [e for e in ddp_run.events if e.get("event") in ("control_drift", "probe_error")]
    for name in ("C", "L2", "S"):
        np.testing.assert_allclose(ddp_run.chaos[name][perturbed[0]], single.chaos[name][perturbed[0]], rtol=1e-3)
    # Separation curves: written by rank 0 only, a pair per step from the spawn; the control's exactly 0.
    for ghost in ddp_run.ghosts:
        steps, l2 = ddp_run.separation(ghost.ghost_id)
        single_steps, single_l2 = single.separation(ghost.ghost_id)
        np.testing.assert_array_equal(steps, np.arange(2, STEPS + 1))
        np.testing.assert_array_equal(steps, single_steps)
        if ghost.control:
            assert np.all(l2 == 0.0)
        else:
            np.testing.assert_allclose(l2, single_l2, rtol=1e-3)


def test_ghost_faults_on_one_rank_and_inconsistent_attaching_never_deadlock(tmp_path: Path) -> None:
    """One spawn for both robustness properties (a spawn costs seconds): a ghost fault on one rank marks the ghost
    on every rank, and attaching inconsistently is the same clear error on every rank."""
    results = run_spawned("robustness", tmp_path)
    for rank in range(WORLD):
        assert "DistributedDataParallel wrapper on ranks [0]" in results[rank]["wrapper_error"]
        assert "ranks disagree on the probe configuration" in results[rank]["config_error"]
        assert "resume=True is not supported under torch.distributed" in results[rank]["resume_error"]
        assert results[rank]["after"] == WORLD
    assert not any(tmp_path.glob("wrap_*/*")) and not any(tmp_path.glob("config_*/*"))
    for rank in range(WORLD):
        assert results[rank]["exception"] == ["failed", "failed"]  # control and perturbed ghost, same on all ranks
        assert results[rank]["nan"] == ["diverged", "diverged"]
        assert results[rank]["exception_closed_step"] == results[rank]["nan_closed_step"] == STEPS
    run = dynprobe.load_run(tmp_path / "fault_exception_rank0")
    reasons = [g.reason for g in run.ghosts]
    assert all("on 1 of 2 ranks" in r and "another rank" in r for r in reasons), reasons
    nan_run = dynprobe.load_run(tmp_path / "fault_nan_rank0")
    assert all("non-finite loss (on 1 of 2 ranks)" in g.reason for g in nan_run.ghosts)
    assert not (tmp_path / "fault_exception_rank1").exists() and not (tmp_path / "fault_nan_rank1").exists()


# ---------------------------------------------------------------------------------------------- pure parts


def test_partition_keeps_modules_whole_and_balances_sizes() -> None:
    named = [("a.weight", torch.zeros(100)), ("a.bias", torch.zeros(10)), ("b.weight", torch.zeros(60)),
             ("c.weight", torch.zeros(50)), ("c.bias", torch.zeros(5))]
    shares = partition_modules(named, 2)
    assert shares == [["a.weight", "a.bias"], ["b.weight", "c.weight", "c.bias"]]
    assert sorted(sum(shares, [])) == sorted(n for n, _ in named)
    assert partition_modules(named[:2], 3) == [["a.weight", "a.bias"], [], []]


def test_null_sink_keeps_records_in_memory_and_touches_no_file_of_the_run(tmp_path: Path) -> None:
    sink = NullSink(tmp_path / "never", {"config": {}})
    assert isinstance(sink, RunSink)
    sink.event("attach", step=0)
    sink.save_array(0, "params", np.zeros(3))
    sink.save_arrays(0, "buffers", {"b": np.zeros(2)})
    sink.save_run_array("eval_indices", np.arange(3))
    sink.append_separation(0, np.arange(3.0), np.zeros(3))
    sink.save_matrix("C", np.zeros((2, 2)))
    rows = sink.rows_path("C")
    rows.write_bytes(b"12345678")  # a recorder appending its rows: a private scratch file, never in the run
    sink.commit_snapshot({"step": 0, "kernel": True})
    sink.update_manifest(status="closed")
    assert sink.snapshots == [{"snapshot_index": 0, "step": 0, "kernel": True}]
    assert sink.manifest["status"] == "closed"
    assert not (tmp_path / "never").exists() and tmp_path not in rows.parents
    sink.close()
    assert not rows.exists()


@pytest.mark.slow
def test_batchnorm_buffers_follow_ddp_broadcast_for_ghosts_and_the_kernel(tmp_path: Path) -> None:
    results = run_spawned("batchnorm", tmp_path)
    assert results[0]["params"] == results[1]["params"]
    run = dynprobe.load_run(tmp_path / "bn_rank0")
    control = [i for i, g in enumerate(run.ghosts) if g.control][0]
    compared = ~np.isnan(run.chaos["C"][control])
    assert compared.sum() == 4
    assert np.all(run.chaos["C"][control][compared] == 0.0) and np.all(run.chaos["D"][control][compared] == 0.0)
    # rank 1's share of the control ghost's kernel uses the ghost's buffers, which must be rank 0's (as DDP's main)
    assert np.all(np.abs(run.chaos["S"][control][compared]) < 1e-12)
    assert not [e for e in run.events if e.get("event") in ("control_drift", "probe_error")]
    np.testing.assert_allclose(run.kernel(snapshot_index=-1), np.array(results[0]["kernel_direct"]), rtol=1e-5,
                               atol=1e-9)
    assert not (tmp_path / "bn_rank1").exists()
