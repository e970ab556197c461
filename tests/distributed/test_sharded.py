"""The probe under FSDP2 (``fully_shard``), 2 CPU processes with the gloo backend (dynprobe/distributed/sharded*.py).

Each spawned test trains the tiny MLP of tests/distributed/test_runtime_ddp.py, every Linear and the root
``fully_shard``-ed (parameters are DTensors, half the rows on each rank), on halves of the same global batches,
with a deadline: a hang fails the test instead of blocking CI.
Results come back as JSON files written by the test workers.
"""
from __future__ import annotations

import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import dynprobe
from dynprobe.distributed import sharded_rows
from dynprobe.distributed.sharded import AgreedSnapshots, ShardedRunFailure, layout_problems, unsupported_under_fsdp
from dynprobe.distributed.sharded_rows import (
    ShardedCosineRows,
    cosine_from_partial_sums,
    local_norms,
    local_row_sums,
    split_by_channel,
)
from dynprobe.distributed.sharded_snapshot import local_layer_bounds

from .. import spawned
from . import fsdp_setup
from .fsdp_setup import GLOBAL_BATCH, eval_data, shard_per_linear

fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(not dist.is_available() or not hasattr(fsdp, "fully_shard"),
                                reason="torch.distributed FSDP2 is not available")

WORLD = 2
STEPS = 8
DEADLINE_S = 150.0
SLOW_FROM, SLOW_LR = 6, 1e-6  # from step 6 the steps are tiny: C(6, 8) ~ 1e-13


# ---------------------------------------------------------------------------------------------- the experiment


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))


def sharded_model() -> nn.Module:
    return shard_per_linear(make_model())






def train(model: nn.Module, shard: slice, out: Path | None, probe_hook=None, **options: object):
    """The user's loop (:func:`fsdp_setup.train`); from step 6 the steps are tiny: C(6, 8) ~ 1e-13."""
    return fsdp_setup.train(model, shard, out, steps=STEPS, eval_set=eval_data(), probe_hook=probe_hook,
                            lr_drop=(SLOW_FROM, SLOW_LR), **options)


def local_shards(model: nn.Module) -> list[list[float]]:
    return [p.to_local().detach().reshape(-1).tolist() for p in model.parameters()]


def full_vector(model: nn.Module) -> list[float]:
    return torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()]).tolist()


# ---------------------------------------------------------------------------------------------- spawning


def _shard(rank: int) -> slice:
    per_rank = GLOBAL_BATCH // WORLD
    return slice(rank * per_rank, (rank + 1) * per_rank)


def run_spawned(scenario: str, folder: Path) -> list[dict]:
    return spawned.run_spawned(__name__, scenario, folder, world=WORLD, deadline_s=DEADLINE_S)


# ---------------------------------------------------------------------------------------------- scenarios


def scenario_train(rank: int, folder: Path, result: dict) -> None:
    bare = sharded_model()
    train(bare, _shard(rank), None)
    result["bare"] = local_shards(bare)
    model = sharded_model()
    result["initial_full"] = full_vector(model)
    probe = train(model, _shard(rank), folder / "run")  # the same out= on every rank: rank 0 writes it
    result["probed"] = local_shards(model)
    result["final_full"] = full_vector(model)
    result["writer"] = type(probe.writer).__name__
    result["steps"] = [s["step"] for s in probe.writer.snapshots]
    result["last_C_row"] = probe._recorder.last_rows["C"].tolist()


def scenario_robustness(rank: int, folder: Path, result: dict) -> None:
    # HSDP (a 2-D mesh: replicate × shard) is refused at attach, on every rank alike
    mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard"))
    model = make_model()
    fsdp.fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    try:
        dynprobe.Probe(model, optimizer, eval_data=eval_data(), out=folder / "refused_hsdp")
    except ValueError as error:
        result["hsdp_error"] = str(error)
    flag = torch.ones(1)
    dist.all_reduce(flag)  # the process group is still usable: no collective was left half-done
    result["after"] = float(flag)

    # A fault inside the probe on one rank only: rank 1's partial sums raise (inside the row's collectives), then,
    # in a second run, rank 0's commit line fails (after every collective of the snapshot).
    for fault in ("partial_sums", "commit"):
        bare = sharded_model()
        train(bare, _shard(rank), None)

        def inject(probe: dynprobe.Probe, fault: str = fault) -> None:
            if fault == "partial_sums" and rank == 1:
                original = sharded_rows.local_row_sums

                def failing(x, stack, *args):
                    if stack.shape[0] == 2:  # the third snapshot (step 4)
                        raise RuntimeError("injected fault in rank 1's partial sums")
                    return original(x, stack, *args)

                sharded_rows.local_row_sums = failing
            if fault == "commit" and rank == 0:
                original_commit = probe.writer.commit_snapshot

                def failing_commit(record):
                    if record["step"] == 4:
                        raise OSError("injected: no space left on device")
                    return original_commit(record)

                probe.writer.commit_snapshot = failing_commit

        model = sharded_model()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            probe = train(model, _shard(rank), folder / f"fault_{fault}", probe_hook=inject)
        sharded_rows.local_row_sums = local_row_sums
        result[f"{fault}_attached"] = probe.attached
        result[f"{fault}_snapshots"] = [s["step"] for s in probe.writer.snapshots]
        result[f"{fault}_warning"] = [str(w.message) for w in caught if "detached itself" in str(w.message)]
        result[f"{fault}_bitwise"] = local_shards(model) == local_shards(bare)


SCENARIOS = {"train": scenario_train, "robustness": scenario_robustness}


# ---------------------------------------------------------------------------------------------- references


def cosine_reference(vectors: np.ndarray) -> np.ndarray:
    """eq. (1) in float64 from whole vectors, as ½‖x̂ − ŷ‖² (accurate for every C, no cancellation)."""
    units = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.array([[0.5 * np.sum((a - b) ** 2) for b in units] for a in units])


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    off = ~np.eye(a.shape[0], dtype=bool)
    return float(np.max(np.abs(a[off] - b[off]) / np.abs(b[off])))


# ---------------------------------------------------------------------------------------------- tests


def test_fsdp_run_is_bitwise_unchanged_and_its_c_matches_float64_and_an_unsharded_run(tmp_path: Path) -> None:
    results = run_spawned("train", tmp_path)
    for rank, result in enumerate(results):
        assert result["probed"] == result["bare"], f"rank {rank}: the probe changed training"
    assert [r["writer"] for r in results] == ["RunWriter", "NullSink"]
    assert results[0]["steps"] == results[1]["steps"] == [0, 2, 4, 6, 8]
    assert results[0]["last_C_row"] == results[1]["last_C_row"]  # every rank holds the same sums, bit for bit

    run = dynprobe.load_run(tmp_path / "run")
    assert run.status == "closed" and run.manifest["distributed"]["attached_to"] == "fully_shard"
    assert not [e for e in run.events if e.get("event") == "probe_error"]
    assert "one all-reduce of the new norms" in run.conventions["C_sharded"] and "params.dcp" in run.conventions[
        "theta_storage"]
    # load_run: whole vectors (no process group here), equal to the gathered full parameters
    assert not dist.is_initialized()
    np.testing.assert_array_equal(run.params(snapshot_index=0), np.array(results[0]["initial_full"], dtype=np.float32))
    np.testing.assert_array_equal(run.params(snapshot_index=-1), np.array(results[0]["final_full"], dtype=np.float32))
    state = run.state_dict(snapshot_index=-1)
    assert tuple(state["2.weight"].shape) == (12, 16)
    for rank in range(WORLD):  # each shard file holds that rank's rows: never θ whole
        assert (tmp_path / "run/snapshots/step_00000008/params.dcp" /
                f"shard-{rank + 1:05d}-model-00001-of-00001.safetensors").is_file()
    assert not (tmp_path / "run/snapshots/step_00000008/params.npy").exists()
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "run", damaged)
    (damaged / "snapshots/step_00000008/params.dcp/shard-00001-model-00001-of-00001.safetensors").unlink()
    with pytest.raises(dynprobe.RunFormatError, match="cover 48 of its 96 entries"):
        dynprobe.load_run(damaged).params(snapshot_index=-1)  # never a vector with rank 0's rows missing

    # C against a computation from the whole θ (whole vector and per layer): ≤ 1e-12 relative for every entry,
    # the ones after the learning rate drop (C ~ 1e-13) included — float64 itself is no closer there (numpy's own
    # ½‖x̂ − ŷ‖² is 2e-11 off), so the reference is in extended precision; measured ≤ 1.0e-14
    vectors = np.stack([run.params(snapshot_index=i) for i in range(len(run))]).astype(np.longdouble)
    offsets = [(s["offset"], s["offset"] + s["numel"]) for s in run.manifest["model"]["parameters"]]
    layers = [(offsets[2 * layer][0], offsets[2 * layer + 1][1]) for layer in range(3)]
    assert run.C_layers.shape == (3, 5, 5)
    for measured, (a, b) in zip([run.C, *run.C_layers], [(0, vectors.shape[1]), *layers]):
        reference = cosine_reference(vectors[:, a:b]).astype(np.float64)
        off = ~np.eye(len(run), dtype=bool)
        error = np.abs(measured[off] - reference[off]) / reference[off]
        assert np.all(error <= 1e-12), error
        assert reference[off].min() < 1e-10  # the entries after the learning rate drop

    # ... and against an unsharded single-process run of the same model on the same global batches: equal within
    # the rounding of training itself (FSDP averages the ranks' gradients in another order)
    single_model = make_model()
    train(single_model, slice(None), tmp_path / "single")
    single = dynprobe.load_run(tmp_path / "single")
    np.testing.assert_array_equal(single.params(snapshot_index=0), run.params(snapshot_index=0))
    assert np.max(np.abs(single.params(snapshot_index=-1) - run.params(snapshot_index=-1))) <= 1e-6  # measured 4.5e-8
    assert relative_difference(run.C, single.C) <= 1e-5  # measured 1.3e-7
    for layer in range(3):
        assert relative_difference(run.C_layers[layer], single.C_layers[layer]) <= 1e-5  # measured 2.8e-7
    assert np.abs(run.D - single.D).max() <= 1 / 64
    np.testing.assert_allclose(run.eval_loss, single.eval_loss, rtol=1e-5)


def test_fsdp_refuses_unsupported_options_on_every_rank_and_survives_a_fault_on_one_rank(tmp_path: Path) -> None:
    results = run_spawned("robustness", tmp_path)
    for rank in range(WORLD):
        result = results[rank]
        assert "only a 1-D mesh over all 2 ranks" in result["hsdp_error"] and "not HSDP" in result["hsdp_error"]
        assert result["after"] == WORLD
        for fault in ("partial_sums", "commit"):
            assert result[f"{fault}_attached"] is False, (rank, fault)
            assert result[f"{fault}_bitwise"], (rank, fault)  # training went on, unchanged
            assert len(result[f"{fault}_warning"]) == 1
        assert "on 1 rank(s)" in result["partial_sums_warning"][0]
    assert "injected fault in rank 1" in results[1]["partial_sums_warning"][0]
    assert "failed on 1 of 2 ranks" in results[1]["commit_warning"][0]
    assert not any(tmp_path.glob("refused_*/*"))
    for fault in ("partial_sums", "commit"):
        run = dynprobe.load_run(tmp_path / f"fault_{fault}")
        assert run.status == "probe_failed"
        assert list(run.steps) == [0, 2]  # step 4 never committed, on any rank
    # rank 0's commit failed after every rank wrote its step-4 shards: they exist, and the snapshot is not visible
    assert (tmp_path / "fault_commit/snapshots/step_00000004/params.dcp").is_dir()
    assert not (tmp_path / "fault_partial_sums/snapshots/step_00000004").exists()  # failed before any file


# ---------------------------------------------------------------------------------------------- pure parts


def _split(vector: torch.Tensor, layers: list[tuple[int, int]]) -> list[tuple[torch.Tensor, list]]:
    """Two "ranks": the first 40 % of each layer's columns on rank 0, the rest on rank 1 (pieces and bounds)."""
    pieces: list[list[torch.Tensor]] = [[], []]
    bounds: list[list[tuple[int, int]]] = [[], []]
    for a, b in layers:
        split = a + (b - a) * 4 // 10
        for rank, (start, stop) in enumerate(((a, split), (split, b))):
            offset = sum(t.numel() for t in pieces[rank])
            bounds[rank].append((offset, offset + stop - start))
            pieces[rank].append(vector[start:stop])
    return [(torch.cat(pieces[rank]), bounds[rank]) for rank in range(2)]


class TwoRanks:
    """Two ShardedCosineRows in one process, their all-reduce done by hand: each rank's ``row`` runs in a thread
    and the payloads meet in the middle (a SUM over the two)."""

    def __init__(self, layers: list[tuple[int, int]]) -> None:
        self.barrier = threading.Barrier(2)
        self.payloads: dict[int, torch.Tensor] = {}
        self.rows = [ShardedCosineRows(_split(torch.zeros(layers[-1][1]), layers)[rank][1], 2,
                                       all_reduce=self._reduce(rank)) for rank in range(2)]

    def _reduce(self, rank: int):
        def reduce(tensor: torch.Tensor) -> None:
            self.payloads[rank] = tensor.clone()
            self.barrier.wait()
            tensor.copy_(self.payloads[0] + self.payloads[1])
            self.barrier.wait()
        return reduce

    def row(self, vector: torch.Tensor, layers: list[tuple[int, int]]) -> list[np.ndarray]:
        pieces = _split(vector, layers)
        out: list = [None, None]

        def work(rank: int) -> None:
            out[rank] = self.rows[rank].row(pieces[rank][0])

        threads = [threading.Thread(target=work, args=(rank,)) for rank in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        return out


def test_rows_from_two_ranks_partial_sums_equal_float64_c_of_the_whole_vectors() -> None:
    generator = torch.Generator().manual_seed(0)
    layers = [(0, 700), (700, 1000), (1000, 1003)]
    base = torch.randn(1003, generator=generator)
    # a far snapshot (C ~ 1e-1), a near one (C ~ 1e-11: the dot-product form would lose every digit) and an
    # identical one
    snapshots = [base, base + 0.3 * torch.randn(1003, generator=generator),
                 base + 1e-5 * torch.randn(1003, generator=generator), base.clone()]
    # the reference in extended precision: float64's own ½‖x̂ − ŷ‖² is only good to ~4u/√(2C) relative (1e-11 at
    # C = 1e-10), for the reference as for the value tested
    vectors = torch.stack(snapshots).double().numpy().astype(np.longdouble)
    references = [cosine_reference(vectors)] + [cosine_reference(vectors[:, a:b]) for a, b in layers]
    assert references[0][2, 0] < 1e-10  # 1 − cos would cancel here
    ranks = TwoRanks(layers)
    for index, snapshot in enumerate(snapshots):
        rows = ranks.row(snapshot, layers)
        np.testing.assert_array_equal(rows[0], rows[1])  # the same sums on both ranks
        for channel, reference in enumerate(references):
            expected = reference[index, :index].astype(np.float64)
            difference = np.abs(rows[0][channel, :index] - expected)
            error = np.divide(difference, expected, out=difference.copy(), where=expected != 0)  # 0 must be 0
            assert np.all(error <= 1e-12), (index, channel, error)  # every C, however small
    assert rows[0][0, 0] == 0.0 and np.all(rows[0][:, 0] == 0.0)  # identical vectors: exactly 0, every channel


def test_partial_sums_are_a_sum_over_pieces() -> None:
    generator = torch.Generator().manual_seed(1)
    layers = [(0, 600), (600, 610)]
    x, y = torch.randn(610, generator=generator), torch.randn(610, generator=generator)
    x64, y64 = x.double().numpy(), y.double().numpy()
    norms = [sum(local_norms(piece, bounds) for piece, bounds in _split(v, layers)) for v in (x, y)]
    x_norm2, y_norm2 = (split_by_channel(n, True) for n in norms)
    np.testing.assert_allclose(x_norm2.numpy(), [x64 @ x64, x64[:600] @ x64[:600], x64[600:] @ x64[600:]],
                               rtol=1e-14)
    total = sum(local_row_sums(px, py[None], x_norm2, y_norm2[None], bounds, True)
                for (px, bounds), (py, _) in zip(_split(x, layers), _split(y, layers)))
    c = cosine_from_partial_sums(total.numpy(), x_norm2.numpy(), y_norm2[None].numpy())
    for channel, (a, b) in enumerate([(0, 610), *layers]):  # ½‖x̂ − ŷ‖² of each channel, in float64
        u, v = x64[a:b] / np.linalg.norm(x64[a:b]), y64[a:b] / np.linalg.norm(y64[a:b])
        assert c[channel, 0] == pytest.approx(0.5 * np.sum((u - v) ** 2), rel=1e-13), channel


def test_local_layer_bounds_follow_each_rank_s_shards() -> None:
    layers = [("a", slice(0, 110)), ("b", slice(110, 170))]
    # parameters of 100, 10 (layer a) and 60 (layer b) entries; this rank holds 50, 5 and 30 of them
    assert local_layer_bounds([100, 10, 60], [50, 5, 30], layers) == [(0, 55), (55, 85)]
    assert local_layer_bounds([100, 10, 60], [50, 0, 0], layers) == [(0, 50), (50, 50)]


def test_a_plain_parameter_next_to_shards_is_named_at_attach() -> None:
    problems = layout_problems([("head.weight", torch.zeros(3, 2))], WORLD)
    assert len(problems) == 1 and "'head.weight' is not sharded" in problems[0]
    assert unsupported_under_fsdp() == []


class _FakeRun:
    """Collectives of a 2-rank run whose other rank reports ``other`` failures."""

    rank, world_size = 0, 2

    def __init__(self, other: float) -> None:
        self.other = other

    def all_reduce(self, tensor: torch.Tensor) -> None:
        tensor += self.other


class _Sequence:
    def __init__(self, fail: bool) -> None:
        self.fail, self.taken = fail, []

    def take(self, step: int, *, ghosts: object) -> None:
        self.taken.append(step)
        if self.fail:
            raise OSError("disk full")


def test_agreed_snapshots_raise_on_every_rank_when_any_rank_failed() -> None:
    AgreedSnapshots(_Sequence(False), _FakeRun(0.0), torch.device("cpu")).take(2, ghosts=None)  # all well
    with pytest.raises(ShardedRunFailure, match="step 4 failed on 1 of 2 ranks"):
        AgreedSnapshots(_Sequence(False), _FakeRun(1.0), torch.device("cpu")).take(4, ghosts=None)
    with pytest.raises(OSError, match="disk full"):  # the failing rank raises its own error
        AgreedSnapshots(_Sequence(True), _FakeRun(0.0), torch.device("cpu")).take(4, ghosts=None)
