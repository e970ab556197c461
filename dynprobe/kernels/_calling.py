"""How the eNTK engine calls the model on its probe samples: a value that planning and execution share (private).

A :class:`ModelCall` holds the probe inputs (the engine's private copy, on the model's device), how they are
passed (one positional tensor, or keyword tensors plus non-tensor constants) and how logits are selected from
the output. Every forward of the engine goes through it with explicit parameter values
(``torch.func.functional_call``), so the user's parameters and buffers are never read implicitly or written.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["ModelCall"]


@dataclass(frozen=True)
class ModelCall:
    """The model, its probe inputs and its output selector; ``forward(values, samples)`` runs a slice of samples."""

    model: nn.Module
    batched: Mapping[str, torch.Tensor]  # per-sample input tensors, first dim n ("0": the positional input)
    constants: Mapping[str, Any]  # non-tensor keyword inputs, passed unchanged
    positional: bool
    output_fn: Callable[[Any], torch.Tensor] | None
    device: torch.device
    n: int

    @classmethod
    def prepare(cls, model: nn.Module, inputs: object, output_fn: Callable[[Any], torch.Tensor] | None,
                device: torch.device) -> ModelCall:
        """Validate ``inputs`` (a tensor, or a mapping with at least one tensor) and copy them to ``device``."""
        with torch.inference_mode(False):
            if isinstance(inputs, torch.Tensor):
                batched, constants, positional = {"0": inputs}, {}, True
            elif isinstance(inputs, Mapping):
                batched = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
                constants = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}
                positional = False
                if not batched:
                    raise ValueError("inputs mapping has no tensor values; the probe samples must be tensors")
            else:
                raise TypeError(f"inputs must be a tensor or a mapping of tensors; got {type(inputs).__name__}")
            sizes = {k: (v.shape[0] if v.dim() else None) for k, v in batched.items()}
            if len(set(sizes.values())) != 1 or None in sizes.values():
                raise ValueError(f"every input tensor needs the same first (sample) dimension n; got sizes {sizes}")
            n = next(iter(sizes.values()))
            if n < 1:
                raise ValueError("inputs have no samples (first dimension 0)")
            batched = {k: v.detach().to(device).clone() for k, v in batched.items()}
        return cls(model, batched, constants, positional, output_fn, device, n)

    def single(self, index: int) -> ModelCall:
        """The same call on the one probe sample ``index`` (as its sample 0)."""
        return replace(self, batched={k: v[index : index + 1] for k, v in self.batched.items()}, n=1)

    def inputs(self, samples: slice) -> dict[str, torch.Tensor]:
        """The per-sample input tensors of a slice of samples."""
        return {k: v[samples] for k, v in self.batched.items()}

    def forward(self, values: Mapping[str, torch.Tensor], samples: slice) -> object:
        """The model's output on a slice of the probe samples, with the given parameter and buffer values."""
        return self.forward_inputs(values, self.inputs(samples))

    def forward_inputs(self, values: Mapping[str, torch.Tensor], chunk: Mapping[str, torch.Tensor]) -> object:
        """The model's output on per-sample inputs shaped like :meth:`inputs` returns them."""
        if self.positional:
            return functional_call(self.model, values, (chunk["0"],))
        return functional_call(self.model, values, (), {**chunk, **self.constants})

    def call(self, values: Mapping[str, torch.Tensor], batch: object) -> object:
        """The model's output on a user batch (a tensor or a mapping), e.g. for BatchNorm re-estimation."""
        if isinstance(batch, Mapping):
            batch = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            return functional_call(self.model, values, (), batch)
        return functional_call(self.model, values, (batch.to(self.device),))

    def to_logits(self, output: object, batch: int) -> torch.Tensor:
        """The output as (batch, c) logits: ``output_fn`` applied, then flattened per sample."""
        return self._flattened(self.selected(output), batch)

    @staticmethod
    def _flattened(output: torch.Tensor, batch: int) -> torch.Tensor:
        if output.dim() == 0 or output.shape[0] != batch:
            raise ValueError(f"the logits must have the samples on their first dimension ({batch}); got shape "
                             f"{tuple(output.shape)} — select/reshape them with output_fn=")
        return output.reshape(batch, -1)

    def selected(self, output: object) -> torch.Tensor:
        """The output ``output_fn`` selects (the output itself without one), unflattened."""
        output = self.output_fn(output) if self.output_fn is not None else output
        if not isinstance(output, torch.Tensor):
            hint = "" if self.output_fn is None else " (output_fn returned it)"
            raise TypeError(f"the model output is a {type(output).__name__}{hint}, not a tensor of logits; pass "
                            "output_fn= to select them, e.g. output_fn=lambda out: out.logits or lambda out: out[0]")
        return output

    def check_independence(self, values: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
        """The per-sample output shape; raise if the eval-mode forward mixes samples (or is random).

        The first few samples are run together and one at a time: per-sample Jacobians (eq. 3 of the two-phase
        paper) exist only if each sample's output depends on that sample alone.
        """
        count = min(self.n, 3)
        with torch.no_grad():
            output = self.selected(self.forward(values, slice(0, count)))
            together = self._flattened(output, count)
            if count > 1:
                alone = torch.cat([self.to_logits(self.forward(values, slice(i, i + 1)), 1) for i in range(count)])
                tolerance = 1e3 * torch.finfo(together.dtype).eps * (together.abs().max().item() + 1e-30)
                if alone.shape != together.shape or (alone - together).abs().max().item() > tolerance:
                    raise ValueError(
                        "the model's eval-mode output for a sample depends on the other samples of the batch (or is "
                        "random): per-sample Jacobians (eq. 3) cannot express that. Typical causes: BatchNorm-like "
                        "layers using batch statistics, attention across the batch dimension, dropout that ignores "
                        "eval mode (F.dropout without training=self.training).")
        if together.shape[1] == 0:
            raise ValueError("the model has no outputs (c = 0)")
        return tuple(output.shape[1:])
