"""Pure interval metrics against numpy references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dynprobe.metrics import functions as metrics
from dynprobe.metrics._blocked import BLOCK, Blocks, cosine_rows, squared_norms

from ..exact import exact_cosine_dissimilarity, exact_from_integers, integers, landed_cosine_dissimilarity


def _cos_dissim(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def test_cosine_dissimilarity_matches_numpy_in_float64():
    rng = np.random.default_rng(0)
    a = rng.normal(size=1000).astype(np.float32)
    b = (a + 1e-4 * rng.normal(size=1000)).astype(np.float32)
    assert metrics.cosine_dissimilarity(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(
        _cos_dissim(a, b), rel=1e-10)


def test_cosine_dissimilarity_resolves_tiny_differences_that_float32_loses(device):
    rng = np.random.default_rng(1)
    a = rng.normal(size=100_000).astype(np.float32)
    b = a.copy()
    b[:10] += np.float32(1e-3)
    expected = exact_cosine_dissimilarity(a, b)  # integer arithmetic: no cancellation in the reference either
    assert 0 < expected < 1e-9
    assert metrics.cosine_dissimilarity(a, b) == pytest.approx(expected, rel=1e-9)
    on_device = metrics.cosine_dissimilarity(torch.from_numpy(a).to(device), torch.from_numpy(b).to(device))
    assert on_device == pytest.approx(expected, rel=1e-9)
    assert abs(_cos_dissim(a, b) - expected) > 1e-8 * expected  # what 1 − cos in float64 gives (cancellation)


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


def test_kernel_distance_is_scale_invariant_and_zero_on_itself(device):
    rng = np.random.default_rng(3)
    j = rng.normal(size=(8, 30))
    h = j @ j.T
    on_device = torch.from_numpy(h).to(device)
    assert metrics.kernel_distance(on_device, 3.5 * on_device) == pytest.approx(0.0, abs=1e-15)
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


# ------------------------------------------------------------------------------------------ C at matrix speed


def _trajectory(dtype: torch.dtype, p: int = 9_000, seed: int = 0) -> list[torch.Tensor]:
    """Snapshots whose C to the first spans 1e-16 .. 1: shrinking steps, a pure rescaling, a repeat."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(p, generator=generator)
    out = [x.to(dtype)]
    for size in [3e-1, 1e-1, 3e-2, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8]:
        touched = torch.randint(0, p, (max(1, p // 50),), generator=generator)
        step = torch.zeros(p)
        step[touched] = size * torch.randn(touched.numel(), generator=generator)
        out.append((out[-1].float() + step).to(dtype))
    out.append((out[-1].float() * 1.5).to(dtype))  # parallel to the previous one
    out.append(out[-1].clone())  # identical to the previous one
    out.append(torch.randn(p, generator=generator).to(dtype))  # unrelated: C ≈ 1
    return out


def _check_against_references(got: float, a: np.ndarray, b: np.ndarray, truth: float | None = None) -> None:
    truth = exact_cosine_dissimilarity(a, b) if truth is None else truth
    if truth == 0:
        assert got == 0.0
        return
    if truth >= 1e-9:
        assert abs(got - truth) <= 1e-9 * truth, (got, truth)
        landed = landed_cosine_dissimilarity(a, b)  # the exact form of the landed code, float64
        assert abs(got - landed) <= 1e-9 * landed
    else:
        assert abs(got - truth) <= 1e-18


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_from_dot_products_have_relative_error_below_1e_9_and_exact_zeros(dtype):
    vectors = _trajectory(dtype)
    p = vectors[0].numel()
    slices = [slice(0, 5000), slice(5000, 5010), slice(5010, p)]  # a big layer, a 10-element one, the rest
    blocks = Blocks(p, slices)
    stack = torch.stack(vectors)
    norms = np.stack([squared_norms(v, blocks) for v in vectors])
    exact = []  # per channel, per vector: (scaled integers, their squared norm)
    for channel in range(blocks.channels):
        start, stop = blocks.channel_range(channel)
        ints = [integers(v[start:stop].float().numpy()) for v in vectors]
        exact.append([(x, x.dot(x)) for x in ints])
    used_dot = used_exact = 0
    for i, v in enumerate(vectors):
        values = cosine_rows(v, norms[i], stack, norms, blocks)[0]
        with np.errstate(invalid="ignore"):
            used_exact += int((values < blocks.exact_below()[:, None]).sum())
            used_dot += int((values >= blocks.exact_below()[:, None]).sum())
        for j in range(i + 1):
            for channel in range(blocks.channels):
                start, stop = blocks.channel_range(channel)
                x, y = exact[channel][i], exact[channel][j]
                truth = exact_from_integers(x[0], y[0], x[1], y[1])
                a, b = vectors[i][start:stop].float().numpy(), vectors[j][start:stop].float().numpy()
                _check_against_references(values[channel, j], a, b, truth)
    assert used_dot > 100 and used_exact > 100  # both forms were exercised


def test_to_many_matches_exact_references_on_a_trajectory():
    vectors = _trajectory(torch.float32, p=10_000, seed=1)
    stack = torch.stack(vectors)
    for v in vectors[::4]:
        values = metrics.cosine_dissimilarity_to_many(v, stack).numpy()
        for got, w in zip(values, vectors):
            _check_against_references(float(got), v.numpy(), w.numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ghost_pairs_use_the_exact_form(dtype):
    vectors = _trajectory(dtype, p=20_000, seed=2)
    for v, w in zip(vectors, vectors[1:]):
        _check_against_references(metrics.cosine_dissimilarity(v, w), v.float().numpy(), w.float().numpy())
    assert metrics.cosine_dissimilarity(vectors[4], vectors[4].clone()) == 0.0


def test_the_switch_threshold_follows_the_derived_bound():
    blocks = Blocks(10_000_000, [slice(0, 100), slice(100, 10_000_000)])
    error = blocks.dot_error()
    n = BLOCK + np.ceil(np.log2(blocks.blocks)) + 1 + 3  # block width + tree heights (module docstring)
    assert error[0] == pytest.approx(2 * n * 2.0**-53 + 6 * 2.0**-53, rel=1e-3)
    assert error[1] < error[2]  # a 100-element layer sums fewer terms
    assert np.all(blocks.exact_below() == pytest.approx(error * (1e9 + 1)))
    assert 1e-5 < blocks.exact_below()[0] < 1e-4


def test_norms_depend_on_the_values_only_so_identical_vectors_give_exact_zeros():
    rng = np.random.default_rng(5)
    p = 70_001
    blocks = Blocks(p, [slice(0, 30_000), slice(30_000, p)])
    values = torch.from_numpy(rng.standard_normal(p).astype(np.float32)).to(torch.bfloat16)
    reference = squared_norms(values.float(), blocks)
    padded = torch.zeros(p + 7)
    for offset in range(1, 8):  # misaligned views of the same numbers
        padded[offset : offset + p] = values.float()
        np.testing.assert_array_equal(squared_norms(padded[offset : offset + p], blocks), reference)
    np.testing.assert_array_equal(squared_norms(values, blocks), reference)  # held in bfloat16
    stack = torch.stack([values.float(), torch.randn(p)])
    rows, fused = cosine_rows(values.float(), None, stack, np.stack([reference, squared_norms(stack[1], blocks)]),
                              blocks)
    np.testing.assert_array_equal(fused, reference)  # the norms computed with the dot products: the same numbers
    assert np.all(rows[:, 0] == 0.0)


def test_disagreement_to_many_on_each_device_matches_numpy(device):
    """D (eq. 6) between one prediction vector and a stack, computed where the predictions live."""
    rng = np.random.default_rng(5)
    a, many = rng.integers(0, 10, 700), rng.integers(0, 10, (4, 700))
    got = metrics.disagreement_to_many(torch.from_numpy(a).to(device), torch.from_numpy(many).to(device))
    np.testing.assert_array_equal(torch.as_tensor(got).cpu().numpy(), (many != a).mean(axis=1))
