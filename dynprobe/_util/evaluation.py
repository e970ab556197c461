"""The fixed evaluation set and the side-effect-free evaluation of a model on it.

Every snapshot evaluates the model on the *same* examples (D, eq. (6) of the two-phase paper, compares
predictions example by example). The set is taken once, when the probe attaches: from ``(inputs, targets)``
tensors, or from a DataLoader (map-style datasets are subsampled by index with a seeded generator; iterable ones
contribute their first examples). Reading the user's DataLoader happens under a forked RNG so the user's stream
is untouched. The set carries its :class:`~dynprobe._util.tasks.Task` (classification, tokens or regression),
which turns outputs into loss, predictions, accuracy and D everywhere.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .inputs import (
    Inputs,
    OutputFn,
    check_inputs,
    concat_inputs,
    default_output_fn,
    device_of_inputs,
    forward,
    index_inputs,
    inputs_to,
    no_autocast,
    num_examples,
    split_batch,
)
from .modules import eval_mode, preserved_rng, rng_devices
from .tasks import ClassificationTask, Task, TokenTask, as_task, infer_task

__all__ = [
    "EvalResult", "EvalSet", "Inputs", "balanced_subset", "check_logits", "check_model_outputs", "default_output_fn",
    "evaluate", "forward", "index_inputs", "inputs_to", "no_autocast", "num_examples",
]


@dataclass
class EvalSet:
    """A fixed set of ``n`` labelled examples on CPU, where they came from (``indices``), and their task.

    ``task`` defaults to the one the targets imply (:func:`~dynprobe._util.tasks.infer_task`); the targets are
    checked against it (and normalized: labels as int64, regression targets floating).
    """

    inputs: Inputs
    targets: torch.Tensor
    indices: torch.Tensor
    task: Task = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.task is None:
            self.task = infer_task(torch.as_tensor(self.targets))
        self.targets = self.task.check_targets(self.targets)

    @property
    def n(self) -> int:
        return int(self.targets.shape[0])

    @property
    def prediction_size(self) -> int:
        """Length of one evaluation's prediction vector (``run.predictions``): ``n`` for classification, the
        number of scored tokens, or ``n`` × output coordinates for regression."""
        return self.task.prediction_size(self.targets)

    @classmethod
    def from_user(cls, eval_data: Any, *, max_examples: int, seed: int, task: Any = None) -> EvalSet:
        """Build from ``(inputs, targets)`` or a DataLoader, subsampled (seeded) to ``max_examples``.

        ``task``: None/``"auto"`` (from the targets), a task name or a task object (see :func:`as_task`).
        """
        task = as_task(task)
        if isinstance(eval_data, (tuple, list)) and len(eval_data) == 2:
            inputs, targets = eval_data
            return cls._from_tensors(inputs, targets, max_examples=max_examples, seed=seed, task=task)
        if isinstance(eval_data, torch.utils.data.DataLoader):
            return cls._from_loader(eval_data, max_examples=max_examples, seed=seed, task=task)
        raise TypeError(
            "eval_data must be (inputs, targets) — inputs a tensor or a dict of tensors, targets one row per "
            "example (class labels, (N, T) token labels or real values) — or a torch DataLoader yielding such "
            f"pairs; got {type(eval_data).__name__}"
        )

    @classmethod
    def _from_tensors(cls, inputs: Any, targets: Any, *, max_examples: int, seed: int,
                      task: Task | None = None) -> EvalSet:
        if not isinstance(inputs, (torch.Tensor, Mapping)):
            raise TypeError(f"eval_data inputs must be a tensor or a dict of tensors; got {type(inputs).__name__}")
        targets = torch.as_tensor(targets)
        if targets.is_meta:
            raise ValueError("eval_data targets are on the meta device (a shape without data); load the data onto "
                             "a real device before attaching the probe")
        if targets.dim() == 0:
            raise ValueError("eval_data targets must have one row per example; got a scalar")
        task = task or infer_task(targets)
        targets = task.check_targets(targets)
        n_inputs = num_examples(inputs)
        if n_inputs != targets.shape[0]:
            raise ValueError(
                f"eval_data must be (inputs, targets) with the same first dimension; got {n_inputs} inputs and "
                f"{targets.shape[0]} targets"
            )
        if n_inputs == 0:
            raise ValueError("eval_data is empty")
        check_inputs(inputs, "eval_data", finite=False)  # meta tensors cannot even be subsampled
        if n_inputs > max_examples:
            generator = torch.Generator().manual_seed(seed)
            indices = torch.randperm(n_inputs, generator=generator)[:max_examples].sort().values
        else:
            indices = torch.arange(n_inputs)
        inputs_cpu = inputs_to(index_inputs(inputs, indices.to(device_of_inputs(inputs))), torch.device("cpu"))
        targets_cpu = targets[indices.to(targets.device)].cpu()
        check_inputs(inputs_cpu, "eval_data")
        _check_targets_usable(task, targets_cpu, inputs_cpu)
        return cls(inputs_cpu, targets_cpu, indices, task)

    @classmethod
    def _from_loader(cls, loader: torch.utils.data.DataLoader, *, max_examples: int, seed: int,
                     task: Task | None = None) -> EvalSet:
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
            for index, batch in enumerate(batches):
                inputs, targets = split_batch(batch, f"eval_data DataLoader batch {index}")
                parts_x.append(inputs)
                parts_y.append(targets)
                count += targets.shape[0]
                if count >= max_examples:
                    break
        if not parts_y:
            raise ValueError("eval_data DataLoader yielded no batches")
        inputs = concat_inputs(parts_x)
        targets = _concat_targets(parts_y)
        if indices is None:
            indices = torch.arange(min(count, max_examples))
        keep = slice(0, min(count, max_examples))
        made = cls._from_tensors(index_inputs(inputs, keep), targets[keep], max_examples=max_examples, seed=seed,
                                 task=task)
        return cls(made.inputs, made.targets, indices[: made.n], made.task)


def _concat_targets(parts: list[torch.Tensor]) -> torch.Tensor:
    if all(p.dim() == 2 for p in parts) and len({p.shape[1] for p in parts}) > 1:
        raise ValueError("eval_data DataLoader batches have token targets of different lengths "
                         f"{sorted({p.shape[1] for p in parts})}; pad them to one length (ignore_index) or pass "
                         "(inputs, targets) tensors")
    return torch.cat(parts)


def _check_targets_usable(task: Task, targets: torch.Tensor, inputs: Inputs) -> None:
    if targets.is_floating_point() and not bool(torch.isfinite(targets).all()):
        bad = torch.nonzero(~torch.isfinite(targets.reshape(targets.shape[0], -1)).all(dim=1)).reshape(-1)
        raise ValueError(f"eval_data targets hold NaN or inf values (example {int(bad[0])}; {bad.numel()} examples "
                         "in all): the eval loss would be NaN. Clean or drop those examples")
    if isinstance(task, TokenTask):
        if task.units(targets) == 0:
            raise ValueError(f"eval_data token targets are all ignore_index={task.ignore_index}: no token to score")
        ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
        same = isinstance(ids, torch.Tensor) and ids.shape == targets.shape and torch.equal(ids, targets)
        if same and not task.shift:
            warnings.warn(
                "eval_data token targets equal input_ids: the logits at each position would be scored against the "
                "token they were computed from. For a causal language model (labels = input_ids, as Hugging Face "
                "takes them) pass task=dynprobe.config.TokenTask(shift=True)", UserWarning, stacklevel=4)


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: ``preds`` (the task's prediction vector, one entry per unit of D), the mean loss, the
    accuracy (NaN where the task has none), ``num_classes`` (the task's output size) and ``nonfinite``, the number
    of examples whose outputs hold NaN or inf."""

    preds: torch.Tensor
    loss: float
    accuracy: float
    num_classes: int
    nonfinite: int = 0


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

    Loss, predictions and accuracy are the eval set's task's (mean cross-entropy of the logits for
    classification — the convention of the paper's B and of ``run.eval_loss`` — whatever loss the user trains
    with). With ``params_and_buffers`` the model is called through ``torch.func.functional_call`` (used for
    ghosts and interpolations).
    """
    device = device or next(iter(model.parameters())).device
    task = eval_set.task
    preds: list[torch.Tensor] = []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    units = torch.zeros((), dtype=torch.int64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)
    has_accuracy, num_classes = True, -1
    with torch.no_grad(), eval_mode(model), preserved_rng(rng_devices(model)), no_autocast(device):
        for start in range(0, eval_set.n, batch_size):
            batch = inputs_to(index_inputs(eval_set.inputs, slice(start, start + batch_size)), device)
            targets = eval_set.targets[start : start + batch_size].to(device, non_blocking=True)
            outputs = task.check_outputs(output_fn(forward(model, batch, params_and_buffers)), targets)
            num_classes = task.num_outputs(outputs)
            if start == 0:  # the labels, once per eval set, from its host copy: before the first loss indexes them
                task.check_target_range(eval_set.targets, num_classes)
            part, count = task.loss_sum(outputs, targets)
            loss_sum += part
            units += count
            right = task.correct(outputs, targets)
            has_accuracy = right is not None
            if right is not None:
                correct += right
            preds.append(task.predictions(outputs, targets))
            nonfinite += (~torch.isfinite(outputs.detach())).reshape(outputs.shape[0], -1).any(dim=1).sum()
    # one host read for the four sums (float64 holds the integer counts exactly)
    loss_total, units_total, correct_total, nonfinite_total = torch.stack(
        [loss_sum, units.double(), correct.double(), nonfinite.double()]).tolist()
    total = int(units_total)
    loss = loss_total / total if total else float("nan")
    accuracy = correct_total / total if has_accuracy and total else float("nan")
    return EvalResult(torch.cat(preds), loss, accuracy, num_classes, int(nonfinite_total))


def check_model_outputs(model: nn.Module, eval_set: EvalSet, *, output_fn: OutputFn | None = None,
                        device: torch.device | None = None, cuda_devices: list[int] | None = None) -> int:
    """Call the model on two eval examples (eval mode, no grad, RNG preserved) and check its outputs against the
    task: shape, label range over the whole eval set, finite values. Returns the task's output size (classes,
    vocabulary, output coordinates: the manifest's ``num_classes``). A model that cannot take the eval inputs
    fails here, at ``Probe(...)``, with the reason."""
    output_fn = output_fn or default_output_fn
    device = device or next(iter(model.parameters())).device
    sample = inputs_to(index_inputs(eval_set.inputs, slice(0, 2)), device)
    targets = eval_set.targets[:2].to(device)
    with torch.no_grad(), eval_mode(model), preserved_rng(cuda_devices or []), no_autocast(device):
        try:
            output = forward(model, sample)
        except Exception as error:
            raise ValueError(
                f"calling the model on eval_data inputs failed ({type(error).__name__}: {error}); eval_data "
                "inputs must be what the model takes: a tensor (model(x)) or a dict (model(**x))"
            ) from error
        try:
            outputs = output_fn(output)
        except TypeError as error:
            raise ValueError(str(error)) from error
        if isinstance(outputs, torch.Tensor) and outputs.is_meta:
            raise ValueError("the model's outputs on eval_data are on the meta device (no values): materialize the "
                             "model and the data before attaching the probe")
        outputs = eval_set.task.check_outputs(outputs, targets)
    if (outputs.is_floating_point() or outputs.is_complex()) and not bool(torch.isfinite(outputs).all()):
        raise ValueError("the model's outputs on the first eval examples hold NaN or inf (the inputs are finite): "
                         "every eval loss, D and barrier would be NaN. Check the model's initialization")
    num_outputs = eval_set.task.num_outputs(outputs)
    eval_set.task.check_target_range(eval_set.targets, num_outputs)
    return num_outputs


def check_logits(logits: Any, targets: torch.Tensor) -> None:
    """Raise a clear error unless ``logits`` is an (N, C ≥ 2) classification output matching ``targets``
    (kept for callers written before tasks: ``ClassificationTask().check_outputs``)."""
    ClassificationTask().check_outputs(logits, targets)


def balanced_subset(targets: torch.Tensor, n: int, *, seed: int) -> torch.Tensor:
    """``n`` indices into ``targets``, as class-balanced as the data allows, seeded, sorted.

    Classes take turns (round robin over a seeded shuffle of each class), so every class gets ⌊n/c⌋ or ⌈n/c⌉
    examples when it has enough; the eNTK's probe set is built this way. Targets that are not class labels
    (token labels, regression values) have no classes to balance: a seeded uniform draw.
    """
    if n > targets.shape[0]:
        raise ValueError(f"asked for {n} examples but the eval set holds only {targets.shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(targets.shape[0], generator=generator)
    if targets.dim() != 1 or targets.is_floating_point():
        return order[:n].sort().values
    shuffled = targets[order]
    per_class = [order[shuffled == c] for c in torch.unique(targets).tolist()]
    chosen: list[int] = []
    for depth in range(max(m.shape[0] for m in per_class)):
        chosen.extend(int(members[depth]) for members in per_class if depth < members.shape[0])
        if len(chosen) >= n:
            break
    return torch.tensor(sorted(chosen[:n]), dtype=torch.long)
