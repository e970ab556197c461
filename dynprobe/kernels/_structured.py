"""Closed-form per-sample gradients of common layers for the eNTK engine (private).

In eval mode a model maps each sample independently, so one *batched* backward pass of a cotangent row v
(``autograd.grad(f, z, v)``) gives every sample's gradient with respect to a layer output z, δ_i = ∂(vᵀf_i)/∂z_i,
without per-sample parameter gradients. The engine taps the outputs of supported layers (forward hooks that
only mark z as a differentiation target) and derives their parameters' per-sample gradients from (input,
δ) — the structured derivatives of Novak et al. 2022 ("Fast finite width neural tangent kernel"), the same
algebra as BackPACK's and Opacus's per-sample gradients:

* ``nn.Linear`` on (n, d_in) inputs — a :class:`LinearGram` unit: g_i = δ_i ⊗ a_i, so
  ``⟨g_i, g_j⟩ = (a_i·a_j)(δ_i·δ_j)``: the layer's kernel is (input Gram) ∘ (output-gradient Gram), O(n²(d_in +
  d_out)) instead of O(n² d_in d_out), and no per-sample gradient is formed.
* ``nn.Linear`` on (n, ..., d_in) sequences — :class:`LinearSequence`: g_i = Σ_t δ_it ⊗ a_it (one batched matmul).
  Hugging Face's ``Conv1D`` (GPT-2's projections, y = x W + b with W of shape (d_in, d_out)) is the same layer
  with a transposed weight and gets the same rules (a kernel does not see the orientation of a gradient).
* ``nn.Conv1d/2d/3d`` — :class:`Convolution`: the weight gradient of a convolution whose groups are the samples
  (``torch.nn.grad.conv*_weight`` with ``groups = n·groups``): one oneDNN call, no im2col copy.
* ``BatchNorm`` (eval: running statistics), ``LayerNorm``, ``GroupNorm`` — :class:`Normalization`:
  g_γ = Σ δ ⊙ x̂, g_β = Σ δ.
* ``nn.Embedding`` — :class:`EmbeddingGram`: ``⟨g_i, g_j⟩ = Σ_{t,t'} [idx_it = idx_jt'] δ_it·δ_jt'`` (padding
  index excluded), never a per-sample copy of the table. ``max_norm`` renormalizes the looked-up rows (of the
  engine's private copy) during the forward, which the rule follows; ``scale_grad_by_freq`` rescales the
  *training* gradient by in-batch frequencies, which is not part of the Jacobian and is ignored.

A module is handled this way only if its class keeps the stock ``forward``, it is not parametrized, none of
its parameters is shared with another module, and it is called exactly once per forward pass; everything
else falls back to the generic path (:mod:`._generic`). A module whose input has a first dimension of 1 shared
by every sample (a position-embedding lookup on ``(1, T)`` ids) is *broadcast*: its output is expanded to the
batch in the forward (:class:`Tapper`), after which the same rules give each sample its own gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from ._chunking import UnitCost, blocked_product

__all__ = ["Record", "Tapper", "make_unit", "structured_kind"]

_KIND_OF_FORWARD = {
    nn.Linear.forward: "linear",
    nn.Conv1d.forward: "conv",
    nn.Conv2d.forward: "conv",
    nn.Conv3d.forward: "conv",
    _BatchNorm.forward: "batchnorm",
    nn.SyncBatchNorm.forward: "batchnorm",
    nn.LayerNorm.forward: "layernorm",
    nn.GroupNorm.forward: "groupnorm",
    nn.Embedding.forward: "embedding",
}
# Layers of other libraries with the algebra of a supported one, by (module, class name): Hugging Face's Conv1D
# (GPT-2's projections) is y = x W + b with W of shape (in, out), a Linear layer with a transposed weight.
_KIND_OF_CLASS = {("transformers.pytorch_utils", "Conv1D"): "linear_t"}
_CONV_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}
_GRAM_TEMP_BYTES = 64 * 2**20  # blocking target for the temporaries of factor-Gram contractions


def structured_kind(module: nn.Module) -> str | None:
    """The structured rule for this module (``"linear"``, ``"conv"``, ...), or None for the generic path."""
    kind = _KIND_OF_FORWARD.get(getattr(type(module), "forward", None))
    if kind is None:
        kind = _KIND_OF_CLASS.get((type(module).__module__, type(module).__qualname__))
    if kind is None or parametrize.is_parametrized(module):
        return None
    if set(name for name, p in module._parameters.items() if p is not None) - {"weight", "bias"}:
        return None
    if kind == "batchnorm" and not module.track_running_stats:
        return None  # uses batch statistics even in eval mode: the engine rejects such models before this
    return kind


@dataclass
class Record:
    """What a tap saw in one forward: the module input (detached), its output (the differentiation target)."""

    inputs: torch.Tensor
    output: torch.Tensor
    extra: tuple = ()
    input_version: int = 0
    output_version: int = 0
    cache: dict = field(default_factory=dict)  # row-independent intermediates (e.g. an unfolded input)


class Tapper:
    """Forward hooks that mark the outputs of structured modules as differentiation targets.

    While ``active``, each call of a tapped module appends a :class:`Record`. The hook never changes values:
    it makes the output a grad-requiring leaf when nothing upstream requires grad, and returns a clone only
    for modules whose output the model later modifies in place (``clone_outputs``), so that δ is the gradient
    with respect to the value the module produced. A ``broadcast`` module (input and output of first dimension
    1, shared by every sample) has its output expanded to ``batch`` samples (a view, same values), so that the
    batched backward gives each sample its own δ; its input is expanded alike. Hooks are prepended so that user
    hooks see our output.
    """

    def __init__(self, modules: list[nn.Module], *, clone_outputs: set[int] = frozenset(),
                 clone_inputs: set[int] = frozenset(), broadcast: set[int] = frozenset(),
                 planning: bool = False) -> None:
        self.modules = modules
        self.clone_outputs = set(clone_outputs)
        self.clone_inputs = set(clone_inputs)
        self.broadcast = set(broadcast)
        self.planning = planning
        self.active = False
        self.batch = 1  # samples in the current forward (set by the caller before each forward)
        self.records: list[list[Record]] = [[] for _ in modules]
        self.returned: list[list[torch.Tensor]] = [[] for _ in modules]
        self.sequence: list[int] = []  # tapped module indices in call order
        self._handles: list = []

    def __enter__(self) -> Tapper:
        for index, module in enumerate(self.modules):
            self._handles.append(module.register_forward_hook(self._hook(index), prepend=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.records = [[] for _ in self.modules]
        self.returned = [[] for _ in self.modules]
        self.sequence = []

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any):
            if not self.active or not args or not isinstance(output, torch.Tensor):
                return None
            x = args[0]
            if index in self.broadcast and output.dim() and output.shape[0] == 1 and x.dim() and x.shape[0] == 1:
                shape = (self.batch, *output.shape[1:])
                tap = output.expand(shape) if output.requires_grad else output.detach().expand(shape).requires_grad_()
                inputs = x.detach().expand(self.batch, *x.shape[1:])
            else:
                tap = output if output.requires_grad else output.detach().requires_grad_()
                inputs = x.detach().clone() if index in self.clone_inputs else x.detach()
            extra = (module.running_mean, module.running_var) if isinstance(module, _BatchNorm) else ()
            self.records[index].append(Record(inputs, tap, extra, x._version, tap._version))
            self.sequence.append(index)
            if self.planning or index in self.clone_outputs:
                result = tap.clone()
                if self.planning:
                    self.returned[index].append(result)
                return result
            return None if tap is output else tap
        return hook


def _conv_padded_input(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The input as the convolution sees it, and the padding left to pass to the weight-gradient call."""
    dims = x.dim() - 2
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return F.pad(x, module._reversed_padding_repeated_twice, mode=mode), (0,) * dims
    return x, tuple(module.padding)


class _Unit:
    """One module's differentiated parameters (or a block of its output channels). Subclasses give the rule."""

    gram = False  # True: contributes through factor Grams (no slab columns)

    def __init__(self, name: str, module: nn.Module, module_id: int, weight: str | None, bias: str | None,
                 info: dict, itemsize: int, channels: tuple[int, int] | None = None) -> None:
        self.name, self.module, self.module_id = name, module, module_id
        self.weight, self.bias = weight, bias
        self.info, self.itemsize = info, itemsize
        self.channels = channels
        self.parameter_names = [p for p in (weight, bias) if p is not None]
        self.cost = self._cost()

    def _cost(self) -> UnitCost:
        raise NotImplementedError

    def _base_cost(self, columns: int, form_bytes: int, factor_fixed: int = 0, factor_row: int = 0) -> UnitCost:
        return UnitCost(columns=columns, delta_bytes=self.info["out_numel"] * self.itemsize, module_id=self.module_id,
                        form_bytes=form_bytes, factor_bytes_fixed=factor_fixed, factor_bytes_row=factor_row,
                        depth=self.info.get("depth", 1.0), split=None)

    def blocks(self, delta: torch.Tensor, record: Record) -> list[torch.Tensor]:
        """Per-sample gradients of one output row, as (m, k) blocks whose widths sum to ``cost.columns``."""
        raise NotImplementedError

    def form(self, delta: torch.Tensor, record: Record, out: torch.Tensor) -> None:
        """Write the per-sample gradients (m, columns) of one row into ``out`` (a slab view)."""
        offset = 0
        for block in self.blocks(delta, record):
            out[:, offset : offset + block.shape[1]].copy_(block)
            offset += block.shape[1]


class Convolution(_Unit):
    """``nn.Conv1d/2d/3d``: per-sample weight gradients, by one of two equivalent strategies.

    ``"grouped"``: the weight gradient of a convolution whose groups are the samples (``torch.nn.grad.conv*_weight``
    with ``groups = m·groups``), no extra memory. ``"unfold"``: the input unfolded once per forward (im2col,
    cached for every row) and one batched matmul per row, ``δ_i (C_out × S) @ U_i (S × C_in k)``. oneDNN's grouped
    weight gradient is slow for few output positions and many channels, the unfold costs memory and a copy:
    :meth:`choose_strategy` picks one from the layer's shapes when the engine is planned.
    """

    strategy = "grouped"

    def _cost(self) -> UnitCost:
        m = self.module
        c0, c1 = self.channels or (0, m.out_channels)
        weight_columns = (c1 - c0) * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        self.weight_columns = weight_columns if self.weight else 0
        columns = self.weight_columns + ((c1 - c0) if self.bias else 0)
        sliced = (c1 - c0) * self.info["out_numel"] // m.out_channels if self.channels else 0
        cost = self._base_cost(columns, (weight_columns + sliced + self.info["in_numel"]) * self.itemsize)
        if self.strategy == "unfold":
            cost.cache_bytes = self._unfolded_numel() * self.itemsize
        if m.groups == 1 and c1 - c0 > 1:
            cost.split = self._split
        return cost

    def _unfolded_numel(self) -> int:
        m = self.module
        positions = self.info["out_numel"] // m.out_channels
        return positions * m.in_channels * math.prod(m.kernel_size)

    def _split(self, parts: int) -> list[_Unit]:
        c0, c1 = self.channels or (0, self.module.out_channels)
        size = math.ceil((c1 - c0) / parts)
        pieces = []
        for start in range(c0, c1, size):
            piece = Convolution(self.name, self.module, self.module_id, self.weight, self.bias, self.info,
                                self.itemsize, (start, min(start + size, c1)))
            piece.set_strategy(self.strategy)
            pieces.append(piece)
        return pieces

    def set_strategy(self, strategy: str) -> None:
        self.strategy = strategy
        self.cost = self._cost()

    def _unfolded(self, record: Record) -> torch.Tensor:
        """The input as (m·groups, positions, C_in/groups · ∏k), computed once per forward and cached."""
        key = "unfolded"
        if key not in record.cache:
            m = self.module
            x, padding = _conv_padded_input(m, record.inputs)
            samples = x.shape[0]
            if x.dim() == 3:  # Conv1d as a 2-D convolution of height 1
                x = x.unsqueeze(2)
                kernel, dilation, stride, padding = (1, *m.kernel_size), (1, *m.dilation), (1, *m.stride), (0, *padding)
            else:
                kernel, dilation, stride = m.kernel_size, m.dilation, m.stride
            columns = F.unfold(x, kernel, dilation, padding, stride)  # (m, C_in·∏k, positions)
            columns = columns.view(samples, m.groups, -1, columns.shape[-1]).transpose(2, 3)
            record.cache[key] = columns.reshape(samples * m.groups, columns.shape[2], columns.shape[3])
        return record.cache[key]

    def blocks(self, delta: torch.Tensor, record: Record) -> list[torch.Tensor]:
        m = self.module
        samples = delta.shape[0]
        result = []
        if self.channels is not None:
            delta = delta[:, self.channels[0] : self.channels[1]]
        blocks = delta.shape[1]
        if self.weight:
            if self.strategy == "unfold":
                grad = torch.bmm(delta.reshape(samples * m.groups, blocks // m.groups, -1), self._unfolded(record))
            else:
                x, padding = _conv_padded_input(m, record.inputs)
                weight_size = (samples * blocks, m.in_channels // m.groups, *m.kernel_size)
                grad = _CONV_WEIGHT_GRAD[x.dim() - 2](
                    x.reshape(1, -1, *x.shape[2:]), weight_size, delta.reshape(1, -1, *delta.shape[2:]),
                    m.stride, padding, m.dilation, samples * m.groups)
            result.append(grad.reshape(samples, -1))
        if self.bias:
            result.append(delta.sum(dim=tuple(range(2, delta.dim()))))
        return result

    def choose_strategy(self) -> None:
        """``"unfold"`` for few output positions (≤ 64) or a narrow im2col row (C_in/groups · ∏k ≤ 32), else grouped.

        The grouped weight gradient's cost grows with the number of groups times the work per group, which is
        poorly parallelized when each group has few output positions or a narrow input row; the unfolded matmul is
        one large GEMM there, at the price of the unfold's copy and memory. A fixed rule rather than a timing at
        planning: timings on a shared machine are noisy, and the plan (and its memory) should not depend on the
        load of the moment (``tests/benchmarks/bench_entk.py`` measures both).
        """
        m = self.module
        if len(m.kernel_size) == 3 or not self.weight:
            return
        positions = self.info["out_numel"] // m.out_channels
        row_width = (m.in_channels // m.groups) * math.prod(m.kernel_size)
        self.set_strategy("unfold" if positions <= 64 or row_width <= 32 else "grouped")


class LinearSequence(_Unit):
    """``nn.Linear`` applied to (n, ..., d_in): per-sample gradients Σ_t δ_t ⊗ a_t by one batched matmul."""

    def _cost(self) -> UnitCost:
        in_features, out_features = self.info["in_features"], self.info["out_features"]
        c0, c1 = self.channels or (0, out_features)
        self.weight_columns = (c1 - c0) * in_features if self.weight else 0
        columns = self.weight_columns + ((c1 - c0) if self.bias else 0)
        cost = self._base_cost(columns, ((c1 - c0) * in_features + self.info["out_numel"]) * self.itemsize)
        if c1 - c0 > 1:
            cost.split = self._split
        return cost

    def _split(self, parts: int) -> list[_Unit]:
        c0, c1 = self.channels or (0, self.info["out_features"])
        size = math.ceil((c1 - c0) / parts)
        return [LinearSequence(self.name, self.module, self.module_id, self.weight, self.bias, self.info,
                               self.itemsize, (start, min(start + size, c1))) for start in range(c0, c1, size)]

    def blocks(self, delta: torch.Tensor, record: Record) -> list[torch.Tensor]:
        samples = delta.shape[0]
        result = []
        delta = delta.reshape(samples, -1, delta.shape[-1])
        if self.channels is not None:
            delta = delta[..., self.channels[0] : self.channels[1]]
        if self.weight:
            inputs = record.inputs.reshape(samples, -1, record.inputs.shape[-1])
            result.append(torch.bmm(delta.transpose(1, 2), inputs).view(samples, -1))
        if self.bias:
            result.append(delta.sum(dim=1))
        return result


class Normalization(_Unit):
    """BatchNorm (running statistics), LayerNorm, GroupNorm: g_γ = Σ δ ⊙ x̂ and g_β = Σ δ per sample.

    x̂ is recomputed for every row (one fused multiply-add) rather than cached: caching it saves little and
    would cost the layer's input size in memory.
    """

    def _cost(self) -> UnitCost:
        reference = self.module.weight if self.module.weight is not None else self.module.bias
        self.weight_columns = reference.numel() if self.weight else 0
        columns = self.weight_columns + (reference.numel() if self.bias else 0)
        return self._base_cost(columns, 2 * self.info["out_numel"] * self.itemsize)

    def _reduce_dims(self, ndim: int) -> tuple[int, ...]:
        """Dimensions summed per sample: all but (sample, channel); for LayerNorm all but (sample, *shape)."""
        if isinstance(self.module, nn.LayerNorm):
            return tuple(range(1, ndim - len(self.module.normalized_shape)))
        return tuple(range(2, ndim))

    def _normalized(self, record: Record) -> torch.Tensor:
        m, x = self.module, record.inputs
        if isinstance(m, _BatchNorm):  # eval mode: the running statistics the forward used (captured by the tap)
            mean, var = record.extra
            shape = (1, -1) + (1,) * (x.dim() - 2)
            scale = torch.rsqrt(var + m.eps)
            return torch.addcmul((-mean * scale).view(shape), x, scale.view(shape))  # (x − μ)/σ in one pass
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, eps=m.eps)
        return F.layer_norm(x, m.normalized_shape, eps=m.eps)

    def blocks(self, delta: torch.Tensor, record: Record) -> list[torch.Tensor]:
        samples = delta.shape[0]
        reduce = self._reduce_dims(delta.dim())
        result = []
        if self.weight:
            x_hat = self._normalized(record)
            if isinstance(self.module, nn.LayerNorm) or delta.dim() == 2:
                product = delta * x_hat
                result.append((product.sum(dim=reduce) if reduce else product).reshape(samples, -1))
            else:  # per channel: a fused multiply-reduce over positions
                result.append(torch.linalg.vecdot(delta.flatten(2), x_hat.flatten(2)))
        if self.bias:
            result.append((delta.sum(dim=reduce) if reduce else delta).reshape(samples, -1))
        return result


class LinearGram(_Unit):
    """``nn.Linear`` on (n, d_in): kernel ``(A Aᵀ + 1_bias) ∘ (Δ Δᵀ)`` from stored factors, never g_i itself."""

    gram = True

    def _cost(self) -> UnitCost:
        return self._base_cost(0, 0, factor_fixed=self.info["in_features"] * self.itemsize,
                               factor_row=self.info["out_features"] * self.itemsize)

    def contract_bytes(self, n: int, rows: int) -> int:
        """Temporaries of :meth:`contract` (blocked to at most ``_GRAM_TEMP_BYTES``)."""
        return min(_GRAM_TEMP_BYTES, n * n * rows * rows * 24 + 2 * n * n * 8)

    def new_factors(self, n: int, rows: int, dtype: torch.dtype, device: torch.device) -> dict:
        return {"a": torch.empty(n, self.info["in_features"], dtype=dtype, device=device) if self.weight else None,
                "d": torch.empty(n, rows, self.info["out_features"], dtype=dtype, device=device)}

    def store(self, factors: dict, delta: torch.Tensor, record: Record, samples: slice, row: int) -> None:
        if factors["a"] is not None and row == 0:
            factors["a"][samples] = record.inputs
        factors["d"][samples, row] = delta

    def contract(self, factors: dict, out: torch.Tensor, full: bool) -> None:
        a, d = factors["a"], factors["d"]
        n, rows, width = d.shape
        block = max(1, min(n, _GRAM_TEMP_BYTES // max(1, n * rows * rows * 24)))
        flat = d.reshape(n * rows, width) if full else d.reshape(n, rows * width)
        for start in range(0, n, block):
            stop = min(start + block, n)
            if a is not None:
                inputs_gram = blocked_product(a[start:stop], a)
                if self.bias:
                    inputs_gram += 1.0
            else:
                inputs_gram = torch.ones(stop - start, n, dtype=torch.float64, device=d.device)
            if full:
                deltas = blocked_product(flat[start * rows : stop * rows], flat).view(stop - start, rows, n, rows)
                out.view(n, rows, n, rows)[start:stop] += inputs_gram[:, None, :, None] * deltas
            else:
                out[start:stop] += inputs_gram * blocked_product(flat[start:stop], flat)


class EmbeddingGram(_Unit):
    """``nn.Embedding``: ``Σ_{t,t'} [idx_it = idx_jt' ≠ padding_idx] ⟨δ_it, δ_jt'⟩`` from stored indices and δ."""

    gram = True

    def _cost(self) -> UnitCost:
        tokens = self.info["in_numel"]
        return self._base_cost(0, 0, factor_fixed=tokens * 8,
                               factor_row=tokens * self.module.embedding_dim * self.itemsize)

    def contract_bytes(self, n: int, rows: int) -> int:
        return min(_GRAM_TEMP_BYTES, (n * self.info["in_numel"] * rows) ** 2 * 24)

    def new_factors(self, n: int, rows: int, dtype: torch.dtype, device: torch.device) -> dict:
        tokens = self.info["in_numel"]
        return {"idx": torch.empty(n, tokens, dtype=torch.long, device=device),
                "d": torch.empty(n, rows, tokens, self.module.embedding_dim, dtype=dtype, device=device)}

    def store(self, factors: dict, delta: torch.Tensor, record: Record, samples: slice, row: int) -> None:
        if row == 0:
            factors["idx"][samples] = record.inputs.reshape(delta.shape[0], -1)
        factors["d"][samples, row] = delta.reshape(delta.shape[0], -1, self.module.embedding_dim)

    def contract(self, factors: dict, out: torch.Tensor, full: bool) -> None:
        idx, d = factors["idx"], factors["d"]
        n, rows, tokens, width = d.shape
        padding = self.module.padding_idx
        valid = idx != padding if padding is not None else torch.ones_like(idx, dtype=torch.bool)
        # Rows of the factor matrix: (sample, token) with the rows concatenated (sum modes) or apart (full).
        per_sample = tokens * (rows if full else 1)
        x = d.reshape(n * per_sample, width) if full else d.permute(0, 2, 1, 3).reshape(n * tokens, rows * width)
        block = max(1, min(n, int(math.sqrt(_GRAM_TEMP_BYTES / 16)) // max(1, per_sample)))
        out4 = out.view(n, rows, n, rows) if full else None
        for i0 in range(0, n, block):
            i1 = min(i0 + block, n)
            for j0 in range(0, n, block):
                j1 = min(j0 + block, n)
                gram = blocked_product(x[i0 * per_sample : i1 * per_sample], x[j0 * per_sample : j1 * per_sample])
                same = (idx[i0:i1].reshape(-1, 1) == idx[j0:j1].reshape(1, -1))
                same &= valid[i0:i1].reshape(-1, 1) & valid[j0:j1].reshape(1, -1)
                same = same.view(i1 - i0, tokens, j1 - j0, tokens)
                if full:
                    gram = gram.view(i1 - i0, rows, tokens, j1 - j0, rows, tokens)
                    masked = gram * same[:, None, :, :, None, :]
                    out4[i0:i1, :, j0:j1, :] += masked.sum(dim=(2, 5))
                else:
                    gram = gram.view(i1 - i0, tokens, j1 - j0, tokens)
                    out[i0:i1, j0:j1] += (gram * same).sum(dim=(1, 3))


def make_unit(kind: str, name: str, module: nn.Module, module_id: int, weight: str | None, bias: str | None,
              info: dict, itemsize: int) -> _Unit:
    """The unit class for a module kind, given what the planning forward saw (``info``: shapes per sample)."""
    if kind in ("linear", "linear_t"):
        cls = LinearGram if info["in_dim"] == 2 else LinearSequence
    elif kind == "conv":
        cls = Convolution
    elif kind == "embedding":
        cls = EmbeddingGram
    else:
        cls = Normalization
    return cls(name, module, module_id, weight, bias, info, itemsize)
