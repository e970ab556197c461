"""Capture of what one training step consumed, and its replay on a ghost.

For every training-mode forward of the main model, a forward pre-hook records the inputs (by reference), the
RNG state *before* the forward (so dropout masks replay identically) and the autocast state. The watched loss
records its arguments — with the main model's output located by identity, so a ghost's output can take its
place (``criterion(out.logits, y)`` works) — and a tensor hook on the loss records dL_total/dloss, which
reproduces ``loss / k`` gradient accumulation, loss weights and ``GradScaler.scale``. A *micro-batch* is one
(forward, loss) pair; a step is the list of micro-batches since the previous optimizer step.

Replaying a step on a ghost (:func:`replay_micro_batch`) sets the recorded RNG state, re-enters the recorded
autocast state, runs the ghost's forward on the same inputs, rebuilds the loss arguments with the ghost's
output, and calls ``backward`` with the recorded gradient. The caller restores the main RNG stream afterwards.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "explicit_micro_batch",
    "AutocastState",
    "ForwardCall",
    "LossCall",
    "MicroBatch",
    "OutputPath",
    "RngState",
    "StepCapture",
    "micro_batch_loss",
    "replay_micro_batch",
]


# ------------------------------------------------------------------------------------------------ RNG


@dataclass(frozen=True)
class RngState:
    """The CPU generator state and the states of the CUDA devices a computation may touch."""

    cpu: torch.Tensor
    cuda: tuple[tuple[int, torch.Tensor], ...] = ()

    @classmethod
    def capture(cls, cuda_devices: Sequence[int] = ()) -> RngState:
        cuda = tuple((d, torch.cuda.get_rng_state(d)) for d in cuda_devices) if cuda_devices else ()
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda:
            torch.cuda.set_rng_state(state, device)


# ------------------------------------------------------------------------------------------------ autocast


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has per-device functions
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _autocast_dtype(device_type: str) -> torch.dtype:
    try:
        return torch.get_autocast_dtype(device_type)
    except (AttributeError, TypeError):  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


@dataclass(frozen=True)
class AutocastState:
    """Which autocast regions were active (CPU and CUDA) and with which dtypes."""

    regions: tuple[tuple[str, torch.dtype], ...] = ()

    @classmethod
    def capture(cls) -> AutocastState:
        regions = []
        for device_type in ("cpu", "cuda"):
            if device_type == "cuda" and not torch.cuda.is_available():
                continue
            if _autocast_enabled(device_type):
                regions.append((device_type, _autocast_dtype(device_type)))
        return cls(tuple(regions))

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Re-enter exactly these autocast regions (and disable autocast elsewhere)."""
        with contextlib.ExitStack() as stack:
            active = dict(self.regions)
            for device_type in ("cpu", "cuda"):
                if device_type == "cuda" and not torch.cuda.is_available():
                    continue
                if device_type in active:
                    stack.enter_context(torch.autocast(device_type, dtype=active[device_type]))
                elif _autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            yield


# ------------------------------------------------------------------------------------------------ outputs


OutputPath = tuple[Any, ...]  # keys / indices / attribute names from the output object to a tensor


def tensor_paths(output: Any, prefix: OutputPath = (), depth: int = 0) -> Iterator[tuple[OutputPath, torch.Tensor]]:
    """Every tensor reachable in a model output (tensors, tuples, lists, mappings, dataclasses)."""
    if depth > 6:
        return
    if isinstance(output, torch.Tensor):
        yield prefix, output
    elif isinstance(output, Mapping):  # includes Hugging Face ModelOutput
        for key, value in output.items():
            yield from tensor_paths(value, (*prefix, ("key", key)), depth + 1)
    elif isinstance(output, (tuple, list)):
        for i, value in enumerate(output):
            yield from tensor_paths(value, (*prefix, ("index", i)), depth + 1)
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        for f in dataclasses.fields(output):
            yield from tensor_paths(getattr(output, f.name), (*prefix, ("attr", f.name)), depth + 1)


def follow(output: Any, path: OutputPath) -> Any:
    """The object at ``path`` inside ``output`` (see :func:`tensor_paths`)."""
    for kind, key in path:
        output = output[key] if kind in ("key", "index") else getattr(output, key)
    return output


# ------------------------------------------------------------------------------------------------ records


@dataclass
class ForwardCall:
    """One training-mode forward of the main model."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rng: RngState
    autocast: AutocastState
    input_versions: tuple[tuple[torch.Tensor, int], ...]
    output: Any = None
    output_ids: dict[int, OutputPath] = field(default_factory=dict)

    def inputs_unchanged(self) -> bool:
        """False when an input tensor was modified in place after the forward (a reused buffer)."""
        return all(t._version == v for t, v in self.input_versions)


@dataclass
class LossCall:
    """One call of the watched loss whose arguments contain a captured forward's output."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    forward: ForwardCall
    # For each loss argument that is (part of) the forward's output: where it sits in the loss arguments and
    # where it sits in the output.
    substitutions: tuple[tuple[OutputPath, OutputPath], ...]
    autocast: AutocastState
    grad: torch.Tensor | None = None  # dL_total/dloss, recorded by a tensor hook during backward
    scale: float | None = None  # the main GradScaler's scale when the loss was computed (if one is declared)


@dataclass
class MicroBatch:
    forward: ForwardCall
    loss: LossCall | None  # None when the loss comes from the output itself (loss_from_output)
    grad: torch.Tensor | None = None
    scale: float | None = None


def _arg_paths(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[tuple[OutputPath, Any]]:
    for i, value in enumerate(args):
        yield (("index", i),), value
        if isinstance(value, (tuple, list, Mapping)):
            for path, tensor in tensor_paths(value, (("index", i),)):
                yield path, tensor
    for key, value in kwargs.items():
        yield (("kw", key),), value
        if isinstance(value, (tuple, list, Mapping)):
            for path, tensor in tensor_paths(value, (("kw", key),)):
                yield path, tensor


def _replace(container: Any, path: OutputPath, value: Any) -> Any:
    """A copy of ``container`` (tuples, lists, mappings, nested) with the element at ``path`` set to ``value``."""
    if not path:
        return value
    key, rest = path[0][1], path[1:]
    if isinstance(container, Mapping):
        copied = dict(container)
        copied[key] = _replace(container[key], rest, value)
        return copied
    items = list(container)
    items[key] = _replace(items[key], rest, value)
    return tuple(items) if isinstance(container, tuple) else items


# ------------------------------------------------------------------------------------------------ capture


class StepCapture:
    """Records the micro-batches of the current step (between two optimizer steps)."""

    def __init__(self, cuda_devices: Sequence[int], scale_fn: Callable[[], float] | None = None) -> None:
        self.cuda_devices = tuple(cuda_devices)
        self.scale_fn = scale_fn
        self.forwards: list[ForwardCall] = []
        self.micro_batches: list[MicroBatch] = []
        self.unmatched_losses = 0

    def on_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        versions = tuple((t, t._version) for t in _tensors_in((args, kwargs)))
        self.forwards.append(ForwardCall(args, dict(kwargs), RngState.capture(self.cuda_devices),
                                         AutocastState.capture(), versions))

    def on_output(self, output: Any) -> None:
        if self.forwards and self.forwards[-1].output is None:
            call = self.forwards[-1]
            call.output = output
            call.output_ids = {id(t): path for path, t in tensor_paths(output)}
            call.output_ids[id(output)] = ()  # the whole output object passed to the loss

    def on_loss(self, loss: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A watched-loss call: find the forward whose output it consumes; hook the loss's gradient."""
        for call in reversed(self.forwards):
            substitutions = tuple(
                (arg_path, call.output_ids[id(value)])
                for arg_path, value in _arg_paths(args, kwargs)
                if id(value) in call.output_ids
            )
            if substitutions:
                record = LossCall(args, dict(kwargs), call, substitutions, AutocastState.capture())
                self._add(MicroBatch(call, record), loss)
                return
        self.unmatched_losses += 1

    def on_output_loss(self, loss: torch.Tensor) -> None:
        """``loss_from_output`` mode: the loss is part of the last forward's output."""
        if self.forwards:
            self._add(MicroBatch(self.forwards[-1], None), loss)

    def _add(self, micro: MicroBatch, loss: torch.Tensor) -> None:
        if self.scale_fn is not None:
            micro.scale = float(self.scale_fn())
        if loss.requires_grad:
            def record(grad: torch.Tensor, micro: MicroBatch = micro) -> None:
                micro.grad = grad.detach().clone()

            loss.register_hook(record)
        self.micro_batches.append(micro)

    def take(self) -> list[MicroBatch]:
        """The micro-batches whose backward ran since the previous step; resets the capture."""
        taken = [m for m in self.micro_batches if m.grad is not None]
        self.forwards, self.micro_batches, self.unmatched_losses = [], [], 0
        return taken


def _tensors_in(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if depth > 4:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _tensors_in(value, depth + 1)
    elif isinstance(obj, (tuple, list)):
        for value in obj:
            yield from _tensors_in(value, depth + 1)


# ------------------------------------------------------------------------------------------------ replay


def ghost_loss_arguments(loss: LossCall, ghost_output: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The loss arguments with every piece of the main output replaced by the ghost's counterpart."""
    args, kwargs = loss.args, loss.kwargs
    for arg_path, out_path in loss.substitutions:
        value = follow(ghost_output, out_path)
        if arg_path[0][0] == "kw":
            kwargs = _replace(kwargs, arg_path, value)
        else:
            args = _replace(args, arg_path, value)
    return args, kwargs


def micro_batch_loss(
    run_model: Callable[..., Any],
    micro: MicroBatch,
    *,
    loss_fn: Callable[..., torch.Tensor] | None,
    loss_from_output: Callable[[Any], torch.Tensor] | None,
) -> torch.Tensor:
    """The loss of one captured micro-batch for a replica: ``run_model(*args, **kwargs)`` under the recorded
    autocast state, then the watched loss (under its own recorded autocast state) with the replica's output in
    place of the main one, or ``loss_from_output(output)``. Does not touch the RNG and does not backpropagate.

    Shared by the sequential ghosts (``run_model`` is the ghost module) and the vectorized stack (``run_model``
    is a ``functional_call`` inside ``vmap``, where every tensor here is one replica's slice).
    """
    forward = micro.forward
    with forward.autocast.entered():
        output = run_model(*forward.args, **forward.kwargs)
    if micro.loss is not None:
        if loss_fn is None:
            raise ValueError("a captured micro-batch needs the watched loss function to be replayed")
        args, kwargs = ghost_loss_arguments(micro.loss, output)
        with micro.loss.autocast.entered():
            return loss_fn(*args, **kwargs)
    if loss_from_output is None:
        raise ValueError("a micro-batch captured from the output's loss needs loss_from_output to be replayed")
    return loss_from_output(output)


def replay_micro_batch(
    model: nn.Module,
    micro: MicroBatch,
    *,
    loss_fn: Callable[..., torch.Tensor] | None,
    loss_from_output: Callable[[Any], torch.Tensor] | None,
    scale_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Forward and backward one captured micro-batch on ``model`` (a ghost); returns the detached loss.

    Sets the recorded RNG state, computes :func:`micro_batch_loss` and backpropagates the recorded dL/dloss.
    With ``scale_loss`` (a ghost's own ``GradScaler.scale``), the main scale is divided out of the recorded
    dL/dloss and the ghost's scale applied instead; scales are powers of two, so this is exact.
    """
    micro.forward.rng.restore()
    loss = micro_batch_loss(model, micro, loss_fn=loss_fn, loss_from_output=loss_from_output)
    grad = micro.grad
    if scale_loss is not None and micro.scale:
        scale_loss(loss).backward(grad / micro.scale)
    else:
        loss.backward(grad)  # None: an explicit probe.step(x, y), whose loss is backpropagated as is
    return loss.detach()


def explicit_micro_batch(inputs: Any, targets: Any, cuda_devices: list[int], *, with_loss: bool) -> MicroBatch:
    """What an explicit ``probe.step(inputs, targets)`` call hands the ghosts: ``model(inputs)`` (``model(**inputs)``
    for a dict) with the RNG and autocast state of this call, and — ``with_loss`` — the watched loss applied to
    ``(output, targets)``; without, the loss comes from the output (``loss_from_output``)."""
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else ((inputs,), {})
    call = ForwardCall(args, kwargs, RngState.capture(cuda_devices), AutocastState.capture(), ())
    if not with_loss:
        return MicroBatch(call, None)
    loss = LossCall((None, targets), {}, call, (((("index", 0),), ()),), AutocastState.capture())
    return MicroBatch(call, loss)
