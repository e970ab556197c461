"""Snapshots of a sharded θ (FSDP2) without gathering it (except for the eNTK): :class:`ShardedSnapshotRecorder`.

The same two halves as :class:`dynprobe.recording.snapshot.SnapshotRecorder` (``measure`` then ``commit``), with
every collective in ``measure``, in the same order on every rank:

1. the eval set is evaluated on every rank (the FSDP forward all-gathers each layer: every rank evaluates the same
   eval batches and gets the same predictions);
2. the C row (whole θ and per layer) from this rank's partial sums: two all-reduces, the new norms then the row's
   sums (:class:`~dynprobe.distributed.sharded_rows.ShardedCosineRows`); both carry a failure flag, so a rank
   that fails before them still takes part and every rank raises alike;
3. H(θ_t) when the kernel cadence asks for one (``kernel_fn``: a
   :class:`~dynprobe.distributed.sharded_kernel.GatheredKernel`, collective: θ gathered, each rank a share of the
   parameters, one all-reduce of the partial kernels that carries a failure flag), identical on every rank;
4. θ's shards: every rank writes its own with ``torch.distributed.checkpoint.save`` in DCP's safetensors format
   (``HuggingFaceStorageWriter(save_distributed=True)``: one file per rank, each shard's offsets in the file's JSON
   header, no pickled metadata) into ``snapshots/step_…/params.dcp/``. ``save`` is collective and returns on rank
   0 only after every rank reported its files written (DCP gathers the write results to rank 0 and raises on
   every rank if any rank failed).

``commit`` is local: rank 0 writes the buffers, predictions, the kernel, the rows of C, D and S and, last, the
snapshot's commit line — so a snapshot is visible only once every rank's shard file exists, as for an unsharded
run's ``params.npy``. The other ranks' sinks write nothing. D (eq. 6) is computed from the predictions, identical on
every rank, as in an unsharded run; so is S (eq. 4) from the kernels, identical on every rank (earlier kernels
beyond ``KERNEL_MEMORY`` are read back from rank 0's ``kernel.npy`` files, which every rank sees).

Memory: every rank keeps its pieces of earlier snapshots for the rows (``T·P/R`` numbers) within
``history_memory`` (by default a quarter of what the process may still use on the device); the others are read
back from its own shard files when a row needs them.

Resume (``resume=True``, the recorded world size): the recorder rebuilds its online state from the kept snapshots
(:meth:`ShardedSnapshotRecorder._resume`, :mod:`dynprobe.distributed.sharded_resume`), so that the rows after the
resume equal those of an uninterrupted run.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dynprobe._util.evaluation import EvalSet, evaluate
from dynprobe._util.modules import layer_slices
from dynprobe.metrics.interval import CosineMetric, FunctionMetric, PairwiseMatrix
from dynprobe.recording.matrices import RecordedMatrix
from dynprobe.recording.snapshot import MAX_LAYERS, SnapshotData, default_history_memory, history_dtype
from dynprobe.store.files import load_npy
from dynprobe.store.history import VectorHistory
from dynprobe.store.layout import BUFFERS, KERNEL, PREDS, SHARDED_PARAMS, layer_metric, snapshot_file
from dynprobe.store.matrix_rows import MatrixRows
from dynprobe.store.rows import TriangularRows
from dynprobe.store.sharded import save_sharded_params
from dynprobe.store.sink import RunSink

from .sharded import Collectives, local_numel, local_piece, reshard
from .sharded_resume import own_pieces
from .sharded_rows import ShardedCosineRows

__all__ = ["ShardedSnapshotRecorder", "local_layer_bounds"]

PREDICTIONS_MEMORY = 64 * 2**20  # bytes of earlier predictions kept for D's rows
KERNEL_MEMORY = 64 * 2**20  # bytes of earlier kernels kept for S's rows
CONVENTIONS = {
    "theta_storage": "FSDP2: each rank's shards, torch.distributed.checkpoint safetensors files (one per rank) in "
                     f"each snapshot's {SHARDED_PARAMS} folder; load_run reads whole vectors in named_parameters() "
                     "order",
    "C_sharded": "eq. (1) as ‖x − s·y‖²/(2‖x‖²), s = ‖x‖/‖y‖ (the cancellation-free form of one process), from "
                 "float64 partial sums of each rank's shards: one all-reduce of the new norms, one of the row's "
                 "sums; relative error below 1e-12 for C ≥ 1e-14",
}


def local_layer_bounds(global_numels: list[int], local_numels: list[int],
                       layers: list[tuple[str, slice]]) -> list[tuple[int, int]]:
    """Each layer's column range in this rank's piece: the layers are runs of consecutive parameters of ``vec(θ)``
    (``layers`` from :func:`~dynprobe._util.modules.layer_slices` over the global sizes), so their local shards
    are runs of the piece too."""
    offsets = np.cumsum([0, *global_numels])
    local_offsets = np.cumsum([0, *local_numels])
    bounds = []
    for _, part in layers:
        first = int(np.searchsorted(offsets, part.start, side="left"))
        last = int(np.searchsorted(offsets, part.stop, side="left"))
        bounds.append((int(local_offsets[first]), int(local_offsets[last])))
    return bounds


class ShardedSnapshotRecorder:
    """Measures and commits snapshots of an FSDP2 model; keeps the online C (whole and per layer) and D.

    Args:
        run: this process's collectives (a :class:`~dynprobe.distributed.runtime.DistributedRun`).
        writer: the run sink (rank 0's :class:`~dynprobe.store.writer.RunWriter`, a null sink elsewhere).
        model: the ``fully_shard``-ed model (evaluated through side-effect-free calls only).
        named_params: its trainable parameters (DTensors), in the order of ``vec(θ)``.
        eval_set: the fixed evaluation set (the same on every rank: checked at attach).
        root: rank 0's run directory (:func:`~dynprobe.distributed.sharded.shared_run_root`): every rank
            writes its shards there.
        per_layer: also record C per layer (models with at most ``MAX_LAYERS`` layers).
        kernel_fn: ``(step) -> H`` or None when the eNTK is not measured at that snapshot (collective: called on
            every rank alike); None: no kernels, no S.
        history_memory: bytes of this rank's pieces of earlier snapshots kept on ``device`` for the C rows (None:
            :func:`~dynprobe.recording.snapshot.default_history_memory`, measured at the second snapshot); the
            others are read back from the rank's shard files (:class:`~dynprobe.distributed.sharded_rows.
            ShardedCosineRows`).
    """

    def __init__(self, run: Collectives, writer: RunSink, model: nn.Module,
                 named_params: list[tuple[str, torch.Tensor]], eval_set: EvalSet, *, root: Path,
                 device: torch.device, storage_dtype: torch.dtype, output_fn: Callable[[Any], torch.Tensor],
                 eval_batch_size: int, per_layer: bool = True,
                 kernel_fn: Callable[[int], torch.Tensor | None] | None = None,
                 history_memory: int | None = None) -> None:
        self.run, self.writer, self.model, self.eval_set = run, writer, model, eval_set
        self.named_params = named_params
        self.params = [p for _, p in named_params]
        self.root, self.device, self.storage_dtype = Path(root), device, storage_dtype
        self.output_fn, self.eval_batch_size = output_fn, eval_batch_size
        self.piece_dtype = history_dtype(self.params, storage_dtype)
        global_numels = [p.numel() for p in self.params]
        layers = layer_slices(list(zip([n for n, _ in named_params], global_numels)))
        self.layers: list[str] = [name for name, _ in layers] if per_layer and len(layers) <= MAX_LAYERS else []
        self.local_size = sum(local_numel(p) for p in self.params)
        bounds = local_layer_bounds(global_numels, [local_numel(p) for p in self.params], layers)
        self.cosine = ShardedCosineRows(
            bounds, run.world_size, run.all_reduce, rank=run.rank, per_layer=bool(self.layers),
            memory=history_memory if history_memory is not None else functools.partial(default_history_memory,
                                                                                       device),
            load=self._load_pieces)
        self.c_rows = [TriangularRows(writer.rows_path("C"))] + [
            TriangularRows(writer.rows_path(layer_metric("C", layer))) for layer in range(len(self.layers))]
        history = VectorHistory(device, dtype=eval_set.task.history_dtype, memory_budget=PREDICTIONS_MEMORY,
                                load=self._load_predictions)
        d_rows, d_metric = MatrixRows([writer.rows_path("D")]), FunctionMetric(eval_set.task.disagreement_to_many)
        d_matrix = PairwiseMatrix("D", d_metric, history)
        if writer.resumed:  # rebuild the online state from the kept snapshots (collective; sharded_resume.py)
            d_matrix = self._resume(d_rows, d_metric, history)
        self.disagreement = RecordedMatrix(d_matrix, d_rows)
        self.kernel_fn = kernel_fn
        self.kernels = None
        if kernel_fn is not None:
            s_rows = MatrixRows([writer.rows_path("S")])
            s_history = VectorHistory(device, dtype=torch.float64, memory_budget=KERNEL_MEMORY, load=self._load_kernel)
            s_matrix = PairwiseMatrix("S", CosineMetric(), s_history)
            if writer.resumed:  # the kept kernels, as an unsharded resume reattaches them
                has = [bool(s.get("kernel")) for s in writer.snapshots]
                if not writer.writes:  # a null sink's scratch rows: placeholders (never read), as in _resume
                    _pad_rows(s_rows.files, sum(has))
                s_matrix = PairwiseMatrix.reattach("S", CosineMetric(), s_history, s_rows.read(len(has)), has)
            self.kernels = RecordedMatrix(s_matrix, s_rows)
        self.last_rows: dict[str, np.ndarray] = {}
        self.last_filled: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        self._row: np.ndarray | None = None  # the C row measured by the latest measure(), committed next
        if writer.writes:  # say how θ was stored and C computed (rank 0 writes the manifest)
            writer.update_manifest(conventions={**(writer.manifest.get("conventions") or {}), **CONVENTIONS})

    def _resume(self, d_rows: MatrixRows, d_metric: FunctionMetric, history: VectorHistory) -> PairwiseMatrix:
        """A resumed run: the state an uninterrupted run holds after the kept snapshots. C: each rank reloads its
        own pieces of every kept snapshot (DCP into its DTensor templates) and their global norms
        (:meth:`ShardedCosineRows.restore`: bit-identical norms). D: the kept predictions, from the shared run
        directory, as in an unsharded resume. The row files: rank 0's are cut to the kept snapshots by the
        writer's resume (at its first write); a null sink's scratch files get as many placeholder rows (zeros,
        never read), so that the next row's index matches on every rank."""
        snapshots = self.writer.snapshots
        count = len(snapshots)
        self.cosine.restore(own_pieces(self.run, self.root, self.writer.manifest, [int(s["step"]) for s in snapshots],
                                       self.named_params, self.piece_dtype, self.device))
        if not self.writer.writes:  # rank 0's files are cut by the writer's resume, at its first write
            _pad_rows([*self.c_rows, *d_rows.files], count)
        return PairwiseMatrix.reattach("D", d_metric, history, d_rows.read(count), [True] * count)

    # ------------------------------------------------------------------------------------------------ measure

    def measure(self, step: int) -> SnapshotData:
        """Evaluate, compute the C row and write this rank's shards (every collective of the snapshot)."""
        started = time.perf_counter()
        error, piece, buffers, evaluation = None, None, {}, None
        try:  # a failure after the forward's own collectives (e.g. in output_fn) is flagged in the row's all-reduce
            evaluation = evaluate(self.model, self.eval_set, output_fn=self.output_fn,
                                  batch_size=self.eval_batch_size, device=self.device)
            reshard(self.model)  # the root's parameters stay all-gathered after a forward (sharded.reshard)
            piece = local_piece(self.params, self.piece_dtype)
            buffers = {name: np.array(buffer.detach().cpu().float().numpy() if buffer.dtype == torch.bfloat16
                                      else buffer.detach().cpu().numpy())
                       for name, buffer in self.model.named_buffers() if buffer is not None}
        except Exception as failure:  # noqa: BLE001 - every rank must reach the row's all-reduce
            error = f"{type(failure).__name__}: {failure}"
        if piece is None:
            piece = torch.zeros(self.local_size, dtype=self.piece_dtype, device=self.device)
        self._row = self.cosine.row(piece, error)  # raises on every rank if any failed
        assert evaluation is not None
        kernel = self.kernel_fn(step) if self.kernel_fn is not None else None  # raises on every rank alike
        self._save_shards(step)
        return SnapshotData(step, piece, buffers, evaluation, kernel, started=started)

    def _save_shards(self, step: int) -> None:
        save_sharded_params(self.root, step, {name: p.detach() for name, p in self.named_params})

    # ------------------------------------------------------------------------------------------------ commit

    def commit(self, data: SnapshotData, record: dict[str, Any]) -> dict[str, Any]:
        """Rank 0 writes the buffers, predictions and rows, then the commit line (the shards exist already)."""
        assert self._row is not None, "commit() follows measure()"
        step, row = data.step, self._row
        self.writer.save_arrays(step, BUFFERS, data.buffers)
        preds = data.evaluation.preds
        storage = self.eval_set.task.storage_dtype(data.evaluation.num_classes)
        self.writer.save_array(step, PREDS, preds.cpu().numpy().astype(storage))
        if data.kernel is not None:
            self.writer.save_array(step, KERNEL, data.kernel.cpu().numpy())
        for name, array in data.extra_arrays.items():  # the ghosts' predictions
            self.writer.save_array(step, name, array)
        for channel, rows_file in enumerate(self.c_rows):
            rows_file.append(row[channel], row.shape[1] - 1)
        rows = {"C": row[0], "D": self.disagreement.update(preds)}
        if self.layers:
            rows["C_layers"] = row[1:]
        filled: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {"C": []}
        if self.kernels is not None:
            rows["S"] = self.kernels.update(None if data.kernel is None else data.kernel.reshape(-1))
            filled["S"] = self.kernels.take_filled()
        self.last_rows, self.last_filled, self._row = rows, filled, None
        full = {"step": step, "eval_loss": data.evaluation.loss, "eval_accuracy": data.evaluation.accuracy,
                "kernel": data.kernel is not None, **record, "C_prev": _previous(rows["C"]),
                "D_prev": _previous(rows["D"]), "duration_s": time.perf_counter() - data.started}
        if "S" in rows:
            full["S_prev"] = _previous(rows["S"])
        self.writer.commit_snapshot(full)
        return full

    def materialize(self) -> None:
        """Write ``metrics/C.npy``, ``metrics/D.npy`` (and ``metrics/S.npy``) in full (the per-layer C stays in its
        row files)."""
        self.disagreement.complete()
        self.writer.save_matrix("C", self.c_rows[0].read(self.cosine.count))
        self.writer.save_matrix("D", self.disagreement.compute())
        if self.kernels is not None:
            self.kernels.complete()
            self.writer.save_matrix("S", self.kernels.compute())

    def release(self) -> None:
        """Free the earlier pieces and predictions held for the rows."""
        self.cosine.release()
        self.disagreement.history.release()
        if self.kernels is not None:
            self.kernels.history.release()

    def _load_pieces(self, indices: list[int]) -> Iterator[torch.Tensor]:
        """This rank's pieces of the snapshots at ``indices``, read back from its shard files (collective)."""
        steps = [int(self.writer.snapshots[index]["step"]) for index in indices]
        return own_pieces(self.run, self.root, self.writer.manifest, steps, self.named_params, self.piece_dtype,
                          self.device)

    def _load_predictions(self, index: int) -> np.ndarray | None:
        path = snapshot_file(self.root, self.writer.snapshots[index]["step"], PREDS)
        return load_npy(path).reshape(-1) if path.exists() else None

    def _load_kernel(self, index: int) -> np.ndarray | None:
        path = snapshot_file(self.root, self.writer.snapshots[index]["step"], KERNEL)
        return load_npy(path).reshape(-1) if path.exists() else None


def _pad_rows(files: list[TriangularRows], count: int) -> None:
    """Placeholder rows (zeros) up to ``count`` in a null sink's scratch row files, so that the next row's index
    matches rank 0's."""
    for rows_file in files:
        for index in range(rows_file.complete_rows(), count):
            rows_file.append(np.zeros(index + 1), index)


def _previous(row: np.ndarray) -> float | None:
    """The metric between this snapshot and the previous one (the last off-diagonal entry of the row)."""
    return None if row.size < 2 or np.isnan(row[-2]) else float(row[-2])
