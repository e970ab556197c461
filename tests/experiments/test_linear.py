"""Tests of dynprobe.experiments.linear.linearize: f_lin(x; θ) = f(x; θ₀) + J(θ₀)(θ − θ₀).

Every reference is computed here independently of the code under test: Jacobians by ``torch.func.jacrev`` or
by a naive per-output autograd loop in float64, the kernel dynamics in closed form from an eigendecomposition,
optimizer trajectories by a model whose Jacobian is materialized, weight decay by hand-written update rules.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from dynprobe.experiments.linear import LinearizedModel, linearize
from dynprobe.recipes.mnist1d import Conv1dNet

from ..conftest import MLP, SmallCNN, assert_bitwise_equal, state_of

# ---------------------------------------------------------------------------------------------- helpers

class TanhMLP(nn.Module):
    """Smooth activations, so the linearization error is second order and visible."""

    def __init__(self, d_in: int = 6, width: int = 16, out: int = 3) -> None:
        super().__init__()
        self.hidden = nn.Linear(d_in, width)
        self.output = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(torch.tanh(self.hidden(x)))


class RandomFeatures(nn.Module):
    """A frozen random tanh layer and a trainable linear head: affine in its trainable parameters."""

    def __init__(self, d_in: int = 6, width: int = 12, out: int = 3) -> None:
        super().__init__()
        self.features = nn.Linear(d_in, width)
        self.features.requires_grad_(False)
        self.head = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.features(x)))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(5, 3)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.a(left)) * self.b(right)


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def naive_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(n·c, P) Jacobian of the eval-mode outputs, one backward pass per sample and output, rows (i, k)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    was_training = model.training
    model.eval()
    for i in range(x.shape[0]):
        out = model(x[i : i + 1])[0]
        for k in range(out.shape[0]):
            grads = torch.autograd.grad(out[k], params, retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    model.train(was_training)
    return torch.stack(rows)


def flat(mapping: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in mapping.values()])


def unflat(vector: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, t in like.items():
        out[name] = vector[offset : offset + t.numel()].view_as(t).to(t.dtype)
        offset += t.numel()
    return out


class MaterializedLinearModel(nn.Module):
    """Reference: u(idx) = u₀[idx] + J[idx] · vec(θ − θ₀) with J materialized, on a fixed set of inputs.

    Its parameters hold θ (``placement="theta"``) or δ (``"delta"``), tensor by tensor in the model's order,
    so an optimizer of the same class sees the same tensors as it does on the linearized module.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, placement: str) -> None:
        super().__init__()
        self.theta0 = trainable(model)
        self.jacobian = naive_jacobian(model, x).view(x.shape[0], -1, sum(t.numel() for t in self.theta0.values()))
        with torch.no_grad():
            self.u0 = copy.deepcopy(model).eval()(x).double()
        self.placement = placement
        self.tensors = nn.ParameterList(
            [nn.Parameter(t.clone() if placement == "theta" else torch.zeros_like(t)) for t in self.theta0.values()]
        )

    def theta(self) -> dict[str, torch.Tensor]:
        shift = self.placement == "delta"
        values = [p.detach() + (t if shift else 0) for p, t in zip(self.tensors, self.theta0.values())]
        return dict(zip(self.theta0, values))

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        if self.placement == "delta":
            delta = torch.cat([p.reshape(-1) for p in self.tensors])
        else:
            delta = torch.cat([(p - t).reshape(-1) for p, t in zip(self.tensors, self.theta0.values())])
        return self.u0[index] + self.jacobian[index] @ delta.double()


# ---------------------------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("weight_decay_on", ["theta", "delta"])
@pytest.mark.parametrize("build,shape", [(MLP, (20,)), (SmallCNN, (3, 8, 8)), (Conv1dNet, (1, 40))])
def test_output_at_base_point_is_bitwise_equal_to_eval_mode_model(build, shape, weight_decay_on):
    torch.manual_seed(0)
    model = build()
    x = torch.randn(16, *shape)
    with torch.no_grad():
        reference = copy.deepcopy(model).eval()(x)
    lin = linearize(model, weight_decay_on=weight_decay_on).train()
    output = lin(x)
    assert output.dtype == reference.dtype and output.shape == reference.shape
    assert torch.equal(output, reference), f"max abs diff {(output - reference).abs().max()}"


def test_jacobian_after_optimizer_steps_equals_jacrev_of_original_at_base_point():
    torch.manual_seed(1)
    model = SmallCNN(width=4).double()
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 3, 8, 8, dtype=torch.float64))  # non-trivial running statistics at θ₀
    theta0 = trainable(model)

    def original(params, inputs):
        return functional_call(model, params, (inputs,))

    with torch.no_grad():
        model.eval()
        jacobian_at_base = jacrev(original)(theta0, x)
    lin = linearize(model)
    optimizer = torch.optim.SGD(lin.parameters(), lr=0.5, momentum=0.9)
    for _ in range(5):
        loss = F.cross_entropy(lin(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    theta = lin.theta()
    assert (flat(theta) - flat(theta0)).norm() > 0.1 * flat(theta0).norm(), "θ must have moved far from θ₀"

    def linearized(params, inputs):
        return functional_call(lin, params, (inputs,))

    jacobian_of_lin = jacrev(linearized)(dict(lin.named_parameters()), x)
    with torch.no_grad():
        jacobian_at_theta = jacrev(original)(theta, x)
    moved = max((jacobian_at_theta[n] - jacobian_at_base[n]).abs().max().item() for n in theta0)
    assert moved > 1e-2, "the network is nonlinear: its own Jacobian changes between θ₀ and θ"
    for name in theta0:
        torch.testing.assert_close(jacobian_of_lin[name], jacobian_at_base[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weight_decay_on", ["theta", "delta"])
@pytest.mark.parametrize("build", [lambda: nn.Linear(6, 3), RandomFeatures])
def test_model_linear_in_its_parameters_is_linearized_exactly_everywhere(build, weight_decay_on):
    torch.manual_seed(2)
    model = build().double()
    x = torch.randn(10, 6, dtype=torch.float64)
    lin = linearize(model, weight_decay_on=weight_decay_on)
    for scale in (0.1, 1.0, 10.0):
        theta = {name: torch.randn_like(t) * scale for name, t in trainable(model).items()}
        lin.load_theta(theta)
        with torch.no_grad():
            expected = functional_call(model, theta, (x,))
            torch.testing.assert_close(lin(x), expected, rtol=1e-12, atol=1e-12 * scale)


def test_nonlinear_model_is_not_reproduced_away_from_base_point():
    """Control for the test above: the same check fails on a network that is nonlinear in θ."""
    torch.manual_seed(2)
    model = TanhMLP().double()
    x = torch.randn(10, 6, dtype=torch.float64)
    lin = linearize(model)
    theta = {name: t + torch.randn_like(t) for name, t in trainable(model).items()}
    lin.load_theta(theta)
    with torch.no_grad():
        assert (lin(x) - functional_call(model, theta, (x,))).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------- kernel dynamics

@pytest.mark.parametrize("weight_decay_on", ["theta", "delta"])
def test_full_batch_gradient_descent_follows_closed_form_kernel_dynamics(weight_decay_on):
    """Loss ½ Σ_i ‖u_i − y_i‖² (sum over samples and outputs), SGD without momentum, float64.

    u_t = y + (I − ηH)^t (u_0 − y) with H = J Jᵀ the full (n·c × n·c) eNTK at θ₀ from a naive autograd loop.
    """
    torch.manual_seed(3)
    n, outputs, steps = 10, 3, 30
    model = TanhMLP(out=outputs).double()
    x = torch.randn(n, 6, dtype=torch.float64)
    y = torch.randn(n, outputs, dtype=torch.float64)
    jacobian = naive_jacobian(model, x)
    kernel = jacobian @ jacobian.T
    eigenvalues, eigenvectors = torch.linalg.eigh(kernel)
    lr = 1.0 / eigenvalues.max().item()

    lin = linearize(model, weight_decay_on=weight_decay_on)
    optimizer = torch.optim.SGD(lin.parameters(), lr=lr)
    with torch.no_grad():
        u0 = lin(x).reshape(-1)
    residual0 = u0 - y.reshape(-1)
    for step in range(1, steps + 1):
        loss = 0.5 * ((lin(x) - y) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            u = lin(x).reshape(-1)
        decay = (1.0 - lr * eigenvalues) ** step
        expected = y.reshape(-1) + eigenvectors @ (decay * (eigenvectors.T @ residual0))
        torch.testing.assert_close(u, expected, rtol=0, atol=1e-10 * residual0.abs().max().item())
    assert (u - u0).norm() > 0.3 * residual0.norm(), "the dynamics must move the outputs substantially"


# ---------------------------------------------------------------------------------------------- optimizers

@pytest.mark.parametrize("weight_decay_on", ["theta", "delta"])
@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
], ids=["sgd-momentum-wd", "sgd-nesterov-wd", "adam", "adamw"])
def test_training_with_optimizers_matches_materialized_jacobian_reference(make_optimizer, weight_decay_on):
    torch.manual_seed(4)
    model = TanhMLP().double()
    x, y = torch.randn(24, 6, dtype=torch.float64), torch.randint(0, 3, (24,))
    reference = MaterializedLinearModel(model, x, weight_decay_on)
    lin = linearize(model, weight_decay_on=weight_decay_on)
    optimizer_lin, optimizer_ref = make_optimizer(lin.parameters()), make_optimizer(reference.parameters())
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        index = torch.randint(0, 24, (8,), generator=generator)
        for module, optimizer, inputs in ((lin, optimizer_lin, x[index]), (reference, optimizer_ref, index)):
            loss = F.cross_entropy(module(inputs), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        theta_lin, theta_ref = lin.theta(), reference.theta()
        for name in theta_ref:
            torch.testing.assert_close(theta_lin[name], theta_ref[name], rtol=1e-9, atol=1e-11)
    assert (flat(lin.theta()) - flat(reference.theta0)).norm() > 1e-2


@pytest.mark.parametrize("weight_decay_on", ["theta", "delta"])
def test_weight_decay_placement_matches_manual_sgd_update(weight_decay_on):
    """θ ← θ − η (Jᵀ r + λ w), w = θ (on θ) or θ − θ₀ (on δ); r = ∂L/∂u of the mean squared error."""
    torch.manual_seed(5)
    model = TanhMLP().double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    lr, decay = 0.2, 0.3
    theta0 = trainable(model)
    jacobian = naive_jacobian(model, x)
    with torch.no_grad():
        u0 = copy.deepcopy(model).eval()(x).reshape(-1).double()
    lin = linearize(model, weight_decay_on=weight_decay_on)
    optimizer = torch.optim.SGD(lin.parameters(), lr=lr, weight_decay=decay)
    start = flat(theta0)
    manual = start.clone()
    for _ in range(10):
        loss = F.mse_loss(lin(x), y, reduction="sum") / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        residual = u0 + jacobian @ (manual - start) - y.reshape(-1)
        decayed = manual if weight_decay_on == "theta" else manual - start
        manual = manual - lr * (jacobian.T @ residual + decay * decayed)
        torch.testing.assert_close(flat(lin.theta()), manual, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weight_decay_on", ["theta", "delta"])
def test_pure_weight_decay_shrinks_toward_zero_or_toward_base_point(weight_decay_on):
    torch.manual_seed(6)
    model = TanhMLP().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    theta0 = trainable(model)
    lin = linearize(model, weight_decay_on=weight_decay_on)
    offset = {name: torch.randn_like(t) for name, t in theta0.items()}
    lin.load_theta({name: theta0[name] + offset[name] for name in theta0})
    lr, decay, steps = 0.1, 0.5, 7
    optimizer = torch.optim.SGD(lin.parameters(), lr=lr, weight_decay=decay)
    for _ in range(steps):
        optimizer.zero_grad()
        (lin(x) * 0).sum().backward()  # zero data gradient: only weight decay moves θ
        optimizer.step()
    factor = (1 - lr * decay) ** steps
    for name, theta in lin.theta().items():
        start = theta0[name] + offset[name]
        expected = factor * start if weight_decay_on == "theta" else theta0[name] + factor * offset[name]
        torch.testing.assert_close(theta, expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------- BatchNorm, dropout, modes

def test_batchnorm_uses_base_running_statistics_and_never_updates_them():
    torch.manual_seed(7)
    model = SmallCNN()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 3, 8, 8) * 2 + 1)  # warmed-up running statistics at θ₀
    base_buffers = {name: b.clone() for name, b in model.named_buffers()}
    lin = linearize(model).train()
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    optimizer = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        loss = F.cross_entropy(lin(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        full_batch, half_batch = lin(x), lin(x[:5])
        eval_mode_reference = functional_call(copy.deepcopy(model).eval(), lin.theta(), (x,))
    torch.testing.assert_close(half_batch, full_batch[:5], rtol=1e-6, atol=1e-6)  # no batch statistics
    base = lin.base_state()
    for name, buffer in base_buffers.items():
        assert torch.equal(base[name], buffer), f"{name} changed"
        assert torch.equal(dict(model.named_buffers())[name], buffer)
    # f_lin at θ differs from the network at θ, but both use the same frozen (eval-mode) statistics at θ₀:
    lin.load_theta(trainable(model))
    with torch.no_grad():
        assert torch.equal(lin(x), copy.deepcopy(model).eval()(x))
    assert not torch.equal(full_batch, eval_mode_reference)


def test_dropout_is_off_even_in_train_mode_and_rng_is_untouched():
    torch.manual_seed(8)
    model = MLP(dropout=0.5)
    x = torch.randn(32, 20)
    lin = linearize(model).train()
    state = torch.get_rng_state()
    first, second = lin(x), lin(x)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, second)
    with torch.no_grad():
        assert torch.equal(first, copy.deepcopy(model).eval()(x))


def test_train_and_eval_flags_change_nothing_it_computes():
    torch.manual_seed(9)
    model = SmallCNN()
    x = torch.randn(8, 3, 8, 8)
    lin = linearize(model)
    lin.load_theta({name: t + 0.1 * torch.randn_like(t) for name, t in trainable(model).items()})
    with torch.no_grad():
        in_train, in_eval = lin.train()(x), lin.eval()(x)
    assert torch.equal(in_train, in_eval)
    assert lin.train().training and all(m.training for m in lin.modules())
    assert not lin.eval().training


def test_users_model_is_unchanged_by_linearizing_and_training():
    torch.manual_seed(10)
    model = SmallCNN()
    model.train()
    model.features[1].eval()  # a per-module choice that must survive
    flags = [m.training for m in model.modules()]
    before = state_of(model)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    rng = torch.get_rng_state()
    lin = linearize(model)
    optimizer = torch.optim.Adam(lin.parameters(), lr=1e-2)
    for _ in range(3):
        loss = F.cross_entropy(lin(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert_bitwise_equal(state_of(model), before)
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.data_ptr() != q.data_ptr() for p in model.parameters() for q in lin.parameters())


# ---------------------------------------------------------------------------------------------- parameters and state

def test_parameters_have_the_models_trainable_names_shapes_and_order():
    torch.manual_seed(11)
    model = RandomFeatures()  # its first layer is frozen
    lin = linearize(model)
    expected = [(n, p.shape) for n, p in model.named_parameters() if p.requires_grad]
    assert [(n, p.shape) for n, p in lin.named_parameters()] == expected == [
        ("head.weight", torch.Size([3, 12])), ("head.bias", torch.Size([3]))]
    assert list(lin.state_dict()) == ["head.weight", "head.bias"]
    assert list(dict(lin.named_buffers())) == []


def test_state_dicts_and_optimizer_state_carry_over_from_the_model():
    torch.manual_seed(12)
    model = Conv1dNet(width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(16, 1, 40), torch.randint(0, 10, (16,))
    for _ in range(2):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lin = linearize(model)
    other = linearize(Conv1dNet(width=8))
    other.load_state_dict(dict(model.named_parameters()))  # strict: the same keys and shapes
    assert_bitwise_equal(other.state_dict(), lin.state_dict())
    optimizer_lin = torch.optim.SGD(lin.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    optimizer_lin.load_state_dict(optimizer.state_dict())
    lin_params, model_params = list(lin.parameters()), list(model.parameters())
    for p_lin, p_model in zip(lin_params, model_params):
        assert torch.equal(optimizer_lin.state[p_lin]["momentum_buffer"], optimizer.state[p_model]["momentum_buffer"])


def test_tied_parameters_appear_once_and_move_together():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encode = nn.Linear(5, 5, bias=False)
            self.decode = nn.Linear(5, 5, bias=False)
            self.decode.weight = self.encode.weight

        def forward(self, x):
            return self.decode(torch.tanh(self.encode(x)))

    torch.manual_seed(13)
    model = Tied().double()
    x = torch.randn(4, 5, dtype=torch.float64)
    lin = linearize(model)
    assert [n for n, _ in lin.named_parameters()] == ["encode.weight"]
    theta0 = trainable(model)
    with torch.no_grad():
        jacobian_at_base = jacrev(lambda p: functional_call(model.eval(), p, (x,)))(theta0)["encode.weight"]
    jacobian_of_lin = jacrev(lambda p: functional_call(lin, p, (x,)))(dict(lin.named_parameters()))["encode.weight"]
    torch.testing.assert_close(jacobian_of_lin, jacobian_at_base, rtol=1e-12, atol=1e-12)


def test_params_mapping_sets_the_base_point_parameters_and_buffers():
    torch.manual_seed(14)
    model = SmallCNN()
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 3, 8, 8))
    snapshot = state_of(model)  # θ_t with its running statistics
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model(torch.randn(32, 3, 8, 8) + 3)
    current = state_of(model)
    x = torch.randn(8, 3, 8, 8)
    lin = linearize(model, params=snapshot)
    snapshot_model = SmallCNN()
    snapshot_model.load_state_dict(snapshot)
    with torch.no_grad():
        assert torch.equal(lin(x), snapshot_model.eval()(x))
    assert_bitwise_equal(lin.base_state(), snapshot)
    assert_bitwise_equal(lin.theta(), trainable(snapshot_model))
    assert_bitwise_equal(state_of(model), current)
    partial = linearize(model, params={"head.bias": torch.zeros(5, dtype=torch.float64)})  # cast, rest from model
    assert partial.base_state()["head.bias"].dtype == torch.float32
    assert torch.equal(partial.theta()["head.bias"], torch.zeros(5))
    assert torch.equal(partial.theta()["head.weight"], current["head.weight"])


@pytest.mark.parametrize("weight_decay_on", ["theta", "delta"])
def test_theta_delta_and_load_theta_read_back_consistently(weight_decay_on):
    torch.manual_seed(15)
    model = TanhMLP()
    theta0 = trainable(model)
    lin = linearize(model, weight_decay_on=weight_decay_on)
    holds = {n: p.detach().clone() for n, p in lin.named_parameters()}
    zeros = {n: torch.zeros_like(t) for n, t in theta0.items()}
    assert_bitwise_equal(holds, theta0 if weight_decay_on == "theta" else zeros)
    assert_bitwise_equal(lin.theta(), theta0)
    assert_bitwise_equal(lin.delta(), zeros)
    target = {n: t + 0.5 for n, t in theta0.items()}
    lin.load_theta(target)
    for name in theta0:
        torch.testing.assert_close(lin.theta()[name], target[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(lin.delta()[name], target[name] - theta0[name], rtol=0, atol=1e-6)
    lin.theta()["hidden.weight"].add_(100.0)  # a copy: the module is unaffected
    torch.testing.assert_close(lin.theta()["hidden.weight"], target["hidden.weight"], rtol=0, atol=1e-6)


def test_to_double_moves_the_frozen_copy_too():
    torch.manual_seed(16)
    model = SmallCNN()
    x = torch.randn(4, 3, 8, 8)
    lin = linearize(model).double()
    assert all(t.dtype == torch.float64 for t in lin.base_state().values() if t.is_floating_point())
    output = lin(x.double())
    assert output.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(output, copy.deepcopy(model).double().eval()(x.double()), rtol=0, atol=1e-12)
    assert next(model.parameters()).dtype == torch.float32


def test_deepcopy_of_linearized_model_is_independent():
    torch.manual_seed(17)
    lin = linearize(TanhMLP())
    twin = copy.deepcopy(lin)
    with torch.no_grad():
        next(twin.parameters()).add_(1.0)
    assert not torch.equal(lin.theta()["hidden.weight"], twin.theta()["hidden.weight"])
    assert_bitwise_equal(lin.base_state(), twin.base_state())


# ---------------------------------------------------------------------------------------------- inputs and outputs

def test_mapping_inputs_are_passed_as_keyword_arguments():
    torch.manual_seed(18)
    model = TwoInputs()
    inputs = {"left": torch.randn(6, 4), "right": torch.randn(6, 5)}
    lin = linearize(model)
    with torch.no_grad():
        expected = model(**inputs)
    assert torch.equal(lin(inputs), expected)
    assert torch.equal(lin(**inputs), expected)
    assert torch.equal(lin(inputs["left"], right=inputs["right"]), expected)


def test_output_fn_selects_the_tensor_to_linearize():
    class TupleOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 3)

        def forward(self, x):
            return {"logits": self.layer(x), "labels": x.argmax(1)}

    torch.manual_seed(19)
    model = TupleOut()
    x = torch.randn(5, 4)
    with pytest.raises(TypeError, match="output_fn="):
        linearize(model)(x)
    lin = linearize(model, output_fn=lambda out: out["logits"])
    with torch.no_grad():
        assert torch.equal(lin(x), model(x)["logits"])
    with pytest.raises(TypeError, match="output_fn must return a tensor"):
        linearize(model, output_fn=lambda out: out.keys())(x)
    with pytest.raises(TypeError, match="floating-point"):
        linearize(model, output_fn=lambda out: out["labels"])(x)


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("call,error,match", [
    (lambda m: linearize("model"), TypeError, "model must be a torch.nn.Module"),
    (lambda m: linearize(m, weight_decay_on="theta0"), ValueError, "weight_decay_on must be one of"),
    (lambda m: linearize(m, output_fn="logits"), TypeError, "output_fn must be a callable"),
    (lambda m: linearize(m, params=m), TypeError, r"other_model.state_dict\(\)"),
    (lambda m: linearize(m, params={"hiden.weight": torch.zeros(16, 6)}), ValueError, "not parameters or buffers"),
    (lambda m: linearize(m, params={"hidden.weight": torch.zeros(6, 16)}), ValueError, r"shape \(6, 16\)"),
    (lambda m: linearize(m, params={"hidden.weight": [0.0]}), TypeError, "must be a tensor"),
    (lambda m: linearize(m.requires_grad_(False)), ValueError, "no trainable parameters"),
    (lambda m: linearize(m).load_theta({"hidden.weight": torch.zeros(16, 6)}), ValueError, "missing"),
    (lambda m: linearize(m).load_theta(list(m.parameters())), TypeError, "theta must be a mapping"),
])
def test_bad_arguments_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(TanhMLP())


def test_top_level_name_clash_with_linearized_model_attribute_is_a_clear_error():
    class Clash(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.theta = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.theta

    with pytest.raises(ValueError, match="'theta' is an attribute of LinearizedModel"):
        linearize(Clash())


def test_linearized_model_is_an_nn_module():
    lin = linearize(TanhMLP())
    assert isinstance(lin, LinearizedModel) and isinstance(lin, nn.Module)
    assert "weight_decay_on='theta'" in repr(lin)
