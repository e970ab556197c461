"""Taking a snapshot of the main run: θ_t, buffers, eval predictions (and H(θ_t)), then one row per metric.

:class:`SnapshotRecorder` is the stateful half of a snapshot; the math and the rows' state are in
:mod:`dynprobe.metrics` (:mod:`dynprobe.metrics.interval`), the earlier vectors (memory budget, spilled history)
in :mod:`dynprobe.store.history`, the row files in :mod:`dynprobe.store.matrix_rows` (paired by
:class:`dynprobe.recording.matrices.RecordedMatrix`), the other files behind a
:class:`dynprobe.store.sink.RunSink`. A snapshot is measured first (:meth:`SnapshotRecorder.measure`), so that
ghosts can be compared with it, then committed (:meth:`SnapshotRecorder.commit`, a transaction): files, metric
rows, and last the event line that makes it visible.

C is recorded for the whole parameter vector and per layer (:func:`dynprobe._util.modules.layer_slices`): the
same pass over the history, split by the layers' slices, so the per-layer matrices ``C_l(t, t')`` cost no extra
pass over it; they are stored in full, one row file per layer (``L·T²/2`` float64 numbers, small next to the
snapshots themselves).
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
from dynprobe._util.memory import device_headroom
from dynprobe._util.modules import flatten_parameters, layer_slices
from dynprobe._util.signals import interrupts_deferred
from dynprobe._util.user_warnings import warn_user
from dynprobe.metrics.interval import CosineMetric, FunctionMetric, PairwiseMatrix
from dynprobe.store.files import load_npy
from dynprobe.store.history import VectorHistory
from dynprobe.store.layout import BUFFERS, KERNEL, PARAMS, PREDS, layer_metric, snapshot_file
from dynprobe.store.matrix_rows import MatrixRows
from dynprobe.store.sink import RunSink

from .matrices import RecordedMatrix

__all__ = ["HISTORY_FRACTION", "SnapshotData", "SnapshotRecorder", "default_history_memory", "flatten_parameters",
           "history_dtype"]

# of the memory the process may still use after the user's first optimizer step, kept for earlier snapshots'
# vectors by default
HISTORY_FRACTION = 0.25
MAX_LAYERS = 512  # per-layer C is recorded for models with at most this many layers


def default_history_memory(device: torch.device | str) -> int:
    """The default ``history_memory``: :data:`HISTORY_FRACTION` of the memory the process may still use where the
    history lives (:func:`dynprobe._util.memory.device_headroom`: cgroup v1/v2, ``RLIMIT_AS``, available RAM; on
    CUDA the free memory within the per-process fraction), measured now — the recorder asks after the user's first
    optimizer step (see :class:`SnapshotRecorder`), when the optimizer state exists and the step's activations are
    held by the allocator. The buffer is committed only as snapshots arrive, and sheds to the run directory when
    the process nears its limit (:mod:`dynprobe.store.history`)."""
    return int(device_headroom(device) * HISTORY_FRACTION)


def history_dtype(params: list[torch.Tensor], storage_dtype: torch.dtype) -> torch.dtype:
    """The dtype C's history is kept in: the parameters' own (bfloat16 or float16 when they all are; every
    value is exact), else the storage dtype. Rows accumulate in float64 whatever it is."""
    dtypes = {p.dtype for p in params}
    if len(dtypes) == 1 and next(iter(dtypes)) in (torch.bfloat16, torch.float16):
        return next(iter(dtypes))
    return storage_dtype


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
    """Measures and commits snapshots of the main model, and keeps the online C (whole and per layer), D and S.

    Args:
        writer: the run directory (a :class:`dynprobe.store.sink.RunSink`; a background writer may wrap it).
        model: the user's model (evaluated through side-effect-free calls only).
        params: the trainable parameters, in the order of ``vec(θ)``.
        eval_set: the fixed evaluation set.
        storage_dtype: dtype of stored parameter vectors (float32, or float64 for float64 models).
        history_memory: bytes of earlier snapshots' parameter vectors (and kernels: a quarter of it when the
            eNTK is measured) kept in memory for the C (and S) rows; beyond it the history spills to the run
            directory and the far entries of the rows are completed in blocks (:mod:`dynprobe.metrics.interval`).
            ``None``: :func:`default_history_memory`.
        kernel_fn: ``(step) -> H``, or None when the eNTK is not measured at the snapshot at that step.
        per_layer: also record C per layer.
    """

    def __init__(
        self,
        writer: RunSink,
        model: nn.Module,
        params: list[torch.Tensor],
        eval_set: EvalSet,
        *,
        device: torch.device,
        storage_dtype: torch.dtype,
        output_fn: Callable[[Any], torch.Tensor],
        eval_batch_size: int,
        history_memory: int | None = None,
        kernel_fn: Callable[[int], torch.Tensor | None] | None = None,
        per_layer: bool = True,
    ) -> None:
        self.writer, self.model, self.params, self.eval_set = writer, model, params, eval_set
        self.device, self.storage_dtype = device, storage_dtype
        self.output_fn, self.eval_batch_size = output_fn, eval_batch_size
        self.kernel_fn = kernel_fn
        # The default budget is measured lazily: at the second snapshot, after the user's first optimizer step.
        self._history_memory = None if history_memory is None else int(history_memory)
        self._warned_nonfinite = False
        spec = (writer.manifest.get("model") or {}).get("parameters")
        named = [(p["name"], int(p["numel"])) for p in spec] if spec else [(str(i), p) for i, p in enumerate(params)]
        layers = layer_slices(named)
        self.layers: list[str] = [name for name, _ in layers] if per_layer and len(layers) <= MAX_LAYERS else []
        size = sum(p.numel() for p in params)

        def budget(name: str) -> int:
            total = self.history_memory
            kernel_share = total // 4 if kernel_fn is not None else 0
            return {"C": total - kernel_share, "S": kernel_share, "D": max(64 * 2**20, total // 16)}[name]

        budgets = {name: (budget(name) if history_memory is not None else lambda n=name: budget(n))
                   for name in ("C", "S", "D")}
        dtypes = {"C": history_dtype(params, storage_dtype), "S": torch.float64, "D": eval_set.task.history_dtype}
        metric_of = {
            "C": CosineMetric(size, [s for _, s in layers] if self.layers else None),
            "D": FunctionMetric(eval_set.task.disagreement_to_many),  # eq. (6), or the task's D (tokens, regression)
            "S": CosineMetric(),  # sized by the first kernel
        }
        committed = writer.snapshots
        self.matrices: dict[str, RecordedMatrix] = {}
        self.last_rows: dict[str, np.ndarray] = {}  # the rows appended by the latest commit ("C_layers": L rows)
        # entries of earlier rows (and of the latest one) computed by the latest commit: {"C": [(row, columns, values)]}
        self.last_filled: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        for name in ("C", "D", "S") if kernel_fn is not None else ("C", "D"):
            history = VectorHistory(device, dtype=dtypes[name], memory_budget=budgets[name],
                                    load=lambda i, n=name: self._load(i, n),
                                    load_columns=lambda i, a, b, n=name: self._load(i, n, (a, b)),
                                    before_load=self._flush)
            metric = metric_of[name]
            rows = MatrixRows([writer.rows_path(name)] + [writer.rows_path(layer_metric(name, layer))
                                                          for layer in range(metric.channels - 1)])
            if writer.resumed:
                has = [bool(s.get("kernel")) for s in committed] if name == "S" else [True] * len(committed)
                rows.truncate(len(has))
                matrix = PairwiseMatrix.reattach(name, metric, history, rows.read(len(has)), has)
            else:
                matrix = PairwiseMatrix(name, metric, history)
            self.matrices[name] = RecordedMatrix(matrix, rows)

    @property
    def history_memory(self) -> int:
        """Bytes for earlier snapshots' vectors: the user's ``history_memory``, or :func:`default_history_memory`
        measured at the first use after attach (the second snapshot: the user's first optimizer step is done)."""
        if self._history_memory is None:
            self._history_memory = default_history_memory(self.device)
        return self._history_memory

    # ------------------------------------------------------------------------------------------------ measure

    def flat_params(self) -> torch.Tensor:
        return flatten_parameters(self.params, self.storage_dtype)

    def measure(self, step: int) -> SnapshotData:
        """Measure the main model at ``step`` without changing it (mode flags, RNG, parameters, buffers)."""
        started = time.perf_counter()
        evaluation = evaluate(
            self.model, self.eval_set, output_fn=self.output_fn, batch_size=self.eval_batch_size, device=self.device
        )
        if evaluation.nonfinite and not self._warned_nonfinite:
            self._warned_nonfinite = True  # the eval inputs were checked finite at attach: training diverged
            warn_user(f"dynprobe: at step {step} the model's outputs on {evaluation.nonfinite} of {self.eval_set.n} "
                      "eval examples are NaN or inf: eval_loss, D and the barriers are NaN from here on",
                      RuntimeWarning)
        # copies: the files may be written after the next training step changed the live buffers
        buffers = {name: np.array(_to_numpy(buffer)) for name, buffer in self.model.named_buffers()
                   if buffer is not None}
        kernel = self.kernel_fn(step) if self.kernel_fn is not None else None
        return SnapshotData(step, self.flat_params(), buffers, evaluation, kernel, started=started)

    # ------------------------------------------------------------------------------------------------ commit

    def commit(self, data: SnapshotData, record: dict[str, Any]) -> dict[str, Any]:
        """Write the snapshot's files, append one row per matrix, then the commit event. Returns the record.

        A transaction: an exception of any kind before the commit event (a ``KeyboardInterrupt`` included) undoes
        the snapshot's rows — the matrices' state and history as before it, the rows appended to their files cut
        off — and is re-raised; the next snapshot is then the one an uninterrupted run would record. The arrays
        already saved stay in the uncommitted snapshot's folder, which no reader looks at. Once the sink has
        registered the commit (:attr:`RunSink.snapshots` grew) the snapshot stands, whatever is raised after; a
        Ctrl-C during the commit call itself is delivered when it returns (:func:`interrupts_deferred`).
        """
        committed = len(self.writer.snapshots)
        previous = self.last_rows, self.last_filled
        for matrix in self.matrices.values():
            matrix.begin()
        try:
            return self._commit(data, record)
        except BaseException:
            if len(self.writer.snapshots) == committed:
                for matrix in self.matrices.values():
                    matrix.rollback()
                self.last_rows, self.last_filled = previous
            raise
        finally:
            for matrix in self.matrices.values():
                matrix.end()

    def _commit(self, data: SnapshotData, record: dict[str, Any]) -> dict[str, Any]:
        step = data.step
        self.writer.save_array(step, PARAMS, _to_numpy(data.params))
        self.writer.save_arrays(step, BUFFERS, data.buffers)
        preds = data.evaluation.preds
        storage = self.eval_set.task.storage_dtype(data.evaluation.num_classes)
        self.writer.save_array(step, PREDS, preds.cpu().numpy().astype(storage))
        if data.kernel is not None:
            self.writer.save_array(step, KERNEL, data.kernel.cpu().numpy())
        for name, array in data.extra_arrays.items():
            self.writer.save_array(step, name, array)
        rows = {
            "C": self.matrices["C"].update(data.params),
            "D": self.matrices["D"].update(preds),
        }
        if self.layers:
            rows["C_layers"] = self.matrices["C"].last_row[1:]
        if "S" in self.matrices:
            rows["S"] = self.matrices["S"].update(None if data.kernel is None else data.kernel.reshape(-1))
        self.last_rows = rows
        self.last_filled = {name: self.matrices[name].take_filled() for name in ("C", "S") if name in self.matrices}
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
        with interrupts_deferred():  # the event line and the sink's record of it: both or neither
            self.writer.commit_snapshot(full)
        return full

    def complete(self) -> None:
        """Compute every pending entry of the matrices (those against spilled snapshots, done in blocks)."""
        for matrix in self.matrices.values():
            matrix.complete()

    def materialize(self) -> None:
        """Complete the matrices, then write each one in full as ``metrics/NAME.npy`` (a convenience copy of the
        row files; the per-layer C stays in its row files)."""
        self.complete()
        for name, matrix in self.matrices.items():
            self.writer.save_matrix(name, matrix.compute())

    def release(self) -> None:
        """Free the earlier vectors held for the rows (after :meth:`materialize`, or when the run fails)."""
        for matrix in self.matrices.values():
            matrix.history.release()

    @property
    def bytes_loaded(self) -> int:
        """Bytes of earlier snapshots read back from the run directory for the rows so far."""
        return sum(m.history.bytes_loaded for m in self.matrices.values())

    # ------------------------------------------------------------------------------------------------ reading

    def _flush(self) -> None:
        flush = getattr(self.writer, "flush", None)  # a background writer: the files must be on disk
        if flush is not None:
            flush()

    def _load(self, snapshot_index: int, name: str, columns: tuple[int, int] | None = None) -> np.ndarray | None:
        """A stored vector of snapshot ``snapshot_index`` (entries ``columns[0]:columns[1]`` of it only, when given)."""
        step = self.writer.snapshots[snapshot_index]["step"]
        path = snapshot_file(self.writer.root, step, {"C": PARAMS, "D": PREDS, "S": KERNEL}[name])
        if not path.exists():
            return None
        if columns is None:
            return load_npy(path).reshape(-1)  # read into memory once (a mapping would hold the pages as well)
        # a copy of the slice: only its pages are read, and the mapping is closed as soon as it is dropped
        return np.array(load_npy(path, mmap=True).reshape(-1)[columns[0] : columns[1]])


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """numpy has no bfloat16: such tensors are stored as float32 (exact)."""
    tensor = tensor.detach()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).cpu().numpy()


def _previous(row: np.ndarray) -> float | None:
    """The metric between this snapshot and the previous one (the last off-diagonal entry of the row)."""
    return None if row.size < 2 or np.isnan(row[-2]) else float(row[-2])
