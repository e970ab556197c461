"""What the FSDP2 tests share: small models sharded per Linear and at the root, the global batches each rank takes
its part of, and the eval set (everything generated from fixed seeds: every rank builds the same)."""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

GLOBAL_BATCH = 8  # examples per step over all ranks
FEATURES, CLASSES = 6, 3


def shard_per_linear(model: nn.Sequential) -> nn.Sequential:
    """``fully_shard`` every Linear, then the root (which shards what is left: a BatchNorm's weight and bias)."""
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def global_batch(step: int, *, seed: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global batch (inputs, labels): each rank trains on its part (:func:`part_of`)."""
    generator = torch.Generator().manual_seed(seed + step)
    return (torch.randn(GLOBAL_BATCH, FEATURES, generator=generator),
            torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=generator))


def part_of(rank: int, world: int) -> slice:
    """Rank ``rank``'s examples of a global batch."""
    per_rank = GLOBAL_BATCH // world
    return slice(rank * per_rank, (rank + 1) * per_rank)


def eval_data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(n, FEATURES, generator=generator), torch.arange(n) % CLASSES
