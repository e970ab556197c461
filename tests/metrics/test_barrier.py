"""Tests of dynprobe.metrics.barrier.loss_barrier (eq. (5) of the two-phase paper).

The reference is a brute-force α loop written here: for every α, a fresh copy of the model is loaded with
``α θ_a + (1 − α) θ_b`` through ``load_state_dict`` (integer buffers from θ_a), optionally has its BatchNorm
statistics reset and re-estimated REPAIR-style, and is evaluated on all the data in one float64 pass.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynprobe.metrics.barrier import BarrierResult, loss_barrier
from dynprobe.recipes.mnist1d import Conv1dNet


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """A copy with fresh weights and non-trivial BatchNorm running statistics (and step counts)."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("num_batches_tracked"):
                tensor.fill_(seed + 1)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
    return model


def mlp_endpoints() -> tuple[nn.Module, dict, dict]:
    torch.manual_seed(0)
    model = MLP()
    return model, randomized(model, 1).state_dict(), randomized(model, 2).state_dict()


def classification_data(n: int, shape: tuple[int, ...], classes: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=generator), torch.randint(0, classes, (n,), generator=generator)


def brute_force_curve(model, state_a, state_b, x, y, alphas, *, metric="loss", reset_batches=None):
    values = []
    for alpha in np.asarray(alphas).tolist():
        replica = copy.deepcopy(model)
        state = {
            name: alpha * a + (1 - alpha) * state_b[name] if a.is_floating_point() else a.clone()
            for name, a in state_a.items()
        }
        replica.load_state_dict(state)
        if reset_batches is not None:
            for module in replica.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.reset_running_stats()
                    module.momentum = None
            replica.train()
            with torch.no_grad():
                for batch in reset_batches:
                    replica(batch)
        replica.eval()
        with torch.no_grad():
            logits = replica(x).double()
        if metric == "loss":
            values.append(float(F.cross_entropy(logits, y)))
        else:
            values.append(float((logits.argmax(1) != y).double().mean()))
    return np.array(values)


def brute_force_barrier(curve_values, endpoint_a, endpoint_b):
    return float(np.max(curve_values) - 0.5 * (endpoint_a + endpoint_b))


def snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
        [m.training for m in model.modules()],
        [getattr(m, "momentum", None) for m in model.modules()],
    )


def assert_bitwise_same(before, model: nn.Module):
    state, flags, momenta = before
    now = model.state_dict()
    assert state.keys() == now.keys()
    for name in state:
        assert state[name].dtype == now[name].dtype and torch.equal(state[name], now[name]), name
    assert flags == [m.training for m in model.modules()]
    assert momenta == [getattr(m, "momentum", None) for m in model.modules()]
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("metric", ["loss", "error"])
def test_matches_brute_force_alpha_loop_on_mlp_with_batchnorm(metric):
    model, state_a, state_b = mlp_endpoints()
    x, y = classification_data(300, (8,), 3)
    result = loss_barrier(model, state_a, state_b, (x, y), metric=metric, alphas=11, batch_size=128)
    expected = brute_force_curve(model, state_a, state_b, x, y, np.linspace(0, 1, 11), metric=metric)
    np.testing.assert_allclose(result.alphas, np.linspace(0, 1, 11), rtol=0, atol=0)
    np.testing.assert_allclose(result.curve, expected, rtol=1e-5, atol=1e-7)
    assert result.endpoint_a == pytest.approx(expected[-1], rel=1e-5)
    assert result.endpoint_b == pytest.approx(expected[0], rel=1e-5)
    assert result.value == pytest.approx(brute_force_barrier(expected, expected[-1], expected[0]), abs=1e-5)
    assert result.argmax_alpha == result.alphas[int(np.argmax(result.curve))]
    assert float(result) == result.value and result.metric == metric and result.num_examples == 300


def test_default_grid_is_thirty_points_on_the_unit_interval_and_matches_brute_force():
    model, state_a, state_b = mlp_endpoints()
    x, y = classification_data(200, (8,), 3)
    result = loss_barrier(model, state_a, state_b, (x, y))
    assert result.alphas.shape == (30,) and result.alphas[0] == 0.0 and result.alphas[-1] == 1.0
    expected = brute_force_curve(model, state_a, state_b, x, y, result.alphas)
    np.testing.assert_allclose(result.curve, expected, rtol=1e-5)
    assert "30 evenly spaced points on [0.0, 1.0]" in result.conventions["alphas"]


def test_identical_endpoints_give_exactly_zero_and_a_flat_curve():
    model, state_a, _ = mlp_endpoints()
    x, y = classification_data(200, (8,), 3)
    same = loss_barrier(model, state_a, state_a, (x, y))
    equal_copy = loss_barrier(model, state_a, {k: v.clone() for k, v in state_a.items()}, (x, y))
    for result in (same, equal_copy):
        assert result.value == 0.0
        assert np.all(result.curve == result.curve[0])
        assert result.endpoint_a == result.endpoint_b == result.curve[0]


def test_identical_endpoints_give_exactly_zero_with_batchnorm_reset():
    model = Conv1dNet(width=8)
    state = randomized(model, 3).state_dict()
    x, y = classification_data(64, (1, 40), 10)
    result = loss_barrier(model, state, state, (x, y), alphas=7, reset_bn=x, batch_size=32)
    assert result.value == 0.0 and np.all(result.curve == result.curve[0])


def test_users_model_parameters_buffers_flags_and_rng_are_untouched():
    model, state_a, state_b = mlp_endpoints()
    model.train()
    model.body[1].eval()  # a per-module choice (frozen BN in a training model) that must survive
    model.body[1].momentum = 0.3
    x, y = classification_data(100, (8,), 3)
    before = snapshot(model)
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    loss_barrier(model, state_a, state_b, (x, y), alphas=5)
    loss_barrier(model, state_a, state_b, (x, y), alphas=5, reset_bn=x[:50], metric="error")
    assert torch.equal(torch.get_rng_state(), rng)
    assert_bitwise_same(before, model)


def test_users_model_is_restored_when_the_evaluation_fails_midway():
    model, state_a, state_b = mlp_endpoints()
    model.train()
    before = snapshot(model)
    x, y = classification_data(20, (8,), 3)
    with pytest.raises(ValueError, match="class indices"):
        loss_barrier(model, state_a, state_b, (x, y + 3), reset_bn=x)  # fails after the first BN re-estimation
    assert_bitwise_same(before, model)


def test_endpoint_tensors_given_by_the_caller_are_untouched():
    model = Conv1dNet(width=8)
    state_a, state_b = randomized(model, 1).state_dict(), randomized(model, 2).state_dict()
    copies = [{k: v.clone() for k, v in s.items()} for s in (state_a, state_b)]
    x, y = classification_data(64, (1, 40), 10)
    loss_barrier(model, state_a, state_b, (x, y), alphas=4, reset_bn=x)
    for given, kept in zip((state_a, state_b), copies):
        assert all(torch.equal(given[k], kept[k]) for k in kept)


def test_batchnorm_reset_matches_brute_force_copy_reset_recompute():
    model = Conv1dNet(width=8)
    state_a, state_b = randomized(model, 1).state_dict(), randomized(model, 2).state_dict()
    x, y = classification_data(96, (1, 40), 10)
    train_x, _ = classification_data(96, (1, 40), 10, seed=5)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(train_x, torch.zeros(96, dtype=torch.long)), batch_size=32
    )
    result = loss_barrier(model, state_a, state_b, (x, y), alphas=6, reset_bn=loader, reset_bn_batches=2)
    expected = brute_force_curve(
        model, state_a, state_b, x, y, np.linspace(0, 1, 6), reset_batches=[train_x[:32], train_x[32:64]]
    )
    np.testing.assert_allclose(result.curve, expected, rtol=1e-5)
    assert result.value == pytest.approx(brute_force_barrier(expected, expected[-1], expected[0]), abs=1e-5)
    assert "re-estimated at every alpha on 64 examples in 2 batches" in result.conventions["batchnorm"]
    without_reset = brute_force_curve(model, state_a, state_b, x, y, np.linspace(0, 1, 6))
    assert not np.allclose(expected, without_reset, rtol=1e-3)  # the reset really changes the answer here


def test_integer_buffers_are_copied_from_params_a_not_interpolated():
    class Offset(nn.Module):
        """Logits shifted by an integer buffer, so interpolating it would change the output."""

        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)
            self.register_buffer("shift", torch.zeros(3, dtype=torch.long))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) + self.shift

    model = Offset()
    state_a, state_b = randomized(model, 1).state_dict(), randomized(model, 2).state_dict()
    state_a["shift"] = torch.tensor([0, 0, 4])
    state_b["shift"] = torch.tensor([8, 0, 0])
    x, y = classification_data(50, (4,), 3)
    result = loss_barrier(model, state_a, state_b, (x, y), alphas=5)
    expected = brute_force_curve(model, state_a, state_b, x, y, np.linspace(0, 1, 5))  # shift from a throughout
    np.testing.assert_allclose(result.curve, expected, rtol=1e-5)
    with_b_shift = brute_force_curve(model, {**state_a, "shift": state_b["shift"]}, state_b, x, y, [0.0])
    assert not math.isclose(result.endpoint_b, with_b_shift[0], rel_tol=1e-3)


def test_convex_toy_barrier_equals_the_hand_computed_value():
    # logits (w·x, 0), one example x = 1 of class 0: L(w) = softplus(−w). From w_b = −2 to w_a = 2 the path
    # w(α) = 4α − 2 is monotone, the maximum is L(w_b) and B = (softplus(2) − softplus(−2)) / 2 = 1 exactly.
    model = nn.Linear(1, 2, bias=False)
    state = lambda w: {"weight": torch.tensor([[w], [0.0]])}  # noqa: E731
    x, y = torch.ones(1, 1), torch.zeros(1, dtype=torch.long)
    result = loss_barrier(model, state(2.0), state(-2.0), (x, y), alphas=9)
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    np.testing.assert_allclose(result.curve, [softplus(2 - 4 * a) for a in np.linspace(0, 1, 9)], rtol=1e-6)
    assert result.value == pytest.approx(1.0, abs=1e-6)
    assert result.argmax_alpha == 0.0
    # restricted to the middle of the path, the barrier is measured against the true endpoints (evaluated anyway)
    middle = loss_barrier(model, state(2.0), state(-2.0), (x, y), alphas=3, alpha_range=(0.25, 0.75))
    np.testing.assert_allclose(middle.alphas, [0.25, 0.5, 0.75])
    assert middle.endpoint_a == pytest.approx(softplus(-2), rel=1e-6)
    assert middle.endpoint_b == pytest.approx(softplus(2), rel=1e-6)
    assert middle.value == pytest.approx(softplus(1) - 0.5 * (softplus(2) + softplus(-2)), abs=1e-6)
    # a range that stays near the better endpoint can give a negative barrier
    late = loss_barrier(model, state(2.0), state(-2.0), (x, y), alphas=2, alpha_range=(0.6, 0.9))
    assert late.value == pytest.approx(softplus(-0.4) - 0.5 * (softplus(2) + softplus(-2)), abs=1e-6)
    assert late.value < 0


class Squared(nn.Module):
    """One parameter w; logits (w²·x − ½, 0): w and −w are the same function, the midpoint w = 0 is not."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.w**2 * x[:, 0] - 0.5, torch.zeros_like(x[:, 0])], dim=1)


def test_nonconvex_toy_barrier_equals_the_hand_computed_value():
    model = Squared()
    x, y = torch.ones(1, 1), torch.zeros(1, dtype=torch.long)
    a, b = {"w": torch.tensor(2.0)}, {"w": torch.tensor(-2.0)}
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    loss = loss_barrier(model, a, b, (x, y), alphas=21)
    hand = [softplus(0.5 - 4 * (2 * t - 1) ** 2) for t in np.linspace(0, 1, 21)]  # L = softplus(−(w² − ½))
    np.testing.assert_allclose(loss.curve, hand, rtol=1e-6)
    assert loss.argmax_alpha == 0.5
    assert loss.value == pytest.approx(softplus(0.5) - softplus(-3.5), abs=1e-6)
    error = loss_barrier(model, a, b, (x, y), alphas=3, metric="error")
    np.testing.assert_array_equal(error.curve, [0.0, 1.0, 0.0])  # at w = 0 the logit of class 0 is −½
    assert error.value == 1.0
    extrapolated = loss_barrier(model, a, b, (x, y), alphas=8, alpha_range=(-0.2, 1.2))
    expected = [softplus(0.5 - 4 * (2 * t - 1) ** 2) for t in np.linspace(-0.2, 1.2, 8)]
    np.testing.assert_allclose(extrapolated.curve, expected, rtol=1e-6, atol=1e-7)  # float32 cross-entropy


def test_explicit_alphas_are_sorted_and_deduplicated():
    model = Squared()
    x, y = torch.ones(1, 1), torch.zeros(1, dtype=torch.long)
    result = loss_barrier(model, {"w": torch.tensor(2.0)}, {"w": torch.tensor(-2.0)}, (x, y), alphas=[0.5, 0.25, 0.5])
    np.testing.assert_array_equal(result.alphas, [0.25, 0.5])
    assert result.conventions["alphas"].startswith("explicit: 2 points")


def test_dataloader_data_gives_the_same_barrier_as_tensors_and_leaves_rng_alone():
    model, state_a, state_b = mlp_endpoints()
    x, y = classification_data(120, (8,), 3)
    from_tensors = loss_barrier(model, state_a, state_b, (x, y), alphas=5, batch_size=40)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=40, shuffle=True)
    rng = torch.get_rng_state()
    from_loader = loss_barrier(model, state_a, state_b, loader, alphas=5)
    assert torch.equal(torch.get_rng_state(), rng)
    np.testing.assert_allclose(from_loader.curve, from_tensors.curve, rtol=1e-6)
    generator = ((x[i : i + 50], y[i : i + 50]) for i in range(0, 120, 50))  # a one-shot iterable works too
    from_generator = loss_barrier(model, state_a, state_b, generator, alphas=5)
    np.testing.assert_allclose(from_generator.curve, from_tensors.curve, rtol=1e-6)


def test_modules_and_partial_state_dicts_are_accepted_as_endpoints():
    model, state_a, state_b = mlp_endpoints()
    module_a, module_b = MLP(), MLP()
    module_a.load_state_dict(state_a)
    module_b.load_state_dict(state_b)
    x, y = classification_data(100, (8,), 3)
    from_states = loss_barrier(model, state_a, state_b, (x, y), alphas=5)
    from_modules = loss_barrier(model, module_a, module_b, (x, y), alphas=5)
    np.testing.assert_array_equal(from_modules.curve, from_states.curve)
    # parameters only: the buffers (BN running stats) come from `model` for both endpoints
    params_a = {k: v for k, v in state_a.items() if "running" not in k and "num_batches" not in k}
    params_b = {k: v for k, v in state_b.items() if "running" not in k and "num_batches" not in k}
    model_buffers = {k: v for k, v in model.state_dict().items() if k not in params_a}
    partial = loss_barrier(model, params_a, params_b, (x, y), alphas=5)
    full_a, full_b = {**state_a, **model_buffers}, {**state_b, **model_buffers}
    expected = brute_force_curve(model, full_a, full_b, x, y, partial.alphas)
    np.testing.assert_allclose(partial.curve, expected, rtol=1e-5)


def test_tied_weights_are_interpolated_once():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encode = nn.Linear(3, 3, bias=False)
            self.decode = nn.Linear(3, 3, bias=False)
            self.decode.weight = self.encode.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.decode(torch.tanh(self.encode(x)))

    model = Tied()
    state_a, state_b = randomized(model, 1).state_dict(), randomized(model, 2).state_dict()
    assert set(state_a) == {"encode.weight", "decode.weight"}
    x, y = classification_data(40, (3,), 3)
    result = loss_barrier(model, state_a, state_b, (x, y), alphas=4)
    np.testing.assert_allclose(result.curve, brute_force_curve(model, state_a, state_b, x, y, result.alphas), rtol=1e-5)


def test_mapping_inputs_and_logits_outputs_are_supported():
    class KeywordModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, features: torch.Tensor, scale: float = 1.0) -> dict:
            return {"logits": self.linear(features) * scale}

    model = KeywordModel()
    state_a, state_b = randomized(model, 1).state_dict(), randomized(model, 2).state_dict()
    x, y = classification_data(30, (4,), 3)
    result = loss_barrier(model, state_a, state_b, ({"features": x, "scale": 2.0}, y), alphas=4)
    plain = nn.Linear(4, 3)
    rename = lambda s: {k.removeprefix("linear."): v * 2 for k, v in s.items()}  # noqa: E731  (scale 2 folded in)
    expected = brute_force_curve(plain, rename(state_a), rename(state_b), x, y, result.alphas)
    np.testing.assert_allclose(result.curve, expected, rtol=1e-5)


def test_non_tensor_output_needs_output_fn():
    class TupleModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> tuple:
            return (self.linear(x), "aux")

    model = TupleModel()
    x, y = classification_data(10, (4,), 3)
    with pytest.raises(TypeError, match="output_fn"):
        loss_barrier(model, model.state_dict(), model.state_dict(), (x, y))
    result = loss_barrier(model, model.state_dict(), model.state_dict(), (x, y), output_fn=lambda out: out[0])
    assert result.value == 0.0


def test_result_records_conventions_and_serializes():
    model, state_a, state_b = mlp_endpoints()
    x, y = classification_data(50, (8,), 3)
    result = loss_barrier(model, state_a, state_b, (x, y), alphas=4)
    assert isinstance(result, BarrierResult)
    for key in ("formula", "metric", "alphas", "interpolated", "batchnorm", "mode", "num_examples"):
        assert key in result.conventions
    assert "integer buffers copied from params_a" in result.conventions["interpolated"]
    as_dict = result.to_dict()
    assert as_dict["curve"] == result.curve.tolist() and as_dict["value"] == result.value
    with pytest.raises(ValueError):
        result.curve[0] = 1.0  # read-only


def test_float64_model_is_evaluated_in_float64():
    model = nn.Linear(5, 4).double()
    state_a, state_b = randomized(model, 1).state_dict(), randomized(model, 2).state_dict()
    x, y = classification_data(40, (5,), 4)
    result = loss_barrier(model, state_a, state_b, (x.double(), y), alphas=5)
    expected = brute_force_curve(model, state_a, state_b, x.double(), y, result.alphas)
    np.testing.assert_allclose(result.curve, expected, rtol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"metric": "accuracy"}, ValueError, "metric must be one of"),
        ({"alphas": 1}, ValueError, "alphas must be at least 2"),
        ({"alphas": []}, ValueError, "non-empty"),
        ({"alphas": [0.0, float("nan")]}, ValueError, "finite"),
        ({"alphas": True}, TypeError, "alphas must be"),
        ({"alphas": [0.0, 1.0], "alpha_range": (0.0, 1.0)}, ValueError, "drop it"),
        ({"alpha_range": (1.0, 0.0)}, ValueError, "low < high"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"reset_bn_batches": 0}, ValueError, "reset_bn_batches"),
        ({"reference": "chord"}, ValueError, "reference must be one of"),
        ({"task": "lm"}, ValueError, "task must be 'auto'"),
    ],
)
def test_bad_options_fail_with_clear_errors(kwargs, error, match):
    model, state_a, state_b = mlp_endpoints()
    x, y = classification_data(10, (8,), 3)
    with pytest.raises(error, match=match):
        loss_barrier(model, state_a, state_b, (x, y), **kwargs)


def test_bad_endpoints_and_data_fail_with_clear_errors():
    model, state_a, state_b = mlp_endpoints()
    x, y = classification_data(10, (8,), 3)
    with pytest.raises(ValueError, match="entries the model does not have: 'extra'"):
        loss_barrier(model, {**state_a, "extra": torch.zeros(1)}, state_b, (x, y))
    with pytest.raises(ValueError, match=r"params_b\['head.weight'\] has shape \(2, 16\)"):
        loss_barrier(model, state_a, {**state_b, "head.weight": torch.zeros(2, 16)}, (x, y))
    with pytest.raises(ValueError, match="module without the model's entries"):
        loss_barrier(model, state_a, nn.Linear(8, 3), (x, y))
    with pytest.raises(TypeError, match="params_a must be a mapping"):
        loss_barrier(model, [1, 2], state_b, (x, y))
    with pytest.raises(ValueError, match="data is empty"):
        loss_barrier(model, state_a, state_b, (x[:0], y[:0]))
    with pytest.raises(ValueError, match="data is empty"):
        loss_barrier(model, state_a, state_b, [])
    with pytest.raises(TypeError, match=r"data must be \(inputs, targets\)"):
        loss_barrier(model, state_a, state_b, x)
    with pytest.raises(ValueError, match="integer class labels"):
        loss_barrier(model, state_a, state_b, (x, y.float()), task="classification")
    with pytest.raises(ValueError, match="for regression the model's output must have the targets' shape"):
        loss_barrier(model, state_a, state_b, (x, y.float()))  # real targets: a regression barrier
    with pytest.raises(ValueError, match="10 inputs but 9 targets"):
        loss_barrier(model, state_a, state_b, (x, y[:9]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\]"):
        loss_barrier(model, state_a, state_b, (x, y + 5))
    with pytest.raises(ValueError, match="no normalization layer"):
        plain = nn.Linear(8, 3)
        loss_barrier(plain, plain.state_dict(), plain.state_dict(), (x, y), reset_bn=x)
    with pytest.raises(ValueError, match="reset_bn holds no examples"):
        loss_barrier(model, state_a, state_b, (x, y), reset_bn=[])


# ------------------------------------------------------------------------------------------- the linear reference


def brute_force_linear_barrier(curve_values: np.ndarray, alphas: np.ndarray, endpoint_a: float, endpoint_b: float
                               ) -> float:
    """max_α [L(α) − (α L_a + (1 − α) L_b)], written out."""
    return float(max(value - (alpha * endpoint_a + (1 - alpha) * endpoint_b)
                     for alpha, value in zip(alphas.tolist(), curve_values.tolist())))


@pytest.mark.parametrize("reference", ["mean", "linear"])
def test_both_references_come_from_one_path_and_match_brute_force(reference):
    model, state_a, state_b = mlp_endpoints()
    x, y = classification_data(300, (8,), 3)
    alphas = np.linspace(0, 1, 11)
    result = loss_barrier(model, state_a, state_b, (x, y), alphas=11, reference=reference, batch_size=128)
    expected = brute_force_curve(model, state_a, state_b, x, y, alphas)
    b_mean = brute_force_barrier(expected, expected[-1], expected[0])
    b_linear = brute_force_linear_barrier(expected, alphas, expected[-1], expected[0])
    assert result.mean == pytest.approx(b_mean, abs=1e-5)
    assert result.linear == pytest.approx(b_linear, abs=1e-5)
    assert result.value == (result.mean if reference == "mean" else result.linear) == float(result)
    assert result.reference == reference
    chord = alphas * result.endpoint_a + (1 - alphas) * result.endpoint_b
    assert result.argmax_alpha_linear == alphas[int(np.argmax(result.curve - chord))]
    assert result.argmax_alpha_mean == alphas[int(np.argmax(result.curve))]
    assert result.to_dict()["linear"] == result.linear and result.conventions["reference"] == f"value is B_{reference}"


def test_an_endpoint_gap_is_a_mean_barrier_but_not_a_linear_one():
    # The convex toy path (monotone loss from softplus(2) down to softplus(-2)): B_mean is half the endpoint gap,
    # B_linear is 0 exactly (the path never rises above the chord; the maximum sits at an endpoint).
    model = nn.Linear(1, 2, bias=False)
    state = lambda w: {"weight": torch.tensor([[w], [0.0]])}  # noqa: E731
    x, y = torch.ones(1, 1), torch.zeros(1, dtype=torch.long)
    result = loss_barrier(model, state(2.0), state(-2.0), (x, y), alphas=9)
    assert result.mean == pytest.approx(1.0, abs=1e-6)
    assert result.linear == 0.0
    # The nonconvex toy has a real barrier in both references.
    bump = loss_barrier(Squared(), {"w": torch.tensor(2.0)}, {"w": torch.tensor(-2.0)}, (x, y), alphas=21,
                        reference="linear")
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    assert bump.value == pytest.approx(softplus(0.5) - softplus(-3.5), abs=1e-6) and bump.argmax_alpha == 0.5


def test_identical_endpoints_are_evaluated_once(monkeypatch):
    model, state_a, _ = mlp_endpoints()
    x, y = classification_data(50, (8,), 3)
    calls = []
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda inputs: calls.append(1) or original(inputs))
    result = loss_barrier(model, state_a, {k: v.clone() for k, v in state_a.items()}, (x, y), alphas=11,
                          batch_size=50)
    assert len(calls) == 1 and result.mean == 0.0 and result.linear == 0.0


# ------------------------------------------------------------------------------------------- other tasks


def test_token_barrier_uses_token_cross_entropy_over_non_ignored_tokens():
    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(11, 8)
            self.head = nn.Linear(8, 11)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.embed(ids)))

    model = TinyLM()
    state_a, state_b = randomized(model, 1).state_dict(), randomized(model, 2).state_dict()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (20, 6), generator=generator)
    labels = torch.randint(0, 11, (20, 6), generator=generator)
    labels[:, :2] = -100
    result = loss_barrier(model, state_a, state_b, (ids, labels), alphas=5, batch_size=7)
    assert "tokens" in result.conventions["task"]
    expected = []
    for alpha in np.linspace(0, 1, 5):
        replica = copy.deepcopy(model)
        replica.load_state_dict({k: alpha * a + (1 - alpha) * state_b[k] for k, a in state_a.items()})
        with torch.no_grad():
            logits = replica(ids).double()
        expected.append(float(F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)))
    np.testing.assert_allclose(result.curve, expected, rtol=1e-5)
    error = loss_barrier(model, state_a, state_b, (ids, labels), alphas=3, metric="error")
    keep = labels != -100
    expected_error = []
    for alpha in (0.0, 0.5, 1.0):
        replica = copy.deepcopy(model)
        replica.load_state_dict({k: alpha * a + (1 - alpha) * state_b[k] for k, a in state_a.items()})
        with torch.no_grad():
            expected_error.append(float((replica(ids).argmax(-1)[keep] != labels[keep]).double().mean()))
    np.testing.assert_allclose(error.curve, expected_error, atol=1e-12)


def test_regression_barrier_uses_mse_and_refuses_the_error_metric():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    state_a, state_b = randomized(model, 1).state_dict(), randomized(model, 2).state_dict()
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 4, generator=generator), torch.randn(30, 2, generator=generator)
    result = loss_barrier(model, state_a, state_b, (x, y), alphas=6, batch_size=8)
    expected = []
    for alpha in np.linspace(0, 1, 6):
        replica = copy.deepcopy(model)
        replica.load_state_dict({k: alpha * a + (1 - alpha) * state_b[k] for k, a in state_a.items()})
        with torch.no_grad():
            expected.append(float(F.mse_loss(replica(x).double(), y.double())))
    np.testing.assert_allclose(result.curve, expected, rtol=1e-5)
    alphas = np.linspace(0, 1, 6)
    assert result.linear == pytest.approx(brute_force_linear_barrier(np.array(expected), alphas, expected[-1],
                                                                     expected[0]), abs=1e-6)
    with pytest.raises(ValueError, match="metric='error' needs a task with an accuracy"):
        loss_barrier(model, state_a, state_b, (x, y), metric="error")


def test_the_barrier_on_each_device_matches_the_brute_force_loop(device):
    """B (eq. 5) with the model and data on ``device`` (CUDA under the fixture's deterministic settings) against the
    brute-force α loop on the CPU."""
    model, state_a, state_b = mlp_endpoints()
    x, y = classification_data(300, (8,), 3)
    expected = brute_force_curve(model, state_a, state_b, x, y, np.linspace(0, 1, 11), metric="loss")
    on_device = copy.deepcopy(model).to(device)
    result = loss_barrier(on_device, state_a, state_b, (x.to(device), y.to(device)), alphas=11, batch_size=128)
    np.testing.assert_allclose(result.curve, expected, rtol=1e-5, atol=1e-7)
    assert result.value == pytest.approx(brute_force_barrier(expected, expected[-1], expected[0]), abs=1e-5)
