"""The interface the recorders write a run through: :class:`RunSink`.

The snapshot recorder, the ghosts and the barrier scheduler never open files of the run directory themselves;
they call a sink. :class:`dynprobe.store.writer.RunWriter` is the sink that writes the run directory; on
torch.distributed ranks other than 0 a null sink (:mod:`dynprobe.distributed`) keeps the snapshot records in
memory and writes nothing, so every rank runs the same recording code. A background writer may wrap a
:class:`RunWriter` and implement the same protocol.

Ordering contract (crash safety): everything a snapshot refers to — its arrays (:meth:`RunSink.save_array`,
:meth:`RunSink.save_arrays`), its metric rows (appended to :meth:`RunSink.rows_path`) and its events — is
written before :meth:`RunSink.commit_snapshot`, whose event line makes the snapshot visible to readers.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["RunSink"]


@runtime_checkable
class RunSink(Protocol):
    """Where a probe records a run.

    Attributes:
        root: the run directory.
        manifest: the run's manifest (a dict; :meth:`update_manifest` changes it).
        snapshots: the committed snapshot records, in order (``{"snapshot_index", "step", "kernel", ...}``).
        resumed: whether the run continues an earlier one (``resume=True`` on an existing run).
        writes: whether the sink stores anything (False for the null sink of DDP ranks other than 0: what only
            the writing rank does — the online detector, callbacks, barriers, the training-loss log — is decided
            by this flag, once, where the probe is assembled).
    """

    root: Path
    manifest: dict[str, Any]
    snapshots: list[dict[str, Any]]
    resumed: bool
    writes: bool

    def event(self, event: str, /, **fields: Any) -> None:
        """Append one event line ``{"event": event, "time": ..., **fields}`` (fields JSON-safe'd)."""

    def save_array(self, step: int, name: str, array: np.ndarray) -> None:
        """Store ``array`` as ``name.npy`` in the folder of the snapshot at ``step`` (atomically)."""

    def save_arrays(self, step: int, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Store named arrays as ``name.npz`` in the folder of the snapshot at ``step`` (atomically)."""

    def save_run_array(self, name: str, array: np.ndarray) -> None:
        """Store a run-level array (``eval_indices``, ``kernel_probe_indices``) once."""

    def commit_snapshot(self, record: dict[str, Any]) -> None:
        """The commit point of a snapshot: append its ``snapshot`` event (``index`` is added)."""

    def update_manifest(self, **fields: Any) -> None:
        """Set manifest fields and rewrite the manifest atomically."""

    def rows_path(self, metric: str) -> Path:
        """The append-only row file of an interval matrix (``metrics/C.rows``)."""

    def save_matrix(self, metric: str, matrix: np.ndarray) -> None:
        """Store a full interval matrix (``metrics/C.npy``), materialized at close."""

    def append_separation(self, ghost: int, steps: np.ndarray, values: np.ndarray) -> None:
        """Append (step, ‖θ' − θ_ref‖₂) pairs to the ghost's separation log."""

    def resume_from_step(self, resume_step: int | None) -> int:
        """The step a resumed run continues from (``resume_step``, else the last committed snapshot's step)."""

    def flush(self) -> None:
        """Return once everything handed to the sink so far is on disk (a no-op for a synchronous writer)."""

    def close(self) -> None:
        """Release the run (the writer's lock); idempotent. Nothing is written after it."""
