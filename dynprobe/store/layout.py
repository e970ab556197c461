"""The run directory's format: every file and folder name, in one place.

Format version 1 (the README's "Run directory" section describes it for users)::

    runs/NAME/
      run.json                  manifest: format version, versions, full config, model summary, status
      events.jsonl              append-only event log; a "snapshot" line is the commit point of a snapshot
      eval_indices.npy          which examples of the user's eval data form the fixed eval set
      kernel_probe_indices.npy  which eval-set examples form the eNTK probe set
      snapshots/step_00000100/  params.npy (flat θ), buffers.npz, preds.npy (eval argmax), kernel.npy,
                                ghost_001.preds.npy, ghost_001.params.npy
      metrics/C.rows, D.rows …  append-only lower-triangular float64 rows: row k holds M[k, 0..k]
      metrics/C.npy, D.npy …    full T×T matrices, materialized when the probe closes (for other tools)
      metrics/B.jsonl           loss barriers between snapshots, one JSON line per pair
      switching/results.jsonl   switching-experiment results, one JSON line per switch step

Every other module builds paths through these names and functions; none spells a file name itself.
"""
from __future__ import annotations

from pathlib import Path

__all__ = [
    "BARRIERS",
    "BUFFERS",
    "EVAL_INDICES",
    "EVENTS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KERNEL",
    "KERNEL_PROBE_INDICES",
    "MANIFEST",
    "METRICS",
    "PARAMS",
    "PREDS",
    "SNAPSHOTS",
    "SWITCHING",
    "SWITCHING_RESULTS",
    "barriers_path",
    "ghost_array",
    "matrix_path",
    "rows_path",
    "snapshot_dir",
    "snapshot_dirname",
    "snapshot_file",
    "switching_results_path",
]

FORMAT_VERSION = 1
FORMAT_NAME = "dynprobe-run"

MANIFEST = "run.json"
EVENTS = "events.jsonl"
EVAL_INDICES = "eval_indices.npy"
KERNEL_PROBE_INDICES = "kernel_probe_indices.npy"
SNAPSHOTS = "snapshots"
METRICS = "metrics"
SWITCHING = "switching"
BARRIERS = "B.jsonl"
SWITCHING_RESULTS = "results.jsonl"

# Array names inside a snapshot folder (``NAME.npy``; buffers are ``buffers.npz``).
PARAMS = "params"
BUFFERS = "buffers"
PREDS = "preds"
KERNEL = "kernel"


def snapshot_dirname(step: int) -> str:
    """``step_00000100``: zero-padded so that a directory listing sorts by step."""
    return f"step_{int(step):08d}"


def snapshot_dir(root: Path, step: int) -> Path:
    """``root/snapshots/step_00000100``."""
    return Path(root) / SNAPSHOTS / snapshot_dirname(step)


def snapshot_file(root: Path, step: int, name: str) -> Path:
    """The ``.npy`` array ``name`` of the snapshot at ``step`` (``buffers`` is the one ``.npz``)."""
    suffix = ".npz" if name == BUFFERS else ".npy"
    return snapshot_dir(root, step) / f"{name}{suffix}"


def ghost_array(ghost: int, what: str) -> str:
    """Name of a ghost's array in a snapshot folder: ``ghost_001.preds`` or ``ghost_001.params``."""
    return f"ghost_{int(ghost):03d}.{what}"


def rows_path(root: Path, metric: str) -> Path:
    """``metrics/C.rows``: the append-only lower-triangular rows of an interval matrix."""
    return Path(root) / METRICS / f"{metric}.rows"


def matrix_path(root: Path, metric: str) -> Path:
    """``metrics/C.npy``: the full matrix, materialized at close."""
    return Path(root) / METRICS / f"{metric}.npy"


def barriers_path(root: Path) -> Path:
    """``metrics/B.jsonl``: loss barriers between snapshots."""
    return Path(root) / METRICS / BARRIERS


def switching_results_path(root: Path) -> Path:
    """``switching/results.jsonl``: switching-experiment results."""
    return Path(root) / SWITCHING / SWITCHING_RESULTS
