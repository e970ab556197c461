"""Online interval matrices: the spilled history completed in blocks, pending entries, resume, bytes read."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dynprobe.metrics import _columns as columns_module
from dynprobe.metrics import functions as metrics
from dynprobe.metrics.interval import MIN_GROUP, NEAR, CosineMetric, FunctionMetric, PairMetric, PairwiseMatrix
from dynprobe.recording.matrices import RecordedMatrix
from dynprobe.store.history import VectorHistory
from dynprobe.store.matrix_rows import MatrixRows
from dynprobe.store.rows import TriangularRows

P, T = 3000, 24
SLICES = [slice(0, 1000), slice(1000, 1010), slice(1010, P)]


def _trajectory(seed: int = 0, t: int = T, decay: float = 0.8) -> list[np.ndarray]:
    """Steps shrinking by ``decay``: late snapshots are so close that their C entries need the exact form."""
    rng = np.random.default_rng(seed)
    out = [rng.standard_normal(P).astype(np.float32)]
    for k in range(1, t):
        out.append((out[-1] + rng.standard_normal(P).astype(np.float32) * np.float32(0.05 * decay**k)))
    out[7] = out[6].copy()  # a snapshot that did not move: exact zeros
    return out


class Disk:
    """The run directory's stored vectors, with every read counted (``reads``: whole vectors; ``slices``:
    ``(index, start, stop)``)."""

    def __init__(self) -> None:
        self.arrays: dict[int, np.ndarray] = {}
        self.reads: list[int] = []
        self.slices: list[tuple[int, int, int]] = []

    def load(self, index: int) -> np.ndarray:
        self.reads.append(index)
        return self.arrays[index]

    def load_columns(self, index: int, start: int, stop: int) -> np.ndarray:
        self.slices.append((index, start, stop))
        return self.arrays[index][start:stop]

    def numbers_read(self) -> int:
        return len(self.reads) * P + sum(stop - start for _, start, stop in self.slices)


def _recorded(tmp_path, name: str, metric: PairMetric, history: VectorHistory, **options) -> RecordedMatrix:
    """The pure matrix and its row files, one per channel, as the recorder pairs them."""
    files = MatrixRows([tmp_path / f"{name}.{c}.rows" for c in range(metric.channels)])
    return RecordedMatrix(PairwiseMatrix(name, metric, history, **options), files)


def _matrix(tmp_path, name: str, vectors_in_memory: float, disk: Disk, dtype=torch.float32) -> RecordedMatrix:
    history = VectorHistory("cpu", dtype=dtype, memory_budget=int(vectors_in_memory * P * dtype.itemsize),
                            load=disk.load, load_columns=disk.load_columns)
    return _recorded(tmp_path, name, CosineMetric(P, SLICES), history)


def _run(tmp_path, name: str, vectors_in_memory: float, trajectory, dtype=torch.float32):
    disk = Disk()
    matrix = _matrix(tmp_path, name, vectors_in_memory, disk, dtype)
    for t, vector in enumerate(trajectory):
        disk.arrays[t] = vector
        matrix.update(torch.from_numpy(vector))
    matrix.complete()
    return [matrix.compute(c) for c in range(matrix.matrix.metric.channels)], disk, matrix


def _assert_same_matrices(got, reference):
    """Deferred entries are summed block by block in another order (a product of the group with many vectors,
    not one row at a time): equal within rounding, far inside the 1e-9 bound; exact zeros stay exact."""
    for ref, matrix_c in zip(reference, got):
        np.testing.assert_allclose(matrix_c, ref, rtol=1e-10, atol=1e-300)
        np.testing.assert_array_equal(matrix_c == 0, ref == 0)


@pytest.mark.parametrize("vectors_in_memory", [12, 6, 3, 2, 1, 0])
def test_a_spilled_history_gives_the_in_memory_matrices(tmp_path, vectors_in_memory):
    trajectory = _trajectory()
    reference, _, _ = _run(tmp_path, "ref", 100, trajectory)
    got, disk, matrix = _run(tmp_path, "spilled", vectors_in_memory, trajectory)
    assert matrix.history.spilled and not matrix.matrix.pending
    _assert_same_matrices(got, reference)
    assert reference[0][7, 6] == 0.0 and reference[0][0, 0] == 0.0
    # the whole-vector channel against an independent computation
    x = torch.from_numpy(np.stack(trajectory))
    for t in range(T):
        expected = metrics.cosine_dissimilarity_to_many(x[t], x).numpy()
        np.testing.assert_allclose(reference[0][t], expected, rtol=1e-9, atol=0)
    # each layer against slicing the vectors with numpy
    for c, part in enumerate(SLICES, start=1):
        for t in (5, 17, T - 1):
            for j in range(T):
                assert reference[c][t, j] == pytest.approx(metrics.cosine_dissimilarity(x[t, part], x[j, part]),
                                                           rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("decay, passes", [(1.0, 1), (0.8, 2)])
def test_each_spilled_vector_is_read_once_per_group_of_rows_in_column_slices(tmp_path, decay, passes):
    """Moving snapshots: one pass over the columns per group; settling ones (entries in the exact form): two."""
    t_total, capacity = 60, 10  # the anchor and a ring of the newest 9; rows completed in groups of MIN_GROUP
    trajectory = _trajectory(t=t_total, decay=decay)
    completions: list[int] = []
    disk = Disk()
    matrix = _matrix(tmp_path, "blocks", capacity, disk)
    for t, vector in enumerate(trajectory):
        disk.arrays[t] = vector
        before = len(matrix.matrix.pending)
        matrix.update(torch.from_numpy(vector))
        if len(matrix.matrix.pending) < before:
            completions.append(t)
            assert before + 1 == MIN_GROUP  # a group is exactly MIN_GROUP rows (the ring is smaller)
    matrix.complete()
    assert completions == [26, 42, 58] and not matrix.matrix.pending and np.isfinite(matrix.compute()).all()
    assert not disk.reads  # nothing read whole, only slices
    assert matrix.history.bytes_loaded == disk.numbers_read() * 4
    # every vector is read at most once per pass of a completion, in slices that tile it
    per_vector = np.bincount([s[0] for s in disk.slices], weights=[s[2] - s[1] for s in disk.slices])
    assert per_vector.max() <= passes * P * (len(completions) + 1) and per_vector.max() % P == 0
    # the landed code read every vector beyond the first ten back whole at every later snapshot; now each
    # completion reads the spilled vectors once and the group's rows that left the ring: T²·p / (2K) + T·p
    landed = sum(t - capacity for t in range(capacity, t_total)) * P
    assert disk.numbers_read() * 5 < landed * (1 if passes == 1 else 2.5)
    assert disk.numbers_read() <= passes * (sum(range(0, t_total, MIN_GROUP)) + t_total) * P
    reference, _, _ = _run(tmp_path, "in_memory", 100, trajectory)
    _assert_same_matrices([matrix.compute()], reference)


def test_rows_are_readable_with_nan_for_pending_entries_and_complete_at_the_end(tmp_path):
    trajectory = _trajectory()
    disk = Disk()
    matrix = _matrix(tmp_path, "live", 6, disk)
    for t, vector in enumerate(trajectory[:13]):  # spills at 6: row 12 sees 0 and the ring 7-11; rows 7-12 pending
        disk.arrays[t] = vector
        row = matrix.update(torch.from_numpy(vector))
    assert np.isfinite(row[[0, 7, 8, 9, 10, 11, 12]]).all() and np.isnan(row[1:7]).all()  # anchor, ring: at once
    live = matrix.compute()
    assert matrix.matrix.pending and np.isnan(live).any()
    for index, columns in matrix.matrix.pending.items():
        assert np.isnan(live[index, columns]).all()
    matrix.complete()
    assert np.isfinite(matrix.compute()).all() and not matrix.matrix.pending


def test_a_resumed_matrix_completes_what_the_interrupted_one_left_pending(tmp_path):
    trajectory = _trajectory()
    reference, _, _ = _run(tmp_path, "ref", 100, trajectory)
    disk = Disk()
    first = _matrix(tmp_path, "resumed", 6, disk)
    for t, vector in enumerate(trajectory[:17]):
        disk.arrays[t] = vector
        first.update(torch.from_numpy(vector))
    assert sorted(first.matrix.pending) == list(range(7, 17))  # "killed" before the group of MIN_GROUP rows filled
    paths = [r.path for r in first.rows.files]
    history = VectorHistory("cpu", dtype=torch.float32, memory_budget=6 * P * 4, load=disk.load)
    files = MatrixRows(paths)
    files.truncate(16)  # 16 uncommitted
    second = RecordedMatrix(PairwiseMatrix.reattach("C", CosineMetric(P, SLICES), history, files.read(16),
                                                    [True] * 16), files)
    assert sorted(second.matrix.pending) == list(range(7, 16))  # completed with their group, as uninterrupted
    for t, vector in enumerate(trajectory[16:], start=16):
        disk.arrays[t] = vector
        second.update(torch.from_numpy(vector))
    second.complete()
    _assert_same_matrices([second.compute(c) for c in range(len(paths))], reference)
    uninterrupted, _, _ = _run(tmp_path, "uninterrupted", 6, trajectory)
    for c in range(len(paths)):  # the same budget without the interruption: the same numbers
        np.testing.assert_array_equal(second.compute(c), uninterrupted[c])


def test_history_is_kept_in_the_parameters_dtype(tmp_path):
    trajectory = [torch.from_numpy(v).to(torch.bfloat16).float().numpy() for v in _trajectory()]
    reference, _, _ = _run(tmp_path, "f32", 100, trajectory)
    got, _, matrix = _run(tmp_path, "bf16", 100, trajectory, dtype=torch.bfloat16)
    assert matrix.history._buffer.dtype == torch.bfloat16  # half the memory of float32
    for ref, matrix_c in zip(reference, got):  # the same values, summed in another order: within the bound
        np.testing.assert_allclose(matrix_c, ref, rtol=1e-9, atol=0)
        np.testing.assert_array_equal(matrix_c == 0, ref == 0)


def test_missing_vectors_give_nan_rows_and_the_rest_completes(tmp_path):
    rng = np.random.default_rng(3)
    kernels = {t: rng.standard_normal(400) for t in range(0, 20, 3)}
    disk = Disk()
    history = VectorHistory("cpu", dtype=torch.float64, memory_budget=3 * 400 * 8, load=disk.load)
    matrix = _recorded(tmp_path, "S", CosineMetric(), history)
    for t in range(20):
        if t in kernels:
            disk.arrays[t] = kernels[t]
        matrix.update(torch.from_numpy(kernels[t]) if t in kernels else None)
    matrix.complete()
    s = matrix.compute()
    have = sorted(kernels)
    assert np.isnan(s[1]).all() and np.isnan(s[:, 2]).all()
    for i in have:
        for j in have:
            assert s[i, j] == pytest.approx(metrics.kernel_distance(kernels[i], kernels[j]), rel=1e-9, abs=1e-300)


def test_function_metrics_keep_their_one_channel_rows(tmp_path):
    rng = np.random.default_rng(4)
    preds = [rng.integers(0, 5, 300) for _ in range(9)]
    disk = Disk()
    history = VectorHistory("cpu", dtype=torch.int32, memory_budget=2 * 300 * 4, load=disk.load)
    matrix = _recorded(tmp_path, "D", FunctionMetric(metrics.disagreement_to_many), history)
    for t, p in enumerate(preds):
        disk.arrays[t] = p
        matrix.update(torch.from_numpy(p))
    matrix.complete()
    expected = np.array([[np.mean(a != b) for b in preds] for a in preds])
    np.testing.assert_allclose(matrix.compute(), expected, rtol=0, atol=1e-15)


def test_fill_writes_in_place_and_only_inside_complete_rows(tmp_path):
    rows = TriangularRows(tmp_path / "M.rows")
    for k in range(4):
        rows.append(np.full(k + 1, np.nan), k)
    size = rows.path.stat().st_size
    rows.fill(3, np.array([0, 2, 1]), np.array([1.0, 3.0, 2.0]))
    rows.fill(2, np.array([0]), np.array([7.0]))
    assert rows.path.stat().st_size == size
    m = rows.read(4)
    np.testing.assert_array_equal(m[3, :3], [1.0, 2.0, 3.0])
    assert m[2, 0] == 7.0 and m[0, 2] == 7.0 and np.isnan(m[3, 3])
    with pytest.raises(ValueError, match="not complete"):
        rows.fill(4, np.array([0]), np.array([1.0]))
    with pytest.raises(ValueError, match="outside"):
        rows.fill(1, np.array([2]), np.array([1.0]))


def _resident_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the RSS from /proc")
def test_a_large_history_budget_costs_only_the_vectors_stored_even_in_deterministic_mode():
    # Deterministic mode makes torch.empty fill new memory with NaN, which would commit the whole budget (a
    # quarter of the free memory by default) at the first snapshot; the history must not let it.
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        before = _resident_mib()
        history = VectorHistory("cpu", dtype=torch.float32, memory_budget=2 * 2**30, load=lambda index: None)
        history.append(torch.ones(1000), np.ones(1))
        grown = _resident_mib() - before
        assert torch.utils.deterministic.fill_uninitialized_memory  # the user's setting is restored
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    assert history.capacity == 2 * 2**30 // 4000 and grown < 100, grown
    history.release()


def test_a_spilled_bfloat16_history_matches_the_in_memory_one_within_the_bound(tmp_path):
    """bfloat16 vectors go through the column slices as float32 (exact), the in-memory rows as float64 chunks:
    the same values, summed in another order."""
    trajectory = [torch.from_numpy(v).to(torch.bfloat16).float().numpy() for v in _trajectory(decay=0.9)]
    reference, _, _ = _run(tmp_path, "memory", 100, trajectory, dtype=torch.bfloat16)
    got, disk, matrix = _run(tmp_path, "spilled", 3, trajectory, dtype=torch.bfloat16)
    assert matrix.history.spilled and disk.slices and not matrix.matrix.pending
    for ref, matrix_c in zip(reference, got):
        np.testing.assert_allclose(matrix_c, ref, rtol=1e-9, atol=0)
        np.testing.assert_array_equal(matrix_c == 0, ref == 0)


@pytest.mark.parametrize("memory_batch", [256, 5])
def test_in_memory_rows_are_deferred_beyond_the_near_snapshots_and_completed_in_groups(tmp_path, monkeypatch,
                                                                                        memory_batch):
    """Past ``defer_bytes`` of history a row is computed at once against the first and the NEAR newest snapshots;
    the rest waits for MIN_GROUP pending rows, then comes from products of the group with the history (in batches
    of ``MEMORY_BATCH`` vectors)."""
    monkeypatch.setattr(columns_module, "MEMORY_BATCH", memory_batch)
    trajectory = _trajectory(t=60, decay=0.95)
    reference, _, _ = _run(tmp_path, "immediate", 100, trajectory)
    disk = Disk()
    history = VectorHistory("cpu", dtype=torch.float32, memory_budget=100 * P * 4, load=disk.load,
                            load_columns=disk.load_columns)
    metric = CosineMetric(P, SLICES)
    matrix = _recorded(tmp_path, "d", metric, history, defer_bytes=0)
    filled = {}
    for t, vector in enumerate(trajectory):
        row = matrix.update(torch.from_numpy(vector)).copy()
        near = [0, *range(max(0, t - NEAR), t + 1)]
        assert np.isfinite(row[near]).all()
        for k, columns, values in matrix.take_filled():
            filled[(k, tuple(columns))] = values
        if t > NEAR + 1 and t % MIN_GROUP != (NEAR + 1) % MIN_GROUP:
            assert np.isnan(matrix.compute()[t, 1 : t - NEAR]).all()  # pending until the group is full
    matrix.complete()
    for k, columns, values in matrix.take_filled():
        filled[(k, tuple(columns))] = values
    assert not matrix.matrix.pending and not disk.reads and not disk.slices  # nothing read back: all in memory
    got = [matrix.compute(c) for c in range(metric.channels)]
    _assert_same_matrices(got, reference)
    for (k, columns), values in filled.items():  # what online consumers were given is what was stored
        np.testing.assert_array_equal(values, got[0][k, list(columns)])
    assert sum(len(columns) for _, columns in filled) == sum(max(0, t - NEAR - 1) for t in range(60))


@pytest.mark.parametrize("device", ["cpu", "cuda"])  # "cuda": the torch code path, run here on CPU tensors
def test_group_products_give_every_block_sum_to_within_the_bound(device):
    """ColumnPass.products against float64 matrix products, span by span, with a layer narrower than a block."""
    from dynprobe.metrics._blocked import Blocks
    from dynprobe.metrics._spans import ColumnPass

    rng = np.random.default_rng(3)
    blocks = Blocks(P, SLICES)
    history = torch.from_numpy(rng.standard_normal((11, P)).astype(np.float32))
    group = torch.from_numpy(rng.standard_normal((4, P)).astype(np.float32))
    plan = ColumnPass(blocks, 4, device=torch.device(device), max_columns=1500)
    assert len(plan.spans) > 1
    per_task = np.concatenate([plan.products(s, history[:, a:b], group[:, a:b])
                               for s, (a, b, _, _) in enumerate(plan.spans)], -1)
    got = plan.combine(per_task.reshape(11 * 4, -1)).reshape(-1, 11, 4)  # (channels, 11, 4)
    h64, g64 = history.double().numpy(), group.double().numpy()
    for channel in range(blocks.channels):
        a, b = blocks.channel_range(channel)
        exact = h64[:, a:b] @ g64[:, a:b].T
        scale = np.abs(h64[:, a:b]) @ np.abs(g64[:, a:b]).T  # Σ|x_i y_i|: the bound is γ_n times this
        assert np.all(np.abs(got[channel] - exact) <= blocks.dot_error()[channel] / 2 * scale)


@pytest.mark.parametrize("vectors_in_memory", [0, 1, 6, 100])
def test_a_deferred_budget_is_measured_at_the_second_vector_and_gives_the_same_matrices(tmp_path, vectors_in_memory):
    """A budget given as a function (the probe's default, measured after the user's first optimizer step) is asked
    once, when the second vector arrives; the first one waits alone in memory, and spills if the budget is smaller
    than one vector. The rows equal those of the same budget given at once."""
    trajectory = _trajectory()
    reference, _, _ = _run(tmp_path, "given", vectors_in_memory, trajectory)
    disk, asked = Disk(), []

    def measure() -> int:
        asked.append(len(history))
        return int(vectors_in_memory * P * 4)

    history = VectorHistory("cpu", dtype=torch.float32, memory_budget=measure, load=disk.load,
                            load_columns=disk.load_columns)
    metric = CosineMetric(P, SLICES)
    matrix = _recorded(tmp_path, "deferred", metric, history)
    for t, vector in enumerate(trajectory):
        disk.arrays[t] = vector
        matrix.update(torch.from_numpy(vector))
        if t == 0:
            assert not asked and history.in_memory(0)
    matrix.complete()
    assert asked == [2]  # during the second vector's registration, once
    _assert_same_matrices([matrix.compute(c) for c in range(metric.channels)], reference)
