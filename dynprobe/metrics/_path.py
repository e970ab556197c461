"""The straight line between two states of one architecture, and the loss measured along it (for the barrier).

``Path.between`` aligns two endpoints (state dicts or modules) with the model's own tensors; ``Path.at(α)`` is
``torch.lerp(θ_b, θ_a, α)`` on every floating-point parameter and buffer; :func:`path_sums` evaluates the task's
loss (or 0/1 error) at each α through ``torch.func.functional_call`` — the user's module is never loaded. A path
whose ``at(α)`` returns None has loaded θ(α) into the model itself, which is then called as it is (FSDP2, where
no process holds θ whole: :func:`dynprobe.metrics.barrier.loss_barrier_in_place`).
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, Union

import torch
from torch import nn

from dynprobe._util.batchnorm import reestimate_batchnorm, running_stat_layers
from dynprobe._util.inputs import Inputs, OutputFn, forward
from dynprobe._util.tasks import Task

__all__ = ["Path", "PathLike", "StateLike", "norm_layer_keys", "path_sums"]

StateLike = Union[Mapping[str, torch.Tensor], nn.Module]


@dataclass
class Path:
    """The straight line between two full states (canonical name → tensor) of ``model``."""

    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    interpolated: list[str]  # floating entries that differ (as objects) between a and b
    canonical_name: dict[str, str]  # any parameter/buffer name (tied aliases included) → its canonical name

    @classmethod
    def between(cls, model: nn.Module, params_a: StateLike, params_b: StateLike) -> Path:
        own, canonical_name = _model_entries(model)
        a = _endpoint(params_a, "params_a", own, canonical_name)
        b = _endpoint(params_b, "params_b", own, canonical_name)
        buffers = {canonical_name[name] for name, _ in model.named_buffers(remove_duplicate=False)}
        interpolated = []
        for name, tensor in own.items():
            floating = tensor.is_floating_point() or tensor.is_complex()
            if floating and a[name] is not b[name]:
                interpolated.append(name)
            if name in buffers:
                # Buffers are tiny: private copies guarantee that nothing a forward does reaches the caller's.
                a[name] = a[name].clone()
            if name not in interpolated:
                b[name] = a[name]  # integer buffers (num_batches_tracked) are copied from params_a
            elif name in buffers:
                b[name] = b[name].clone()
        return cls(a, b, interpolated, canonical_name)

    def identical(self) -> bool:
        """Whether both endpoints hold the same values everywhere (then B = 0 exactly, without evaluating)."""
        return all(torch.equal(self.a[name], self.b[name]) for name in self.interpolated)

    def at(self, alpha: float) -> dict[str, torch.Tensor]:
        """The state ``torch.lerp(θ_b, θ_a, α)``: θ_a itself at α = 1, θ_b at α = 0."""
        if alpha == 1.0:
            return dict(self.a)
        if alpha == 0.0:
            return dict(self.b)
        state = dict(self.a)
        for name in self.interpolated:
            state[name] = torch.lerp(self.b[name], self.a[name], alpha)
        return state


class PathLike(Protocol):
    """What :func:`path_sums` needs of a path: the state at α for ``functional_call`` (a :class:`Path`), or None
    once the path has loaded θ(α) into the model itself."""

    def at(self, alpha: float) -> dict[str, torch.Tensor] | None: ...


def _model_entries(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    own: dict[str, torch.Tensor] = {}
    canonical_name: dict[str, str] = {}
    first_name_of: dict[int, str] = {}
    named = itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        # Tied weights appear under several names; functional_call wants one value per tensor.
        first = first_name_of.setdefault(id(tensor), name)
        canonical_name[name] = first
        if first == name:
            own[name] = tensor
    return own, canonical_name


def _endpoint(params: StateLike, argument: str, own: dict[str, torch.Tensor], canonical_name: dict[str, str]
              ) -> dict[str, torch.Tensor]:
    if isinstance(params, nn.Module):
        source = dict(itertools.chain(params.named_parameters(remove_duplicate=False),
                                      params.named_buffers(remove_duplicate=False)))
        missing = sorted(set(canonical_name) - set(source))
        if missing:
            raise ValueError(f"{argument} is a module without the model's entries {_some(missing)}; pass a module of "
                             "the same architecture, or a state_dict")
    elif isinstance(params, Mapping):
        source = params
    else:
        raise TypeError(f"{argument} must be a mapping name -> tensor (e.g. model.state_dict()) or an nn.Module; "
                        f"got {type(params).__name__}")
    unknown = sorted(str(k) for k in source if k not in canonical_name)
    if unknown:
        raise ValueError(f"{argument} has entries the model does not have: {_some(unknown)}; pass a state_dict of the "
                         "same architecture (the model's names look like " + _some(sorted(own)) + ")")
    given: dict[str, Any] = {}
    for name, value in source.items():
        given.setdefault(canonical_name[name], value)
    state = {}
    for name, tensor in own.items():
        value = given.get(name, tensor)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{argument}[{name!r}] must be a tensor; got {type(value).__name__}")
        if value.shape != tensor.shape:
            raise ValueError(f"{argument}[{name!r}] has shape {tuple(value.shape)} but the model's has "
                             f"{tuple(tensor.shape)}")
        state[name] = value.detach().to(device=tensor.device, dtype=tensor.dtype)
    return state


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def norm_layer_keys(model: nn.Module, canonical_name: dict[str, str]) -> dict[str, str]:
    """Running-statistics entries (``"<layer>.running_mean"``, ``_var``, ``num_batches_tracked``) → their canonical
    state keys, for the normalization layers that keep running statistics."""
    keys = {}
    for prefix, module in running_stat_layers(model):
        dot = f"{prefix}." if prefix else ""
        for entry in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(module, entry, None) is not None:
                keys[dot + entry] = canonical_name[dot + entry]
    return keys


def path_sums(model: nn.Module, path: PathLike, alphas: list[float], batches: list[tuple[Inputs, torch.Tensor]], *,
              task: Task, metric: str, output_fn: OutputFn, norm_keys: dict[str, str] | None = None,
              reset_batches: list[Inputs] | None = None) -> tuple[torch.Tensor, int]:
    """Σ over the data's units of the loss (or 0/1 error) at every α, float64 (A,) on the model's device; and the
    number of units. With ``reset_batches``, BatchNorm statistics are re-estimated at every α first (the one
    re-estimation, :func:`dynprobe._util.batchnorm.reestimate_batchnorm`: cumulative average, dropout off)."""
    sums: list[torch.Tensor] = []
    count_total: torch.Tensor | None = None
    labels_checked = False
    for alpha in alphas:
        state = path.at(alpha)  # None: θ(α) is in the model itself, called as it is
        if reset_batches:
            assert state is not None, "BatchNorm re-estimation needs the state of a functional path"
            statistics = reestimate_batchnorm(model, reset_batches,
                                              forward=lambda inputs, state=state: forward(model, inputs, state))
            keys = norm_keys or {}
            state.update({keys[name]: value for name, value in statistics.items() if name in keys})
        total, count_total = None, None
        for inputs, targets in batches:
            outputs = task.check_outputs(output_fn(forward(model, inputs, state)), targets)
            if not labels_checked:  # the labels of all batches, once per call (one host read), before any loss
                task.check_target_range(torch.cat([t.reshape(-1).to(targets.device) for _, t in batches]),
                                        task.num_outputs(outputs))
                labels_checked = True
            part, count = task.loss_sum(outputs, targets)
            if metric == "error":
                part = (count - task.correct(outputs, targets)).to(torch.float64)
            total = part if total is None else total + part
            count_total = count if count_total is None else count_total + count
        assert total is not None  # the caller rejects empty data
        sums.append(total)
    assert count_total is not None
    return torch.stack(sums), int(count_total)  # the one synchronization of the call
