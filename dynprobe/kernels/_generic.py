"""The generic eNTK path: per-sample Jacobians of parameters without a structured rule, for any module (private).

Three strategies, tried in this order when the engine is planned (the first that runs on two probe samples is
kept):

* ``"vmap"``: ``vmap`` over samples of ``jacrev`` of a single-sample ``functional_call`` (the model sees a batch
  of one, ``x.unsqueeze(0)``): every sample and output row in one vectorized call. It is the reference the
  structured rules are tested against, and the fallback for custom layers, ``nn.MultiheadAttention``'s packed
  projections, bare ``nn.Parameter``s, shared or re-used weights.
* ``"per_sample"``: for models ``vmap`` cannot run — a forward with data-dependent control flow, such as
  Hugging Face's attention-mask builder calling ``mask.all()`` — one ordinary forward per sample and one
  backward over all output rows at once (``autograd.grad(..., is_grads_batched=True)``, which vectorizes only
  the backward pass).
* ``"per_sample_rows"``: the same with one backward per output row, when even the backward cannot be
  vectorized.

Only Jacobians are formed here (the *Jacobian contraction* strategy); the contraction is
:func:`._chunking.accumulate_gram`. The NTK-vector-product strategy (a vjp then a jvp per column of H) is not
offered: on CPU it is several times slower than contraction for ``trace``.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch.func import jacrev, vmap

from ._calling import ModelCall

__all__ = ["GENERIC_STRATEGIES", "write_generic_jacobian"]

GENERIC_STRATEGIES = ("vmap", "per_sample", "per_sample_rows")


def write_generic_jacobian(strategy: str, call: ModelCall, values: Mapping[str, torch.Tensor], names: list[str],
                           samples: slice, rows: torch.Tensor | None, out: torch.Tensor) -> None:
    """Write ``∂(v_k · f(x_i)) / ∂θ_names`` into ``out`` (m, R, Σ numel) for the m samples of ``samples``.

    Args:
        strategy: one of :data:`GENERIC_STRATEGIES`.
        values: every parameter and buffer by name (the differentiated ones are taken from here too).
        names: the parameters to differentiate (their columns follow this order in ``out``).
        rows: cotangent rows (m, R, c), or None for every logit (R = c, ``trace``/``full``).
    """
    with warnings.catch_warnings():  # PyTorch's "no batching rule, falling back to a loop" performance warning
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        if strategy == "vmap":
            _vmapped(call, values, names, samples, rows, out)
        else:
            _per_sample(call, values, names, samples, rows, out, batched_rows=strategy == "per_sample")


def _vmapped(call: ModelCall, values: Mapping[str, torch.Tensor], names: list[str], samples: slice,
             rows: torch.Tensor | None, out: torch.Tensor) -> None:
    primals = {name: values[name] for name in names}
    others = {name: value for name, value in values.items() if name not in primals}

    def per_sample(primal: dict, inputs: dict, row: torch.Tensor | None) -> torch.Tensor:
        single = {key: value.unsqueeze(0) for key, value in inputs.items()}
        logits = call.to_logits(call.forward_inputs({**others, **primal}, single), 1).reshape(-1)
        return logits if row is None else row @ logits

    jacobian = vmap(jacrev(per_sample), in_dims=(None, 0, None if rows is None else 0))(
        primals, call.inputs(samples), rows)
    _write(out, [jacobian[name] for name in names])


def _per_sample(call: ModelCall, values: Mapping[str, torch.Tensor], names: list[str], samples: slice,
                rows: torch.Tensor | None, out: torch.Tensor, *, batched_rows: bool) -> None:
    leaves = [values[name].detach().requires_grad_() for name in names]
    merged = {**values, **dict(zip(names, leaves))}
    for j, i in enumerate(range(samples.start, samples.stop)):
        logits = call.to_logits(call.forward(merged, slice(i, i + 1)), 1).reshape(-1)
        cotangents = torch.eye(logits.shape[0], dtype=logits.dtype, device=logits.device) if rows is None \
            else rows[j].to(logits.dtype)
        if not logits.requires_grad:
            out[j].zero_()
            continue
        if batched_rows:
            grads = torch.autograd.grad(logits, leaves, cotangents, is_grads_batched=True, allow_unused=True)
        else:
            per_row = [torch.autograd.grad(logits, leaves, row, retain_graph=True, allow_unused=True)
                       for row in cotangents]
            grads = [None if per_row[0][k] is None else torch.stack([g[k] for g in per_row])
                     for k in range(len(leaves))]
        grads = [torch.zeros(cotangents.shape[0], *leaf.shape, dtype=out.dtype, device=out.device) if g is None else g
                 for g, leaf in zip(grads, leaves)]
        _write(out[j : j + 1], [g.unsqueeze(0) for g in grads])


def _write(out: torch.Tensor, blocks: list[torch.Tensor]) -> None:
    offset = 0
    samples, row_count = out.shape[0], out.shape[1]
    for block in blocks:
        block = block.reshape(samples, row_count, -1)
        out[:, :, offset : offset + block.shape[2]].copy_(block)
        offset += block.shape[2]
