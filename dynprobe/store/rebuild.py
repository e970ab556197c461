"""Rebuilding a run's derived files from its snapshots: the interval-matrix rows (``metrics/*.rows``).

The rows of C, D and S are a function of the arrays every committed snapshot stores, so a resumed run whose row
file is missing or short rebuilds it instead of cutting the snapshots it lacks rows for:

* ``C`` — eq. (1), ``1 − cos(vec θ_i, vec θ_j)`` of the stored ``params.npy``, in float64; ``C.layer_NNN`` the same
  on layer NNN's slice of θ (:func:`dynprobe._util.modules.layer_slices` of the manifest's parameters);
* ``D`` — eq. (6) from the stored ``preds.npy``: the fraction of differing labels for integer predictions
  (classification, tokens), the mean squared difference for float predictions (regression);
* ``S`` — eq. (4), ``1 − <H_i, H_j>_F / (‖H_i‖ ‖H_j‖)`` of the stored ``kernel.npy``; NaN for snapshots without one.

Rebuilt values equal the online ones up to float64 rounding of the summation order (not bit for bit). A metric whose
arrays are not all stored (a snapshot lacking ``preds.npy``) cannot be rebuilt: :func:`rebuild_rows` says so, and
the resume keeps only the snapshots that have rows. Nor are an FSDP run's C rows rebuilt (that would gather every
snapshot's whole θ on one process): its resume keeps the snapshots they have rows for.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dynprobe._util.distances import pairwise_cosine_dissimilarity
from dynprobe._util.modules import layer_slices

from .files import RunFormatError, load_npy
from .layout import KERNEL, PARAMS, PREDS, SHARDED_PARAMS, snapshot_file
from .sharded import has_sharded_params

__all__ = ["lower_triangle_bytes", "rebuild_rows"]


def lower_triangle_bytes(matrix: np.ndarray) -> bytes:
    """The row file of a T×T matrix: row k holds ``M[k, 0..k]``, little-endian float64."""
    return np.ascontiguousarray(matrix[np.tril_indices(len(matrix))], dtype="<f8").tobytes()


def _layer(metric: str) -> int | None:
    base, _, layer = metric.partition(".layer_")
    return int(layer) if base == "C" and layer.isdigit() else None


def _disagreement(preds: list[np.ndarray]) -> np.ndarray:
    count = len(preds)
    out = np.zeros((count, count))
    stacked = np.stack([p.reshape(-1) for p in preds])
    for i in range(count):
        if np.issubdtype(stacked.dtype, np.integer):
            values = (stacked[: i + 1] != stacked[i]).mean(axis=1)
        else:
            values = np.square(stacked[: i + 1].astype(np.float64) - stacked[i].astype(np.float64)).mean(axis=1)
        out[i, : i + 1] = values
        out[: i + 1, i] = values
    return out


def rebuild_rows(root: Path, manifest: Mapping[str, Any], metric: str, snapshots: list[dict[str, Any]]
                 ) -> np.ndarray:
    """The T×T matrix of ``metric`` (``"C"``, ``"C.layer_NNN"``, ``"D"``, ``"S"``) over ``snapshots``, from their
    stored arrays. Raises :class:`RunFormatError` naming the missing or damaged array when it cannot be rebuilt."""
    steps = [int(s["step"]) for s in snapshots]
    specs = (manifest.get("model") or {}).get("parameters") or []
    if metric == "D":
        return _disagreement([load_npy(snapshot_file(root, step, PREDS)) for step in steps])
    if metric == "S":
        have = [i for i, s in enumerate(snapshots) if s.get("kernel")]
        result = np.full((len(steps), len(steps)), np.nan)
        if have:
            kernels = np.stack([load_npy(snapshot_file(root, steps[i], KERNEL)).reshape(-1) for i in have])
            result[np.ix_(have, have)] = pairwise_cosine_dissimilarity(kernels)
        return result
    layer = _layer(metric)
    if metric != "C" and layer is None:
        raise RunFormatError(f"{root}: metric rows {metric!r} are not a function of the stored snapshots")
    sharded = [step for step in steps if has_sharded_params(root, step)]
    if sharded:  # rebuilding would gather every snapshot's whole θ on one process, which FSDP exists to avoid
        raise RunFormatError(f"{root}: the rows of {metric} are not rebuilt from an FSDP run's shards (snapshot at "
                             f"step {sharded[0]}: {SHARDED_PARAMS}/)")
    numel = sum(int(spec["numel"]) for spec in specs)
    part = slice(None)
    if layer is not None:
        slices = layer_slices((spec["name"], int(spec["numel"])) for spec in specs)
        if layer >= len(slices):
            raise RunFormatError(f"{root}: the manifest has {len(slices)} layers; there is no layer {layer}")
        part = slices[layer][1]
    vectors = [np.asarray(load_npy(snapshot_file(root, step, PARAMS), mmap=True, shape=(numel,) if specs else None)
                          [part], dtype=np.float64) for step in steps]
    return pairwise_cosine_dissimilarity(np.stack(vectors))
