"""The eNTK engine against an independent float64 reference, its properties, and its errors.

The reference is deliberately naive: the model cast to float64, one forward per sample (a batch of one), one
``torch.autograd.grad`` per (sample, logit), the Jacobian J (n, c, P) stacked and reduced with einsum — no code
shared with the engine. Test models use smooth activations (tanh, GELU, softplus): in float32 a ReLU network's
activation masks can flip at kinks between two computations of the same kernel, which would make the
comparison measure kinks rather than the engine (the issue measured up to 1e-4 relative on a ResNet-20).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynprobe.kernels._chunking import ACCUMULATION, blocked_product
from dynprobe.kernels._execution import PlanRunner
from dynprobe.kernels._structured import Convolution
from dynprobe.kernels.engine import NTKEngine, empirical_ntk
from dynprobe.metrics import functions as metrics

MODES = ["trace", "logit_sum", "full", "single", "true_class"]

# nn.MultiheadAttention under vmap (generic path) uses torch's slow batching fallback for CPU flash attention.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


# ----------------------------------------------------------------------------- reference
def naive_jacobian(model: nn.Module, inputs, *, output_fn=None, wrt=None, buffers=None) -> torch.Tensor:
    """J[i, k, :] = ∂f_k(x_i)/∂θ in float64, one sample and one logit at a time."""
    reference = copy.deepcopy(model).double().eval()
    if buffers:
        for name, value in buffers.items():
            module_name, _, attribute = name.rpartition(".")
            getattr(reference.get_submodule(module_name), attribute).copy_(value.double())
    named = dict(reference.named_parameters())
    names = list(wrt) if wrt is not None else [k for k, p in model.named_parameters() if p.requires_grad]
    params = [named[name] for name in names]
    n = inputs.shape[0] if isinstance(inputs, torch.Tensor) else next(
        v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
    rows = []
    for i in range(n):
        if isinstance(inputs, torch.Tensor):
            x = inputs[i : i + 1]
            out = reference(x.double() if x.is_floating_point() else x)
        else:
            kwargs = {k: (v[i : i + 1].double() if v.is_floating_point() else v[i : i + 1])
                      if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            out = reference(**kwargs)
        logits = (output_fn(out) if output_fn else out).reshape(-1)
        per_logit = []
        for k in range(logits.numel()):
            grads = torch.autograd.grad(logits[k], params, retain_graph=True, allow_unused=True)
            per_logit.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                        for g, p in zip(grads, params)]))
        rows.append(torch.stack(per_logit))
    return torch.stack(rows)


def kernel_from_jacobian(jac: torch.Tensor, mode: str, *, class_index: int = 1, targets=None) -> torch.Tensor:
    n, c, _ = jac.shape
    if mode == "trace":
        return torch.einsum("ikp,jkp->ij", jac, jac)
    if mode == "logit_sum":
        summed = jac.sum(1)
        return summed @ summed.T
    if mode == "full":
        return torch.einsum("ikp,jlp->ikjl", jac, jac).reshape(n * c, n * c)
    if mode == "single":
        return jac[:, class_index] @ jac[:, class_index].T
    chosen = jac[torch.arange(n), torch.as_tensor(targets)]
    return chosen @ chosen.T


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def mode_kwargs(mode: str, n: int, c: int) -> dict:
    if mode == "single":
        return {"class_index": 1}
    if mode == "true_class":
        return {"targets": torch.arange(n) % c}
    return {}


# ----------------------------------------------------------------------------- models
def randomize_normalization(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that eval mode is not the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                if getattr(module, "running_mean", None) is not None:
                    module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=generator) - 0.5)
                    module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
                if module.weight is not None:
                    module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.rand(module.bias.shape, generator=generator) - 0.5)
    return model


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.GELU(), nn.Dropout(0.3), nn.Linear(12, 4))


def make_cnn() -> nn.Module:
    return randomize_normalization(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
        nn.Conv2d(4, 6, 3, stride=2, bias=False), nn.BatchNorm2d(6), nn.Softplus(), nn.Dropout(0.2),
        nn.Flatten(), nn.Linear(6 * 3 * 3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.softplus(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x  # in place on the BatchNorm output, as Idelbayev's ResNet does
        return torch.tanh(out)


class SmallResNet(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(2, 4)
        self.blocks = nn.Sequential(ResidualBlock(4), ResidualBlock(4))
        self.head = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(self.norm(self.stem(x)))
        return self.head(self.blocks(out).mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    """Embedding (with padding index) + a learned positional Parameter + pre-LayerNorm attention and MLP."""

    def __init__(self, vocab: int = 11, width: int = 8, length: int = 5, classes: int = 3,
                 torch_attention: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.position = nn.Parameter(0.1 * torch.randn(length, width))
        self.norm1 = nn.LayerNorm(width)
        self.torch_attention = torch_attention
        if torch_attention:
            self.attention = nn.MultiheadAttention(width, 2, batch_first=True)
        else:
            self.qkv = nn.Linear(width, 3 * width)
            self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position
        x = self.norm1(h)
        if self.torch_attention:
            h = h + self.attention(x, x, x, need_weights=False)[0]
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
            h = h + self.proj(weights @ v)
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(dim=1))


class DictInputModel(nn.Module):
    """``model(signal=..., extra=..., scale=...)`` returning a dict of outputs (logits selected by output_fn)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.norm = nn.GroupNorm(1, 3)
        self.features = nn.Linear(4, 6)
        self.head = nn.Linear(3 * 5 + 6, 3)

    def forward(self, signal: torch.Tensor, extra: torch.Tensor, scale: float = 1.0) -> dict:
        a = torch.tanh(self.norm(self.conv(signal))).flatten(1)
        b = F.softplus(self.features(extra))
        return {"logits": scale * self.head(torch.cat([a, b], dim=1)), "aux": a}


def dict_output(out: dict) -> torch.Tensor:
    return out["logits"]


def make_case(name: str):
    """(model, inputs, output_fn) of each test model, seeded."""
    torch.manual_seed(0)
    if name == "mlp":
        return make_mlp(), torch.randn(7, 6), None
    if name == "cnn_batchnorm":
        return make_cnn(), torch.randn(5, 3, 8, 8), None
    if name == "resnet":
        return randomize_normalization(SmallResNet()), torch.randn(4, 3, 6, 6), None
    if name == "transformer":
        tokens = torch.randint(0, 11, (5, 5))
        tokens[0, 3:] = 0  # padding
        return randomize_normalization(TinyTransformer()), tokens, None
    if name == "transformer_mha":
        return randomize_normalization(TinyTransformer(torch_attention=True)), torch.randint(1, 11, (4, 5)), None
    if name == "dict_inputs":
        inputs = {"signal": torch.randn(5, 2, 5), "extra": torch.randn(5, 4), "scale": 0.5}
        return randomize_normalization(DictInputModel()), inputs, dict_output
    raise KeyError(name)


def make_double_case(name: str):
    """:func:`make_case` in float64: the model and its floating inputs (float64 comparisons of two paths)."""
    model, inputs, output_fn = make_case(name)
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
        inputs = inputs.double()
    elif isinstance(inputs, dict):
        inputs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return model.double(), inputs, output_fn


CASES = ["mlp", "cnn_batchnorm", "resnet", "transformer", "transformer_mha", "dict_inputs"]


@pytest.fixture(scope="module")
def jacobians() -> dict:
    cache = {}

    def get(name: str):
        if name not in cache:
            model, inputs, output_fn = make_case(name)
            cache[name] = naive_jacobian(model, inputs, output_fn=output_fn)
        return cache[name]

    return get


# ----------------------------------------------------------------------------- against the reference
def _to_device(inputs, device: torch.device):
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return inputs


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_matches_naive_float64_loop(case, mode, jacobians, device):
    model, inputs, output_fn = make_case(case)
    jac = jacobians(case)  # the reference on the CPU, float64
    n, c, _ = jac.shape
    extra = mode_kwargs(mode, n, c)
    expected = kernel_from_jacobian(jac, mode, class_index=1, targets=extra.get("targets"))
    extra = {k: _to_device(v, device) for k, v in extra.items()}
    kernel = empirical_ntk(model.to(device), _to_device(inputs, device), mode=mode, output_fn=output_fn, **extra)
    assert kernel.dtype == torch.float64 and kernel.device.type == device.type
    assert kernel.shape == expected.shape
    assert relative_error(kernel.cpu(), expected) <= 1e-6


@pytest.mark.parametrize("case", CASES)
def test_structured_and_generic_paths_agree_in_float64(case):
    model, inputs, output_fn = make_double_case(case)
    for mode in ("trace", "full"):
        auto = NTKEngine(model, inputs, mode=mode, output_fn=output_fn)
        generic = NTKEngine(model, inputs, mode=mode, output_fn=output_fn, method="generic")
        assert auto.plan.chunks.units or case == "transformer_mha"
        assert relative_error(auto(), generic()) <= 1e-12


def test_float64_model_matches_reference_to_float64_precision():
    model, inputs, _ = make_case("cnn_batchnorm")
    model = model.double()
    expected = kernel_from_jacobian(naive_jacobian(model, inputs), "trace")
    assert relative_error(empirical_ntk(model, inputs.double()), expected) <= 1e-12


def test_structured_rules_cover_supported_layers_and_fall_back_for_the_rest():
    model, inputs, _ = make_case("transformer")
    engine = NTKEngine(model, inputs)
    generic = [name for group in engine.plan.chunks.generic_groups for name in group]
    assert generic == ["position"]  # a bare nn.Parameter has no structured rule
    assert {unit.name for unit in engine.plan.chunks.units} == {"embed", "norm1", "qkv", "proj", "norm2", "mlp.0",
                                                                "mlp.2",
                                                         "head"}
    model, inputs, _ = make_case("transformer_mha")
    generic = [n for g in NTKEngine(model, inputs).plan.chunks.generic_groups for n in g]
    assert "attention.in_proj_weight" in generic and "attention.out_proj.weight" in generic  # out_proj never called


def test_both_convolution_strategies_match_reference():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, dilation=1), nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2), nn.Softplus(),
        nn.Conv2d(4, 6, 2, stride=2, padding="valid"), nn.Tanh(),
        nn.Conv2d(6, 5, 3, padding="same", padding_mode="reflect"), nn.Flatten(), nn.Linear(5 * 4 * 4, 3))
    inputs = torch.randn(4, 3, 8, 8)
    expected = kernel_from_jacobian(naive_jacobian(model, inputs), "trace")
    for strategy in ("grouped", "unfold"):
        engine = NTKEngine(model, inputs)
        for unit in engine.plan.chunks.units:
            if isinstance(unit, Convolution):
                unit.set_strategy(strategy)
        assert relative_error(engine(), expected) <= 1e-6, strategy


def test_conv1d_and_conv3d_layers_match_reference():
    torch.manual_seed(2)
    conv1d = nn.Sequential(nn.Conv1d(2, 3, 3, padding="same", padding_mode="circular"), nn.Tanh(),
                           nn.Conv1d(3, 3, 2, stride=2, groups=3), nn.Flatten(), nn.Linear(3 * 4, 2))
    conv3d = nn.Sequential(nn.Conv3d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 27, 2))
    for model, inputs in ((conv1d, torch.randn(4, 2, 8)), (conv3d, torch.randn(3, 1, 4, 4, 4))):
        expected = kernel_from_jacobian(naive_jacobian(model, inputs), "full")
        for strategy in ("grouped", "unfold"):
            engine = NTKEngine(model, inputs, mode="full")
            for unit in engine.plan.chunks.units:
                if isinstance(unit, Convolution) and unit.module.weight.dim() < 5:
                    unit.set_strategy(strategy)
            assert relative_error(engine(), expected) <= 1e-6


def test_shared_and_reused_layers_fall_back_to_the_generic_path():
    class Reuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.tied_a = nn.Linear(4, 4)
            self.tied_b = nn.Linear(4, 4)
            self.tied_b.weight = self.tied_a.weight
            self.flat = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.inner(torch.tanh(self.inner(x))))  # called twice
            h = torch.tanh(self.tied_b(torch.tanh(self.tied_a(h))))
            return self.flat(h.view(-1, 2, 2).transpose(1, 2).reshape(-1, 4)).view(x.shape[0], -1)

    torch.manual_seed(3)
    model, inputs = Reuse(), torch.randn(4, 4)
    engine = NTKEngine(model, inputs)
    structured = {unit.name for unit in engine.plan.chunks.units}
    assert "inner" not in structured and "tied_a" not in structured and "tied_b" not in structured
    expected = kernel_from_jacobian(naive_jacobian(model, inputs), "trace")
    assert relative_error(engine(), expected) <= 1e-6


def test_full_mode_layout_is_sample_major_and_consistent_with_trace(jacobians):
    model, inputs, _ = make_case("cnn_batchnorm")
    jac = jacobians("cnn_batchnorm")
    n, c, _ = jac.shape
    full = empirical_ntk(model, inputs, mode="full")
    blocks = full.view(n, c, n, c)
    assert torch.allclose(blocks[1, 2, 3, 0], jac[1, 2] @ jac[3, 0], rtol=1e-5)
    trace = empirical_ntk(model, inputs, mode="trace")
    assert relative_error(blocks.diagonal(dim1=1, dim2=3).sum(-1), trace) <= 1e-6  # two float32 computations
    single_sum = sum(empirical_ntk(model, inputs, mode=f"single:{k}") for k in range(c))
    assert relative_error(single_sum, trace) <= 1e-6


def test_single_mode_string_and_class_index_are_the_same_kernel():
    model, inputs, _ = make_case("mlp")
    assert torch.equal(empirical_ntk(model, inputs, mode="single:2"),
                       empirical_ntk(model, inputs, mode="single", class_index=2))


def test_wrt_restricts_the_differentiated_parameters():
    model, inputs, _ = make_case("cnn_batchnorm")
    names = ["3.weight", "8.weight", "11.bias"]
    expected = kernel_from_jacobian(naive_jacobian(model, inputs, wrt=names), "trace")
    assert relative_error(empirical_ntk(model, inputs, wrt=names), expected) <= 1e-6


def test_frozen_parameters_are_not_differentiated():
    model, inputs, _ = make_case("mlp")
    model[0].weight.requires_grad_(False)
    expected = kernel_from_jacobian(naive_jacobian(model, inputs), "trace")
    assert relative_error(empirical_ntk(model, inputs), expected) <= 1e-6
    assert not model[0].weight.requires_grad


def test_single_sample_and_more_normalization_layers_match_reference():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4), nn.Tanh(), nn.GroupNorm(2, 4),
                          nn.Flatten(), nn.LayerNorm(24, bias=False), nn.Linear(24, 5), nn.LayerNorm(5), nn.GELU(),
                          nn.LayerNorm(5, elementwise_affine=False), nn.Linear(5, 2))
    randomize_normalization(model).double()  # float64: the 5-wide LayerNorms amplify float32 rounding to ~1e-6
    for n in (1, 4):
        inputs = torch.randn(n, 2, 6, dtype=torch.float64)
        expected = kernel_from_jacobian(naive_jacobian(model, inputs), "full")
        assert relative_error(empirical_ntk(model, inputs, mode="full"), expected) <= 1e-12


def test_user_forward_hooks_that_change_outputs_are_respected():
    model, inputs, _ = make_case("cnn_batchnorm")
    model[0].register_forward_hook(lambda module, args, output: 2.0 * output)
    model[8].register_forward_hook(lambda module, args, output: torch.tanh(output))
    expected = kernel_from_jacobian(naive_jacobian(model, inputs), "trace")  # the deep copy keeps the hooks
    assert relative_error(empirical_ntk(model, inputs), expected) <= 1e-6


def test_embedding_with_max_norm_renormalizes_a_private_copy_of_the_table():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=0.5), nn.Flatten(), nn.Tanh(), nn.Linear(12, 2))
    with torch.no_grad():
        model[0].weight.mul_(3.0)  # rows above max_norm: the forward renormalizes them in place
    before = model[0].weight.clone()
    inputs = torch.randint(0, 10, (4, 3))
    kernel = empirical_ntk(model, inputs)
    assert torch.equal(model[0].weight, before)
    renormalized = copy.deepcopy(model)
    with torch.no_grad():
        torch.embedding_renorm_(renormalized[0].weight, torch.arange(10), 0.5, 2.0)
    renormalized[0].max_norm = None
    expected = kernel_from_jacobian(naive_jacobian(renormalized, inputs), "trace")
    assert relative_error(kernel, expected) <= 1e-6
    with pytest.raises(ValueError, match="max_norm"):
        NTKEngine(model, inputs, method="generic")


def test_multidimensional_outputs_are_flattened_per_sample():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Unflatten(1, (2, 3)))
    inputs = torch.randn(4, 3)
    kernel = empirical_ntk(model, inputs, mode="full")
    assert kernel.shape == (24, 24)
    expected = kernel_from_jacobian(naive_jacobian(model, inputs), "full")
    assert relative_error(kernel, expected) <= 1e-6


# ----------------------------------------------------------------------------- properties
@pytest.mark.parametrize("mode", ["trace", "full", "true_class"])
def test_kernel_is_symmetric_positive_semidefinite(mode):
    model, inputs, _ = make_case("resnet")
    kernel = empirical_ntk(model, inputs, mode=mode, **mode_kwargs(mode, 4, 3))
    assert torch.equal(kernel, kernel.T)
    eigenvalues = torch.linalg.eigvalsh(kernel)
    assert eigenvalues.min() >= -1e-9 * eigenvalues.max()


def test_kernel_distance_to_a_rescaled_kernel_is_zero():
    model, inputs, _ = make_case("mlp")
    kernel = empirical_ntk(model, inputs)
    assert metrics.kernel_distance(kernel, 4.0 * kernel) == 0.0
    assert abs(metrics.kernel_distance(kernel, 3.7 * kernel)) <= 1e-15
    assert metrics.kernel_distance(kernel, kernel) == 0.0


@pytest.mark.parametrize("mode", ["trace", "full"])
@pytest.mark.parametrize("case", ["cnn_batchnorm", "resnet", "transformer", "dict_inputs"])
def test_chunked_result_equals_unchunked(case, mode):
    model, inputs, output_fn = make_double_case(case)
    whole = NTKEngine(model, inputs, mode=mode, output_fn=output_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a budget this small is below the smallest plan: the engine says so
        tiny = NTKEngine(model, inputs, mode=mode, output_fn=output_fn, max_memory=20_000)
    assert whole.plan.chunks.sample_chunk == whole.n and len(whole.plan.chunks.structured_groups) == 1
    assert tiny.plan.chunks.sample_chunk < tiny.n and len(tiny.plan.chunks.structured_groups) > 1
    assert relative_error(tiny(), whole()) <= 1e-12


@pytest.mark.parametrize(("case", "mode", "fraction"), [("resnet", "trace", 5), ("cnn_batchnorm", "full", 3)])
def test_plan_fitting_a_smaller_budget_is_chunked_and_exact(case, mode, fraction):
    model, inputs, _ = make_case(case)
    model, inputs = model.double(), inputs.double()
    whole = NTKEngine(model, inputs, mode=mode)
    budget = whole.plan.chunks.estimated_bytes // fraction
    smaller = NTKEngine(model, inputs, mode=mode, max_memory=budget)
    plan = smaller.plan.chunks
    assert plan.fits and plan.estimated_bytes <= budget and not plan.direct
    assert plan.sample_chunk < smaller.n or len(plan.structured_groups) > 1 or len(plan.row_chunks) > 1
    assert relative_error(smaller(), whole()) <= 1e-12


def test_chunking_splits_wide_layers_into_channel_blocks():
    model, inputs, _ = make_case("cnn_batchnorm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = NTKEngine(model.double(), inputs.double(), max_memory=20_000)
    names = [unit.name for unit in engine.plan.chunks.units]
    assert names.count("3") > 1  # the 4→6 convolution was cut into output-channel blocks
    expected = kernel_from_jacobian(naive_jacobian(model, inputs), "trace")
    assert relative_error(engine(), expected) <= 1e-12


def test_too_small_memory_budget_warns():
    model, inputs, _ = make_case("mlp")
    with pytest.warns(UserWarning, match="max_memory"):
        NTKEngine(model, inputs, max_memory=1000)


def test_engine_reuse_with_new_params_matches_fresh_computations():
    model, inputs, _ = make_case("cnn_batchnorm")
    engine = NTKEngine(model, inputs)
    first = engine()
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
        other[1].running_mean.add_(0.3)
    second = engine(other.state_dict())  # parameters and buffers
    expected = kernel_from_jacobian(naive_jacobian(other, inputs), "trace")
    assert relative_error(second, expected) <= 1e-6
    assert relative_error(engine(), first) <= 1e-12
    params_only = engine(dict(other.named_parameters()))  # buffers from the model
    reference = copy.deepcopy(other)
    reference.load_state_dict({**other.state_dict(), **{k: v for k, v in model.state_dict().items() if "running" in k}})
    assert relative_error(params_only, kernel_from_jacobian(naive_jacobian(reference, inputs), "trace")) <= 1e-6


def test_dropout_is_off_and_train_mode_gives_the_eval_kernel():
    model, inputs, _ = make_case("cnn_batchnorm")
    model.eval()
    evaluated = empirical_ntk(model, inputs)
    model.train()
    assert torch.equal(empirical_ntk(model, inputs), evaluated)
    assert all(m.training for m in model.modules())


def test_recalibrated_batchnorm_matches_repair_reset_on_a_copy():
    model, inputs, _ = make_case("cnn_batchnorm")
    torch.manual_seed(5)
    batches = [(torch.randn(16, 3, 8, 8) * 2 + 0.5, torch.zeros(16)) for _ in range(3)]
    # REPAIR's reset_bn_stats on a private copy: reset, momentum=None, train-mode BatchNorm over the batches.
    repaired = copy.deepcopy(model).eval()
    for module in repaired.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
            module.train()
    with torch.no_grad():
        for x, _ in batches:
            repaired(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kernel = empirical_ntk(model, inputs, bn="recalibrated", bn_batches=iter(batches))
    expected = kernel_from_jacobian(naive_jacobian(repaired, inputs), "trace")
    assert relative_error(kernel, expected) <= 1e-5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert relative_error(kernel, empirical_ntk(model, inputs)) > 1e-3  # the statistics did change


def test_engine_call_leaves_model_rng_and_hooks_untouched():
    model, inputs, _ = make_case("cnn_batchnorm")
    model.train()
    model[1].eval()  # a user's per-module choice must survive
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads_required = [p.requires_grad for p in model.parameters()]
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    batches = [torch.randn(8, 3, 8, 8)]
    cpu_rng = torch.get_rng_state()
    engine = NTKEngine(model, inputs, mode="full")
    engine()
    empirical_ntk(model, inputs, bn="recalibrated", bn_batches=batches)
    assert torch.equal(torch.get_rng_state(), cpu_rng)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == grads_required
    assert all(p.grad is None for p in model.parameters())
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks


def test_works_inside_no_grad_and_inference_mode():
    model, inputs, _ = make_case("mlp")
    expected = empirical_ntk(model, inputs)
    with torch.no_grad():
        assert torch.equal(empirical_ntk(model, inputs), expected)
    with torch.inference_mode():
        assert relative_error(empirical_ntk(model, inputs), expected) <= 1e-12


def test_result_is_on_the_model_device_with_the_convention_recorded():
    model, inputs, _ = make_case("mlp")
    engine = NTKEngine(model, inputs, mode="full", keep_buffers=False)
    assert engine().device == next(model.parameters()).device
    assert engine.convention["layout"].startswith("(n*c, n*c)")
    assert engine.convention["accumulation"] == ACCUMULATION and ACCUMULATION.startswith("float64")
    assert "structured" in engine.describe() and engine.last_timings["contraction"] > 0


def test_factor_gram_products_add_their_partial_sums_in_float64():
    # 1e8 + 1 - 1e8: a float32 sum of the three products loses the 1 (float32's spacing at 1e8 is 8); partial sums
    # of one column added in float64 give it exactly (the structured Linear/Embedding units contract their factors
    # with blocked_product; they multiplied whole rows in float32 before).
    x = torch.tensor([[1e4, 1.0, 1e4]], dtype=torch.float32)
    y = torch.tensor([[1e4, 1.0, -1e4]], dtype=torch.float32)
    assert blocked_product(x, y, k_block=1).item() == 1.0
    a, b = torch.randn(5, 70, dtype=torch.float64), torch.randn(3, 70, dtype=torch.float64)
    assert relative_error(blocked_product(a, b, k_block=16), a @ b.T) <= 1e-14


# ----------------------------------------------------------------------------- errors
def test_unknown_mode_is_a_clear_error():
    model, inputs, _ = make_case("mlp")
    with pytest.raises(ValueError, match="mode must be one of .*'trace'.*got 'tr'"):
        empirical_ntk(model, inputs, mode="tr")


def test_single_mode_needs_a_valid_class_index():
    model, inputs, _ = make_case("mlp")
    with pytest.raises(ValueError, match="class_index"):
        empirical_ntk(model, inputs, mode="single")
    with pytest.raises(ValueError, match=r"class_index must be in \[0, 4\)"):
        empirical_ntk(model, inputs, mode="single:7")
    with pytest.raises(ValueError, match="disagree"):
        empirical_ntk(model, inputs, mode="single:1", class_index=2)
    with pytest.raises(ValueError, match="only used with mode='single'"):
        empirical_ntk(model, inputs, class_index=1)


def test_true_class_mode_needs_valid_targets():
    model, inputs, _ = make_case("mlp")
    with pytest.raises(ValueError, match="needs targets"):
        empirical_ntk(model, inputs, mode="true_class")
    with pytest.raises(ValueError, match="integer labels"):
        empirical_ntk(model, inputs, mode="true_class", targets=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="class indices"):
        empirical_ntk(model, inputs, mode="true_class", targets=torch.full((7,), 9))


def test_non_tensor_output_without_output_fn_is_a_clear_error():
    model, inputs, _ = make_case("dict_inputs")
    with pytest.raises(TypeError, match="output_fn"):
        empirical_ntk(model, inputs)


def test_batchnorm_in_train_mode_is_rejected():
    model, inputs, _ = make_case("cnn_batchnorm")
    with pytest.raises(ValueError, match="Train-mode BatchNorm"):
        empirical_ntk(model, inputs, bn="train")
    no_running_stats = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.Flatten())
    with pytest.raises(ValueError, match="track_running_stats"):
        empirical_ntk(no_running_stats, inputs)


def test_model_mixing_samples_across_the_batch_is_rejected():
    class BatchCentering(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x - x.mean(dim=0, keepdim=True)

    model = nn.Sequential(nn.Linear(6, 4), BatchCentering(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="depends on the other samples"):
        empirical_ntk(model, torch.randn(5, 6))


def test_bad_inputs_params_and_options_are_clear_errors():
    model, inputs, _ = make_case("mlp")
    with pytest.raises(TypeError, match="inputs must be a tensor or a mapping"):
        empirical_ntk(model, [inputs])
    with pytest.raises(ValueError, match="same first"):
        empirical_ntk(DictInputModel(), {"signal": torch.randn(5, 2, 5), "extra": torch.randn(4, 4)},
                      output_fn=dict_output)
    with pytest.raises(ValueError, match="unknown parameters"):
        empirical_ntk(model, inputs, params={"nope.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="has shape"):
        empirical_ntk(model, inputs, params={"0.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="bn_batches"):
        empirical_ntk(model, inputs, bn="recalibrated")
    with pytest.raises(ValueError, match="max_memory"):
        empirical_ntk(model, inputs, max_memory=-5)
    with pytest.raises(ValueError, match="method"):
        empirical_ntk(model, inputs, method="ntk_vp")
    with pytest.raises(ValueError, match="no trainable"):
        empirical_ntk(copy.deepcopy(model).requires_grad_(False), inputs)


# ----------------------------------------------------------------------------- plan as a value; masks; no vmap
class PositionModel(nn.Module):
    """Token + position embeddings, the positions looked up on a (1, T) buffer shared by every sample (as Hugging
    Face models do), a bare scale Parameter, and a data-dependent branch (vmap cannot run it)."""

    def __init__(self, vocab: int = 9, width: int = 6, length: int = 4, classes: int = 3, branch: bool = False):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(length, width)
        self.register_buffer("position_ids", torch.arange(length).unsqueeze(0), persistent=False)
        self.scale = nn.Parameter(torch.tensor(1.3))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)
        self.branch = branch

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tokens(ids) + self.positions(self.position_ids[:, : ids.shape[1]])
        if self.branch and bool((ids > 0).all()):  # data-dependent control flow, like an attention-mask check
            h = h * 1.0
        return self.head(torch.tanh(self.norm(h) * self.scale))  # (n, T, classes)


def test_the_plan_is_a_frozen_value_that_execution_only_reads():
    model, inputs, _ = make_case("cnn_batchnorm")
    engine = NTKEngine(model, inputs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        engine.plan.rows = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        engine.plan.chunks.sample_chunk = 1
    runner = PlanRunner(engine.plan, engine.call)  # execution needs the plan and the model call, not the engine
    kernel = torch.zeros(engine.n, engine.n, dtype=torch.float64)
    model.eval()
    runner.run({**dict(model.named_parameters()), **dict(model.named_buffers())}, [kernel])
    assert relative_error(0.5 * (kernel + kernel.T), engine()) <= 1e-12


def test_a_position_lookup_shared_by_all_samples_is_structured_and_exact():
    torch.manual_seed(4)
    model, ids = PositionModel(), torch.randint(0, 9, (5, 4))
    engine = NTKEngine(model, ids)
    assert engine.plan.broadcast and "positions.weight" not in engine.plan.generic_names
    expected = kernel_from_jacobian(naive_jacobian(model, ids), "trace")
    assert relative_error(engine(), expected) <= 1e-6
    assert relative_error(NTKEngine(model, ids, mode="full")(), kernel_from_jacobian(naive_jacobian(model, ids),
                                                                                      "full")) <= 1e-6


def test_output_mask_leaves_out_the_masked_output_coordinates():
    torch.manual_seed(5)
    model, ids = PositionModel(), torch.randint(0, 9, (4, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    jac = naive_jacobian(model, ids)  # (n, T·classes, P), position-major
    weights = mask.repeat_interleave(3, dim=1).double()  # (n, T·classes)
    masked = jac * weights[:, :, None]
    for mode in ("trace", "logit_sum", "full"):
        kernel = empirical_ntk(model, ids, mode=mode, output_mask=mask)
        assert relative_error(kernel, kernel_from_jacobian(masked, mode)) <= 1e-6, mode
    with pytest.raises(ValueError, match="output_mask must have shape"):
        empirical_ntk(model, ids, output_mask=mask[:, :3])


def test_models_vmap_cannot_run_get_a_per_sample_generic_path():
    torch.manual_seed(6)
    model, ids = PositionModel(branch=True), torch.randint(1, 9, (4, 4))
    with pytest.warns(UserWarning, match=r"'scale'.*one probe sample at a time"):
        engine = NTKEngine(model, ids)
    assert engine.plan.generic_names == ["scale"] and engine.plan.generic_strategy == "per_sample"
    assert "per_sample" in engine.describe()
    for mode in ("trace", "true_class"):
        extra = {"targets": torch.arange(4) % 12} if mode == "true_class" else {}
        expected = kernel_from_jacobian(naive_jacobian(model, ids), mode, targets=extra.get("targets"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            kernel = empirical_ntk(model, ids, mode=mode, **extra)
        assert relative_error(kernel, expected) <= 1e-6, mode


def test_a_parameter_no_strategy_can_differentiate_is_a_clear_error_naming_it():
    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(3, 2)
            self.gain = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.from_numpy((x * self.gain).numpy()))  # fails whenever gain requires grad

    with pytest.raises(ValueError, match=r"cannot differentiate the parameters 'gain'"):
        NTKEngine(Opaque(), torch.randn(3, 3))
