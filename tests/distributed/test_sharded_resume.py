"""Resuming an FSDP2 run (``resume=True`` under ``fully_shard``; dynprobe/distributed/sharded_resume.py), 2 gloo ranks.

The experiment of tests/distributed/test_sharded.py (the tiny MLP, every Linear and the root ``fully_shard``-ed,
halves of the same global batches, the learning rate dropped for the last snapshots so that their C takes the
cancellation-free form). A reference run trains 8 steps uninterrupted; another saves a checkpoint (each
rank's local shards and momentum buffers) at step 4, trains on to step 7 and "crashes" (no close: its hooks and
its lock die), then restores the checkpoint and resumes the run from step 4. Every stored array must equal the
reference's. Results come back as JSON files written by the spawned ranks.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import dynprobe
from dynprobe.distributed.sharded_resume import ShardedResumeError, check_resumed_shards

from .. import spawned
from .fsdp_setup import GLOBAL_BATCH, eval_data, global_batch
from .test_sharded import SLOW_FROM, SLOW_LR, local_shards, make_model, sharded_model

fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(not dist.is_available() or not hasattr(fsdp, "fully_shard"),
                                reason="torch.distributed FSDP2 is not available")

STEPS, CHECKPOINT, CRASH = 8, 4, 7
DEADLINE_S = 180.0


# ---------------------------------------------------------------------------------------------- the loop


def optimizer_of(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)


def probe_of(model: nn.Module, optimizer: torch.optim.Optimizer, out: Path, **options: object) -> dynprobe.Probe:
    return dynprobe.Probe(model, optimizer, eval_data=eval_data(), out=out, schedule=2, total_steps=STEPS,
                          **options)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, criterion, shard: slice, steps: range,
                after_step=None) -> None:
    """The user's loop over ``steps`` (global step numbers: the learning rate drops at SLOW_FROM)."""
    for step in steps:
        for group in optimizer.param_groups:
            group["lr"] = SLOW_LR if step >= SLOW_FROM else 0.2
        x, y = global_batch(step)
        loss = criterion(model(x[shard]), y[shard])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(step + 1)


def checkpoint_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """This rank's part of a training checkpoint: its local shards and momentum buffers (copies)."""
    return {"params": [p.to_local().detach().clone() for p in model.parameters()],
            "momentum": [optimizer.state[p]["momentum_buffer"].to_local().clone() for p in model.parameters()]}


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: dict) -> None:
    """Write the checkpoint back into the same model and optimizer, in place (as loading a sharded checkpoint
    does)."""
    with torch.no_grad():
        for p, saved, momentum in zip(model.parameters(), checkpoint["params"], checkpoint["momentum"]):
            p.to_local().copy_(saved)
            optimizer.state[p]["momentum_buffer"].to_local().copy_(momentum)


def simulate_crash(probe: dynprobe.Probe) -> None:
    """What a killed process leaves: no close(); its hooks and its lock on the run die with it."""
    probe._closed = True
    for handle in probe._handles:
        handle.remove()
    probe.writer.close()


def _shard(rank: int, world: int) -> slice:
    per_rank = GLOBAL_BATCH // world
    return slice(rank * per_rank, (rank + 1) * per_rank)


def history_bytes(probe: dynprobe.Probe) -> int:
    """Bytes of earlier snapshots' θ the probe holds for the C rows (FSDP: this rank's pieces)."""
    cosine = probe._recorder.cosine
    return cosine.history.numel() * cosine.history.element_size()


# ---------------------------------------------------------------------------------------------- scenarios


def scenario_resume(rank: int, folder: Path, result: dict) -> None:
    shard = _shard(rank, 2)
    model = sharded_model()
    optimizer = optimizer_of(model)
    probe = probe_of(model, optimizer, folder / "reference")
    train_steps(model, optimizer, probe.watch(nn.CrossEntropyLoss()), shard, range(STEPS))
    result["reference_local"] = local_shards(model)
    result["history_bytes"] = history_bytes(probe)
    result["reference_history"] = probe._recorder.cosine.history.tolist()
    result["reference_norms"] = [n.tolist() for n in probe._recorder.cosine.norms]
    probe.close()

    model = sharded_model()
    optimizer = optimizer_of(model)
    probe = probe_of(model, optimizer, folder / "run")
    saved: dict = {}

    def save(step: int) -> None:
        if step == CHECKPOINT:
            saved.update(checkpoint_of(model, optimizer))

    train_steps(model, optimizer, probe.watch(nn.CrossEntropyLoss()), shard, range(CRASH), after_step=save)
    result["crashed_steps"] = [s["step"] for s in probe.writer.snapshots]
    simulate_crash(probe)
    restore(model, optimizer, saved)

    try:  # the last snapshot (6) is the default resume step, but the model holds step 4's parameters
        probe_of(model, optimizer, folder / "run", resume=True)
    except ValueError as error:
        result["mismatch_error"] = str(error)
    result["untouched"] = not any((folder / "run").glob("set-aside-*"))

    probe = probe_of(model, optimizer, folder / "run", resume=True, resume_step=CHECKPOINT)
    result["global_step"] = probe.global_step
    result["writer"] = type(probe.writer).__name__
    result["resumed_history"] = probe._recorder.cosine.history.tolist()
    result["resumed_norms"] = [n.tolist() for n in probe._recorder.cosine.norms]
    train_steps(model, optimizer, probe.watch(nn.CrossEntropyLoss()), shard, range(CHECKPOINT, STEPS))
    result["resumed_local"] = local_shards(model)
    result["steps"] = [s["step"] for s in probe.writer.snapshots]
    probe.close()

    # a kept snapshot that lost a rank's shard file (the model matches the last snapshot, step 8): refused on
    # every rank while the probe reloads the kept snapshots, never a C computed from a piece left NaN
    if rank == 0:
        shutil.copytree(folder / "reference", folder / "damaged")
        (folder / "damaged/snapshots/step_00000002/params.dcp/shard-00002-model-00001-of-00001.safetensors").unlink()
    dist.barrier()
    try:
        probe_of(model, optimizer, folder / "damaged", resume=True)
    except ShardedResumeError as error:
        result["damaged_error"] = str(error)
    flag = torch.ones(1)
    dist.all_reduce(flag)
    result["after"] = float(flag)


def scenario_write_one_rank(rank: int, folder: Path, result: dict) -> None:
    model = sharded_model()
    optimizer = optimizer_of(model)
    probe = probe_of(model, optimizer, folder / "one_rank")
    train_steps(model, optimizer, probe.watch(nn.CrossEntropyLoss()), slice(None), range(2))
    result["history_bytes"] = history_bytes(probe)
    probe.close()


def scenario_resume_two_ranks(rank: int, folder: Path, result: dict) -> None:
    model = sharded_model()
    try:
        probe_of(model, optimizer_of(model), folder / "one_rank", resume=True)
    except ValueError as error:
        result["error"] = str(error)
    flag = torch.ones(1)
    dist.all_reduce(flag)  # nothing was left half-done in a collective
    result["after"] = float(flag)


def scenario_resume_with_kernel_and_ghosts(rank: int, folder: Path, result: dict) -> None:
    """The resume of scenario_resume with the eNTK and ghosts: a ghost spawned at 0 (alive at the interruption)
    and one spawned at the resume step (re-created there: the same θ and ε)."""
    shard = _shard(rank, 2)
    options = dict(kernel=dynprobe.KernelConfig(n=8), ghosts=dynprobe.Ghosts(at=[0, CHECKPOINT]))
    for name in ("reference", "run"):
        model = sharded_model()
        optimizer = optimizer_of(model)
        probe = probe_of(model, optimizer, folder / name, **options)
        saved: dict = {}

        def save(step: int) -> None:
            if step == CHECKPOINT:
                saved.update(checkpoint_of(model, optimizer))

        if name == "reference":
            train_steps(model, optimizer, probe.watch(nn.CrossEntropyLoss()), shard, range(STEPS))
            probe.close()
            result["reference_local"] = local_shards(model)
            continue
        train_steps(model, optimizer, probe.watch(nn.CrossEntropyLoss()), shard, range(CRASH), after_step=save)
        simulate_crash(probe)
        restore(model, optimizer, saved)
        probe = probe_of(model, optimizer, folder / name, resume=True, resume_step=CHECKPOINT, **options)
        train_steps(model, optimizer, probe.watch(nn.CrossEntropyLoss()), shard, range(CHECKPOINT, STEPS))
        probe.close()
        result["resumed_local"] = local_shards(model)


SCENARIOS = {"resume": scenario_resume, "resume_everything": scenario_resume_with_kernel_and_ghosts,
             "write_one_rank": scenario_write_one_rank,
             "resume_two_ranks": scenario_resume_two_ranks}


def run_spawned(scenario: str, folder: Path, world: int = 2) -> list[dict]:
    return spawned.run_spawned(__name__, scenario, folder, world=world, deadline_s=DEADLINE_S)


# ---------------------------------------------------------------------------------------------- tests


def test_a_resumed_fsdp_run_stores_what_an_uninterrupted_run_stores(tmp_path: Path) -> None:
    results = run_spawned("resume", tmp_path)
    assert results[0]["crashed_steps"] == [0, 2, 4, 6]
    for rank, result in enumerate(results):
        # the same refusal on every rank, naming the step the parameters do match; the run is left as it was
        assert "differ from the run's snapshot at step 6" in result["mismatch_error"], rank
        assert "pass resume_step=4" in result["mismatch_error"] and "of 2 ranks differ" in result["mismatch_error"]
        assert result["untouched"]
        assert result["global_step"] == CHECKPOINT
        assert result["steps"] == [0, 2, 4, 6, 8]
        # training is the reference's, bit for bit; the probe's rebuilt state is the reference's at step 4
        assert result["resumed_local"] == result["reference_local"], rank
        assert result["resumed_history"] == result["reference_history"][:3], rank
        assert result["resumed_norms"] == result["reference_norms"][:3], rank  # bit-identical global norms
        assert "reading the parameter shards of the snapshot at step 2 failed on 2 of 2 ranks" in \
            result["damaged_error"] and "is not in the shards (found (8, 6))" in result["damaged_error"]
        assert result["after"] == 2
    assert [r["writer"] for r in results] == ["RunWriter", "NullSink"]
    assert results[0]["mismatch_error"] == results[1]["mismatch_error"]

    reference, run = dynprobe.load_run(tmp_path / "reference"), dynprobe.load_run(tmp_path / "run")
    assert run.status == "closed" and run.manifest["resumes"][0]["step"] == CHECKPOINT
    assert not [e for e in run.events if e.get("event") == "probe_error"]
    np.testing.assert_array_equal(run.steps, reference.steps)
    for i in range(len(run)):  # θ read back from every rank's shards: bit for bit
        np.testing.assert_array_equal(run.params(snapshot_index=i), reference.params(snapshot_index=i))
    assert run.C_layers.shape == reference.C_layers.shape == (3, 5, 5)
    off = ~np.eye(len(run), dtype=bool)
    for measured, expected in zip([run.C, *run.C_layers], [reference.C, *reference.C_layers]):
        assert np.all(np.abs(measured[off] - expected[off]) <= 1e-12 * np.abs(expected[off]))
        np.testing.assert_array_equal(measured, expected)  # in fact bit for bit: the same sums in the same order
    assert reference.C[4, 3] < 1e-9  # the rows after the resume include entries far below the dot-product form's reach
    np.testing.assert_array_equal(run.D, reference.D)
    np.testing.assert_array_equal(run.eval_loss, reference.eval_loss)
    np.testing.assert_array_equal(run.train_loss, reference.train_loss)


def test_resuming_at_another_world_size_is_refused_on_every_rank(tmp_path: Path) -> None:
    written = run_spawned("write_one_rank", tmp_path, world=1)
    assert written[0]["history_bytes"] > 0
    results = run_spawned("resume_two_ranks", tmp_path)
    for result in results:
        assert "cannot resume" in result["error"] and "(resume=True)" in result["error"]
        assert "recorded under FSDP (fully_shard) on 1 rank" in result["error"]
        assert "this probe runs under FSDP (fully_shard) on 2 ranks" in result["error"]
        assert "resume it under fully_shard on 1 rank (the recorded world size)" in result["error"]
        assert result["after"] == 2
    assert results[0]["error"] in results[1]["error"]  # rank 1 reports rank 0's refusal
    # ... and in one process without torch.distributed (an unsharded model): refused before anything is written
    model = make_model()
    before = sorted(p.name for p in (tmp_path / "one_rank").iterdir())
    with pytest.raises(ValueError, match=r"recorded under FSDP \(fully_shard\) on 1 rank, and this probe runs in "
                                         r"one process, unsharded"):
        probe_of(model, optimizer_of(model), tmp_path / "one_rank", resume=True)
    assert sorted(p.name for p in (tmp_path / "one_rank").iterdir()) == before
    assert dynprobe.load_run(tmp_path / "one_rank").status == "closed"


def test_the_shard_check_needs_the_snapshot_at_the_resume_step_only() -> None:
    class NoCollectives:  # any collective would fail: none may be issued without a snapshot at the step
        rank, world_size = 0, 2

        def all_reduce(self, tensor: torch.Tensor) -> None:
            raise AssertionError("no collective expected")

    check_resumed_shards(NoCollectives(), Path("/nonexistent"), {}, [], [{"step": 0}, {"step": 2}], 3,
                         torch.device("cpu"))


def test_a_resumed_fsdp_run_with_the_entk_and_ghosts_stores_what_an_uninterrupted_run_stores(tmp_path: Path) -> None:
    results = run_spawned("resume_everything", tmp_path)
    for rank, result in enumerate(results):
        assert result["resumed_local"] == result["reference_local"], rank
    reference, run = dynprobe.load_run(tmp_path / "reference"), dynprobe.load_run(tmp_path / "run")
    assert run.status == "closed" and not [e for e in run.events if e.get("event") == "probe_error"]
    np.testing.assert_array_equal(run.kernel_steps, reference.kernel_steps)
    np.testing.assert_array_equal(run.S, reference.S)  # the kept kernels reattached: bit for bit
    np.testing.assert_array_equal(run.C, reference.C)
    statuses = {e["ghost"]: e["status"] for e in run.events if e.get("event") == "ghost_status"}
    spawned_at = {e["ghost"]: e["spawn_step"] for e in run.events if e.get("event") == "ghost_spawn"}
    interrupted = [g for g, status in statuses.items() if status == "interrupted"]
    assert interrupted and all(spawned_at[g] == 0 for g in interrupted)  # alive at the interruption

    def compares(r, ghost_step):
        return [(e["ghost"], e["step"], e["L2"], e["C"], e["D"], e.get("S")) for e in r.events
                if e.get("event") == "ghost_compare" and spawned_at.get(e["ghost"]) == ghost_step
                and e["step"] > CHECKPOINT]

    later = compares(run, CHECKPOINT)
    assert later and later == compares(reference, CHECKPOINT)  # re-created at the resume step: bit for bit
    assert all(c[-1] is not None for c in later if c[1] == STEPS)  # S measured at the last step
