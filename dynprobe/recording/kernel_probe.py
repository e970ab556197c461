"""The eNTK measured at snapshots: a fixed probe set and one reusable :class:`dynprobe.kernels.NTKEngine`.

The probe set is drawn once from the eval set — seeded and class-balanced, never augmented — so that H(θ_t) is
computed on identical inputs at every snapshot (and for every ghost), which is what makes the kernel distance S
(eq. 4) between two snapshots meaningful.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from dynprobe._util.evaluation import EvalSet, balanced_subset, index_inputs, inputs_to
from dynprobe.config import KernelConfig
from dynprobe.kernels.engine import NTKEngine

__all__ = ["KernelMeasure"]


class KernelMeasure:
    """``measure(params=None) -> H`` on the run's probe set; ``due(index)`` says whether snapshot ``index`` has one."""

    def __init__(self, config: KernelConfig, model: nn.Module, eval_set: EvalSet, *,
                 output_fn: Callable[[Any], torch.Tensor], device: torch.device, distributed: Any = None) -> None:
        if config.n > eval_set.n:
            raise ValueError(
                f"KernelConfig(n={config.n}) asks for more probe examples than the eval set holds ({eval_set.n}); "
                f"lower n or give more eval_data (eval_max={eval_set.n} examples were kept)"
            )
        self.config = config
        self.indices = balanced_subset(eval_set.targets, config.n, seed=config.seed)
        inputs = inputs_to(index_inputs(eval_set.inputs, self.indices), device)
        targets = eval_set.targets[self.indices].to(device)
        bn_batches = None
        if config.bn == "recalibrated":
            # Held-out, un-augmented eval inputs: deterministic, and the same at every snapshot.
            bn_batches = [inputs_to(index_inputs(eval_set.inputs, slice(s, s + 256)), device)
                          for s in range(0, eval_set.n, 256)]

        def make_engine(wrt: list[str] | None = None) -> NTKEngine:
            return NTKEngine(
                model, inputs, mode=config.mode, class_index=config.class_index,
                targets=targets if config.mode == "true_class" else None, bn=config.bn, bn_batches=bn_batches,
                output_fn=output_fn, max_memory=config.max_memory, wrt=wrt,
            )

        # Under torch.distributed (a dynprobe.distributed.DistributedRun), each rank differentiates a share of the
        # parameters and the partial kernels are summed across ranks (dynprobe.distributed.ShardedKernel).
        if distributed is None:
            self.engine = make_engine()
        else:
            from dynprobe.distributed.runtime import ShardedKernel

            self.engine = ShardedKernel(distributed, model, make_engine)

    def due(self, snapshot_index: int) -> bool:
        return snapshot_index % self.config.every == 0

    def measure(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """H(θ) on the probe set (float64); ``params``: values by name (a ghost's), None: the model's own."""
        return self.engine(params)

    def convention(self) -> dict[str, Any]:
        return {**self.engine.convention, "every": self.config.every, "seed": self.config.seed,
                "probe_set": "seeded, class-balanced subset of the eval set (kernel_probe_indices.npy)"}
