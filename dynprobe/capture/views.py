"""Loss arguments that are views of the model's output, and loss arguments computed from it.

The nanoGPT pattern ``criterion(logits.reshape(-1, V), y.reshape(-1))`` hands the watched loss a *view* of the
model's output: another tensor object over the same memory. A view is fixed by its geometry relative to the output,
(size, stride, storage offset − the output's storage offset), so a ghost replays the loss on

    ghost_output.as_strided(size, stride, ghost_output.storage_offset() + offset)

— the same elements in the same layout, hence the same loss kernel and, for the ε = 0 control, the same bits
(reshape, view, flatten, transpose, permute, slicing such as ``[..., :-1, :]``, select, unsqueeze, ``detach``).
The geometry means the same elements only when the ghost's output has the main output's size and stride; that is
checked at replay (:meth:`OutputView.of`). Locating a view reads metadata only (``untyped_storage().data_ptr()``,
``stride()``, ``storage_offset()``): no device synchronisation.

Two kinds of views are refused, each with its reason (:func:`locate_view` returns a string):

* a view of an output that is not dense in its memory (``h.chunk(2, -1)``, ``h[:, -1]``), other than the output
  itself (``out.detach()``): memory between its elements belongs to something else, so the address range of a view
  does not prove that its elements are the output's;
* a view that overlaps itself (``expand``, ``unfold``): the main run's backward sums the repeated elements in its
  own order, ``as_strided``'s in another, and the control would not stay bitwise equal.

An argument computed from the output but not a view of it (``logits.float()``, ``logits / T``, a non-contiguous
``reshape`` that copies) cannot be replayed: the ghost would be handed the main run's tensor, not one computed from
its own output. :func:`derived_from` finds it by walking at most ``max_nodes`` nodes of its autograd graph back to
the output's ``grad_fn`` (host-side objects, no synchronisation).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["OutputView", "derived_from", "locate_view", "storage_key"]


def storage_key(tensor: torch.Tensor) -> int | None:
    """The address of the memory ``tensor`` views, or None for a tensor without ordinary storage (sparse, meta,
    empty)."""
    if tensor.layout != torch.strided or tensor.is_meta or tensor.numel() == 0:
        return None
    try:
        address = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
        return None
    return address or None


def _ordered(size: tuple[int, ...], stride: tuple[int, ...]) -> list[tuple[int, int]]:
    """(stride, size) of the dimensions that move, innermost first."""
    return sorted((st, s) for s, st in zip(size, stride) if s > 1)


def _extent(size: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """One past the largest storage offset an element reaches, relative to the first element."""
    return 1 + sum((s - 1) * st for s, st in zip(size, stride))


def _dense(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Every address between the first and the last element is an element, each once (any dimension order)."""
    expected = 1
    for st, s in _ordered(size, stride):
        if st != expected:
            return False
        expected *= s
    return True


def _overlaps(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Some address is reached by two elements (a sufficient test: each stride clears the dimensions inside it)."""
    reach = 1
    for st, s in _ordered(size, stride):
        if st < reach:
            return True
        reach = st * s
    return False


@dataclass(frozen=True)
class OutputView:
    """A loss argument as a view of one output tensor: its geometry relative to the output, the output's own size
    and stride (the geometry is valid on a tensor with exactly these), and whether the argument was detached."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    output_size: tuple[int, ...]
    output_stride: tuple[int, ...]
    detached: bool = False

    def of(self, output: torch.Tensor) -> torch.Tensor:
        """The same view of another output (a ghost's); a clear error when that output's layout differs."""
        if tuple(output.shape) != self.output_size or tuple(output.stride()) != self.output_stride:
            raise ValueError(
                f"the watched loss takes a view of the model's output (size {list(self.size)}, stride "
                f"{list(self.stride)}), replayed on the ghost's output at the same place; but the ghost's output has "
                f"size {list(output.shape)} and stride {list(output.stride())} where the main output had "
                f"{list(self.output_size)} and {list(self.output_stride)}, so the same view would read other "
                "elements. Pass the model's output itself to the watched loss and reshape inside the loss")
        view = output.as_strided(self.size, self.stride, output.storage_offset() + self.offset)
        return view.detach() if self.detached else view


def locate_view(argument: torch.Tensor, output: torch.Tensor) -> OutputView | str | None:
    """``argument`` as a view of ``output``: its :class:`OutputView`; a string saying why a tensor over the output's
    memory cannot be replayed as one (see the module docstring); None when it does not lie in the output's memory."""
    key = storage_key(argument)
    if key is None or key != storage_key(output) or argument.dtype != output.dtype:
        return None
    size, stride = tuple(argument.shape), tuple(argument.stride())
    out_size, out_stride = tuple(output.shape), tuple(output.stride())
    offset = argument.storage_offset() - output.storage_offset()
    if offset < 0 or offset + _extent(size, stride) > _extent(out_size, out_stride) or min(stride, default=0) < 0:
        return None  # memory beside the output (a larger buffer it is part of)
    same = offset == 0 and size == out_size and stride == out_stride  # the output itself (detached)
    if not same and not _dense(out_size, out_stride):
        return (f"a loss argument (size {list(size)}) is a view of a model output that is not dense in its memory "
                f"(size {list(out_size)}, stride {list(out_stride)}: a slice or chunk of a larger tensor)")
    if _overlaps(size, stride):
        return (f"a loss argument is a view of the model's output whose elements overlap (size {list(size)}, stride "
                f"{list(stride)}: expand or unfold), whose gradient a ghost cannot replay bit for bit")
    return OutputView(size, stride, offset, out_size, out_stride,
                      detached=output.requires_grad and not argument.requires_grad)


def derived_from(argument: Any, output_nodes: Iterable[Any], max_nodes: int = 64) -> str | None:
    """The name of the operation applied to the output on the way to ``argument`` (``"ToCopyBackward0"`` for
    ``logits.double()``) when its autograd graph reaches one of ``output_nodes`` (the output tensors' ``grad_fn``)
    within ``max_nodes`` nodes; else None."""
    if not isinstance(argument, torch.Tensor) or argument.grad_fn is None:
        return None
    targets = {id(node) for node in output_nodes}
    frontier = [(argument.grad_fn, argument.grad_fn)]  # (node, the node it was reached from)
    seen: dict[int, Any] = {}  # keeps the nodes alive, so that their ids stay theirs
    while frontier and len(seen) < max_nodes:
        node, child = frontier.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        if id(node) in targets:
            return type(child).__name__
        frontier.extend((parent, node) for parent, _ in node.next_functions if parent is not None)
    return None
