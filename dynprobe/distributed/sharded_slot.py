"""The main FSDP2 model as a slot: another state (a ghost's shards and buffers, an interpolated θ) put into it for
a while, the main state restored bit for bit afterwards.

An FSDP2 model cannot be deep-copied, so whatever must run through it with other parameter values runs in the
main model itself: the values are written into each parameter's local shard (in place, under ``no_grad``, as an
optimizer step does: the next all-gather reads them), the forwards (and backwards) run with FSDP's own
collectives, and the main values, buffers and gradient tensors are written back. Every rank must enter and leave
the slot together (the forwards are collective).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .sharded import local_tensor, reshard

__all__ = ["MainModelSlot"]


class MainModelSlot:
    """The main FSDP model as a slot a ghost's state is put into for a while (module docstring).

    ``holding(params, buffers, train=True)``: another state's shards (``params``, DTensors sharded as the main
    parameters) and buffers (by name) written in, the main ones kept aside; on a normal exit with ``train`` the
    gradients the model's parameters received move to ``params`` and the buffers the forwards updated to
    ``buffers``; on any exit the main values, buffers and gradient tensors are back, bit for bit.
    """

    def __init__(self, model: nn.Module, main_params: Sequence[torch.Tensor]) -> None:
        self.model = model
        self.params = list(main_params)
        self.buffers = [(name, b) for name, b in model.named_buffers() if b is not None]

    @contextmanager
    def holding(self, params: Sequence[torch.Tensor], buffers: Mapping[str, torch.Tensor], *, train: bool
                ) -> Iterator[None]:
        locals_ = [local_tensor(p) for p in self.params]
        with torch.no_grad():
            kept = [t.clone() for t in locals_]
            kept_buffers = [b.clone() for _, b in self.buffers]
            for target, ghost_p in zip(locals_, params):
                target.copy_(local_tensor(ghost_p))
            for name, b in self.buffers:
                b.copy_(buffers[name])
        main_grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        try:
            try:
                yield
            finally:  # a forward left the root's parameters all-gathered, holding this state's values
                reshard(self.model)
            if train:
                for ghost_p, p in zip(params, self.params):
                    ghost_p.grad = p.grad
                with torch.no_grad():
                    for name, b in self.buffers:
                        buffers[name].copy_(b)
        finally:
            with torch.no_grad():
                for target, value in zip(locals_, kept):
                    target.copy_(value)
                for (_, b), value in zip(self.buffers, kept_buffers):
                    b.copy_(value)
            for p, grad in zip(self.params, main_grads):
                p.grad = grad
