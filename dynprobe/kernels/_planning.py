"""Which layers of a model get a structured per-sample-gradient rule, learned from two small forwards (private).

A layer qualifies only if what the rule assumes is observed: the stock ``forward`` of a supported class, its own
unshared parameters, exactly one call per forward pass, and tensors whose first dimension is the sample
dimension (checked at two batch sizes, so that a Linear layer applied to a flattened ``(n·T, d)`` or a
sequence-first ``(T, n, d)`` tensor is not mistaken for per-sample rows). The same forwards measure what the
memory planner needs: forward-graph bytes per sample (through ``saved_tensors_hooks``) and activation sizes.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ._structured import Convolution, Tapper, make_unit, structured_kind

__all__ = ["Structure", "discover_structure"]


@dataclass
class Structure:
    modules: list[tuple[str, nn.Module]] = field(default_factory=list)  # tapped layers; a unit's module_id indexes it
    units: list = field(default_factory=list)  # output side first
    generic: list[tuple[str, int]] = field(default_factory=list)  # (name, numel) of parameters without a rule
    clone_outputs: set[int] = field(default_factory=set)
    clone_inputs: set[int] = field(default_factory=set)
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


def _candidates(engine, differentiated: set[str]) -> list[tuple[str, nn.Module, str, str | None, str | None]]:
    model = engine.model
    if engine.method == "generic":
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


def _planning_forward(engine, values, modules: list[nn.Module], samples: int) -> tuple[Tapper, _SavedBytes]:
    excluded = {v.untyped_storage().data_ptr() for v in values.values()}
    saved = _SavedBytes(excluded)
    tapper = Tapper(modules, planning=True)
    with tapper, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        tapper.active = True
        try:
            engine._to_logits(engine._forward(values, slice(0, samples)), samples)
        finally:
            tapper.active = False
    for module_records in tapper.records:
        for record in module_records:
            saved.add(record.inputs)
            saved.add(record.output)
    return tapper, saved


def _per_sample_layout(record, samples: int) -> bool:
    return (record.inputs.dim() >= 1 and record.output.dim() >= 2 and record.inputs.shape[0] == samples
            and record.output.shape[0] == samples)


def _macs_per_sample(kind: str, module: nn.Module, out_numel: int) -> float:
    """A rough forward cost, for the planner's backward-depth estimate."""
    if kind == "conv":
        return module.weight.numel() * out_numel / module.out_channels
    if kind == "linear":
        return module.weight.numel() * out_numel / module.out_features
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


def discover_structure(engine, values: dict[str, torch.Tensor]) -> Structure:
    """Run the planning forwards and build the structured units and the list of generic parameters."""
    differentiated = set(engine.wrt)
    itemsize = torch.finfo(engine.dtype).bits // 8
    candidates = _candidates(engine, differentiated)
    modules = [module for _, module, *_ in candidates]
    first = min(engine.n, 3)
    tapper, saved = _planning_forward(engine, values, modules, first)
    second = _planning_forward(engine, values, modules, first - 1)[0] if first > 1 else None
    structure = Structure()
    accepted = []  # (forward position, candidate, info, clone_output, clone_input)
    for index, candidate in enumerate(candidates):
        records = tapper.records[index]
        if len(records) != 1 or not _per_sample_layout(records[0], first):
            continue
        record = records[0]
        if second is not None:
            other = second.records[index]
            if (len(other) != 1 or not _per_sample_layout(other[0], first - 1)
                    or other[0].inputs.shape[1:] != record.inputs.shape[1:]
                    or other[0].output.shape[1:] != record.output.shape[1:]):
                continue
        kind, module = candidate[2], candidate[1]
        if kind == "embedding" and record.inputs.is_floating_point():
            continue
        if kind != "embedding" and not record.inputs.is_floating_point():
            continue
        out_numel = record.output[0].numel()
        info = {"in_numel": record.inputs[0].numel(), "out_numel": out_numel, "in_dim": record.inputs.dim(),
                "in_shape": tuple(record.inputs.shape[1:]), "out_shape": tuple(record.output.shape[1:]),
                "macs": _macs_per_sample(kind, module, out_numel)}
        position = tapper.sequence.index(index)
        accepted.append((position, candidate, info, tapper.returned[index][0]._version != 0,
                         record.inputs._version != record.input_version))
    accepted.sort(key=lambda item: item[0])  # forward order
    total_macs = sum(item[2]["macs"] for item in accepted) or 1.0
    after = total_macs
    for module_id, (_, (prefix, module, kind, weight, bias), info, clone_output, clone_input) in enumerate(accepted):
        after -= info["macs"]
        info["depth"] = 0.02 + after / total_macs  # share of the forward between this layer and the output
        structure.modules.append((prefix, module))
        if clone_output:
            structure.clone_outputs.add(module_id)
        if clone_input:
            structure.clone_inputs.add(module_id)
        structure.units.append(make_unit(kind, prefix, module, module_id, weight, bias, info, itemsize))
    for unit in structure.units:
        if isinstance(unit, Convolution):
            unit.choose_strategy()
    structure.units.reverse()  # output side first: the planner packs groups from the output down
    covered = {name for unit in structure.units for name in unit.parameter_names}
    structure.generic = [(name, values[name].numel()) for name in engine.wrt if name not in covered]
    _check_generic_embeddings(engine.model, {name for name, _ in structure.generic})
    structure.graph_bytes = saved.total // first + 1
    sizes = [info["out_numel"] for _, _, info, _, _ in accepted] + [info["in_numel"] for _, _, info, _, _ in accepted]
    structure.activation_bytes = max(sizes, default=0) * itemsize
    if structure.generic:
        leaves = {name: (value.detach().requires_grad_() if name in differentiated else value)
                  for name, value in values.items()}
        saved_all = _planning_forward(engine, leaves, [], first)[1]
        structure.generic_graph_bytes = saved_all.total // first + 1
        if not accepted:
            structure.activation_bytes = max(saved_all.storages.values(), default=0) // first
    return structure
