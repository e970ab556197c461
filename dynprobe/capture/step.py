"""Capture of what one training step consumed, and its replay on a ghost.

For every training-mode forward of the main model, a forward pre-hook records the inputs (by reference), the
RNG state *before* the forward (so dropout masks replay identically) and the autocast state. The watched loss
records its arguments — with the main model's output located by identity or as a view of it, so a ghost's output
can take its place (``criterion(out.logits, y)`` and ``criterion(logits.reshape(-1, V), y.reshape(-1))`` work;
:mod:`dynprobe.capture.views`) — and a tensor hook on the loss records dL_total/dloss, which
reproduces ``loss / k`` gradient accumulation, loss weights and ``GradScaler.scale``. A *micro-batch* is one
(forward, loss) pair; a step is the list of micro-batches since the previous optimizer step.

Replaying a step on a ghost (:func:`replay_micro_batch`) sets the recorded RNG state, re-enters the recorded
autocast state, runs the ghost's forward on the same inputs, rebuilds the loss arguments with the ghost's
output, and calls ``backward`` with the recorded gradient. The caller restores the main RNG stream afterwards.

A watched-loss call the ghosts cannot replay is noted with its reason (:class:`UnmatchedLoss`): no argument is
the output, a part of it or a view of it; or an argument is computed from the output without being a view
(``logits.float()``), which the ghosts must not replay with the main run's tensor.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .views import OutputView, derived_from, locate_view, storage_key

__all__ = [
    "explicit_micro_batch",
    "AutocastState",
    "CapturedStep",
    "ForwardCall",
    "LossCall",
    "MicroBatch",
    "OutputPath",
    "RngState",
    "StepCapture",
    "Substitution",
    "UnmatchedLoss",
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
    output_memory: dict[int, list[tuple[OutputPath, torch.Tensor]]] = field(default_factory=dict)  # by storage
    output_nodes: tuple[Any, ...] = ()  # the output tensors' grad_fn, held so that their ids stay theirs

    def inputs_unchanged(self) -> bool:
        """False when an input tensor was modified in place after the forward (a reused buffer)."""
        return all(t._version == v for t, v in self.input_versions)


@dataclass(frozen=True)
class Substitution:
    """A loss argument (at ``arg_path``) that is the output tensor at ``out_path``, or ``view`` of it."""

    arg_path: OutputPath
    out_path: OutputPath
    view: OutputView | None = None

    def of(self, output: Any) -> Any:
        """This argument rebuilt from another output (a ghost's)."""
        value = follow(output, self.out_path)
        return value if self.view is None else self.view.of(value)


@dataclass
class LossCall:
    """One call of the watched loss whose arguments contain a captured forward's output."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    forward: ForwardCall
    substitutions: tuple[Substitution, ...]  # the loss arguments that are (part of, or a view of) the output
    autocast: AutocastState
    grad: torch.Tensor | None = None  # dL_total/dloss, recorded by a tensor hook during backward
    scale: float | None = None  # the main GradScaler's scale when the loss was computed (if one is declared)


@dataclass
class MicroBatch:
    forward: ForwardCall
    loss: LossCall | None  # None when the loss comes from the output itself (loss_from_output)
    grad: torch.Tensor | None = None
    scale: float | None = None


_FIXES = ("Pass the model's output itself, or a view of it (reshape, view, flatten, transpose, slicing), to the "
          "watched loss and compute the rest inside the loss function; for a model that computes its own loss pass "
          "Probe(loss_from_output=...); or call probe.step(x, y) at the top of each iteration with "
          "Ghosts(loss_fn=...) applied to (output, targets)")


@dataclass
class UnmatchedLoss:
    """A watched-loss call the ghosts cannot replay. ``from_output``: an argument comes from the model's output
    (computed from it, or a view that cannot be replayed), so replaying the step without it would train the ghosts
    on another loss; they must stop. ``backpropagated``: the user's backward reached this loss."""

    reason: str
    from_output: bool
    backpropagated: bool = False


@dataclass
class CapturedStep:
    """What :meth:`StepCapture.take` hands the ghosts: the replayable micro-batches, and the watched-loss calls of
    this step that were backpropagated but cannot be replayed."""

    micro_batches: list[MicroBatch]
    unmatched: list[UnmatchedLoss] = field(default_factory=list)


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
        self.unmatched: list[UnmatchedLoss] = []

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
            for path, tensor in tensor_paths(output):
                key = storage_key(tensor)
                if key is not None:
                    call.output_memory.setdefault(key, []).append((path, tensor))
            call.output_nodes = tuple(t.grad_fn for _, t in tensor_paths(output) if t.grad_fn is not None)

    def on_loss(self, loss: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A watched-loss call: find the forward whose output it consumes; hook the loss's gradient. A call that
        cannot be replayed is noted (:class:`UnmatchedLoss`), and counts once its backward runs."""
        arguments = list(_arg_paths(args, kwargs))
        for call in reversed(self.forwards):
            substitutions, problem = _substitutions(call, arguments)
            if problem is not None:
                self._note_unmatched(UnmatchedLoss(f"{problem}. {_FIXES}", from_output=True), loss)
                return
            if substitutions:
                record = LossCall(args, dict(kwargs), call, substitutions, AutocastState.capture())
                self._add(MicroBatch(call, record), loss)
                return
        self._note_unmatched(UnmatchedLoss(
            "none of the watched loss's arguments is the model's output, a part of it or a view of it", False), loss)

    def _note_unmatched(self, unmatched: UnmatchedLoss, loss: torch.Tensor) -> None:
        def record(grad: torch.Tensor, unmatched: UnmatchedLoss = unmatched) -> None:
            unmatched.backpropagated = True

        if loss.requires_grad:
            loss.register_hook(record)
        self.unmatched.append(unmatched)

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

    def take(self) -> CapturedStep:
        """The micro-batches and unmatched loss calls whose backward ran since the previous step; resets the
        capture."""
        taken = CapturedStep([m for m in self.micro_batches if m.grad is not None],
                             [u for u in self.unmatched if u.backpropagated])
        self.forwards, self.micro_batches, self.unmatched = [], [], []
        return taken


def _substitutions(call: ForwardCall, arguments: list[tuple[OutputPath, Any]]
                   ) -> tuple[tuple[Substitution, ...], str | None]:
    """The loss arguments that are ``call``'s output, a part of it or a view of one (:func:`locate_view`); or why
    the call cannot be replayed: an argument is a view that cannot be replayed, or is computed from the output."""
    substitutions = []
    for arg_path, value in arguments:
        if id(value) in call.output_ids:
            substitutions.append(Substitution(arg_path, call.output_ids[id(value)]))
            continue
        if not isinstance(value, torch.Tensor):
            continue
        located = [(path, locate_view(value, out)) for path, out in call.output_memory.get(storage_key(value), [])]
        views = [(path, view) for path, view in located if isinstance(view, OutputView)]
        if views:
            substitutions.append(Substitution(arg_path, *views[0]))
            continue
        refused = next((reason for _, reason in located if isinstance(reason, str)), None)
        if refused is not None:
            return (), refused
        operation = derived_from(value, call.output_nodes)
        if operation is not None:
            return (), (f"the watched loss's argument {_describe(arg_path)} is computed from the model's output "
                        f"({operation}), not the output or a view of it, so a ghost cannot compute it from its own "
                        "output")
    return tuple(substitutions), None


def _describe(path: OutputPath) -> str:
    """``0`` for the first positional argument, ``target=`` for a keyword, ``0[1]`` inside a container."""
    (kind, key), rest = path[0], path[1:]
    head = f"{key}=" if kind == "kw" else str(key)
    return head + "".join(f"[{k!r}]" if isinstance(k, str) else f"[{k}]" for _, k in rest)


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
    for substitution in loss.substitutions:
        value, arg_path = substitution.of(ghost_output), substitution.arg_path
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
    loss = LossCall((None, targets), {}, call, (Substitution((("index", 0),), ()),), AutocastState.capture())
    return MicroBatch(call, loss)
