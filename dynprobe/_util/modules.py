"""Small helpers on ``nn.Module`` state shared by the probe, the eNTK engine, the barrier and the ghosts.

Everything here obeys one rule: whatever the user's model looked like before a call (parameters, buffers,
per-module train/eval flags, RNG streams), it looks exactly the same afterwards.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

__all__ = [
    "device_of",
    "eval_mode",
    "flatten_parameters",
    "layer_name",
    "layer_slices",
    "preserved_rng",
    "rng_devices",
    "same_tensors",
    "trainable_parameters",
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


def same_tensors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Whether two states (tensors by name) are equal bit for bit: the same names, shapes, dtypes and values."""
    return a.keys() == b.keys() and all(
        a[name] is b[name] or (a[name].shape == b[name].shape and a[name].dtype == b[name].dtype
                               and torch.equal(a[name], b[name].to(a[name].device))) for name in a)
