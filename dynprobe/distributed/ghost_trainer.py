"""Ghosts under DDP: :class:`DistributedGhostTrainer`, sequential replicas whose gradients are averaged across ranks.

Each rank replays the captured micro-batches of its own shard (with the replayed RNG) on each ghost; then one
``all_reduce`` per dtype carries, for all live ghosts together, every ghost's gradients pre-multiplied by
``1/world_size`` exactly as DDP's reducer does without a comm hook (``bucket = grad · (1/W)``, then a SUM
all-reduce), the ghosts' float buffers (rank 0's values, zeros elsewhere: DDP's ``broadcast_buffers``) and two
failure counters per ghost (an exception, a non-finite loss). A ghost that fails on one rank is stopped on every
rank; no rank ever skips the collective, so none waits forever. With 2 ranks the sum of two values is order
independent and ·½ is exact, so the ε = 0 control ghost stays bitwise equal to the main model; with more ranks the
ring order of the sum can differ from DDP's buckets in the last bit.
"""
from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

import torch

from dynprobe.capture.step import MicroBatch
from dynprobe.ghosts.replica import (
    losses_finite,
    match_grad_presence,
    replay_gradients,
    step_optimizer,
    sync_hyperparameters,
)
from dynprobe.ghosts.sequential import SequentialTrainer
from dynprobe.ghosts.trainer import Fault, Ghost, TrainerContext

__all__ = ["SEQUENTIAL_REASON", "DistributedGhostTrainer", "agreed_failure"]

SEQUENTIAL_REASON = ("torch.distributed (DDP): sequential ghosts, whose local gradients are averaged across ranks "
                     "with one collective per step")


class DistributedGhostTrainer(SequentialTrainer):
    """Sequential ghosts (deep copies) whose gradients are averaged over the ranks of ``run`` (see the module
    docstring); compared with the main model, on rank 0 only (the others' buffers wait for DDP's broadcast)."""

    def __init__(self, run: Any, context: TrainerContext) -> None:  # run: a dynprobe.distributed.DistributedRun
        super().__init__(context, reason=SEQUENTIAL_REASON)
        self.run = run

    def train_step(self, ghosts: list[Ghost], micro_batches: list[MicroBatch], step: int
                   ) -> list[tuple[int, Fault]]:
        context, config = self.context, self.context.config
        errors: list[str | None] = []
        nonfinite: list[torch.Tensor | None] = []  # device flags, reduced with the gradients (no read per ghost)
        local: BaseException | None = None
        for ghost in ghosts:
            replica = ghost.replica
            try:
                sync_hyperparameters(context.optimizer, replica.optimizer)
                losses = replay_gradients(replica, micro_batches, context.replay)
                match_grad_presence(context.main_params, replica.params)
                errors.append(None)
                nonfinite.append(~losses_finite(losses))
            except Exception as error:  # noqa: BLE001 - agreed on below, never left one rank behind
                errors.append(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
                nonfinite.append(None)
                local = local or error
        exceptions, nonfinite_counts = self._all_reduce(ghosts, errors, nonfinite)
        faults: dict[int, Fault] = {}
        world = self.run.world_size
        for k, ghost in enumerate(ghosts):
            if exceptions[k]:
                faults[ghost.ghost_id] = agreed_failure(errors[k], exceptions[k], world, local)
            elif nonfinite_counts[k]:
                faults[ghost.ghost_id] = Fault("diverged",
                                               f"non-finite loss (on {nonfinite_counts[k]} of {world} ranks)")
            else:
                step_optimizer(ghost.replica, clip_grad_norm=config.clip_grad_norm,
                               clip_grad_value=config.clip_grad_value)
        return list(faults.items())

    def control_drift(self, control: Ghost) -> tuple[str, list[str], torch.Tensor] | None:
        if not self.run.is_writer:  # other ranks' buffers wait for DDP's next broadcast: only rank 0 can compare
            return None
        return super().control_drift(control)

    def _all_reduce(self, ghosts: list[Ghost], errors: list[str | None], nonfinite: list[torch.Tensor | None]
                    ) -> tuple[list[int], list[int]]:
        """The one collective (one per dtype): gradients ·1/W, rank 0's float buffers, failure counters.

        The counters are read on the host once, after the collective (every rank must know who stops before the
        optimizers step): one synchronisation per step under DDP, whatever the number of ghosts."""
        main_params = self.context.main_params
        segments: list[tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
        for k, ghost in enumerate(ghosts):
            failed = errors[k] is not None
            for main_p, ghost_p in zip(main_params, ghost.replica.params):
                segments.append(("grad", ghost_p, None if failed else ghost_p.grad, main_p))
            if self.run.syncs_buffers:  # the layout never depends on failures: every rank builds the same buffer
                for buffer in ghost.replica.model.buffers():
                    if buffer is not None and buffer.is_floating_point():
                        segments.append(("buffer", buffer, None if failed else buffer, None))
        device = main_params[0].device
        flags_dtype = segments[0][1].dtype if segments else torch.float32
        groups = _by_dtype(segments, key=lambda s: s[1].dtype)
        groups.setdefault(flags_dtype, [])
        raised = torch.tensor([float(e is not None) for e in errors], dtype=flags_dtype).to(device)
        not_finite = [torch.zeros((), dtype=flags_dtype, device=device) if f is None else f.to(device, flags_dtype)
                      for f in nonfinite]
        flags = torch.cat([raised, torch.stack(not_finite)]) if not_finite else raised
        reduced_flags = flags
        scale = 1.0 / self.run.world_size
        is_writer = self.run.is_writer
        for dtype, group in groups.items():
            total = sum(s[1].numel() for s in group)
            tail = flags.numel() if dtype == flags_dtype else 0
            flat = torch.empty(total + tail, dtype=dtype, device=device)
            offset = 0
            for kind, target, value, _ in group:
                view = flat[offset:offset + target.numel()]
                if value is None or (kind == "buffer" and not is_writer):
                    view.zero_()
                elif kind == "grad":
                    torch.mul(value.detach().reshape(-1), scale, out=view)  # DDP: bucket = grad · (1/W)
                else:
                    view.copy_(value.detach().reshape(-1))
                offset += target.numel()
            if tail:
                flat[offset:].copy_(flags)
            self.run.all_reduce(flat)
            offset = 0
            for kind, target, value, main_p in group:
                view = flat[offset:offset + target.numel()].view_as(target)
                offset += target.numel()
                if kind == "buffer":
                    if value is not None:
                        target.data.copy_(view)
                elif value is not None:
                    if main_p is not None and main_p.grad is None:
                        target.grad = None  # mirror the main model: no gradient where it has none
                    elif target.grad is not None:
                        target.grad.copy_(view)
            if tail:
                reduced_flags = flat[offset:].clone()
        counts = [int(round(float(v))) for v in reduced_flags.tolist()]
        return counts[:len(ghosts)], counts[len(ghosts):]


def agreed_failure(mine: str | None, ranks: int, world: int, error: BaseException | None) -> Fault:
    """The fault of a ghost that raised on ``ranks`` of the ``world`` ranks (an all-reduced count): ``mine`` is
    this rank's ``"summary\ntraceback"`` (None when it raised elsewhere only), ``error`` this rank's exception
    (re-raised under ``errors="raise"``)."""
    summary, _, trace = (mine or "").partition("\n")
    reason = (summary if mine else "an exception on another rank") + f" (on {ranks} of {world} ranks)"
    return Fault("failed", reason, trace if mine else None, error if mine else None)


def _by_dtype(items: list[Any], key: Callable[[Any], torch.dtype]) -> dict[torch.dtype, list[Any]]:
    groups: dict[torch.dtype, list[Any]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups
