"""Planning an eNTK computation: which layers get a structured rule, how it is chunked — a frozen plan (private).

:func:`make_plan` runs a few small forwards and returns a :class:`KernelPlan`; execution
(:mod:`._execution`) only reads it. A layer qualifies for a structured rule only if what the rule assumes is
observed: the stock ``forward`` of a supported class, its own unshared parameters, exactly one call per
forward pass, and tensors whose first dimension is the sample dimension (checked at two batch sizes, so that a
Linear layer applied to a flattened ``(n·T, d)`` or a sequence-first ``(T, n, d)`` tensor is not mistaken for
per-sample rows) — or a first dimension of 1 at every batch size: a layer computing something every sample
shares (a position-embedding lookup on ``(1, T)`` position ids). Such a *broadcast* layer's output is expanded
to the batch during the engine's forwards, which turns the one shared output into a per-sample one whose
gradient δ_i is sample i's share; the plan accepts that only if the logits are unchanged by the expansion and
each sample's δ equals the δ of that sample run alone. The same forwards measure what the memory planner
needs: forward-graph bytes per sample (through ``saved_tensors_hooks``) and activation sizes.

Parameters without a rule take the generic path: ``vmap(jacrev)`` over samples, or, for a model ``vmap``
cannot run (data-dependent control flow such as Hugging Face's attention-mask checks), one sample at a time
with batched backward passes over the output rows — tried here on two samples, so a call never fails halfway.
"""
from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ._calling import ModelCall
from ._chunking import ChunkPlan, plan_chunks
from ._generic import GENERIC_STRATEGIES, write_generic_jacobian
from ._structured import Convolution, Tapper, make_unit, structured_kind

__all__ = ["KernelPlan", "cotangent_rows", "make_plan"]


@dataclass(frozen=True)
class KernelPlan:
    """Everything one engine call needs besides the parameter values; built once, never modified.

    ``rows``: the cotangent rows v_k, (R, n, c): a call adds Σ_k (v_k·J_i)(v_k·J_j) over them (R = c one-hot
    rows for ``trace``/``full``; rows that are zero for every sample are dropped). ``taps``: the structured
    layers, indexed by each unit's ``module_id``. ``layers``: the layer names (the module owning each
    differentiated parameter, in ``named_parameters()`` order); ``unit_layers[i]`` is the layer of
    ``chunks.units[i]``, ``generic_layers[name]`` the layer of a generic parameter.
    """

    n: int
    num_outputs: int
    full: bool
    dtype: torch.dtype
    device: torch.device
    rows: torch.Tensor
    taps: tuple[tuple[str, nn.Module], ...]
    clone_outputs: frozenset[int]
    clone_inputs: frozenset[int]
    broadcast: frozenset[int]
    chunks: ChunkPlan
    layers: tuple[str, ...]
    unit_layers: tuple[int, ...]
    generic_layers: Mapping[str, int]
    identity_rows: bool = False  # the rows are the c one-hot logits of every sample (the generic path's default)
    generic_strategy: str = "vmap"
    notes: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """The side of H: n, or n·c for ``full``."""
        return self.n * (self.num_outputs if self.full else 1)

    @property
    def generic_names(self) -> list[str]:
        return [name for group in self.chunks.generic_groups for name in group]


@dataclass
class _Structure:
    modules: list[tuple[str, nn.Module]] = field(default_factory=list)  # tapped layers; a unit's module_id indexes it
    units: list = field(default_factory=list)  # output side first
    generic: list[tuple[str, int]] = field(default_factory=list)  # (name, numel) of parameters without a rule
    clone_outputs: set[int] = field(default_factory=set)
    clone_inputs: set[int] = field(default_factory=set)
    broadcast: set[int] = field(default_factory=set)
    graph_bytes: int = 0
    activation_bytes: int = 0
    generic_graph_bytes: int = 0


class _SavedBytes:
    """Bytes of distinct storages autograd saves for backward, excluding parameters and buffers."""

    def __init__(self, excluded: set[int]) -> None:
        self.excluded = excluded
        self.storages: dict[int, int] = {}

    def add(self, tensor: torch.Tensor) -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
            return
        if storage.data_ptr() not in self.excluded:
            self.storages[storage.data_ptr()] = storage.nbytes()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.add(tensor)
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def cotangent_rows(mode: str, n: int, c: int, *, dtype: torch.dtype, device: torch.device,
                   class_index: int | None, labels: torch.Tensor | None,
                   output_mask: torch.Tensor | None) -> torch.Tensor:
    """(R, n, c) cotangents v_k: one-hot logits (trace/full), ones (logit_sum), e_k, e_{y_i}; masked per sample.

    ``output_mask`` (n, c) zeroes the output coordinates a sample does not have (padded tokens); rows that are
    then zero for every sample are dropped (they add nothing to H).
    """
    if mode in ("trace", "full"):
        rows = torch.eye(c, dtype=dtype, device=device).unsqueeze(1).repeat(1, n, 1)
    elif mode == "logit_sum":
        rows = torch.ones(1, n, c, dtype=dtype, device=device)
    elif mode == "single":
        rows = torch.zeros(1, n, c, dtype=dtype, device=device)
        rows[0, :, class_index] = 1
    else:
        rows = torch.zeros(1, n, c, dtype=dtype, device=device)
        rows[0, torch.arange(n), labels.to(device)] = 1
    if output_mask is not None:
        rows = rows * output_mask.to(device=device, dtype=dtype).unsqueeze(0)
        if mode != "full":  # full keeps every (sample, logit) index of H, zero or not
            rows = rows[rows.flatten(1).any(dim=1)]
    return rows


def _candidates(model: nn.Module, method: str, differentiated: set[str],
                ) -> list[tuple[str, nn.Module, str, str | None, str | None]]:
    if method == "generic":
        return []
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    found = []
    for prefix, module in model.named_modules():
        kind = structured_kind(module)
        if kind is None:
            continue
        own = {name: p for name, p in module._parameters.items() if p is not None}
        full = {name: f"{prefix}.{name}" if prefix else name for name in own}
        if not any(full[name] in differentiated for name in own) or any(uses[id(p)] > 1 for p in own.values()):
            continue
        weight = full.get("weight") if full.get("weight") in differentiated else None
        bias = full.get("bias") if full.get("bias") in differentiated else None
        found.append((prefix, module, kind, weight, bias))
    return found


def _planning_forward(call: ModelCall, values: Mapping[str, torch.Tensor], modules: list[nn.Module], samples: int,
                      broadcast: set[int] = frozenset(), cotangent: torch.Tensor | None = None,
                      ) -> tuple[Tapper, _SavedBytes, torch.Tensor, list | None]:
    """One forward of the first ``samples`` probe samples with planning taps; with ``cotangent``, also the
    output gradients δ at the broadcast taps."""
    excluded = {v.untyped_storage().data_ptr() for v in values.values()}
    saved = _SavedBytes(excluded)
    tapper = Tapper(modules, planning=True, broadcast=broadcast)
    with tapper, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        tapper.batch = samples
        tapper.active = True
        try:
            logits = call.to_logits(call.forward(values, slice(0, samples)), samples)
        finally:
            tapper.active = False
    for module_records in tapper.records:
        for record in module_records:
            saved.add(record.inputs)
            saved.add(record.output)
    deltas = None
    if cotangent is not None:
        taps = [tapper.records[index][0].output for index in sorted(broadcast)]
        deltas = list(torch.autograd.grad(logits, taps, cotangent, allow_unused=True)) if logits.requires_grad \
            else [None] * len(taps)
    return tapper, saved, logits.detach(), deltas


def _layout(record, samples: int) -> str | None:
    """``"sample"`` (first dimension = samples), ``"broadcast"`` (first dimension 1, shared) or None."""
    if record.inputs.dim() < 1 or record.output.dim() < 2:
        return None
    if record.inputs.shape[0] == samples and record.output.shape[0] == samples:
        return "sample"
    if samples > 1 and record.inputs.shape[0] == 1 and record.output.shape[0] == 1:
        return "broadcast"
    return None


def _broadcast_is_exact(call: ModelCall, values, modules: list[nn.Module], samples: int, broadcast: set[int],
                        reference: torch.Tensor, dtype: torch.dtype) -> tuple[Tapper, _SavedBytes] | None:
    """The expanded forward when it reproduces the logits and every sample's δ at the broadcast taps; else None."""
    generator = torch.Generator().manual_seed(0)
    cotangent = torch.randn(reference.shape, generator=generator, dtype=torch.float64).to(reference)
    try:
        tapper, saved, logits, together = _planning_forward(call, values, modules, samples, broadcast, cotangent)
        tolerance = 1e3 * torch.finfo(logits.dtype).eps * (reference.abs().max().item() + 1e-30)
        if logits.shape != reference.shape or (logits - reference).abs().max().item() > tolerance:
            return None
        for i in range(samples):
            alone = _planning_forward(call.single(i), values, modules, 1, broadcast, cotangent[i : i + 1])[3]
            for batched, single in zip(together, alone):
                if (batched is None) != (single is None):
                    return None
                if batched is not None:
                    scale = single.abs().max().item() + 1e-30
                    if (batched[i : i + 1] - single).abs().max().item() > 1e3 * torch.finfo(dtype).eps * scale:
                        return None
    except (RuntimeError, ValueError, TypeError, IndexError):  # the expansion broke the model's forward
        return None
    return tapper, saved


def _macs_per_sample(kind: str, module: nn.Module, out_numel: int, info: dict) -> float:
    """A rough forward cost, for the planner's backward-depth estimate."""
    if kind == "conv":
        return module.weight.numel() * out_numel / module.out_channels
    if kind in ("linear", "linear_t"):
        return module.weight.numel() * out_numel / info["out_features"]
    return float(out_numel)


def _check_generic_embeddings(model: nn.Module, generic: set[str]) -> None:
    for prefix, module in model.named_modules():
        name = f"{prefix}.weight" if prefix else "weight"
        if isinstance(module, nn.Embedding) and name in generic and (module.max_norm is not None
                                                                     or module.scale_grad_by_freq):
            raise ValueError(
                f"embedding {prefix!r} has max_norm or scale_grad_by_freq, which the generic torch.func path cannot "
                "differentiate per sample (in-place renormalization / batch-frequency scaling under vmap); use "
                "method='auto' with an unshared embedding table")


def _features(kind: str, module: nn.Module) -> dict:
    if kind == "linear":
        return {"in_features": module.in_features, "out_features": module.out_features}
    if kind == "linear_t":  # weight (in, out): the transpose of nn.Linear's
        return {"in_features": module.weight.shape[0], "out_features": module.weight.shape[1]}
    return {}


def _discover(call: ModelCall, values: dict[str, torch.Tensor], *, wrt: list[str], method: str,
              dtype: torch.dtype) -> _Structure:
    """Run the planning forwards and build the structured units and the list of generic parameters."""
    differentiated = set(wrt)
    itemsize = torch.finfo(dtype).bits // 8
    candidates = _candidates(call.model, method, differentiated)
    modules = [module for _, module, *_ in candidates]
    first = min(call.n, 3)
    tapper, saved, reference, _ = _planning_forward(call, values, modules, first)
    second = _planning_forward(call, values, modules, first - 1)[0] if first > 1 else None
    layouts: dict[int, str] = {}
    for index in range(len(candidates)):
        records = tapper.records[index]
        layout = _layout(records[0], first) if len(records) == 1 else None
        if layout is not None and second is not None:
            other = second.records[index]
            other_layout = _layout(other[0], first - 1) if len(other) == 1 else None
            if first - 1 == 1 and layout == "broadcast":
                other_layout = "broadcast" if other_layout == "sample" else None
            if (other_layout != layout or other[0].inputs.shape[1:] != records[0].inputs.shape[1:]
                    or other[0].output.shape[1:] != records[0].output.shape[1:]):
                layout = None
        if layout is not None:
            layouts[index] = layout
    broadcast = {index for index, layout in layouts.items() if layout == "broadcast"}
    if broadcast:
        expanded = _broadcast_is_exact(call, values, modules, first, broadcast, reference, dtype)
        if expanded is None:
            layouts = {index: layout for index, layout in layouts.items() if index not in broadcast}
            broadcast = set()
        else:
            tapper, saved = expanded
    structure = _Structure()
    accepted = []  # (forward position, candidate, info, clone_output, clone_input, broadcast)
    for index, candidate in enumerate(candidates):
        if index not in layouts:
            continue
        record = tapper.records[index][0]
        kind, module = candidate[2], candidate[1]
        if kind == "embedding" and record.inputs.is_floating_point():
            continue
        if kind != "embedding" and not record.inputs.is_floating_point():
            continue
        out_numel = record.output[0].numel()
        info = {"in_numel": record.inputs[0].numel(), "out_numel": out_numel, "in_dim": record.inputs.dim(),
                "in_shape": tuple(record.inputs.shape[1:]), "out_shape": tuple(record.output.shape[1:]),
                **_features(kind, module)}
        info["macs"] = _macs_per_sample(kind, module, out_numel, info)
        position = tapper.sequence.index(index)
        accepted.append((position, candidate, info, tapper.returned[index][0]._version != 0,
                         record.inputs._version != record.input_version, index in broadcast))
    accepted.sort(key=lambda item: item[0])  # forward order
    total_macs = sum(item[2]["macs"] for item in accepted) or 1.0
    after = total_macs
    for module_id, (_, (prefix, module, kind, weight, bias), info, clone_output, clone_input, shared) in enumerate(
            accepted):
        after -= info["macs"]
        info["depth"] = 0.02 + after / total_macs  # share of the forward between this layer and the output
        structure.modules.append((prefix, module))
        if clone_output:
            structure.clone_outputs.add(module_id)
        if clone_input:
            structure.clone_inputs.add(module_id)
        if shared:
            structure.broadcast.add(module_id)
        structure.units.append(make_unit(kind, prefix, module, module_id, weight, bias, info, itemsize))
    for unit in structure.units:
        if isinstance(unit, Convolution):
            unit.choose_strategy()
    structure.units.reverse()  # output side first: the planner packs groups from the output down
    covered = {name for unit in structure.units for name in unit.parameter_names}
    structure.generic = [(name, values[name].numel()) for name in wrt if name not in covered]
    _check_generic_embeddings(call.model, {name for name, _ in structure.generic})
    structure.graph_bytes = saved.total // first + 1
    sizes = [item[2]["out_numel"] for item in accepted] + [item[2]["in_numel"] for item in accepted]
    structure.activation_bytes = max(sizes, default=0) * itemsize
    if structure.generic:
        leaves = {name: (value.detach().requires_grad_() if name in differentiated else value)
                  for name, value in values.items()}
        try:
            saved_all = _planning_forward(call, leaves, [], first)[1]
        except Exception as error:  # noqa: BLE001 - the forward cannot even run with these parameters as leaves
            raise _undifferentiable([name for name, _ in structure.generic], [_failure("forward", error)]) from error
        structure.generic_graph_bytes = saved_all.total // first + 1
        if not accepted:
            structure.activation_bytes = max(saved_all.storages.values(), default=0) // first
    return structure


def _generic_strategy(call: ModelCall, values: dict[str, torch.Tensor], names: list[str], rows: torch.Tensor,
                      identity_rows: bool, dtype: torch.dtype) -> tuple[str, tuple[str, ...]]:
    """The first generic strategy that runs on two probe samples, and a note when it is not ``vmap``."""
    samples = slice(0, min(call.n, 2))
    count = samples.stop
    numel = sum(values[name].numel() for name in names)
    row_slice = None if identity_rows else rows[:, samples].transpose(0, 1)
    errors = []
    for strategy in GENERIC_STRATEGIES:
        out = torch.empty(count, rows.shape[0], numel, dtype=dtype, device=call.device)
        try:
            write_generic_jacobian(strategy, call, values, names, samples, row_slice, out)
        except Exception as error:  # noqa: BLE001 - any failure of a strategy means trying the next one
            errors.append(_failure(strategy, error))
            continue
        if strategy == "vmap":
            return strategy, ()
        shown = ", ".join(repr(name) for name in names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
        note = (f"the parameters {shown} have no structured eNTK rule and torch.func.vmap cannot run this model "
                f"({errors[0]}); their Jacobian is computed one probe sample at a time ({call.n} forward passes "
                "per kernel instead of one)")
        return strategy, (note,)
    raise _undifferentiable(names, errors)


def _failure(what: str, error: Exception) -> str:
    return f"{what}: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


def _undifferentiable(names: list[str], errors: list[str]) -> ValueError:
    shown = ", ".join(repr(name) for name in names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    return ValueError(f"the eNTK cannot differentiate the parameters {shown} per sample: they have no structured "
                      "rule (a shared/tied weight, a bare nn.Parameter or a custom layer) and the generic path "
                      f"failed — {'; '.join(errors)}. Exclude them with wrt= (names of the parameters to "
                      "differentiate) or use layers with a structured rule (Linear, Conv, norms, Embedding)")


def make_plan(call: ModelCall, values: dict[str, torch.Tensor], *, wrt: list[str], method: str, full: bool,
              rows: torch.Tensor, identity_rows: bool, num_outputs: int, dtype: torch.dtype, max_memory: int,
              layer_of: Mapping[str, str]) -> KernelPlan:
    """Plan the computation of H on ``call``'s probe samples for parameter values like ``values``."""
    structure = _discover(call, values, wrt=wrt, method=method, dtype=dtype)
    itemsize = torch.finfo(dtype).bits // 8
    n = call.n
    size = n * (num_outputs if full else 1)
    fixed = 2 * size * size * 8 + rows.numel() * itemsize + sum(v.numel() * v.element_size()
                                                                 for v in call.batched.values())
    fixed += max([u.contract_bytes(n, rows.shape[0]) for u in structure.units if u.gram], default=0)
    chunks = plan_chunks(n=n, rows=rows.shape[0], full=full, itemsize=itemsize, budget=max_memory,
                         fixed_bytes=fixed, graph_bytes=structure.graph_bytes,
                         activation_bytes=structure.activation_bytes, units=structure.units,
                         generic=structure.generic, generic_graph_bytes=structure.generic_graph_bytes)
    strategy, notes = "vmap", ()
    if structure.generic:
        with warnings.catch_warnings():  # PyTorch's "no batching rule, falling back" performance warnings
            warnings.simplefilter("ignore", UserWarning)
            strategy, notes = _generic_strategy(call, values, [name for name, _ in structure.generic], rows,
                                                identity_rows, dtype)
    layers = tuple(dict.fromkeys(layer_of[name] for name in wrt))
    index = {layer: i for i, layer in enumerate(layers)}
    return KernelPlan(
        n=n, num_outputs=num_outputs, full=full, dtype=dtype, device=call.device, rows=rows,
        taps=tuple(structure.modules), clone_outputs=frozenset(structure.clone_outputs),
        clone_inputs=frozenset(structure.clone_inputs), broadcast=frozenset(structure.broadcast), chunks=chunks,
        layers=layers, unit_layers=tuple(index[layer_of[unit.parameter_names[0]]] for unit in chunks.units),
        generic_layers={name: index[layer_of[name]] for name, _ in structure.generic},
        identity_rows=identity_rows, generic_strategy=strategy, notes=notes)
