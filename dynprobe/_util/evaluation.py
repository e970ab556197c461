"""The fixed evaluation set and the side-effect-free evaluation of a model on it.

Every snapshot evaluates the model on the *same* examples (D, eq. (6), compares predictions example by
example). The set is taken once, when the probe attaches: from ``(inputs, targets)`` tensors, or from a
DataLoader (map-style datasets are subsampled by index with a seeded generator; iterable ones contribute their
first examples). Reading the user's DataLoader happens under a forked RNG so the user's stream is untouched.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from .modules import eval_mode, preserved_rng, rng_devices

__all__ = [
    "EvalResult", "EvalSet", "Inputs", "default_output_fn", "evaluate", "forward", "index_inputs", "inputs_to",
    "no_autocast", "num_examples",
]

Inputs = Union[torch.Tensor, Mapping[str, torch.Tensor]]
OutputFn = Callable[[Any], torch.Tensor]


def default_output_fn(output: Any) -> torch.Tensor:
    """Logits from a model output: a tensor itself, ``output.logits`` (Hugging Face) or ``output["logits"]``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"the model returned a {type(output).__name__}, not a tensor of logits; pass output_fn= "
        f"(e.g. output_fn=lambda out: out[0]) to select the (N, num_classes) logits"
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


def forward(model: nn.Module, inputs: Inputs, params_and_buffers: Mapping[str, torch.Tensor] | None = None) -> Any:
    """``model(x)`` for a tensor, ``model(**x)`` for a mapping; through ``torch.func.functional_call`` with the
    given parameters and buffers instead of the module's own when ``params_and_buffers`` is given."""
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else ((inputs,), {})
    if params_and_buffers is None:
        return model(*args, **kwargs)
    return torch.func.functional_call(model, params_and_buffers, args, kwargs)


@dataclass
class EvalSet:
    """A fixed set of ``n`` labelled examples on CPU, plus where they came from (``indices``)."""

    inputs: Inputs
    targets: torch.Tensor
    indices: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.targets.shape[0])

    @classmethod
    def from_user(cls, eval_data: Any, *, max_examples: int, seed: int) -> EvalSet:
        """Build from ``(inputs, targets)`` or a DataLoader, subsampled (seeded) to ``max_examples``."""
        if isinstance(eval_data, (tuple, list)) and len(eval_data) == 2:
            inputs, targets = eval_data
            return cls._from_tensors(inputs, targets, max_examples=max_examples, seed=seed)
        if isinstance(eval_data, torch.utils.data.DataLoader):
            return cls._from_loader(eval_data, max_examples=max_examples, seed=seed)
        raise TypeError(
            "eval_data must be (inputs, targets) — inputs a tensor or a dict of tensors, targets a 1-D tensor of "
            f"class labels — or a torch DataLoader yielding such pairs; got {type(eval_data).__name__}"
        )

    @classmethod
    def _from_tensors(cls, inputs: Any, targets: Any, *, max_examples: int, seed: int) -> EvalSet:
        if not isinstance(inputs, (torch.Tensor, Mapping)):
            raise TypeError(f"eval_data inputs must be a tensor or a dict of tensors; got {type(inputs).__name__}")
        targets = torch.as_tensor(targets)
        n_inputs = num_examples(inputs)
        if targets.dim() != 1:
            raise ValueError(f"eval_data targets must be a 1-D tensor of class labels; got shape {tuple(targets.shape)}")
        if n_inputs != targets.shape[0]:
            raise ValueError(
                f"eval_data must be (inputs, targets) with the same first dimension; got {n_inputs} inputs and "
                f"{targets.shape[0]} targets"
            )
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise ValueError(
                f"eval_data targets must be integer class labels (dynprobe's D and B are classification metrics); "
                f"got dtype {targets.dtype}"
            )
        if n_inputs == 0:
            raise ValueError("eval_data is empty")
        if n_inputs > max_examples:
            generator = torch.Generator().manual_seed(seed)
            indices = torch.randperm(n_inputs, generator=generator)[:max_examples].sort().values
        else:
            indices = torch.arange(n_inputs)
        inputs_cpu = index_inputs(inputs, indices.to(_device_of_inputs(inputs)))
        return cls(inputs_to(inputs_cpu, torch.device("cpu")), targets[indices.to(targets.device)].cpu().long(), indices)

    @classmethod
    def _from_loader(cls, loader: torch.utils.data.DataLoader, *, max_examples: int, seed: int) -> EvalSet:
        dataset = loader.dataset
        with preserved_rng():  # a shuffling loader or random transforms draw from the global stream
            try:
                length = len(dataset)  # type: ignore[arg-type]
                map_style = hasattr(dataset, "__getitem__")
            except TypeError:
                length, map_style = None, False
            if map_style and length is not None:
                generator = torch.Generator().manual_seed(seed)
                chosen = torch.randperm(length, generator=generator)[: min(max_examples, length)].sort().values
                subset = torch.utils.data.Subset(dataset, chosen.tolist())
                batches: Iterable = torch.utils.data.DataLoader(
                    subset, batch_size=loader.batch_size or 256, shuffle=False, collate_fn=loader.collate_fn,
                    num_workers=0,
                )
                indices = chosen
            else:
                warnings.warn(
                    "eval_data is an iterable-style DataLoader: dynprobe takes its first "
                    f"{max_examples} examples as the eval set (pass (inputs, targets) tensors to choose them)",
                    stacklevel=3,
                )
                batches, indices = loader, None
            parts_x, parts_y, count = [], [], 0
            for batch in batches:
                if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                    raise TypeError(
                        "eval_data DataLoader must yield (inputs, targets) pairs; got a batch of type "
                        f"{type(batch).__name__}"
                    )
                parts_x.append(batch[0])
                parts_y.append(torch.as_tensor(batch[1]))
                count += parts_y[-1].shape[0]
                if count >= max_examples:
                    break
        if not parts_y:
            raise ValueError("eval_data DataLoader yielded no batches")
        inputs = _concat_inputs(parts_x)
        targets = torch.cat(parts_y)
        if indices is None:
            indices = torch.arange(min(count, max_examples))
        keep = slice(0, min(count, max_examples))
        made = cls._from_tensors(index_inputs(inputs, keep), targets[keep], max_examples=max_examples, seed=seed)
        return cls(made.inputs, made.targets, indices[: made.n])


def _device_of_inputs(inputs: Inputs) -> torch.device:
    if isinstance(inputs, torch.Tensor):
        return inputs.device
    for t in inputs.values():
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def _concat_inputs(parts: list[Inputs]) -> Inputs:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    if isinstance(parts[0], Mapping):
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    raise TypeError(f"eval_data inputs must be tensors or dicts of tensors; got {type(parts[0]).__name__}")


@dataclass(frozen=True)
class EvalResult:
    """Predictions and summary of one evaluation: ``preds`` (n,) argmax labels, mean cross-entropy, accuracy."""

    preds: torch.Tensor
    loss: float
    accuracy: float
    num_classes: int


def evaluate(
    model: nn.Module,
    eval_set: EvalSet,
    *,
    output_fn: OutputFn = default_output_fn,
    batch_size: int = 512,
    device: torch.device | None = None,
    params_and_buffers: Mapping[str, torch.Tensor] | None = None,
) -> EvalResult:
    """Evaluate without side effects: eval mode, no grad, autocast off, RNG and module flags restored.

    Loss is the mean cross-entropy of the logits against the eval targets (the convention of the paper's B and
    of ``run.eval_loss``), whatever loss the user trains with. With ``params_and_buffers`` the model is called
    through ``torch.func.functional_call`` (used for ghosts and interpolations).
    """
    device = device or next(iter(model.parameters())).device
    preds: list[torch.Tensor] = []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    num_classes = -1
    with torch.no_grad(), eval_mode(model), preserved_rng(rng_devices(model)), no_autocast(device):
        for start in range(0, eval_set.n, batch_size):
            batch = inputs_to(index_inputs(eval_set.inputs, slice(start, start + batch_size)), device)
            targets = eval_set.targets[start : start + batch_size].to(device, non_blocking=True)
            logits = output_fn(forward(model, batch, params_and_buffers))
            check_logits(logits, targets)
            num_classes = logits.shape[1]
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
            label = logits.argmax(dim=1)
            correct += (label == targets).sum()
            preds.append(label)
    n = eval_set.n
    return EvalResult(torch.cat(preds), float(loss_sum) / n, float(correct) / n, num_classes)


def check_logits(logits: Any, targets: torch.Tensor) -> None:
    """Raise a clear error unless ``logits`` is an (N, C ≥ 2) classification output matching ``targets``."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"output_fn must return a tensor of logits; got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(
            "dynprobe measures classifiers: the model's output on eval_data must be (N, num_classes) logits with "
            f"num_classes >= 2; got shape {tuple(logits.shape)}. For sequence models, pass output_fn= to select "
            "one (N, num_classes) logit tensor"
        )
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"the model returned {logits.shape[0]} rows of logits for {targets.shape[0]} eval examples")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
        raise ValueError(
            f"eval_data targets must be class indices in [0, {logits.shape[1] - 1}]; got values in "
            f"[{int(targets.min())}, {int(targets.max())}]"
        )


class no_autocast:
    """Disable autocast on ``device``'s type for the block (evaluations run in the model's own dtypes)."""

    def __init__(self, device: torch.device) -> None:
        self.context = torch.autocast(device_type=device.type, enabled=False) if device.type in ("cpu", "cuda") else None

    def __enter__(self) -> None:
        if self.context is not None:
            self.context.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.context is not None:
            self.context.__exit__(*exc)


def balanced_subset(targets: torch.Tensor, n: int, *, seed: int) -> torch.Tensor:
    """``n`` indices into ``targets``, as class-balanced as the data allows, seeded, sorted.

    Classes take turns (round robin over a seeded shuffle of each class), so every class gets ⌊n/c⌋ or ⌈n/c⌉
    examples when it has enough; the probe set of the eNTK (paper-methods §3) is built this way.
    """
    if n > targets.shape[0]:
        raise ValueError(f"asked for {n} examples but the eval set holds only {targets.shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(targets.shape[0], generator=generator)
    shuffled = targets[order]
    per_class = [order[shuffled == c] for c in torch.unique(targets).tolist()]
    chosen: list[int] = []
    for depth in range(max(m.shape[0] for m in per_class)):
        chosen.extend(int(members[depth]) for members in per_class if depth < members.shape[0])
        if len(chosen) >= n:
            break
    return torch.tensor(sorted(chosen[:n]), dtype=torch.long)
