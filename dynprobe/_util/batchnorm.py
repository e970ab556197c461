"""BatchNorm running statistics: the one re-estimation used everywhere, and what per-sample Jacobians allow.

Running statistics are what a normalization layer uses in eval mode. They are stale whenever the parameters
were not the ones the statistics were collected with: at initialization (mean 0, variance 1), at a point on a
straight line between two trained networks, at a snapshot whose statistics a linearized model will freeze.
:func:`reestimate_batchnorm` re-estimates them for the parameters at hand, as REPAIR's ``reset_bn_stats`` does
(Jordan, Sedghi, Saukh, Entezari & Neyshabur 2022): statistics reset, one pass over input batches, each batch
weighing the same (PyTorch's ``momentum=None`` cumulative average). The loss barrier (``loss_barrier(reset_bn=)``),
the switching experiment (``reset_bn_batches=``) and the eNTK (``bn="recalibrated"``) all call it.

Train-mode BatchNorm normalizes each sample with statistics of the whole batch, so f(x_i) depends on the other
samples and the per-sample Jacobian of eq. (3) of the two-phase paper is not defined; the eNTK therefore always
runs BatchNorm on running statistics (:func:`check_running_statistics`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

from .inputs import forward as call_model
from .inputs import inputs_to
from .modules import device_of, eval_mode

__all__ = ["batch_inputs", "batchnorm_modules", "check_running_statistics", "recalibrated_statistics",
           "reestimate_batchnorm", "running_stat_layers"]


def batchnorm_modules(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """``(name, module)`` of every BatchNorm layer (1d/2d/3d, SyncBatchNorm), in ``named_modules()`` order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def running_stat_layers(model: nn.Module) -> list[tuple[str, _NormBase]]:
    """``(name, module)`` of every normalization layer that keeps running statistics (BatchNorm, and
    InstanceNorm with ``track_running_stats=True``): the layers :func:`reestimate_batchnorm` re-estimates."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, _NormBase) and m.track_running_stats and m.running_mean is not None]


def check_running_statistics(model: nn.Module) -> None:
    """Raise if some BatchNorm layer would normalize with batch statistics even in eval mode."""
    for name, module in batchnorm_modules(model):
        if not module.track_running_stats or module.running_mean is None or module.running_var is None:
            raise ValueError(
                f"BatchNorm layer {name!r} has no running statistics (track_running_stats=False), so it normalizes "
                "with statistics of the whole batch even in eval mode: per-sample Jacobians (eq. 3) cannot express "
                "that. Use BatchNorm with track_running_stats=True (then bn='eval' or bn='recalibrated' work), or "
                "a per-sample normalization (LayerNorm, GroupNorm)."
            )


def batch_inputs(batch: object) -> object:
    """The model input of one batch: a tensor, a mapping, or the first element of an ``(inputs, ...)`` tuple."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("a batch is an empty tuple/list; expected inputs or (inputs, targets)")
        return batch[0]
    if isinstance(batch, (torch.Tensor, Mapping)):
        return batch
    raise TypeError(f"batches must be tensors, mappings or (inputs, ...) tuples; got {type(batch).__name__}")


def _statistics_dims(module: _NormBase, x: torch.Tensor) -> tuple[list[int], bool]:
    """Dimensions a batch's statistics reduce over, and whether they are per instance (then averaged)."""
    if isinstance(module, _InstanceNorm):
        return list(range(x.dim() - module._get_no_batch_dim() + 1, x.dim())), True  # spatial positions
    return [0, *range(2, x.dim())], False


def reestimate_batchnorm(model: nn.Module, batches: Iterable, *, forward: Callable[[object], object] | None = None,
                         in_place: bool = False) -> dict[str, torch.Tensor]:
    """Re-estimate the running statistics of every normalization layer on ``batches`` (REPAIR's reset).

    For each layer with running statistics (:func:`running_stat_layers`), over the B batches the pass reaches:

        running_mean = (1/B) Σ_b mean_b(x),    running_var = (1/B) Σ_b var_b(x) (unbiased),
        num_batches_tracked = B,

    with mean_b, var_b over the batch and spatial positions (BatchNorm) or per instance and then averaged over
    the batch (InstanceNorm) — exactly PyTorch's train-mode update with ``momentum=None`` after
    ``reset_running_stats()``, accumulated in float64 and returned in each buffer's dtype. During the pass each
    such layer's output is its train-mode output (the batch normalized with its own statistics), so deeper layers
    see what they would see in training; every other module runs in eval mode (dropout off: the estimate is
    deterministic and draws no random numbers). Every module's train/eval flag is restored afterwards, and the
    model's buffers change only with ``in_place=True``.

    Args:
        model: the model whose normalization layers are re-estimated.
        batches: an iterable of batches, each passed to ``forward``; iterated once.
        forward: ``forward(batch)`` runs the model on one batch — for instance through
            ``torch.func.functional_call`` with other parameter values (the statistics are then those of the
            forward at those values). Default: the model called on the batch's inputs (a tensor, a mapping, or the
            first element of an ``(inputs, targets)`` tuple), moved to the model's device.
        in_place: also copy the new statistics into the model's buffers (for a private copy of a model).

    Returns:
        ``{buffer name: tensor}`` (``"<layer>.running_mean"``, ``"<layer>.running_var"``,
        ``"<layer>.num_batches_tracked"``) for every layer the forward reached; a layer it never reached keeps
        its statistics and is absent.
    """
    layers = running_stat_layers(model)
    if forward is None:
        device = device_of(model)

        def forward(batch: object) -> object:
            return call_model(model, inputs_to(batch_inputs(batch), device))

    sums: dict[str, list] = {name: [0.0, 0.0, 0] for name, _ in layers}

    def hook_for(name: str):
        def hook(module: _NormBase, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            dims, per_instance = _statistics_dims(module, x)
            x64 = x.detach().to(torch.float64)
            mean, var = x64.mean(dim=dims), x64.var(dim=dims, unbiased=True)
            if per_instance:
                mean, var = mean.reshape(-1, module.num_features).mean(0), var.reshape(-1, module.num_features).mean(0)
            sums[name][0] = sums[name][0] + mean
            sums[name][1] = sums[name][1] + var
            sums[name][2] += 1
            if per_instance:
                return F.instance_norm(x, None, None, module.weight, module.bias, use_input_stats=True,
                                       eps=module.eps)
            return F.batch_norm(x, None, None, module.weight, module.bias, training=True, momentum=0.0,
                                eps=module.eps)
        return hook

    handles = [module.register_forward_hook(hook_for(name), prepend=True) for name, module in layers]
    count = 0
    try:
        with torch.no_grad(), eval_mode(model):
            for batch in batches:
                forward(batch)
                count += 1
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("no batches to re-estimate the BatchNorm statistics on: give at least one batch of inputs")
    statistics: dict[str, torch.Tensor] = {}
    for name, module in layers:
        total_mean, total_var, seen = sums[name]
        if seen == 0:
            continue
        prefix = f"{name}." if name else ""
        statistics[prefix + "running_mean"] = (total_mean / seen).to(module.running_mean.dtype)
        statistics[prefix + "running_var"] = (total_var / seen).to(module.running_var.dtype)
        if module.num_batches_tracked is not None:
            statistics[prefix + "num_batches_tracked"] = torch.tensor(
                seen, dtype=module.num_batches_tracked.dtype, device=module.num_batches_tracked.device)
        if in_place:
            with torch.no_grad():
                module.running_mean.copy_(statistics[prefix + "running_mean"])
                module.running_var.copy_(statistics[prefix + "running_var"])
                if module.num_batches_tracked is not None:
                    module.num_batches_tracked.fill_(seen)
    return statistics


def recalibrated_statistics(model: nn.Module, batches: Iterable, run: Callable[[object], object],
                            ) -> dict[str, torch.Tensor]:
    """The former spelling of ``reestimate_batchnorm(model, batches, forward=run)``, kept while callers move."""
    return reestimate_batchnorm(model, batches, forward=run)
