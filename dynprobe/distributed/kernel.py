"""The eNTK under DDP: :class:`ShardedKernel`, an eNTK whose parameters are shared out among the ranks.

H = Σ_p J_p J_pᵀ is a sum over parameters, so each rank computes the kernel restricted to its share of the
parameters (whole modules, balanced by size, each rank under the full ``max_memory``) and one SUM ``all_reduce`` of
the n×n partial kernels (plus a failure flag) assembles H on every rank. The costly part — per-sample gradients and
their float64 contraction, O(n²·P) — is divided among the ranks; the forward and backward passes are not.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from dynprobe._util.modules import layer_name

__all__ = ["ShardedKernel", "partition_modules", "sharded_kernel"]

# An eNTK engine builder: ``make_engine(wrt)`` differentiates only the parameters named in ``wrt`` (None: all);
# the engine is called as ``engine(params) -> H`` and has ``n``, ``mode``, ``num_outputs``, ``device``, ``convention``.
EngineFactory = Callable[[list[str] | None], Any]


def partition_modules(named_params: list[tuple[str, torch.Tensor]], parts: int) -> list[list[str]]:
    """Split parameter names into ``parts`` shares of whole modules, balanced by parameter count (largest module
    first to the least-loaded share; ties to the lowest index). Deterministic: every rank computes the same."""
    modules: dict[str, list[tuple[str, int]]] = {}
    for name, p in named_params:
        modules.setdefault(name.rpartition(".")[0], []).append((name, p.numel()))
    order = sorted(modules.items(), key=lambda item: -sum(n for _, n in item[1]))
    shares: list[list[str]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for _, members in order:
        target = loads.index(min(loads))
        shares[target] += [name for name, _ in members]
        loads[target] += sum(n for _, n in members)
    position = {name: i for i, (name, _) in enumerate(named_params)}
    return [sorted(share, key=position.__getitem__) for share in shares]


class ShardedKernel:
    """An eNTK engine whose parameters are shared out among the ranks: ``kernel(params) -> H`` on every rank.

    Rank r builds an :class:`NTKEngine` differentiating only its share of the trainable parameters
    (``wrt=``); H = Σ_r H_r (eq. 3 is a sum over parameters), assembled by :meth:`DistributedRun.
    sum_partial_kernels`. Each engine plans for the full ``max_memory``: the per-rank budget equals a single
    process's. A rank with no share (fewer modules than ranks) contributes zeros. ``run`` is the
    :class:`~dynprobe.distributed.runtime.DistributedRun` of this process. ``rank0_buffers``: compute with rank
    0's floating-point buffers on every rank (default: when DDP broadcasts them; under FSDP, where each rank keeps
    its own, they are the buffers the run stores).
    """

    def __init__(self, run: Any, model: nn.Module, make_engine: EngineFactory, *,
                 rank0_buffers: bool | None = None) -> None:
        self.run, self.model = run, model
        self.rank0_buffers = run.syncs_buffers if rank0_buffers is None else rank0_buffers
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
        self.shares = partition_modules(trainable, run.world_size)
        self.layers = list(dict.fromkeys(layer_name(name) for name, _ in trainable))  # the model's layer order
        share = self.shares[run.rank]
        self._engine = make_engine(share) if share else None
        self._reference = self._engine if self._engine is not None else make_engine(None)  # shapes only
        self.n = self._reference.n
        full = self._reference.mode == "full"
        self.size = self.n * (self._reference.num_outputs if full else 1)
        self.total_parameters = len(trainable)

    @property
    def convention(self) -> dict[str, Any]:
        return {**self._reference.convention, "parameters": self.total_parameters,
                "distributed": f"parameters shared out over {self.run.world_size} ranks by whole modules; the "
                               "partial kernels summed with one all_reduce (float64)"}

    def __call__(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        params = self._with_buffers(params)
        partial, error = None, None
        try:
            if self._engine is not None:
                partial = self._engine(params)
        except Exception as failure:  # noqa: BLE001 - every rank must reach the all_reduce
            error = f"{type(failure).__name__}: {failure}"
        return self.run.sum_partial_kernels(partial, self.size, self._reference.device, error)

    def per_layer(self, params: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Each layer's kernel H_l by layer name, in the model's layer order (``KernelConfig(per_layer=True)``).

        A layer (the module owning a parameter tensor) lies within one rank's share, so each rank computes the H_l
        of its layers and one all-reduce of the (layers, size, size) stack, zeros elsewhere, gives every H_l on
        every rank: exactly each layer's kernel, as one process computes it."""
        params = self._with_buffers(params)
        position = {layer: i for i, layer in enumerate(self.layers)}
        partial, error = None, None
        try:
            if self._engine is not None:
                partial = torch.zeros((len(self.layers), self.size, self.size), dtype=torch.float64,
                                      device=self._reference.device)
                for layer, kernel in self._engine.per_layer(params).items():
                    partial[position[layer]] = kernel
        except Exception as failure:  # noqa: BLE001 - every rank must reach the all_reduce
            error = f"{type(failure).__name__}: {failure}"
        stacked = self.run.sum_partial_kernels(partial, self.size, self._reference.device, error,
                                               layers=len(self.layers))
        return dict(zip(self.layers, stacked))

    def _with_buffers(self, params: Mapping[str, torch.Tensor] | None) -> Mapping[str, torch.Tensor] | None:
        if not self.rank0_buffers:
            return params
        # Rank 0's buffers, as DDP broadcasts them before the next forward: another rank's main model (and a ghost
        # on the step it was cloned) still holds its own running statistics.
        names = [name for name, b in self.model.named_buffers() if b is not None and b.is_floating_point()]
        state = dict(self.model.named_buffers()) if params is None else params
        buffers = [(name, state[name]) for name in names if name in state]
        return {**(params or {}), **self.run.rank0_values(buffers)}


def sharded_kernel(run: Any, model: nn.Module) -> Callable[[EngineFactory], ShardedKernel] | None:
    """The kernel factory of ``KernelMeasure(kernel_factory=...)`` for this process: a :class:`ShardedKernel` over
    ``run``'s ranks under torch.distributed (``run`` a DistributedRun), None (one plain engine) otherwise."""
    if run is None:
        return None
    return lambda make_engine: ShardedKernel(run, model, make_engine)
