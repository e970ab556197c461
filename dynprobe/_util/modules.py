"""Small helpers on ``nn.Module`` state shared by the probe, the eNTK engine, the barrier and the ghosts.

Everything here obeys one rule: whatever the user's model looked like before a call (parameters, buffers,
per-module train/eval flags, RNG streams), it looks exactly the same afterwards.
"""
from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "device_of",
    "eager_compiled",
    "eval_mode",
    "flatten_parameters",
    "is_compiled",
    "layer_name",
    "layer_slices",
    "max_abs_differences",
    "parse_part_name",
    "part_name",
    "preserved_rng",
    "rng_devices",
    "same_tensors",
    "trainable_parameters",
    "uncompiled",
]


def device_of(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (or buffer); CPU for a module without tensors."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter with ``requires_grad``, in ``named_parameters()`` order.

    This is the θ of the paper's eq. (1): the vector whose trajectory the probe records.
    """
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def flatten_parameters(params: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``vec(θ)``: the parameters concatenated in order, as one detached vector of ``dtype`` on their device."""
    return torch.cat([p.detach().reshape(-1).to(dtype) for p in params])


def part_name(name: str, start: int, stop: int) -> str:
    """The name of elements ``start:stop`` of the flattened parameter tensor ``name``: ``name[start:stop]`` (the one
    owner of this notation; :func:`parse_part_name` reads it back)."""
    return f"{name}[{start}:{stop}]"


def parse_part_name(text: str) -> tuple[str, slice | None]:
    """``(tensor name, slice of its flattened elements)`` of a :func:`part_name`; ``(text, None)`` for a whole
    tensor's name."""
    match = re.fullmatch(r"(.+)\[(\d+):(\d+)\]", text)
    if match is None:
        return text, None
    return match.group(1), slice(int(match.group(2)), int(match.group(3)))


def layer_name(parameter_name: str) -> str:
    """The layer that owns a parameter: its name without the last component (``features.0`` for
    ``features.0.weight``); ``""`` for a parameter of the root module (shown as ``(root)``)."""
    return parameter_name.rpartition(".")[0]


def layer_slices(named_params: Iterable[tuple[str, torch.Tensor | int]]) -> list[tuple[str, slice]]:
    """The layers of ``vec(θ)`` and the slice of it each one owns, in first-appearance order.

    ``named_params`` lists ``(name, parameter)`` — or ``(name, numel)``, as the run manifest records them — in
    the order of ``vec(θ)``. A layer is the module that owns a parameter tensor (:func:`layer_name`);
    ``named_parameters()`` yields a module's own parameters together, so each layer is one contiguous slice.
    Per-layer views of a run (per-layer C, per-layer eNTK, per-layer ghost separation) all use this split.
    Should a layer's parameters ever not be adjacent, each adjacent run of them is a layer of its own, the
    later ones named ``name#2``, ``name#3``, ... (the slices always tile ``vec(θ)`` exactly).
    """
    layers: list[tuple[str, slice]] = []
    seen: dict[str, int] = {}
    previous, offset = None, 0
    for name, tensor in named_params:
        numel = int(tensor) if isinstance(tensor, int) else int(tensor.numel())
        layer = layer_name(name)
        if layers and layer == previous:
            layers[-1] = (layers[-1][0], slice(layers[-1][1].start, offset + numel))
        else:
            seen[layer] = seen.get(layer, 0) + 1
            layers.append((layer if seen[layer] == 1 else f"{layer}#{seen[layer]}", slice(offset, offset + numel)))
        previous, offset = layer, offset + numel
    return layers


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the duration of the block, then restore each flag exactly.

    ``module.train(previous)`` would not do: a user may keep, say, a frozen BatchNorm in eval mode inside a
    model that is training, and that per-module choice must survive.
    """
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield module
    finally:
        for m, training in flags:
            m.training = training


def rng_devices(*tensors_or_modules: nn.Module | torch.Tensor | Mapping) -> list[int]:
    """CUDA device indices whose RNG state a computation on these objects may touch."""
    indices: set[int] = set()
    for obj in tensors_or_modules:
        if isinstance(obj, nn.Module):
            tensors = list(obj.parameters()) + list(obj.buffers())
        elif isinstance(obj, Mapping):
            tensors = [t for t in obj.values() if isinstance(t, torch.Tensor)]
        else:
            tensors = [obj]
        indices.update(t.device.index or 0 for t in tensors if t.device.type == "cuda")
    return sorted(indices)


@contextlib.contextmanager
def preserved_rng(devices: list[int] | None = None) -> Iterator[None]:
    """Run the block and put the CPU (and the given CUDA devices') RNG state back as it was.

    A thin wrapper of ``torch.random.fork_rng`` that never warns about device lists.
    """
    with torch.random.fork_rng(devices=devices or [], enabled=True):
        yield


def max_abs_differences(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """``max |a_k − b_k|`` for each pair of tensors, as one float64 vector ``[len(a)]`` on the device of ``a[0]``.

    The one definition of "how far apart / equal are these tensors" (the control ghost's canary, the vectorized
    shadow's drift, "equal bit for bit" before reusing an evaluation): it never synchronizes with the device, so it
    can run on every training step and be read later with other values (:func:`dynprobe._util.transfers.read_together`).

    - Entry k is 0 exactly when ``a_k == b_k`` elementwise (``torch.equal``'s rule: −0.0 equals 0.0); NaN when
      either side holds a NaN (a NaN equals nothing), and also for equal infinities (∞ − ∞ is NaN: a replica holding
      infinities has diverged anyway). So "equal" is ``entry == 0`` and NaN counts as different.
    - float32/float64 pairs of one dtype: differences in that dtype with fused ``_foreach`` kernels (exact while the
      values are within a factor 2 of each other, by Sterbenz's lemma — the case of a drift — one rounding
      otherwise), the maximum taken in float64. Other pairs (integers, bool, half precision, mixed dtypes): in
      float64. Empty tensors: 0. ``b_k`` is moved to ``a_k``'s device; the shapes must match.
    """
    if len(a) != len(b):
        raise ValueError(f"max_abs_differences needs two lists of the same length; got {len(a)} and {len(b)}")
    if not a:
        return torch.zeros(0, dtype=torch.float64)
    device = a[0].device
    results: list[torch.Tensor | None] = [None] * len(a)
    fused: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for k, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise ValueError(f"max_abs_differences: tensor {k} has shape {tuple(x.shape)} on one side and "
                             f"{tuple(y.shape)} on the other")
        if x.numel() == 0:
            results[k] = torch.zeros((), dtype=torch.float64, device=device)
        elif x.dtype == y.dtype and x.dtype in (torch.float32, torch.float64):
            fused.setdefault((x.dtype, x.device), []).append(k)
        else:
            y = y.detach().to(x.device)
            results[k] = (x.detach().double() - y.double()).abs().amax()
    for (_, group_device), indices in fused.items():
        differences = torch._foreach_sub([a[k].detach() for k in indices],
                                         [b[k].detach().to(group_device) for k in indices])
        for k, value in zip(indices, torch._foreach_norm(differences, math.inf, dtype=torch.float64)):
            results[k] = value
    return torch.stack([r.to(device) for r in results])


def same_tensors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Whether two states (tensors by name) are equal bit for bit: the same names, shapes, dtypes and values
    (:func:`max_abs_differences` is 0 for every tensor; one device synchronisation)."""
    if a.keys() != b.keys():
        return False
    names = [name for name in a if a[name] is not b[name]]
    if any(a[n].shape != b[n].shape or a[n].dtype != b[n].dtype for n in names):
        return False
    return not names or bool((max_abs_differences([a[n] for n in names], [b[n] for n in names]) == 0).all())


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or one of its submodules is compiled with ``torch.compile`` (an ``OptimizedModule``, or
    ``module.compile()`` in place)."""
    for module in model.modules():
        if type(module).__name__ == "OptimizedModule" or getattr(module, "_compiled_call_impl", None) is not None:
            return True
    return False


def uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) compiles — its ``_orig_mod``, the name
    ``torch.compile`` documents for the original module — or ``model`` itself when it is no such wrapper.

    The probe computes on this module (eNTK, evaluations, ghosts): calling the user's compiled wrapper with other
    shapes, under ``torch.func`` transforms or with probe hooks on submodules would recompile it and break its graph,
    and a compiled function that reaches its recompile limit runs eagerly from then on — the user's training would
    change. The parameters are the same tensors, so nothing is copied."""
    while type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


@contextlib.contextmanager
def eager_compiled() -> Iterator[None]:
    """Run the probe's own work with every compiled function and module it reaches executed eagerly, never
    recompiled: ``torch.compiler.set_stance("force_eager")`` (torch ≥ 2.6). This covers a module compiled in place
    (``module.compile()``), which has no original module to compute on (:func:`uncompiled`); on older torch nothing
    changes and such a module may be recompiled by the probe's calls."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    with set_stance("force_eager") if set_stance is not None else contextlib.nullcontext():
        yield
