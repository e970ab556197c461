"""Ghost replicas trained as one ``torch.func.vmap`` stack (the vectorized path of the chaos experiment, §4).

R replicas of a model live as stacked tensors, one ``[R, *shape]`` leaf per trainable parameter and one
``[R, *shape]`` tensor per buffer (BatchNorm running statistics are updated per replica, in place, by the
batched kernels). One training step of the stack replays the main run's captured micro-batches
(:mod:`dynprobe.capture`) exactly as the sequential ghosts do: for each micro-batch, set the RNG state recorded
before the main forward, run ``vmap(randomness="same")`` over ``functional_call(base, replica_state, inputs)``
— so every replica draws the main run's dropout masks — and the watched loss under the recorded autocast
states, then backpropagate the recorded dL/dloss (accumulation, loss weights) into all rows at once. Then:
zero gradients where the main has them and the stack has none, per-replica clipping, and one optimizer step
(:mod:`dynprobe.ghosts._stack_optimizers`: one stacked optimizer for elementwise optimizers, else per-replica
optimizers over leaf aliases of the rows), with the main optimizer's current per-group hyper-parameters.

Bitwise facts (CPU, measured; ``tests/ghosts/test_stack.py``): rows of one stack are computed by identical
kernels, so two ε = 0 rows stay bitwise equal forever. The vmapped kernels, however, are not the plain ones:
BatchNorm/LayerNorm gradients and some small matmuls reduce in a different order, so a row drifts from the
un-vmapped main model in the last bits and then chaotically. That is why a vectorized ghost is compared with
an ε = 0 *shadow* row of the same stack, never with the main model (see :mod:`dynprobe.ghosts.vectorized`).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from dynprobe._util.modules import flatten_parameters, max_abs_differences, preserved_rng, rng_devices
from dynprobe.capture.step import MicroBatch, micro_batch_loss

from ._stack_optimizers import AliasOptimizers, StackedOptimizer, is_elementwise
from .replica import differing, match_grad_presence

__all__ = ["GhostStack", "ReplicaState", "check_vmappable", "flatten"]

flatten = flatten_parameters


@contextlib.contextmanager
def _without_vmap_fallback_warnings() -> Any:
    """PyTorch warns when an operator has no batching rule (e.g. attention) and vmap falls back to a loop: expected
    here, and about the probe's internals rather than the user's code."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*performance drop because we have not yet implemented the "
                                                  "batching rule")
        yield

LossFn = Callable[..., torch.Tensor]


@dataclass
class ReplicaState:
    """One replica outside a stack: trainable parameters, buffers, and an optimizer bound to ``params``.

    ``params`` are the model's ``requires_grad`` parameters in ``named_parameters()`` order, ``buffers`` its
    (non-None) buffers in ``named_buffers()`` order.
    """

    params: list[torch.Tensor]
    buffers: list[torch.Tensor]
    optimizer: torch.optim.Optimizer

    @classmethod
    def of(cls, model: nn.Module, optimizer: torch.optim.Optimizer) -> ReplicaState:
        """A view of ``model`` and its ``optimizer`` (no copies; a stack built from it only reads it)."""
        params = [p for p in model.parameters() if p.requires_grad]
        return cls(params, [b for b in model.buffers() if b is not None], optimizer)

    @classmethod
    def copy_of(cls, model: nn.Module, optimizer: torch.optim.Optimizer,
                memo: dict[int, Any] | None = None) -> ReplicaState:
        """Detached copies of ``model``'s parameters and buffers and ``deepcopy(optimizer)`` bound to them."""
        params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        mapping = {id(p): c for p, c in zip((p for p in model.parameters() if p.requires_grad), params)}
        return cls(params, [b.detach().clone() for b in model.buffers() if b is not None],
                   copy.deepcopy(optimizer, {**(memo or {}), **mapping}))


class GhostStack:
    """R replicas of ``model`` trained in lock-step as one vmapped stack; rows are addressed by hashable keys.

    Args:
        model: the main model. A deep copy (``base``) is the functional template: ``functional_call`` swaps the
            stacked rows in, and :meth:`materialize` loads one row into it for evaluation. Train/eval flags of
            its submodules follow the main model's at every step.
        optimizer: the main optimizer: the class, param groups and hyper-parameters every replica uses.
        clip_grad_norm, clip_grad_value: per-replica gradient clipping (``Ghosts(clip_grad_norm=...)``).
        optimizer_mode: ``"auto"`` (one stacked optimizer when the class is elementwise, else per-replica
            optimizers), ``"stacked"`` or ``"per_replica"``.
        no_copy: objects the deep copy of the model must share rather than copy (the probe).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, clip_grad_norm: float | None = None,
                 clip_grad_value: float | None = None, optimizer_mode: str = "auto",
                 no_copy: Sequence[Any] = ()) -> None:
        if optimizer_mode not in ("auto", "stacked", "per_replica"):
            raise ValueError(f"optimizer_mode must be 'auto', 'stacked' or 'per_replica'; got {optimizer_mode!r}")
        self.main = model
        self.base = copy.deepcopy(model, {id(obj): obj for obj in no_copy})
        self.param_names = [n for n, p in self.base.named_parameters() if p.requires_grad]
        self.buffer_names = [n for n, b in self.base.named_buffers() if b is not None]
        self._base_params = [p for p in self.base.parameters() if p.requires_grad]
        self._base_buffers = [b for b in self.base.buffers() if b is not None]
        main_params = [p for p in model.parameters() if p.requires_grad]
        if optimizer_mode == "auto":
            optimizer_mode = "stacked" if is_elementwise(optimizer) else "per_replica"
        self._optim = (StackedOptimizer if optimizer_mode == "stacked" else AliasOptimizers)(optimizer, main_params)
        self.clip_grad_norm, self.clip_grad_value = clip_grad_norm, clip_grad_value
        self.keys: list[Hashable] = []
        self.params: list[torch.Tensor] = []
        self.buffers: list[torch.Tensor] = []
        self._cuda_devices = rng_devices(model)

    # ------------------------------------------------------------------------------------------ rows

    @property
    def optimizer_mode(self) -> str:
        """``"stacked"`` (one optimizer over all rows) or ``"per_replica"`` (one per row, over aliases)."""
        return self._optim.mode

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.keys

    def row(self, key: Hashable) -> int:
        try:
            return self.keys.index(key)
        except ValueError:
            raise KeyError(f"no replica {key!r} in the stack (rows: {self.keys})") from None

    def add(self, key: Hashable, replica: ReplicaState) -> None:
        """Append a replica as a new row (copies its tensors; its optimizer state becomes the row's)."""
        self.extend([key], [replica])

    def extend(self, keys: Sequence[Hashable], replicas: Sequence[ReplicaState]) -> None:
        """Append several replicas at once (one reallocation of the stacked storage)."""
        duplicated = [k for k in keys if k in self.keys] or [k for i, k in enumerate(keys) if k in keys[:i]]
        if duplicated:
            raise ValueError(f"replica keys must be unique; {duplicated[0]!r} is already in the stack")
        for replica in replicas:
            self._check_layout(replica)
        self._restack(list(range(len(self.keys))), list(keys), list(replicas))

    def remove(self, key: Hashable) -> None:
        """Drop a row (its parameters, buffers and optimizer state)."""
        drop = self.row(key)
        self._restack([r for r in range(len(self.keys)) if r != drop], [], [])

    def export(self, key: Hashable) -> ReplicaState:
        """A copy of row ``key`` outside the stack: tensors and an optimizer of the user's class with its state."""
        row = self.row(key)
        params = [p[row].detach().clone() for p in self.params]
        buffers = [b[row].clone() for b in self.buffers]
        return ReplicaState(params, buffers, self._optim.export(row, params))

    def materialize(self, key: Hashable) -> nn.Module:
        """The base module holding row ``key``'s parameters and buffers (valid until the next call)."""
        row = self.row(key)
        with torch.no_grad():
            for target, stacked in zip(self._base_params, self.params):
                target.copy_(stacked[row])
            for target, stacked in zip(self._base_buffers, self.buffers):
                target.copy_(stacked[row])
        return self.base

    def row_state(self, key: Hashable) -> dict[str, torch.Tensor]:
        """Row ``key``'s parameters and buffers by name: detached views into the stack (no copy; valid until the
        next training step or row change)."""
        row = self.row(key)
        return {**{n: p.detach()[row] for n, p in zip(self.param_names, self.params)},
                **{n: b[row] for n, b in zip(self.buffer_names, self.buffers)}}

    def separations(self, reference: Hashable, keys: Sequence[Hashable]) -> dict[Hashable, torch.Tensor]:
        """‖row − row ``reference``‖₂ over the trainable parameters for each of ``keys`` (differences in the
        parameters' dtype, squares summed in float64), one pass over the stack: 0-d float64 device tensors (views of
        one vector; no synchronisation)."""
        if not keys:
            return {}
        # Every row minus the reference row (its own row gives 0): no index tensor to copy to the device.
        ref, total = self.row(reference), None
        for p in self.params:
            data = p.detach()
            squares = torch.linalg.vector_norm((data - data[ref]).reshape(len(self.keys), -1), dim=1,
                                               dtype=torch.float64).square()
            total = squares if total is None else total + squares.to(total.device)
        norms = total.sqrt()
        return {key: norms[self.row(key)] for key in keys}

    def row_differences(self, a: Hashable, b: Hashable) -> tuple[list[str], torch.Tensor]:
        """The names of the parameters and buffers, and max |row a − row b| of each (float64 device vector, 0 where
        bitwise equal: :func:`dynprobe._util.modules.max_abs_differences`; no synchronisation)."""
        ra, rb = self.row(a), self.row(b)
        tensors = [p.detach() for p in self.params] + self.buffers
        return (self.param_names + self.buffer_names,
                max_abs_differences([t[ra] for t in tensors], [t[rb] for t in tensors]))

    def differences(self, a: Hashable, b: Hashable) -> dict[str, float]:
        """max |row a − row b| (float64) for every parameter and buffer whose rows are not bitwise equal (read on
        the host: one synchronisation)."""
        names, values = self.row_differences(a, b)
        return differing(names, values.tolist())

    def _check_layout(self, replica: ReplicaState) -> None:
        expected = [tuple(p.shape) for p in self._base_params]
        if [tuple(p.shape) for p in replica.params] != expected or len(replica.buffers) != len(self._base_buffers):
            raise ValueError("a replica must have the model's trainable parameters and buffers, in order")

    def _restack(self, keep: list[int], keys: list[Hashable], new: list[ReplicaState]) -> None:
        index = torch.tensor(keep, dtype=torch.long)

        def stacked(old: list[torch.Tensor], parts: list[list[torch.Tensor]], template: list[torch.Tensor]):
            result = []
            for k, base in enumerate(template):
                pieces = [old[k].detach()[index.to(base.device)]] if keep else []
                pieces += [part[k].detach().to(base.device, base.dtype).unsqueeze(0) for part in parts]
                result.append(torch.cat(pieces) if pieces else base.detach().new_empty((0, *base.shape)))
            return result

        with torch.no_grad():
            params = [p.requires_grad_() for p in stacked(self.params, [r.params for r in new], self._base_params)]
            buffers = stacked(self.buffers, [r.buffers for r in new], self._base_buffers)
        if keep or new:
            self._optim.rebuild(params, keep, new)
        self.keys = [self.keys[r] for r in keep] + keys
        self.params, self.buffers = params, buffers

    # ------------------------------------------------------------------------------------------ training

    def train_step(self, micro_batches: Sequence[MicroBatch], main_optimizer: torch.optim.Optimizer, *,
                   loss_fn: LossFn | None, loss_from_output: Callable[[Any], torch.Tensor] | None
                   ) -> torch.Tensor:
        """One main optimizer step for every row; returns whether all its losses were finite, per row (in the
        order of :attr:`keys`): a bool device tensor ``[R]``, not read here (no synchronisation).

        The caller restores the main RNG stream afterwards (the replay sets the recorded states).
        """
        self._optim.sync(main_optimizer)
        self.zero_grad()
        losses = self.forward_backward(micro_batches, loss_fn=loss_fn, loss_from_output=loss_from_output)
        match_grad_presence([p for p in self.main.parameters() if p.requires_grad], self.params)
        self._clip()
        self._optim.step()
        return torch.isfinite(losses.reshape(len(micro_batches), len(self.keys), -1)).all(2).all(0)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def forward_backward(self, micro_batches: Sequence[MicroBatch], *, loss_fn: LossFn | None,
                         loss_from_output: Callable[[Any], torch.Tensor] | None) -> torch.Tensor:
        """Replay the micro-batches on all rows, accumulating gradients; returns the detached losses
        ``[micro_batches, R, *loss_shape]``."""
        if not self.keys:
            raise RuntimeError("the stack holds no replicas")
        self._follow_module_flags()
        names = self.param_names + self.buffer_names
        losses = []
        for micro in micro_batches:

            def replica_loss(params: tuple[torch.Tensor, ...], buffers: tuple[torch.Tensor, ...],
                             micro: MicroBatch = micro) -> torch.Tensor:
                state = dict(zip(names, params + buffers))

                def run_model(*args: Any, **kwargs: Any) -> Any:
                    return functional_call(self.base, state, args, kwargs)

                return micro_batch_loss(run_model, micro, loss_fn=loss_fn, loss_from_output=loss_from_output)

            micro.forward.rng.restore()  # the main's RNG state at its forward: randomness="same" → its masks
            with _without_vmap_fallback_warnings():
                loss = vmap(replica_loss, randomness="same")(tuple(self.params), tuple(self.buffers))
                grad = micro.grad
                # The recorded dL/dloss (None for an explicit probe.step: backpropagate the loss as is), every row.
                seed = torch.ones_like(loss) if grad is None else grad.to(loss.dtype).expand_as(loss)
                loss.backward(seed)
            losses.append(loss.detach())
        return torch.stack(losses)

    def _follow_module_flags(self) -> None:
        for main, base in zip(self.main.modules(), self.base.modules()):
            base.training = main.training

    def _clip(self) -> None:
        if self.clip_grad_norm:
            # Per replica, through views of its gradient rows: the same clip_grad_norm_ call as a sequential ghost.
            for row in range(len(self.keys)):
                views = []
                for p in self.params:
                    alias = p[row].detach()
                    alias.grad = p.grad[row] if p.grad is not None else None
                    views.append(alias)
                torch.nn.utils.clip_grad_norm_(views, self.clip_grad_norm)
        if self.clip_grad_value:  # elementwise: clamping all rows at once is per replica
            torch.nn.utils.clip_grad_value_(self.params, self.clip_grad_value)


def check_vmappable(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                    output_fn: Callable[[Any], torch.Tensor], *, no_copy: Sequence[Any] = ()) -> None:
    """Raise ``ValueError`` if a training-mode forward and backward of ``model`` cannot run under
    ``vmap(randomness="same")`` over two stacked copies of its parameters and buffers.

    Runs on a deep copy in training mode, RNG preserved: the user's model is never touched. Typical failures:
    data-dependent Python control flow, ``.item()``/``.tolist()`` on activations, custom ``autograd.Function``
    without vmap support, in-place ops that write batched values into unbatched tensors (the inputs).
    """
    base = copy.deepcopy(model, {id(obj): obj for obj in no_copy})
    base.train()
    names = [n for n, p in base.named_parameters() if p.requires_grad]
    buffer_names = [n for n, b in base.named_buffers() if b is not None]
    with torch.no_grad():
        params = tuple(p.detach().unsqueeze(0).repeat(2, *[1] * p.dim()).requires_grad_()
                       for p in base.parameters() if p.requires_grad)
        buffers = tuple(b.detach().unsqueeze(0).repeat(2, *[1] * b.dim()) for b in base.buffers() if b is not None)

    def replica_output(params: tuple[torch.Tensor, ...], buffers: tuple[torch.Tensor, ...]) -> torch.Tensor:
        output = functional_call(base, dict(zip(names + buffer_names, params + buffers)), args, kwargs)
        return output_fn(output).float().sum()

    try:
        with preserved_rng(rng_devices(model)), _without_vmap_fallback_warnings():
            vmap(replica_output, randomness="same")(params, buffers).sum().backward()
    except Exception as error:  # noqa: BLE001 - any failure means: not vmappable
        raise ValueError(
            f"this model cannot be trained as a torch.func.vmap stack ({type(error).__name__}: {error}). Typical "
            "causes: data-dependent control flow, .item() on activations, a custom autograd.Function without vmap "
            "support, in-place writes into the inputs. Use Ghosts(vectorize=False) (or 'auto', which falls back)"
        ) from error
