"""Tests of dynprobe.ghosts.perturbation: the ghost's θ' = θ + ε and the realized-perturbation report.

Every quantity is checked against a float64 recomputation written here from the tensors before and after.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dynprobe.ghosts.perturbation import KINDS, Perturbation, PerturbationReport, add_ulps, perturb_

NORMS = {"l2": 1e-3, "per_coord": 1e-4, "relative": 1e-3, "ulp": 2, "single_coord": 1e-2}


def weights(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """A few tensors of different shapes, with exact zeros, negatives and a -0.0, like a small network's."""
    generator = torch.Generator().manual_seed(seed)
    conv = torch.randn(8, 3, 5, generator=generator, dtype=dtype) * 0.05
    bias = torch.zeros(8, dtype=dtype)
    bias[3] = -0.0
    gamma = torch.ones(8, dtype=dtype)
    head = torch.randn(10, 64, generator=generator, dtype=dtype) * 0.1
    return [conv, bias, gamma, head]


def clones(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({torch.float64: torch.int64, torch.float32: torch.int32}[tensor.dtype])


def realized_delta(before: list[torch.Tensor], after: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(a.double() - b.double()).reshape(-1) for a, b in zip(after, before)])


def resnet20_at_init(seed: int = 0) -> list[torch.Tensor]:
    """The 269,722 parameters of a CIFAR ResNet-20 at Kaiming-normal (fan-in) init, BN γ = 1 and β = 0."""
    generator = torch.Generator().manual_seed(seed)
    convs, channels, c_in = [(16, 3)], [16], 16
    for width in (16, 32, 64):
        for block in range(6):
            convs.append((width, c_in if block == 0 else width))
            channels.append(width)
        c_in = width
    tensors = [torch.randn(o, i, 3, 3, generator=generator) * math.sqrt(2 / (i * 9)) for o, i in convs]
    for c in channels:
        tensors += [torch.ones(c), torch.zeros(c)]
    tensors += [torch.randn(10, 64, generator=generator) * math.sqrt(2 / 64), torch.zeros(10)]
    assert sum(t.numel() for t in tensors) == 269_722
    return tensors


@pytest.mark.parametrize("kind", KINDS)
def test_report_matches_float64_recomputation_of_the_realized_change(kind):
    tensors = weights()
    before = clones(tensors)
    report = perturb_(tensors, Perturbation(NORMS[kind], kind, seed=3))
    delta = realized_delta(before, tensors)
    zeros = torch.cat([b.reshape(-1) for b in before]) == 0
    assert report.kind == kind
    assert report.total == delta.numel()
    assert report.changed == int((delta != 0).sum())
    assert report.realized_norm == pytest.approx(float(delta.norm()), rel=1e-12)
    assert report.share_on_zeros == pytest.approx(float(delta[zeros].square().sum() / delta.square().sum()), rel=1e-9)
    assert report.survived


@pytest.mark.parametrize("kind", ["l2", "per_coord"])
def test_gaussian_kinds_add_the_documented_seeded_float64_draw(kind):
    # The documented recipe, rebuilt here: z ~ N(0, 1) in float64 from a CPU generator seeded with `seed`, drawn
    # tensor by tensor in order; ε = norm·z/‖z‖ (l2) or norm·z (per_coord); θ' = θ + ε rounded to float32.
    tensors = weights()
    before = clones(tensors)
    norm = NORMS[kind]
    report = perturb_(tensors, Perturbation(norm, kind, seed=11))
    generator = torch.Generator().manual_seed(11)
    z = [torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in before]
    z_norm = math.sqrt(sum(float(zi.square().sum()) for zi in z))
    eps = [zi * (norm / z_norm if kind == "l2" else norm) for zi in z]
    for after, b, e in zip(tensors, before, eps):
        assert torch.equal(bits(after), bits((b.double() + e).float()))
    eps_flat = torch.cat([e.reshape(-1) for e in eps])
    delta = realized_delta(before, tensors)
    assert report.nominal_norm == pytest.approx(float(eps_flat.norm()), rel=1e-12)
    cosine = float(delta @ eps_flat / (delta.norm() * eps_flat.norm()))
    assert report.direction_cosine == pytest.approx(cosine, rel=1e-9)


def test_l2_nominal_norm_equals_the_requested_norm():
    for norm in (1e-9, 1e-7, 0.5):
        report = perturb_(weights(), Perturbation(norm, "l2", seed=1))
        assert report.nominal_norm == pytest.approx(norm, rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_gives_the_same_perturbation_and_another_seed_a_different_one(kind):
    first, second, other = weights(), weights(), weights()
    perturb_(first, Perturbation(NORMS[kind], kind, seed=5))
    perturb_(second, Perturbation(NORMS[kind], kind, seed=5))
    perturb_(other, Perturbation(NORMS[kind], kind, seed=6))
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(first, second))
    assert not all(torch.equal(bits(a), bits(b)) for a, b in zip(first, other))


@pytest.mark.parametrize("kind", KINDS)
def test_global_rng_stream_is_untouched(kind):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    perturb_(weights(), Perturbation(NORMS[kind], kind, seed=2))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_norm_leaves_every_tensor_bitwise_unchanged(kind):
    tensors = weights()
    tensors.append(torch.tensor([-0.0, 0.0, float("nan"), 1e-45], dtype=torch.float32))
    before = clones(tensors)
    report = perturb_(tensors, Perturbation(0, kind, seed=9))
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(tensors, before))
    assert (report.nominal_norm, report.realized_norm, report.changed) == (0.0, 0.0, 0)
    assert not report.survived and report.warning() is None and math.isnan(report.realized_fraction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("steps", [1, 3])
def test_ulp_moves_every_coordinate_by_exactly_k_ulps_with_a_random_sign(dtype, steps):
    tiny = torch.finfo(dtype).tiny
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.05, -0.05, tiny, -tiny / 4, 3e5, -2.0**-20], dtype=dtype)
    tensors = [special, torch.randn(50, 7, dtype=dtype, generator=torch.Generator().manual_seed(0))]
    before = clones(tensors)
    report = perturb_(tensors, Perturbation(steps, "ulp", seed=4))
    saw_up = saw_down = False
    for after, b in zip(tensors, before):
        up, down = b.clone(), b.clone()
        for _ in range(steps):
            up = torch.nextafter(up, torch.full_like(b, math.inf))
            down = torch.nextafter(down, torch.full_like(b, -math.inf))
        is_up, is_down = bits(after) == bits(up), bits(after) == bits(down)
        assert bool((is_up | is_down).all())
        saw_up, saw_down = saw_up or bool(is_up.any()), saw_down or bool(is_down.any())
    assert saw_up and saw_down
    assert report.changed == report.total == 10 + 350
    assert report.realized_norm == report.nominal_norm
    assert report.direction_cosine == pytest.approx(1.0, rel=1e-12)


INTEGER_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
              torch.bfloat16: torch.int16}


@pytest.mark.parametrize("dtype", list(INTEGER_OF))
@pytest.mark.parametrize("steps", [1, 2, 5, 70])
def test_closed_form_ulps_equal_repeated_nextafter_bitwise(dtype, steps):
    """Zeros of both signs, subnormals, the largest finite values (which saturate at ±inf), infinities and NaN."""
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, info.tiny, -info.tiny, info.max, -info.max, math.inf, -math.inf, math.nan,
                            1.0, -1.0], dtype=dtype)
    subnormal = torch.tensor([1, -1, 2, -3], dtype=torch.float64) * float(info.tiny) * float(info.eps)
    values = torch.cat([special, subnormal.to(dtype), torch.randn(200, generator=torch.Generator().manual_seed(1))
                        .to(dtype)])
    generator = torch.Generator().manual_seed(steps)
    for _ in range(2):
        upward = torch.randint(0, 2, values.shape, generator=generator, dtype=torch.bool)
        toward = torch.where(upward, torch.tensor(math.inf, dtype=dtype), torch.tensor(-math.inf, dtype=dtype))
        looped = values.clone()
        for _ in range(steps):
            looped = torch.nextafter(looped, toward)
        closed = add_ulps(values, steps, upward)
        nan = torch.isnan(looped)
        assert torch.equal(nan, torch.isnan(closed))
        assert torch.equal(looped.view(INTEGER_OF[dtype])[~nan], closed.view(INTEGER_OF[dtype])[~nan])


def test_a_huge_number_of_ulps_is_computed_in_closed_form():
    """Perturbation(norm=1e9, kind='ulp') used to call nextafter a billion times."""
    tensors = [torch.randn(1000, generator=torch.Generator().manual_seed(0))]
    before = tensors[0].clone()
    report = perturb_(tensors, Perturbation(1e9, "ulp", seed=2))
    moved = (tensors[0].view(torch.int32).long() - before.view(torch.int32).long()).abs()
    same_sign = torch.sign(tensors[0]) == torch.sign(before)
    assert bool((moved[same_sign] == 10**9).all()) and same_sign.sum() > 900
    assert report.changed == 1000
    with pytest.raises(ValueError, match=r"at most 2\*\*52"):
        Perturbation(2.0**53, "ulp")


def test_the_report_counts_what_survives_rounding_to_lower_precision_dtypes():
    tensors = weights()
    before = clones(tensors)
    report = perturb_(tensors, Perturbation(1e-3, "relative", seed=5))
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        expected = sum(int((a.to(dtype) != b.to(dtype)).sum()) for a, b in zip(tensors, before))
        assert report.changed_at[name] == expected
    assert 0 < report.changed_at["bfloat16"] < report.changed_at["float16"] < report.changed
    one_bf16_ulp = perturb_(weights(), Perturbation(2**16, "ulp"))
    assert one_bf16_ulp.changed_at["bfloat16"] == one_bf16_ulp.total


def test_ulp_rejects_a_fractional_number_of_ulps():
    with pytest.raises(ValueError, match="whole number"):
        Perturbation(1e-7, "ulp")


def test_single_coord_changes_at_most_one_coordinate_by_norm():
    for seed in range(10):
        tensors = weights(seed)
        before = clones(tensors)
        report = perturb_(tensors, Perturbation(1e-2, "single_coord", seed=seed))
        delta = realized_delta(before, tensors)
        assert int((delta != 0).sum()) == report.changed == 1
        assert float(delta.abs().max()) == pytest.approx(1e-2, rel=1e-5)  # one float32 rounding of θ + 1e-2
        assert report.nominal_norm == 1e-2
        # the bits of every other coordinate are untouched (the -0.0 of the bias keeps its sign)
        assert int(sum(int((bits(a) != bits(b)).sum()) for a, b in zip(tensors, before))) == 1


def test_single_coord_picks_coordinates_across_all_tensors():
    hit = set()
    for seed in range(40):
        tensors = [torch.full((3,), 0.5), torch.full((2, 2), 0.5)]
        perturb_(tensors, Perturbation(0.25, "single_coord", seed=seed))
        hit.update(i for i, v in enumerate(torch.cat([t.reshape(-1) for t in tensors]).tolist()) if v != 0.5)
    assert hit == set(range(7))


def test_single_coord_on_a_transposed_tensor_moves_the_same_logical_coordinate():
    base = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    transposed = base.t().contiguous().t()  # same values, column-major strides
    contiguous = base.clone()
    perturb_([transposed], Perturbation(1.0, "single_coord", seed=8))
    perturb_([contiguous], Perturbation(1.0, "single_coord", seed=8))
    assert not transposed.is_contiguous()
    assert torch.equal(transposed, contiguous) and not torch.equal(contiguous, base)


def test_relative_perturbation_scales_with_the_parameter_norm():
    small = weights()
    large = [t * 16 for t in weights()]  # powers of two: the same rounding pattern, exactly scaled
    theta_norm = math.sqrt(sum(float(t.double().square().sum()) for t in small))
    small_report = perturb_(small, Perturbation(1e-3, "relative", seed=2))
    large_report = perturb_(large, Perturbation(1e-3, "relative", seed=2))
    assert small_report.nominal_norm == pytest.approx(1e-3 * theta_norm, rel=1e-12)
    assert large_report.nominal_norm == pytest.approx(16 * small_report.nominal_norm, rel=1e-12)
    assert large_report.realized_norm == pytest.approx(16 * small_report.realized_norm, rel=1e-12)


def test_per_coord_norm_is_the_per_coordinate_standard_deviation():
    tensors = [torch.zeros(200_000, dtype=torch.float64)]
    report = perturb_(tensors, Perturbation(1e-3, "per_coord", seed=0))
    assert float(tensors[0].std()) == pytest.approx(1e-3, rel=0.01)
    assert report.nominal_norm == pytest.approx(1e-3 * math.sqrt(200_000), rel=0.01)


def test_1e_minus_7_l2_on_float32_resnet20_at_init_realizes_about_40_percent():
    # ghost-feasibility §D measured, on a float32 ResNet-20 at init (median |θ| 0.045): ‖δ‖/‖ε‖ = 0.385, 4.7% of
    # coordinates changed, cos(δ, ε) = 0.29, 1.8% of ‖δ‖² on the BN shifts (exact zeros).
    tensors = resnet20_at_init()
    median = float(torch.cat([t.reshape(-1) for t in tensors]).abs().median())
    report = perturb_(tensors, Perturbation(1e-7, "l2", seed=0))
    assert 0.04 < median < 0.05
    assert 0.33 < report.realized_fraction < 0.44
    assert 0.040 < report.changed_fraction < 0.055
    assert 0.2 < report.direction_cosine < 0.4
    assert 0.0 < report.share_on_zeros < 0.05
    assert report.warning() is None  # analyses read the ghost by its realized norm: 38 % is no reason to warn
    sparse = perturb_(resnet20_at_init(), Perturbation(1e-8, "l2", seed=0))  # 13 % kept, on 0.7 % of coordinates
    message = sparse.warning()
    assert message is not None and "effectively unperturbed" in message and "kind='ulp'" in message


def test_float64_weights_keep_a_1e_minus_7_perturbation_whole():
    tensors = weights(dtype=torch.float64)
    report = perturb_(tensors, Perturbation(1e-7, "l2", seed=0))
    assert report.changed == report.total
    assert report.realized_fraction == pytest.approx(1.0, abs=1e-6)
    assert report.direction_cosine == pytest.approx(1.0, abs=1e-9)
    assert report.warning() is None


def test_a_perturbation_absorbed_by_rounding_is_reported_as_lost():
    tensors = [torch.ones(1000), torch.full((10, 10), 0.5)]
    before = clones(tensors)
    report = perturb_(tensors, Perturbation(1e-7, "l2", seed=0))
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))
    assert not report.survived and report.changed == 0 and math.isnan(report.direction_cosine)
    assert "did not survive" in report.warning()


def test_relative_perturbation_of_all_zero_weights_is_reported_as_lost():
    report = perturb_([torch.zeros(5)], Perturbation(1e-3, "relative"))
    assert report.nominal_norm == 0.0 and not report.survived
    assert "did not survive" in report.warning()


def test_parameters_stay_leaves_without_recorded_grad_history():
    layer = nn.Linear(5, 3)
    perturb_(list(layer.parameters()), Perturbation(1e-2, "l2"))
    assert all(p.is_leaf and p.grad_fn is None and p.grad is None for p in layer.parameters())


def test_report_is_frozen_and_serializable():
    report = perturb_(weights(), Perturbation(1e-3))
    assert isinstance(report, PerturbationReport)
    with pytest.raises(AttributeError):
        report.changed = 0  # type: ignore[misc]
    as_dict = report.to_dict()
    assert as_dict["perturbation"] == {"norm": 1e-3, "kind": "l2", "seed": 0}
    assert as_dict["changed"] == report.changed


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"norm": -1e-7}, ValueError, "norm must be finite and >= 0"),
        ({"norm": float("nan")}, ValueError, "norm must be finite"),
        ({"norm": float("inf")}, ValueError, "norm must be finite"),
        ({"norm": "1e-7"}, TypeError, "norm must be a real number"),
        ({"norm": True}, TypeError, "norm must be a real number"),
        ({"kind": "gaussian"}, ValueError, "kind must be one of"),
        ({"seed": -1}, ValueError, "seed must be an integer"),
        ({"seed": 1.5}, ValueError, "seed must be an integer"),
        ({"seed": 2**64}, ValueError, "seed must be an integer"),
    ],
)
def test_bad_perturbation_settings_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        Perturbation(**kwargs)


def test_bad_tensors_fail_with_clear_errors():
    with pytest.raises(TypeError, match="floating point"):
        perturb_([torch.arange(3)], Perturbation())
    shared = torch.zeros(3)
    with pytest.raises(ValueError, match="appears twice"):
        perturb_([shared, shared], Perturbation())
    with pytest.raises(ValueError, match="no coordinates"):
        perturb_([], Perturbation())
    with pytest.raises(TypeError, match="dynprobe.Perturbation"):
        perturb_([torch.zeros(3)], 1e-7)  # type: ignore[arg-type]
