"""Taking a snapshot of the main run: θ_t, buffers, eval predictions (and H(θ_t)), then one row per metric.

:class:`SnapshotRecorder` is the stateful half of a snapshot; the math is in :mod:`dynprobe.metrics`, the row
bookkeeping in :mod:`dynprobe.interval`, the files in :mod:`dynprobe.writer`. A snapshot is measured first
(:meth:`SnapshotRecorder.measure`), so that ghosts can be compared with it, then committed
(:meth:`SnapshotRecorder.commit`): files, metric rows, and last the event line that makes it visible.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from dynprobe._util.evaluation import EvalResult, EvalSet, evaluate
from dynprobe.metrics import functions as metrics
from dynprobe.metrics.interval import PairwiseMatrix, VectorHistory
from dynprobe.store.files import atomic_save_npy, load_npy
from dynprobe.store.layout import KERNEL, PARAMS, PREDS, snapshot_file
from dynprobe.store.rows import TriangularRows
from dynprobe.store.writer import RunWriter

__all__ = ["SnapshotData", "SnapshotRecorder", "flatten_parameters"]


def flatten_parameters(params: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``vec(θ)``: the parameters concatenated in order, as one detached vector of ``dtype`` on their device."""
    return torch.cat([p.detach().reshape(-1).to(dtype) for p in params])


@dataclass
class SnapshotData:
    """What one snapshot measured, before it is committed."""

    step: int
    params: torch.Tensor  # flat θ_t in the run's storage dtype, on the model's device
    buffers: dict[str, np.ndarray]
    evaluation: EvalResult
    kernel: torch.Tensor | None = None  # H(θ_t) on the probe set, float64, when measured at this snapshot
    extra_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)


class SnapshotRecorder:
    """Measures and commits snapshots of the main model, and keeps the online C and D matrices (and S).

    Args:
        writer: the run directory.
        model: the user's model (evaluated through side-effect-free calls only).
        params: the trainable parameters, in the order of ``vec(θ)``.
        eval_set: the fixed evaluation set.
        storage_dtype: dtype of stored parameter vectors (float32, or float64 for float64 models).
        history_memory: bytes of earlier parameter vectors kept on the device for computing C rows; beyond it,
            earlier vectors are streamed back from the run directory.
        kernel_fn: ``(index) -> H`` or None when the eNTK is not measured at that snapshot index.
    """

    def __init__(
        self,
        writer: RunWriter,
        model: nn.Module,
        params: list[torch.Tensor],
        eval_set: EvalSet,
        *,
        device: torch.device,
        storage_dtype: torch.dtype,
        output_fn: Callable[[Any], torch.Tensor],
        eval_batch_size: int,
        history_memory: int,
        kernel_fn: Callable[[int], torch.Tensor | None] | None = None,
    ) -> None:
        self.writer, self.model, self.params, self.eval_set = writer, model, params, eval_set
        self.device, self.storage_dtype = device, storage_dtype
        self.output_fn, self.eval_batch_size = output_fn, eval_batch_size
        self.kernel_fn = kernel_fn
        committed = writer.snapshots
        present = [True] * len(committed)

        def history(name: str) -> VectorHistory:
            # C and S rows are dot products accumulated in float64, so their history is kept in float64 (no
            # per-snapshot cast); predictions are the eval task's (labels: small integers; regression: floats).
            dtype = eval_set.task.history_dtype if name == "D" else torch.float64
            budget = max(history_memory, 64 * 2**20) if name == "D" else history_memory
            return VectorHistory(device, dtype=dtype, memory_budget=budget, load=lambda i: self._load(i, name))

        specs: list[tuple[str, Callable]] = [
            ("C", metrics.cosine_dissimilarity_to_many),
            ("D", eval_set.task.disagreement_to_many),  # eq. (6), or the task's D (tokens, regression)
        ]
        if kernel_fn is not None:
            specs.append(("S", metrics.kernel_distance_to_many))
        self.matrices: dict[str, PairwiseMatrix] = {}
        self.last_rows: dict[str, np.ndarray] = {}  # the rows appended by the latest commit
        for name, row_function in specs:
            path = writer.metrics_path(f"{name}.rows")
            if writer.resumed:
                has = present if name != "S" else [bool(s.get("kernel")) for s in committed]
                self.matrices[name] = PairwiseMatrix.reattach(name, row_function, history(name), path, has)
            else:
                self.matrices[name] = PairwiseMatrix(name, row_function, history(name), TriangularRows(path))

    # ------------------------------------------------------------------------------------------------ measure

    def flat_params(self) -> torch.Tensor:
        return flatten_parameters(self.params, self.storage_dtype)

    def measure(self, step: int) -> SnapshotData:
        """Measure the main model at ``step`` without changing it (mode flags, RNG, parameters, buffers)."""
        started = time.perf_counter()
        evaluation = evaluate(
            self.model, self.eval_set, output_fn=self.output_fn, batch_size=self.eval_batch_size, device=self.device
        )
        buffers = {name: _to_numpy(buffer) for name, buffer in self.model.named_buffers() if buffer is not None}
        index = len(self.writer.snapshots)
        kernel = self.kernel_fn(index) if self.kernel_fn is not None else None
        return SnapshotData(step, self.flat_params(), buffers, evaluation, kernel, started=started)

    # ------------------------------------------------------------------------------------------------ commit

    def commit(self, data: SnapshotData, record: dict[str, Any]) -> dict[str, Any]:
        """Write the snapshot's files, append one row per matrix, then the commit event. Returns the record."""
        step = data.step
        self.writer.save_array(step, "params", _to_numpy(data.params))
        self.writer.save_arrays(step, "buffers", data.buffers)
        preds = data.evaluation.preds
        storage = self.eval_set.task.storage_dtype(data.evaluation.num_classes)
        self.writer.save_array(step, "preds", preds.cpu().numpy().astype(storage))
        if data.kernel is not None:
            self.writer.save_array(step, "kernel", data.kernel.cpu().numpy())
        for name, array in data.extra_arrays.items():
            self.writer.save_array(step, name, array)
        rows = {
            "C": self.matrices["C"].update(data.params),
            "D": self.matrices["D"].update(preds),
        }
        if "S" in self.matrices:
            rows["S"] = self.matrices["S"].update(None if data.kernel is None else data.kernel.reshape(-1))
        self.last_rows = rows
        full = {
            "step": step,
            "eval_loss": data.evaluation.loss,
            "eval_accuracy": data.evaluation.accuracy,
            "kernel": data.kernel is not None,
            **record,
            "C_prev": _previous(rows["C"]),
            "D_prev": _previous(rows["D"]),
            "duration_s": time.perf_counter() - data.started,
        }
        if "S" in rows:
            full["S_prev"] = _previous(rows["S"])
        self.writer.commit_snapshot(full)
        return full

    def materialize(self) -> None:
        """Write each metric's full matrix as ``metrics/NAME.npy`` (a convenience copy of the row files)."""
        for name, matrix in self.matrices.items():
            atomic_save_npy(self.writer.metrics_path(f"{name}.npy"), matrix.compute())

    # ------------------------------------------------------------------------------------------------ reading

    def _load(self, index: int, name: str) -> np.ndarray | None:
        step = self.writer.snapshots[index]["step"]
        path = snapshot_file(self.writer.root, step, {"C": PARAMS, "D": PREDS, "S": KERNEL}[name])
        if not path.exists():
            return None
        array = load_npy(path, mmap=name == "C")
        return array.reshape(-1)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """numpy has no bfloat16: such tensors are stored as float32 (exact)."""
    tensor = tensor.detach()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).cpu().numpy()


def _previous(row: np.ndarray) -> float | None:
    """The metric between this snapshot and the previous one (the last off-diagonal entry of the row)."""
    return None if row.size < 2 or np.isnan(row[-2]) else float(row[-2])
