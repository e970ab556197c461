"""How much disk a run takes: measured (:func:`disk_usage`) and projected before it starts
(:func:`projected_run_bytes`, :func:`free_space_warning`).

A run stores, per snapshot, θ (the parameters in their storage dtype), the buffers and the eval predictions, plus
an eNTK where one is measured and the ghosts' predictions (and parameters with ``Ghosts(save_params=True)``); the
interval matrices grow as T² (append-only lower-triangular rows of float64, and the full matrices written at
close). For a large model the parameter vectors dominate: P × 4 bytes × T.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dynprobe._util.checks import check_int

from .layout import SNAPSHOTS

__all__ = ["DiskUsage", "disk_usage", "free_space_warning", "projected_run_bytes"]

_NPY_HEADER = 128  # bytes of a .npy header
_NPZ_OVERHEAD = 256  # zip headers per archive member, roughly
_EVENT_BYTES = 600  # a snapshot's commit line and the events around it, roughly
_GHOST_EVENT_BYTES = 350  # one ghost comparison line


@dataclass(frozen=True)
class DiskUsage:
    """Bytes a run directory holds (apparent file sizes; links are not followed).

    Attributes:
        total_bytes: every file of the run.
        snapshot_bytes: the files of the snapshot folders.
        snapshots: committed snapshots the per-snapshot figure is over.
        bytes_per_snapshot: ``snapshot_bytes / snapshots`` (0 without snapshots) — what one more snapshot costs,
            the interval matrices' T² growth aside.
    """

    total_bytes: int
    snapshot_bytes: int
    snapshots: int

    @property
    def bytes_per_snapshot(self) -> float:
        return self.snapshot_bytes / self.snapshots if self.snapshots else 0.0

    @property
    def other_bytes(self) -> int:
        """Manifest, events, metric rows and matrices, records."""
        return self.total_bytes - self.snapshot_bytes


def _tree_bytes(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path, followlinks=False):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:  # removed while we walked (a run being written)
                continue
    return total


def disk_usage(root: Path, snapshots: int) -> DiskUsage:
    """The bytes of the run at ``root`` with ``snapshots`` committed snapshots."""
    root = Path(root)
    snapshot_bytes = _tree_bytes(root / SNAPSHOTS)
    return DiskUsage(total_bytes=_tree_bytes(root), snapshot_bytes=snapshot_bytes, snapshots=snapshots)


def projected_run_bytes(*, num_parameters: int, snapshots: int, param_itemsize: int = 4, buffer_bytes: int = 0,
                        eval_n: int = 0, label_itemsize: int = 2, kernel_snapshots: int = 0,
                        kernel_entries: int = 0, ghost_snapshots: int = 0, ghost_params: bool = False) -> int:
    """The projected size in bytes of a run recording ``snapshots`` snapshots (a pure function of the format).

    Args:
        num_parameters: P, the entries of vec(θ).
        snapshots: T, the snapshots the schedule takes.
        param_itemsize: bytes per stored parameter (4 for float32 storage, 8 for float64).
        buffer_bytes: bytes of the model's buffers (BatchNorm statistics, ...).
        eval_n: examples in the eval set (one predicted label each per snapshot).
        label_itemsize: bytes per stored label.
        kernel_snapshots: snapshots with an eNTK; ``kernel_entries``: entries of one kernel (float64).
        ghost_snapshots: ghost comparisons (Σ over ghosts of the snapshots each is alive at).
        ghost_params: whether ghosts store their parameters (``Ghosts(save_params=True)``).
    """
    for name, value in (("num_parameters", num_parameters), ("snapshots", snapshots),
                        ("kernel_snapshots", kernel_snapshots), ("ghost_snapshots", ghost_snapshots)):
        check_int(name, value, minimum=0)
    params = num_parameters * param_itemsize + _NPY_HEADER
    per_snapshot = (params + buffer_bytes + _NPZ_OVERHEAD + eval_n * label_itemsize + _NPY_HEADER
                    + _EVENT_BYTES)
    matrices = 2 + (1 if kernel_snapshots else 0)  # C, D (and S)
    triangle = snapshots * (snapshots + 1) // 2 * 8
    square = snapshots * snapshots * 8
    kernels = kernel_snapshots * (kernel_entries * 8 + _NPY_HEADER)
    ghosts = ghost_snapshots * (eval_n * 4 + _NPY_HEADER + _GHOST_EVENT_BYTES + (params if ghost_params else 0))
    return snapshots * per_snapshot + matrices * (triangle + square) + kernels + ghosts


def free_space_warning(out: str | os.PathLike, projected_bytes: int) -> str | None:
    """A message when ``projected_bytes`` exceed the free space of the filesystem ``out`` is (or will be) on;
    None when they fit or the free space cannot be determined."""
    path = Path(out).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return None
    if projected_bytes <= free:
        return None
    return (f"dynprobe: the run in {str(out)!r} is projected to take {_human(projected_bytes)} (parameters × "
            f"snapshots + kernels + predictions) but its filesystem has {_human(free)} free; snapshot less often "
            "(schedule=), or choose an out= on a larger disk")


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TB"  # pragma: no cover
