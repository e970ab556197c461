"""What the eval targets are, and how a model's outputs on them become a loss, predictions, accuracy and D.

Every number the probe derives from a model's outputs goes through one :class:`Task`: the eval loss of a
snapshot, the stored predictions and the disagreement D (eq. (6) of the two-phase paper) between two of them,
a ghost's comparison with the main run, and the loss along a barrier path (eq. (5)). Three tasks:

* :class:`ClassificationTask` — ``(N, C)`` logits, ``(N,)`` integer class labels. Loss: mean cross-entropy over
  examples; prediction: the argmax label; accuracy: fraction of correct labels; D: fraction of examples whose
  labels differ (eq. (6) exactly).
* :class:`TokenTask` — ``(N, T, V)`` token logits, ``(N, T)`` integer token labels, positions labelled
  ``ignore_index`` (default −100, as in :func:`torch.nn.functional.cross_entropy`) left out. Loss: token
  cross-entropy averaged over the non-ignored tokens of the whole set; prediction: the argmax token at each
  non-ignored position; accuracy: fraction of those tokens predicted right; D: fraction of those tokens whose
  top-1 prediction differs (eq. (6) with tokens as the examples). With ``shift=True`` the logits at position t
  are scored against the label at t + 1 (the Hugging Face causal-LM convention, labels = ``input_ids``).
* :class:`RegressionTask` — outputs of the targets' shape (an ``(N, 1)`` output against ``(N,)`` targets is
  reshaped, never broadcast), floating-point targets. Loss: mean squared error over every output coordinate,
  or the user's ``loss(outputs, targets)`` (a batch mean, weighted by the batch's examples); prediction: the
  outputs themselves; accuracy: undefined (NaN); D: the mean squared distance between the two models' outputs,
  ``mean_{x,k} (f_k(x; θ_i) − f_k(x; θ_j))²`` — in the units of the MSE loss, 0 for equal functions.

C and S do not depend on the task. The task is chosen from the targets (floating → regression, integer
``(N,)`` → classification, integer ``(N, T)`` → tokens) unless the user names it (``Probe(task=...)``).
Losses are summed per unit in float64 (per-example or per-token values in at least float32), so the result
does not depend on how the set is split into batches.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .checks import is_int

__all__ = [
    "TASK_NAMES", "ClassificationTask", "RegressionTask", "Task", "TokenTask", "as_task", "infer_task",
    "task_from_config",
]

TASK_NAMES = ("classification", "tokens", "regression")


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """bf16/fp16 outputs are scored in float32; float32 and float64 in their own dtype."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _label_mismatch_to_many(preds: torch.Tensor, many: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(preds).reshape(1, -1)
    rows = torch.as_tensor(many).reshape(-1, a.shape[1]).to(a.device)
    return (rows != a).to(torch.float64).mean(dim=1)


def _value_range(targets: torch.Tensor) -> tuple[int | None, int | None]:
    """(min, max) of integer ``targets`` with one host read; (None, None) when empty."""
    if not targets.numel():
        return None, None
    low, high = torch.stack([targets.min(), targets.max()]).tolist()
    return int(low), int(high)


def _is_integer(targets: torch.Tensor) -> bool:
    return not (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool)


class Task:
    """The interface every task implements (see the module docstring for the three definitions).

    Per batch, :meth:`check_outputs` validates (and, for regression, reshapes) the outputs from their shapes alone
    (no host synchronisation); the label values are checked once per eval set by :meth:`check_target_range`,
    before the first loss (one host read). :meth:`loss_sum`, :meth:`correct` and :meth:`predictions` reduce them.
    :meth:`disagreement_to_many` is D between one prediction vector and each row of a stack (a row of the D matrix).
    """

    name: ClassVar[str]
    #: dtype of a prediction vector kept in memory for D rows (labels: int32; regression: float64).
    history_dtype: ClassVar[torch.dtype] = torch.int32
    #: whether predictions can be right or wrong (accuracy, the error barrier); not for regression.
    has_accuracy: ClassVar[bool] = True

    def check_targets(self, targets: Any, where: str = "eval_data") -> torch.Tensor:
        raise NotImplementedError

    def check_outputs(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def num_outputs(self, outputs: torch.Tensor) -> int:
        """Classes, vocabulary size, or output coordinates per example (the manifest's ``num_classes``)."""
        raise NotImplementedError

    def check_target_range(self, targets: torch.Tensor, num_outputs: int) -> None:
        """Raise unless every label indexes one of ``num_outputs`` classes (no-op for regression)."""
        return None

    def loss_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ of the loss over the batch's units, float64; the number of units), both left on the device."""
        raise NotImplementedError

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Number of units predicted right (None: accuracy is undefined for this task)."""
        return None

    def predictions(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """A flat vector, one entry per unit of D, in example order."""
        raise NotImplementedError

    def prediction_size(self, targets: torch.Tensor) -> int:
        """Length of the prediction vector on ``targets``: examples (classification), scored tokens (tokens),
        output coordinates (regression)."""
        return int(targets.shape[0])

    def disagreement(self, preds_a: Any, preds_b: Any) -> float:
        """D between two prediction vectors of this task."""
        a, b = torch.as_tensor(preds_a).reshape(-1), torch.as_tensor(preds_b).reshape(-1)
        if a.numel() != b.numel():
            raise ValueError(f"D needs prediction vectors of equal length; got {a.numel()} and {b.numel()}")
        if a.numel() == 0:
            return float("nan")
        return float(self.disagreement_to_many(a, b.reshape(1, -1))[0])

    def disagreement_to_many(self, preds: Any, many: Any) -> torch.Tensor:
        return _label_mismatch_to_many(preds, many)

    def storage_dtype(self, num_outputs: int) -> type:
        """numpy dtype of stored predictions."""
        return np.int16 if num_outputs <= np.iinfo(np.int16).max else np.int32

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name}

    def conventions(self) -> dict[str, str]:
        raise NotImplementedError


@dataclass(frozen=True)
class ClassificationTask(Task):
    """``(N, C)`` logits against ``(N,)`` integer class labels (the two-phase paper's setting)."""

    name: ClassVar[str] = "classification"

    def check_targets(self, targets: Any, where: str = "eval_data") -> torch.Tensor:
        targets = torch.as_tensor(targets)
        if not _is_integer(targets):
            raise ValueError(f"{where}: classification targets must be integer class labels; got dtype "
                             f"{targets.dtype} (for real-valued targets pass task='regression')")
        if targets.dim() != 1:
            hint = " (token labels (N, T): pass task='tokens')" if targets.dim() == 2 else ""
            raise ValueError(f"{where}: classification targets must be a 1-D tensor of class labels; got shape "
                             f"{tuple(targets.shape)}{hint}")
        return targets.long()

    def check_outputs(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, torch.Tensor):
            raise TypeError(f"output_fn must return a tensor of logits; got {type(outputs).__name__}")
        if outputs.dim() != 2 or outputs.shape[1] < 2:
            hint = (" A single output column looks like regression: pass task='regression' (with float targets)"
                    if outputs.dim() == 2 and outputs.shape[1] == 1 else
                    " For sequence models, pass output_fn= to select one (N, num_classes) logit tensor, or "
                    "task='tokens' for (N, T, vocabulary) token logits with (N, T) labels")
            raise ValueError("for classification the model's output on eval_data must be (N, num_classes) logits "
                             f"with num_classes >= 2; got shape {tuple(outputs.shape)}.{hint}")
        if outputs.shape[0] != targets.shape[0]:
            raise ValueError(f"the model returned {outputs.shape[0]} rows of logits for {targets.shape[0]} examples")
        return outputs

    def check_target_range(self, targets: torch.Tensor, num_outputs: int) -> None:
        low, high = _value_range(targets)
        if low is not None and (low < 0 or high >= num_outputs):
            raise ValueError(f"eval_data targets must be class indices in [0, {num_outputs - 1}]; got values in "
                             f"[{low}, {high}]")

    def num_outputs(self, outputs: torch.Tensor) -> int:
        return int(outputs.shape[1])

    def loss_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses = F.cross_entropy(outputs.to(_compute_dtype(outputs)), targets, reduction="none")
        return losses.to(torch.float64).sum(), torch.tensor(targets.shape[0], device=outputs.device)

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs.argmax(dim=1) == targets).sum()

    def predictions(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return outputs.argmax(dim=1)

    def conventions(self) -> dict[str, str]:
        return {"task": "classification: (N, C) logits, (N,) class labels",
                "eval_loss": "mean cross-entropy of the logits over eval examples",
                "D": "eq. (6): fraction of eval examples whose argmax labels differ",
                "eval_accuracy": "fraction of eval examples whose argmax label is the target"}


@dataclass(frozen=True)
class TokenTask(Task):
    """``(N, T, V)`` token logits against ``(N, T)`` integer labels; ``ignore_index`` positions left out.

    Args:
        ignore_index: the label of positions that count nowhere (padding, prompt tokens), as in
            :func:`torch.nn.functional.cross_entropy`.
        shift: score the logits at position t against the label at t + 1 (labels = ``input_ids``, as Hugging
            Face causal LMs take them); ``False``: labels are already aligned with the logits.
    """

    ignore_index: int = -100
    shift: bool = False
    name: ClassVar[str] = "tokens"

    def __post_init__(self) -> None:
        if not is_int(self.ignore_index):
            raise TypeError(f"TokenTask(ignore_index=) must be an int; got {self.ignore_index!r}")
        if not isinstance(self.shift, bool):
            raise TypeError(f"TokenTask(shift=) must be True or False; got {self.shift!r}")

    def check_targets(self, targets: Any, where: str = "eval_data") -> torch.Tensor:
        targets = torch.as_tensor(targets)
        if not _is_integer(targets) or targets.dim() != 2:
            raise ValueError(f"{where}: token targets must be an (N, T) integer tensor of token labels; got "
                             f"{tuple(targets.shape)} of dtype {targets.dtype}")
        return targets.long()

    def _aligned(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shift:
            return outputs[:, :-1], targets[:, 1:]
        return outputs, targets

    def check_outputs(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, torch.Tensor):
            raise TypeError(f"output_fn must return a tensor of token logits; got {type(outputs).__name__}")
        if outputs.dim() != 3 or outputs.shape[:2] != targets.shape or outputs.shape[2] < 2:
            raise ValueError("for task='tokens' the model's output must be (N, T, vocabulary) logits matching the "
                             f"(N, T) = {tuple(targets.shape)} labels; got shape {tuple(outputs.shape)}")
        return outputs

    def check_target_range(self, targets: torch.Tensor, num_outputs: int) -> None:
        low, high = _value_range(targets[targets != self.ignore_index])
        if low is not None and (low < 0 or high >= num_outputs):
            raise ValueError(f"token labels must be in [0, {num_outputs - 1}] (or ignore_index="
                             f"{self.ignore_index}); got values in [{low}, {high}]")

    def num_outputs(self, outputs: torch.Tensor) -> int:
        return int(outputs.shape[2])

    def _valid(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, labels = self._aligned(outputs, targets)
        keep = labels != self.ignore_index
        return logits[keep], labels[keep]

    def loss_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, labels = self._valid(outputs, targets)
        losses = F.cross_entropy(logits.to(_compute_dtype(logits)), labels, reduction="none")
        return losses.to(torch.float64).sum(), torch.tensor(labels.shape[0], device=outputs.device)

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, labels = self._valid(outputs, targets)
        return (logits.argmax(dim=-1) == labels).sum()

    def predictions(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, _ = self._valid(outputs, targets)
        return logits.argmax(dim=-1)

    def prediction_size(self, targets: torch.Tensor) -> int:
        return self.units(targets)

    def units(self, targets: torch.Tensor) -> int:
        """Number of scored tokens in ``targets``."""
        labels = targets[:, 1:] if self.shift else targets
        return int((labels != self.ignore_index).sum())

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "ignore_index": self.ignore_index, "shift": self.shift}

    def conventions(self) -> dict[str, str]:
        where = "label at t+1 for the logits at t" if self.shift else "labels aligned with the logits"
        return {"task": f"tokens: (N, T, V) logits, (N, T) labels, ignore_index={self.ignore_index}, {where}",
                "eval_loss": "token cross-entropy averaged over the non-ignored tokens of the eval set",
                "D": "fraction of non-ignored eval tokens whose top-1 predictions differ",
                "eval_accuracy": "fraction of non-ignored eval tokens whose top-1 prediction is the label"}


@dataclass(frozen=True)
class RegressionTask(Task):
    """Real-valued outputs against floating-point targets of the same shape.

    Args:
        loss: ``loss(outputs, targets) -> scalar`` batch mean (e.g. ``torch.nn.functional.huber_loss``); batches
            are weighted by their number of examples. Default: the mean squared error over every output
            coordinate.
    """

    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    name: ClassVar[str] = "regression"
    history_dtype: ClassVar[torch.dtype] = torch.float64
    has_accuracy: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.loss is not None and not callable(self.loss):
            raise TypeError(f"RegressionTask(loss=) must be callable (outputs, targets) -> loss; got {self.loss!r}")

    def check_targets(self, targets: Any, where: str = "eval_data") -> torch.Tensor:
        targets = torch.as_tensor(targets)
        if targets.dim() == 0 or targets.is_complex() or targets.dtype == torch.bool:
            raise ValueError(f"{where}: regression targets must be a real tensor with one row per example; got "
                             f"shape {tuple(targets.shape)} of dtype {targets.dtype}")
        return targets if targets.is_floating_point() else targets.float()

    def check_outputs(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, torch.Tensor) or not outputs.is_floating_point():
            raise TypeError("output_fn must return a floating-point tensor of predictions; got "
                            f"{getattr(outputs, 'dtype', type(outputs).__name__)}")
        if outputs.shape != targets.shape:
            if outputs.dim() == 0 or outputs.shape[0] != targets.shape[0] or outputs.numel() != targets.numel():
                raise ValueError(f"for regression the model's output must have the targets' shape "
                                 f"{tuple(targets.shape)} (an (N, 1) output for (N,) targets is fine); got "
                                 f"{tuple(outputs.shape)}")
            outputs = outputs.reshape(targets.shape)  # (N, 1) vs (N,): never broadcast to (N, N)
        return outputs

    def num_outputs(self, outputs: torch.Tensor) -> int:
        return int(outputs[0].numel()) if outputs.shape[0] else 0

    def loss_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.loss is None:
            dtype = _compute_dtype(outputs)
            squared = (outputs.to(dtype) - targets.to(dtype)).square()
            return squared.to(torch.float64).sum(), torch.tensor(squared.numel(), device=outputs.device)
        value = self.loss(outputs, targets.to(outputs.dtype))
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError("RegressionTask(loss=) must return a scalar tensor (the batch mean)")
        n = targets.shape[0]
        return value.reshape(()).to(torch.float64) * n, torch.tensor(n, device=outputs.device)

    def predictions(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return outputs.detach().to(_compute_dtype(outputs)).reshape(-1)

    def prediction_size(self, targets: torch.Tensor) -> int:
        return int(targets.numel())

    def disagreement_to_many(self, preds: Any, many: Any) -> torch.Tensor:
        a = torch.as_tensor(preds).reshape(1, -1).to(torch.float64)
        rows = torch.as_tensor(many).reshape(-1, a.shape[1]).to(device=a.device, dtype=torch.float64)
        return (rows - a).square().mean(dim=1)

    def storage_dtype(self, num_outputs: int) -> type:
        return np.float32

    def to_config(self) -> dict[str, Any]:
        loss = "mse" if self.loss is None else getattr(self.loss, "__qualname__", type(self.loss).__name__)
        return {"name": self.name, "loss": loss}

    def conventions(self) -> dict[str, str]:
        loss = ("mean squared error over every output coordinate" if self.loss is None else
                f"the user's loss {self.to_config()['loss']} (batch means weighted by examples)")
        return {"task": "regression: outputs of the targets' shape, real targets",
                "eval_loss": loss,
                "D": "mean squared distance between the two models' outputs, mean over examples and coordinates",
                "eval_accuracy": "undefined for regression (NaN)"}


_BY_NAME: dict[str, Callable[[], Task]] = {
    "classification": ClassificationTask, "tokens": TokenTask, "regression": RegressionTask,
}


def infer_task(targets: torch.Tensor) -> Task:
    """The task the targets imply: floating → regression; integer (N,) → classification; integer (N, T) → tokens."""
    if targets.is_floating_point():
        return RegressionTask()
    if _is_integer(targets) and targets.dim() == 2:
        return TokenTask()
    return ClassificationTask()


def as_task(task: Any) -> Task | None:
    """Validate ``Probe(task=...)``: None or ``"auto"`` (chosen from the targets), a name, or a Task instance."""
    if task is None or task == "auto":
        return None
    if isinstance(task, Task):
        return task
    if isinstance(task, str) and task in _BY_NAME:
        return _BY_NAME[task]()
    raise ValueError(f"task must be 'auto', one of {TASK_NAMES}, or a task object such as "
                     f"dynprobe.config.TokenTask(ignore_index=0, shift=True); got {task!r}")


def task_from_config(config: Mapping[str, Any] | None) -> Task:
    """The task recorded in a run's manifest (runs without one are classification runs)."""
    if not config:
        return ClassificationTask()
    name = config.get("name")
    if name == "tokens":
        return TokenTask(ignore_index=int(config.get("ignore_index", -100)), shift=bool(config.get("shift", False)))
    if name == "regression":
        if config.get("loss", "mse") != "mse":
            raise ValueError(f"this run was recorded with a custom regression loss ({config['loss']}); pass "
                             "task=dynprobe.config.RegressionTask(loss=...) with the same function")
        return RegressionTask()
    return ClassificationTask()
