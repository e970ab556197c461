"""The straight line between two snapshots of an FSDP2 model, loaded into the model's own shards: :class:`ShardedLine`.

The unsharded barrier evaluates ``θ(α) = torch.lerp(θ_b, θ_a, α)`` through ``torch.func.functional_call`` with
whole tensors (:mod:`dynprobe.metrics.barrier`). Under ``fully_shard`` no rank holds θ whole and the model cannot be
deep-copied, so every rank writes its own piece of θ(α) into the model instead, as an optimizer step does:

    local(p)(α) = lerp(local(p)_b, local(p)_a, α)        for every trainable parameter p (its rank-local shard)

``lerp`` is elementwise, so the pieces are exactly the shards of the unsharded path's θ(α), in each tensor's own
dtype (θ_a at α = 1 and θ_b at α = 0 are copied, not computed). The FSDP forward then all-gathers them as it
all-gathers the trained shards. Floating-point buffers (BatchNorm running statistics; not sharded, each rank its own)
are interpolated the same way and integer buffers keep θ_a's values, as in the unsharded path.

**Resharding.** FSDP2 keeps the root module's gathered parameters after a forward (``reshard_after_forward`` is
off for the root: training would gather them again at once); a forward after a write into the shards would use
the stale gathered values. Every FSDP module is therefore resharded (``FSDPModule.reshard()``: frees the gathered
parameters, the shards stay as they are) before each point is loaded and after the model is put back.

**Putting the model back.** θ_a is what the model holds when the line is entered (the newest snapshot); its shards
and buffers are stashed and copied back on exit, whatever happened (bit for bit: ``copy_`` of the same dtype), and
the model resharded, so the next training forward gathers the trained values again.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType

import torch
from torch import nn

from .sharded import local_tensor, reshard

__all__ = ["ShardedLine", "floating_buffers"]


def floating_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's floating-point (or complex) buffers by name: what the path interpolates besides θ."""
    return {name: buffer for name, buffer in model.named_buffers()
            if buffer is not None and (buffer.is_floating_point() or buffer.is_complex())}


class ShardedLine:
    """``θ(α) = lerp(θ_b, θ_a, α)`` written into an FSDP2 model's local shards and buffers (module docstring).

    Use as a context manager: entering stashes θ_a (the model's current shards and floating buffers), :meth:`load`
    writes θ(α), leaving puts θ_a back bit for bit and reshards.

    Args:
        model: the ``fully_shard``-ed model.
        params: its trainable parameters (DTensors) in ``vec(θ)`` order.
        older_piece: this rank's piece of θ_b: the local shards of ``params`` flattened and concatenated in order,
            in any dtype that holds their values exactly (the recorder's history).
        older_buffers: θ_b's floating buffers by name (this rank's own, kept at θ_b's snapshot).
    """

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor], older_piece: torch.Tensor,
                 older_buffers: Mapping[str, torch.Tensor]) -> None:
        self.model, self.params = model, list(params)
        self.buffers = floating_buffers(model)
        missing = sorted(set(self.buffers) - set(older_buffers))
        if missing:
            raise ValueError(f"the older snapshot's buffers lack {missing[:5]} (the model gained buffers)")
        locals_ = [local_tensor(p) for p in self.params]
        size = sum(t.numel() for t in locals_)
        if older_piece.numel() != size:
            raise ValueError(f"the older snapshot's piece has {older_piece.numel()} entries but this rank's shards "
                             f"have {size}")
        self._older: list[torch.Tensor] = []
        offset = 0
        for t in locals_:
            self._older.append(older_piece[offset:offset + t.numel()].to(device=t.device, dtype=t.dtype)
                               .view(t.shape))
            offset += t.numel()
        self._older_buffers = {name: older_buffers[name].to(device=b.device, dtype=b.dtype)
                               for name, b in self.buffers.items()}
        self._stash: list[torch.Tensor] | None = None
        self._stash_buffers: dict[str, torch.Tensor] = {}

    def __enter__(self) -> ShardedLine:
        with torch.no_grad():
            self._stash = [local_tensor(p).detach().clone() for p in self.params]
            self._stash_buffers = {name: b.detach().clone() for name, b in self.buffers.items()}
        return self

    def load(self, alpha: float) -> None:
        """Write θ(α) into the shards and buffers (θ_a at α = 1, θ_b at α = 0, copied)."""
        assert self._stash is not None, "load() inside the with block"
        reshard(self.model)  # the next forward gathers what is written now, not what an earlier one gathered
        with torch.no_grad():
            for p, a, b in zip(self.params, self._stash, self._older):
                local_tensor(p).copy_(_point(a, b, alpha))
            for name, buffer in self.buffers.items():
                buffer.copy_(_point(self._stash_buffers[name], self._older_buffers[name], alpha))

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._stash is None:
            return
        with torch.no_grad():
            for p, a in zip(self.params, self._stash):
                local_tensor(p).copy_(a)
            for name, buffer in self.buffers.items():
                buffer.copy_(self._stash_buffers[name])
        self._stash, self._stash_buffers = None, {}
        reshard(self.model)  # the next training forward gathers the trained shards again


def _point(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``torch.lerp(b, a, α)`` in the tensors' dtype; exactly ``a`` at α = 1 and ``b`` at α = 0."""
    if alpha == 1.0:
        return a
    if alpha == 0.0:
        return b
    return torch.lerp(b, a, alpha)
