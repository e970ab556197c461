"""Model inputs and labelled data: the one parser of ``(inputs, targets)`` data used by every part of dynprobe.

Inputs are a tensor (the model is called ``model(x)``) or a mapping of tensors (``model(**x)``, Hugging Face
style); every batched tensor shares the first dimension, the examples. Labelled data are an ``(inputs,
targets)`` pair or an iterable (a DataLoader) of ``(inputs, targets, ...)`` batches. The eval set, the loss
barrier and the switching experiment read data through these functions only.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import torch
from torch import nn

__all__ = [
    "Inputs", "OutputFn", "check_inputs", "concat_inputs", "default_output_fn", "device_of_inputs", "forward",
    "index_inputs", "input_batches", "inputs_to", "is_labelled_pair", "labelled_batches", "no_autocast",
    "num_examples", "split_batch",
]

Inputs = Union[torch.Tensor, Mapping[str, torch.Tensor]]
OutputFn = Callable[[Any], torch.Tensor]


def default_output_fn(output: Any) -> torch.Tensor:
    """The prediction tensor of a model output: the tensor itself, ``output.logits`` (Hugging Face) or
    ``output["logits"]``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"the model returned a {type(output).__name__}, not a tensor of logits; pass output_fn= "
        f"(e.g. output_fn=lambda out: out[0]) to select the logits (or the predictions, for regression)"
    )


def num_examples(inputs: Inputs) -> int:
    """First dimension of a tensor, or the common first dimension of a mapping of tensors."""
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0] if inputs.dim() else 0
    if isinstance(inputs, Mapping):
        sizes = {name: t.shape[0] for name, t in inputs.items() if isinstance(t, torch.Tensor) and t.dim()}
        if not sizes:
            raise ValueError("eval_data inputs: a mapping of inputs must hold at least one batched tensor")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"eval_data inputs: tensors in the mapping disagree on the number of examples: {sizes}")
        return next(iter(sizes.values()))
    raise TypeError(f"inputs must be a tensor or a mapping of tensors; got {type(inputs).__name__}")


def index_inputs(inputs: Inputs, index: torch.Tensor | slice) -> Inputs:
    """Select examples along the first dimension (of every batched tensor of a mapping)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    return {name: t[index] if isinstance(t, torch.Tensor) and t.dim() else t for name, t in inputs.items()}


def inputs_to(inputs: Inputs, device: torch.device) -> Inputs:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=True)
    return {name: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for name, t in inputs.items()}


def device_of_inputs(inputs: Inputs) -> torch.device:
    if isinstance(inputs, torch.Tensor):
        return inputs.device
    for t in inputs.values():
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def concat_inputs(parts: list[Inputs]) -> Inputs:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    if isinstance(parts[0], Mapping):
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    raise TypeError(f"eval_data inputs must be tensors or dicts of tensors; got {type(parts[0]).__name__}")


def _tensors(inputs: Inputs) -> list[tuple[str, torch.Tensor]]:
    if isinstance(inputs, torch.Tensor):
        return [("inputs", inputs)]
    return [(f"inputs[{name!r}]", t) for name, t in inputs.items() if isinstance(t, torch.Tensor)]


def check_inputs(inputs: Inputs, where: str = "eval_data", *, finite: bool = True) -> None:
    """Refuse inputs that would make every metric meaningless: meta-device tensors (no data) and (``finite``)
    NaN/inf values."""
    for name, tensor in _tensors(inputs):
        if tensor.is_meta:
            raise ValueError(f"{where} {name} is on the meta device (a shape without data); load the data onto a real "
                             "device before attaching the probe")
        if finite and (tensor.is_floating_point() or tensor.is_complex()) and tensor.numel():
            good = torch.isfinite(tensor).reshape(tensor.shape[0], -1).all(dim=1) if tensor.dim() else \
                torch.isfinite(tensor).reshape(1)
            if not bool(good.all()):
                bad = torch.nonzero(~good).reshape(-1)
                raise ValueError(
                    f"{where} {name} holds NaN or inf values (example {int(bad[0])}; {bad.numel()} examples in "
                    "all): every loss, prediction and D on them would be NaN. Clean or drop those examples")


def forward(model: nn.Module, inputs: Inputs, params_and_buffers: Mapping[str, torch.Tensor] | None = None) -> Any:
    """``model(x)`` for a tensor, ``model(**x)`` for a mapping; through ``torch.func.functional_call`` with the
    given parameters and buffers instead of the module's own when ``params_and_buffers`` is given."""
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else ((inputs,), {})
    if params_and_buffers is None:
        return model(*args, **kwargs)
    return torch.func.functional_call(model, params_and_buffers, args, kwargs)


class no_autocast:
    """Disable autocast on ``device``'s type for the block (evaluations run in the model's own dtypes)."""

    def __init__(self, device: torch.device) -> None:
        supported = device.type in ("cpu", "cuda")
        self.context = torch.autocast(device_type=device.type, enabled=False) if supported else None

    def __enter__(self) -> None:
        if self.context is not None:
            self.context.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.context is not None:
            self.context.__exit__(*exc)


# ------------------------------------------------------------------------------------------- labelled data


def is_labelled_pair(obj: Any) -> bool:
    """``(inputs, targets)`` with inputs a tensor or mapping and targets a tensor (the whole set, not a loader)."""
    return (isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], (torch.Tensor, Mapping))
            and isinstance(obj[1], torch.Tensor))


def split_batch(batch: Any, where: str) -> tuple[Inputs, torch.Tensor]:
    """One labelled batch ``(inputs, targets, ...)`` → ``(inputs, targets)``, checked: inputs a tensor or mapping,
    targets batched with one row per example (extra elements, e.g. indices, are ignored)."""
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], (torch.Tensor, Mapping))):
        length = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        raise TypeError(f"{where} is a {type(batch).__name__}{length}; it must be (inputs, targets, ...) with inputs "
                        "a tensor or a dict of tensors")
    inputs, targets = batch[0], torch.as_tensor(batch[1])
    if targets.dim() == 0:
        raise ValueError(f"{where}: targets must have one row per example; got a scalar")
    if num_examples(inputs) != targets.shape[0]:
        raise ValueError(f"{where}: {num_examples(inputs)} inputs but {targets.shape[0]} targets; they must match")
    return inputs, targets


def labelled_batches(data: Any, batch_size: int, where: str = "data") -> list[tuple[Inputs, torch.Tensor]]:
    """``(inputs, targets)`` split into batches of ``batch_size``, or the batches of an iterable, in order;
    empty batches dropped. An iterable is read once, in full."""
    if is_labelled_pair(data):
        inputs, targets = split_batch(data, where)
        starts = range(0, targets.shape[0], batch_size)
        pairs = [(index_inputs(inputs, slice(s, s + batch_size)), targets[s: s + batch_size]) for s in starts]
    elif isinstance(data, (torch.Tensor, Mapping, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(f"{where} must be (inputs, targets) — inputs a tensor or a mapping of tensors, targets one "
                        f"row per example — or an iterable/DataLoader of such pairs; got {type(data).__name__}")
    else:
        pairs = [split_batch(batch, f"{where} batch {index}") for index, batch in enumerate(data)]
    return [(inputs, targets) for inputs, targets in pairs if targets.shape[0] > 0]


def input_batches(source: Any, batch_size: int, limit: int | None, where: str) -> list[Inputs]:
    """Input batches only (e.g. for BatchNorm re-estimation): a tensor or mapping of inputs, an ``(inputs,
    targets)`` pair, or an iterable of input batches or of ``(inputs, targets, ...)`` batches; at most ``limit``."""
    if is_labelled_pair(source) and source[1].dim() >= 1 and source[1].shape[0] == num_examples(source[0]):
        source = source[0]  # an (inputs, targets) pair: the targets play no part
    if isinstance(source, (torch.Tensor, Mapping)):
        starts = range(0, num_examples(source), batch_size)
        batches: Iterable = (index_inputs(source, slice(s, s + batch_size)) for s in starts)
    elif isinstance(source, Iterable) and not isinstance(source, (str, bytes)):
        batches = source
    else:
        raise TypeError(f"{where} must be input batches: a tensor or mapping of inputs, an (inputs, targets) pair, or "
                        f"an iterable/DataLoader of batches; got {type(source).__name__}")
    chosen = []
    for index, batch in enumerate(itertools.islice(batches, limit)):
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (torch.Tensor, Mapping)):
            batch = batch[0]
        if not isinstance(batch, (torch.Tensor, Mapping)):
            raise TypeError(f"each {where} batch must be inputs or (inputs, targets, ...); batch {index} is a "
                            f"{type(batch).__name__}")
        if num_examples(batch) > 0:
            chosen.append(batch)
    if not chosen:
        raise ValueError(f"{where} holds no examples: give at least one batch of inputs")
    return chosen
