"""The standard run's data stream, replayed batch by batch for every switch point and checked on each pass."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from dynprobe._util.inputs import split_batch

__all__ = ["Batch", "BatchStream", "digest"]

Batch = tuple[Any, torch.Tensor]



class BatchStream:
    """The standard run's batches by step, from a callable, a sequence or a re-iterable; each pass checked.

    Every batch's hash is kept by step: a later switch point that gets a different batch for the same step
    (a reshuffling DataLoader, a function drawing from the global RNG) is an error, not a silent mismatch.
    """

    def __init__(self, source: Any, total_steps: int) -> None:
        self.source, self.total_steps = source, total_steps
        self.digests: dict[int, str] = {}
        if isinstance(source, (str, bytes, torch.Tensor, Mapping)):
            raise TypeError(self._form_error(source))
        if isinstance(source, tuple) and len(source) == 2 and all(isinstance(x, torch.Tensor) for x in source):
            raise TypeError("train_loader is a pair of tensors, not a stream of batches; for full-batch training "
                            "pass train_loader=lambda step: (x_train, y_train)")
        if callable(source) and not isinstance(source, (Sequence, torch.utils.data.DataLoader)):
            self.kind = "callable"
        elif isinstance(source, Sequence):
            self.kind = "sequence"
            if len(source) < total_steps:
                raise ValueError(f"train_loader holds {len(source)} batches; training to total_steps={total_steps} "
                                 f"needs batches 0..{total_steps - 1}")
        elif isinstance(source, Iterable):
            if iter(source) is source:
                raise TypeError("train_loader is a one-shot iterator (iter(x) is x): every switch point replays the "
                                "stream from batch 0. Pass a callable step -> (inputs, targets), a list of batches, "
                                "or an object whose __iter__ restarts the stream")
            self.kind = "iterable"
        else:
            raise TypeError(self._form_error(source))

    @staticmethod
    def _form_error(source: Any) -> str:
        return ("train_loader must be the run's data stream: a callable step -> (inputs, targets), a sequence of "
                f"(inputs, targets) batches, or a re-iterable yielding them; got {type(source).__name__}")

    def batches(self, start: int, stop: int) -> Iterable[tuple[int, Batch]]:
        """``(step, batch)`` for steps start..stop−1, each checked against earlier passes."""
        if self.kind == "iterable":
            iterator = iter(self.source)
            for step in range(stop):
                try:
                    batch = next(iterator)
                except StopIteration:
                    raise ValueError(f"train_loader ran out after {step} batches; each iteration must yield the "
                                     f"whole stream, at least total_steps={self.total_steps} batches") from None
                batch = self._checked(step, batch)
                if step >= start:
                    yield step, batch
        else:
            for step in range(start, stop):
                yield step, self._checked(step, self.source(step) if self.kind == "callable" else self.source[step])

    def first_digest(self) -> str | None:
        """Hash of batch 0 (identifies the stream in the configuration); None when no step is trained."""
        if self.total_steps == 0:
            return None
        for _, _ in self.batches(0, 1):
            pass
        return self.digests[0]

    def _checked(self, step: int, batch: Any) -> Batch:
        inputs, targets = split_batch(batch, f"train_loader batch {step}")  # the one parser of labelled data
        fingerprint = digest(inputs, targets)
        known = self.digests.setdefault(step, fingerprint)
        if known != fingerprint:
            raise ValueError(f"train_loader gave a different batch for step {step} than on an earlier pass: every "
                             "switch point must see the standard run's stream. A shuffling DataLoader reshuffles at "
                             "each iteration and a function drawing from the global RNG changes too; pass a "
                             "callable step -> batch that is deterministic in step")
        return inputs, targets


def digest(inputs: Any, targets: torch.Tensor) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    tensors = [inputs] if isinstance(inputs, torch.Tensor) else [inputs[k] for k in sorted(inputs)]
    for tensor in [*tensors, targets]:
        if isinstance(tensor, torch.Tensor):
            hasher.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
            hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return hasher.hexdigest()
