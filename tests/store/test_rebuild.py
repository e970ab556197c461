"""Rebuilding the interval-matrix rows from stored snapshots (dynprobe.store.rebuild): C (eq. 1) per run and per
layer, D (eq. 6) for labels and for regression outputs, S (eq. 4) with NaN where a snapshot has no kernel —
each against a brute-force double loop over the hand-written arrays."""
from __future__ import annotations

import numpy as np
import pytest

from dynprobe.store.files import RunFormatError
from dynprobe.store.layout import KERNEL, PARAMS, PREDS, snapshot_file
from dynprobe.store.rebuild import lower_triangle_bytes, rebuild_rows

STEPS = [0, 10, 25, 60]
SPECS = [{"name": "a.weight", "numel": 4}, {"name": "a.bias", "numel": 2}, {"name": "b.weight", "numel": 3}]
MANIFEST = {"model": {"parameters": SPECS}}


def save(root, step, name, array) -> None:
    path = snapshot_file(root, step, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)


def cosine_dissimilarity(u: np.ndarray, v: np.ndarray) -> float:
    return 1.0 - float(np.dot(u, v)) / float(np.sqrt(np.dot(u, u) * np.dot(v, v)))


def brute_force(items: list, distance) -> np.ndarray:
    return np.array([[distance(a, b) for b in items] for a in items])


@pytest.fixture
def run(tmp_path):
    rng = np.random.default_rng(0)
    params = [rng.normal(size=9).astype(np.float32) for _ in STEPS]
    labels = [rng.integers(0, 3, size=20) for _ in STEPS]
    kernels = [rng.normal(size=(5, 5)) for _ in STEPS]
    for step, p, y, k in zip(STEPS, params, labels, kernels):
        save(tmp_path, step, PARAMS, p)
        save(tmp_path, step, PREDS, y)
        if step != 25:  # one snapshot without a kernel
            save(tmp_path, step, KERNEL, k)
    snapshots = [{"step": s, "kernel": s != 25} for s in STEPS]
    return tmp_path, params, labels, kernels, snapshots


def test_c_is_the_cosine_dissimilarity_of_the_stored_parameters_whole_and_per_layer(run):
    root, params, _, _, snapshots = run
    vectors = [p.astype(np.float64) for p in params]
    np.testing.assert_allclose(rebuild_rows(root, MANIFEST, "C", snapshots),
                               brute_force(vectors, cosine_dissimilarity), atol=1e-12)
    for layer, part in ((0, slice(0, 6)), (1, slice(6, 9))):  # a: weight + bias, b: weight
        np.testing.assert_allclose(rebuild_rows(root, MANIFEST, f"C.layer_{layer:03d}", snapshots),
                                   brute_force([v[part] for v in vectors], cosine_dissimilarity), atol=1e-12)
    with pytest.raises(RunFormatError, match="there is no layer 2"):
        rebuild_rows(root, MANIFEST, "C.layer_002", snapshots)


def test_d_is_the_fraction_of_differing_labels_or_the_mean_squared_difference(run, tmp_path_factory):
    root, _, labels, _, snapshots = run
    np.testing.assert_allclose(rebuild_rows(root, MANIFEST, "D", snapshots),
                               brute_force(labels, lambda a, b: sum(x != y for x, y in zip(a, b)) / len(a)))
    other = tmp_path_factory.mktemp("regression")
    rng = np.random.default_rng(1)
    outputs = [rng.normal(size=(8, 2)).astype(np.float32) for _ in STEPS]
    for step, out in zip(STEPS, outputs):
        save(other, step, PREDS, out)
    mse = brute_force(outputs, lambda a, b: float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))
    np.testing.assert_allclose(rebuild_rows(other, MANIFEST, "D", snapshots), mse, rtol=1e-12)


def test_s_compares_the_stored_kernels_and_is_nan_for_a_snapshot_without_one(run):
    root, _, _, kernels, snapshots = run
    result = rebuild_rows(root, MANIFEST, "S", snapshots)
    have = [0, 1, 3]
    np.testing.assert_allclose(result[np.ix_(have, have)],
                               brute_force([kernels[i].reshape(-1) for i in have], cosine_dissimilarity), atol=1e-12)
    assert np.isnan(result[2]).all() and np.isnan(result[:, 2]).all()


def test_a_missing_array_or_an_unknown_metric_is_a_format_error(run):
    root, _, _, _, snapshots = run
    snapshot_file(root, 10, PARAMS).unlink()
    with pytest.raises(RunFormatError, match="params"):
        rebuild_rows(root, MANIFEST, "C", snapshots)
    with pytest.raises(RunFormatError, match="not a function of the stored snapshots"):
        rebuild_rows(root, MANIFEST, "B", snapshots)


def test_the_row_file_holds_the_lower_triangle_row_by_row_little_endian():
    matrix = np.arange(16, dtype=np.float64).reshape(4, 4)
    expected = [matrix[k, j] for k in range(4) for j in range(k + 1)]
    assert np.frombuffer(lower_triangle_bytes(matrix), dtype="<f8").tolist() == expected
