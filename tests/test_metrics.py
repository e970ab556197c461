"""Pure interval metrics against numpy references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dynprobe.metrics import functions as metrics


def _cos_dissim(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def test_cosine_dissimilarity_matches_numpy_in_float64():
    rng = np.random.default_rng(0)
    a = rng.normal(size=1000).astype(np.float32)
    b = (a + 1e-4 * rng.normal(size=1000)).astype(np.float32)
    assert metrics.cosine_dissimilarity(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(
        _cos_dissim(a, b), rel=1e-10)


def test_cosine_dissimilarity_resolves_tiny_differences_that_float32_loses():
    rng = np.random.default_rng(1)
    a = rng.normal(size=100_000).astype(np.float32)
    b = a.copy()
    b[:10] += np.float32(1e-3)
    expected = _cos_dissim(a, b)
    assert 0 < expected < 1e-9
    assert metrics.cosine_dissimilarity(a, b) == pytest.approx(expected, rel=1e-6)


def test_to_many_variants_match_the_pairwise_function():
    rng = np.random.default_rng(2)
    x, ys = rng.normal(size=50), rng.normal(size=(4, 50))
    np.testing.assert_allclose(metrics.cosine_dissimilarity_to_many(x, ys).numpy(),
                               [_cos_dissim(x, y) for y in ys], rtol=1e-12)
    np.testing.assert_allclose(metrics.l2_distance_to_many(x, ys).numpy(),
                               np.linalg.norm(ys - x, axis=1), rtol=1e-12)
    h, hs = rng.normal(size=(6, 6)), rng.normal(size=(3, 6, 6))
    np.testing.assert_allclose(metrics.kernel_distance_to_many(h, hs).numpy(),
                               [_cos_dissim(h, k) for k in hs], rtol=1e-12)


def test_kernel_distance_is_scale_invariant_and_zero_on_itself():
    rng = np.random.default_rng(3)
    j = rng.normal(size=(8, 30))
    h = j @ j.T
    assert metrics.kernel_distance(h, 3.5 * h) == pytest.approx(0.0, abs=1e-15)
    assert metrics.kernel_distance(h, h) == pytest.approx(0.0, abs=1e-15)
    other = rng.normal(size=(8, 30))
    assert metrics.kernel_distance(h, other @ other.T) == pytest.approx(_cos_dissim(h, other @ other.T), rel=1e-12)


def test_disagreement_matches_numpy():
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 10, 500), rng.integers(0, 10, 500)
    assert metrics.disagreement(a, b) == pytest.approx((a != b).mean())
    many = rng.integers(0, 10, (3, 500))
    np.testing.assert_allclose(metrics.disagreement_to_many(torch.from_numpy(a), torch.from_numpy(many)).numpy(),
                               (many != a).mean(axis=1))


def test_zero_vectors_give_nan_not_an_exception():
    assert np.isnan(metrics.cosine_dissimilarity(np.zeros(3), np.ones(3)))


@pytest.mark.parametrize("fn", [metrics.cosine_dissimilarity, metrics.kernel_distance, metrics.disagreement])
def test_size_mismatch_is_a_clear_error(fn):
    with pytest.raises(ValueError, match="equal"):
        fn(np.ones(3), np.ones(4))
