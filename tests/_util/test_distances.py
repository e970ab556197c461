"""The cancellation-free rows of ``dynprobe._util.distances`` against compensated references, at the scale and the
small C of late training (multi-million-dimensional float32 vectors, C ~ 1e-8 .. 1e-4)."""
from __future__ import annotations

import decimal
import math

import numpy as np
import pytest
import torch

from dynprobe._util import distances
from dynprobe._util.distances import cosine_dissimilarity_rows, pairwise_cosine_dissimilarity, squared_norm_sums

P = 2_000_003  # not a multiple of the block width: the last block is partial
LAYERS = [(0, 1_500_032), (1_500_032, 1_500_041), (1_500_041, P)]  # a big layer, a 9-element one, the rest
TARGETS = [1e-8, 1e-7, 1e-6, 1e-5, 1e-4]


def _exact_sum(products: np.ndarray) -> decimal.Decimal:
    """The sum of float64 numbers to ~1e-32 relative: ``math.fsum`` (correctly rounded) and the rounded remainder."""
    values = products.tolist()
    high = math.fsum(values)
    low = math.fsum(values + [-high])
    return decimal.Decimal(high) + decimal.Decimal(low)


def reference(x: np.ndarray, y: np.ndarray) -> float:
    """``1 − ⟨x, y⟩ / (‖x‖‖y‖)`` for float32 vectors: the products are exact in float64, their sums compensated, the
    rest at 50 digits (so its relative error is ~1e-32 / C)."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    with decimal.localcontext() as context:
        context.prec = 50
        dot, xx, yy = _exact_sum(x64 * y64), _exact_sum(x64 * x64), _exact_sum(y64 * y64)
        return float(1 - dot / (xx * yy).sqrt())


@pytest.fixture(scope="module")
def late_training():
    """``x`` and nearby ``y_k = (1 − λ_k)x + step_k`` (a weight-decay-like radial part and a random step, sized so
    that C(x, y_k) ≈ TARGETS[k]), the channel ranges and the references per channel."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(P).astype(np.float32)
    ys = np.stack([((1 - 3 * math.sqrt(target)) * x.astype(np.float64)
                    + rng.standard_normal(P) * math.sqrt(2 * target)).astype(np.float32) for target in TARGETS])
    ranges = [(0, P)] + LAYERS
    truth = np.array([[reference(x[a:b], y[a:b]) for y in ys] for a, b in ranges])
    return x, ys, ranges, truth


def _norms(v: torch.Tensor, ranges) -> torch.Tensor:
    return torch.stack([squared_norm_sums(v, a, b) for a, b in ranges])


def test_small_c_on_multi_million_vectors_has_relative_error_below_1e_9(late_training):
    x, ys, ranges, truth = late_training
    x_t, ys_t = torch.from_numpy(x), torch.from_numpy(ys)
    values = cosine_dissimilarity_rows(x_t, _norms(x_t, ranges), ys_t, torch.stack([_norms(y, ranges) for y in ys_t]),
                                       LAYERS, True).numpy()
    np.testing.assert_allclose(truth[0], TARGETS, rtol=0.5)  # the setting: C from 1e-8 to 1e-4
    relative = np.abs(values - truth) / truth
    assert relative.max() <= 1e-9, relative
    assert relative.max() <= 1e-12, relative  # the bound of the module docstring, with room
    # what 1 − cos in float64 gives here: the dot-product form would not do
    x64, y64 = x.astype(np.float64), ys[0].astype(np.float64)
    naive = 1 - x64 @ y64 / (np.linalg.norm(x64) * np.linalg.norm(y64))
    assert abs(naive - truth[0, 0]) > 1e-9 * truth[0, 0]


def test_planted_bug_without_the_low_part_of_the_scale_breaks_the_bound(late_training, monkeypatch):
    """The exactness of ``x − s·y`` needs both halves of ``s = s₁ + s₂``: with ``s₁ = fl32(s)`` alone the error is
    a radial step of relative size up to 2⁻²⁴ — far above 1e-9 at small C. (The precision test above catches it.)"""
    x, ys, ranges, truth = late_training

    def high_only(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        high = scale.to(torch.float32).to(torch.float64)
        return high[:, None], torch.zeros_like(high)[:, None]

    monkeypatch.setattr(distances, "_split", high_only)
    x_t, ys_t = torch.from_numpy(x), torch.from_numpy(ys)
    values = cosine_dissimilarity_rows(x_t, _norms(x_t, ranges[:1]), ys_t,
                                       torch.stack([_norms(y, ranges[:1]) for y in ys_t])).numpy()
    assert (np.abs(values[0] - truth[0]) / truth[0]).max() > 1e-9


def test_rows_are_the_same_bits_whatever_the_chunking_threads_and_memory_layout(late_training, monkeypatch):
    x, ys, ranges, _ = late_training
    x_t = torch.from_numpy(x)
    buffer = torch.zeros((len(ys) + 1, P + 3))  # the stack as a misaligned view of a bigger buffer
    buffer[1:, 3:] = torch.from_numpy(ys)
    stack = buffer[1:, 3:]
    norms = torch.stack([_norms(y, ranges) for y in stack])

    def rows() -> np.ndarray:
        return cosine_dissimilarity_rows(x_t, _norms(x_t, ranges), stack, norms, LAYERS, True).numpy()

    reference_bits = rows()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        np.testing.assert_array_equal(rows(), reference_bits)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(distances, "_CPU_CHUNK_COLUMNS", 2**12)
    np.testing.assert_array_equal(rows(), reference_bits)
    contiguous = cosine_dissimilarity_rows(x_t, _norms(x_t, ranges), torch.from_numpy(ys), norms, LAYERS, True)
    np.testing.assert_array_equal(contiguous.numpy(), reference_bits)
    picked_scales = distances.scales(_norms(x_t, ranges), norms[[3, 1]])
    picked = distances.channel_block_sums(x_t, stack, picked_scales, LAYERS, True, 0, P, rows=torch.tensor([3, 1]))
    np.testing.assert_array_equal(distances.cosine_from_sums(picked, _norms(x_t, ranges), norms[[3, 1]]).numpy(),
                                  reference_bits[:, [3, 1]])


def test_rows_on_the_device_match_the_cpu_and_give_exact_zeros(device):
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.standard_normal(300_001).astype(np.float32))
    ys = torch.stack([x, x * 1.5, x + 1e-4 * torch.from_numpy(rng.standard_normal(300_001).astype(np.float32))])
    ranges = [(0, x.numel())]
    cpu = cosine_dissimilarity_rows(x, _norms(x, ranges), ys, torch.stack([_norms(y, ranges) for y in ys]))
    x_d, ys_d = x.to(device), ys.to(device)
    on_device = cosine_dissimilarity_rows(x_d, _norms(x_d, ranges), ys_d,
                                          torch.stack([_norms(y, ranges) for y in ys_d]))
    assert on_device.device.type == device.type
    assert on_device[0, 0].item() == 0.0 and cpu[0, 0].item() == 0.0
    np.testing.assert_allclose(on_device.cpu().numpy()[:, 2], cpu.numpy()[:, 2], rtol=1e-12)
    np.testing.assert_allclose(on_device.cpu().numpy()[:, 1], cpu.numpy()[:, 1], rtol=1e-6, atol=1e-18)  # C ~ 1e-15


def test_pairwise_matrix_is_symmetric_with_a_zero_diagonal_and_nan_for_zero_rows():
    rng = np.random.default_rng(8)
    rows = rng.standard_normal((4, 1000))
    rows[2] = 0.0
    matrix = pairwise_cosine_dissimilarity(rows)
    np.testing.assert_array_equal(matrix, matrix.T)
    assert np.all(np.diag(matrix)[[0, 1, 3]] == 0.0)
    assert np.all(np.isnan(matrix[2])) and np.all(np.isnan(matrix[:, 2]))
    unit = rows[[0, 1, 3]] / np.linalg.norm(rows[[0, 1, 3]], axis=1, keepdims=True)
    np.testing.assert_allclose(matrix[np.ix_([0, 1, 3], [0, 1, 3])], 1 - unit @ unit.T, rtol=1e-12, atol=1e-15)
