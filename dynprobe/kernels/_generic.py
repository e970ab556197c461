"""The generic eNTK path: per-sample Jacobians with ``torch.func`` for any module (private).

``vmap`` over samples of ``jacrev`` of a single-sample ``functional_call``: the model sees a batch of one
(``x.unsqueeze(0)``), so any eval-mode computation works, whatever its layers. It is the reference the
structured rules of :mod:`dynprobe._kernel_structured` are tested against, and the fallback for parameters
without such a rule (custom layers, ``nn.MultiheadAttention``'s packed projections, bare ``nn.Parameter``s
such as positional embeddings, shared or re-used weights).

Only Jacobians are formed here (the *Jacobian contraction* strategy); the contraction itself is
:func:`dynprobe._kernel_chunking.accumulate_gram`. The NTK-vector-product strategy (a vjp then a jvp per
column of H) is not offered: on CPU it measured 7–27× slower than contraction for ``trace``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

__all__ = ["write_generic_jacobian"]


def write_generic_jacobian(model: nn.Module, values: Mapping[str, torch.Tensor], names: list[str],
                           batched: dict[str, torch.Tensor], constants: Mapping, positional: bool,
                           rows: torch.Tensor | None, to_logits: Callable[[object, int], torch.Tensor],
                           out: torch.Tensor) -> None:
    """Write ``∂(r_k · f(x_i)) / ∂θ_names`` into ``out`` (m, R, Σ numel), one slab chunk.

    Args:
        values: every parameter and buffer by name (the differentiated ones are taken from here too).
        names: the parameters to differentiate (their columns follow this order in ``out``).
        batched: the per-sample input tensors of this chunk, first dim m (key ``"0"`` for a positional input).
        constants: non-tensor keyword inputs passed unchanged.
        positional: call ``model(batched["0"])`` instead of ``model(**batched, **constants)``.
        rows: cotangent rows (m, R, c), or None for every logit (R = c, ``trace``/``full``).
        to_logits: ``(model output, batch size) → (batch, c)`` logits.
    """
    primals = {name: values[name] for name in names}
    others = {name: value for name, value in values.items() if name not in primals}

    def per_sample(primal: dict, inputs: dict, row: torch.Tensor | None) -> torch.Tensor:
        merged = {**others, **primal}
        single = {key: value.unsqueeze(0) for key, value in inputs.items()}
        if positional:
            output = functional_call(model, merged, (single["0"],))
        else:
            output = functional_call(model, merged, (), {**single, **constants})
        logits = to_logits(output, 1).reshape(-1)
        return logits if row is None else row @ logits

    jacobian = vmap(jacrev(per_sample), in_dims=(None, 0, None if rows is None else 0))(primals, batched, rows)
    offset = 0
    samples, row_count = out.shape[0], out.shape[1]
    for name in names:
        block = jacobian[name].reshape(samples, row_count, -1)
        out[:, :, offset : offset + block.shape[2]].copy_(block)
        offset += block.shape[2]
