"""BatchNorm for per-sample Jacobians: which modes are possible, and ``bn="recalibrated"`` statistics (private).

Train-mode BatchNorm normalizes each sample with statistics of the whole batch, so f(x_i) depends on the other
samples and the per-sample Jacobian of eq. (3) is not defined; the engine therefore always runs BatchNorm on
running statistics. ``bn="recalibrated"`` first re-estimates those statistics for the parameters at hand, as
REPAIR's ``reset_bn_stats`` does (Jordan et al. 2022: reset, ``momentum=None``, a pass over training batches):
the cumulative average over batches of each batch's mean and unbiased variance — without touching the user's
buffers or module attributes.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["batchnorm_modules", "check_running_statistics", "recalibrated_statistics"]


def batchnorm_modules(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


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


def recalibrated_statistics(model: nn.Module, batches: Iterable, run: Callable[[object], object],
                            ) -> dict[str, torch.Tensor]:
    """Running statistics re-estimated on ``batches`` for the parameters ``run`` uses; the user's buffers are untouched.

    ``run(batch)`` performs one forward pass of the model (eval mode, the engine's parameter values). Each
    BatchNorm layer's output is replaced, through a forward hook, by its train-mode output (normalized with the
    batch's own statistics) while the hook accumulates the batch mean and unbiased variance; the result is
    their average over batches (``momentum=None``), keyed ``"<layer>.running_mean"`` / ``"<layer>.running_var"``,
    in each buffer's dtype. Dropout stays off during the pass (REPAIR runs the whole model in train mode; with
    the eNTK computed dropout-free, statistics of dropout-free activations are the consistent choice).
    """
    modules = batchnorm_modules(model)
    sums: dict[str, list] = {name: [0.0, 0.0, 0] for name, _ in modules}

    def hook_for(name: str):
        def hook(module: _BatchNorm, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            dims = [0] + list(range(2, x.dim()))
            x64 = x.detach().to(torch.float64)
            sums[name][0] = sums[name][0] + x64.mean(dim=dims)
            sums[name][1] = sums[name][1] + x64.var(dim=dims, unbiased=True)
            sums[name][2] += 1
            return F.batch_norm(x, None, None, module.weight, module.bias, training=True, momentum=0.0, eps=module.eps)
        return hook

    handles = [module.register_forward_hook(hook_for(name), prepend=True) for name, module in modules]
    try:
        with torch.no_grad():
            count = 0
            for batch in batches:
                run(batch)
                count += 1
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("bn_batches is empty: bn='recalibrated' needs at least one batch of training inputs")
    statistics: dict[str, torch.Tensor] = {}
    for name, module in modules:
        total_mean, total_var, seen = sums[name]
        if seen == 0:
            continue  # a layer the forward never reached keeps its running statistics
        statistics[f"{name}.running_mean" if name else "running_mean"] = (total_mean / seen).to(module.running_mean.dtype)
        statistics[f"{name}.running_var" if name else "running_var"] = (total_var / seen).to(module.running_var.dtype)
    return statistics


def batch_inputs(batch: object) -> object:
    """The model input of one ``bn_batches`` item: a tensor, a mapping, or the first element of a tuple/list."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("bn_batches yielded an empty tuple/list; expected inputs or (inputs, targets)")
        return batch[0]
    if isinstance(batch, (torch.Tensor, Mapping)):
        return batch
    raise TypeError(f"bn_batches items must be tensors, mappings or (inputs, ...) tuples; got {type(batch).__name__}")
