"""What the FSDP2 tests share: small models sharded per Linear and at the root, the global batches each rank takes
its part of, and the eval set (everything generated from fixed seeds: every rank builds the same)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

import dynprobe

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


def train(model: nn.Module, shard: slice, out: Path | None, *, steps: int, eval_set: tuple[torch.Tensor, torch.Tensor],
          probe_hook: Callable[[dynprobe.Probe], None] | None = None, lr_drop: tuple[int, float] | None = None,
          **options: object) -> dynprobe.Probe | None:
    """The user's loop: SGD with momentum on this rank's ``shard`` of each global batch (``lr_drop = (step, lr)``:
    that learning rate from that step on); with ``out`` the two probe lines are added (a snapshot every 2 steps,
    ``probe_hook`` called with the probe first). Returns the probe (or None)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    probe, criterion = None, nn.CrossEntropyLoss()
    if out is not None:
        probe = dynprobe.Probe(model, optimizer, eval_data=eval_set, out=out, schedule=2, total_steps=steps,
                               **options)
        criterion = probe.watch(criterion)
        if probe_hook is not None:
            probe_hook(probe)
    for step in range(steps):
        if lr_drop is not None and step == lr_drop[0]:
            for group in optimizer.param_groups:
                group["lr"] = lr_drop[1]
        x, y = global_batch(step)
        loss = criterion(model(x[shard]), y[shard])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if probe is not None:
        probe.close()
    return probe
