"""The run sink of a rank other than 0: :class:`NullSink`, a :class:`dynprobe.store.sink.RunSink` that writes nothing.

Every rank runs the same recording code (so that the collectives inside it — eNTK partial sums, ghost kernels —
stay in lock-step); only rank 0's sink writes the run directory. The null sink keeps the snapshot records in memory,
because the schedule and the eNTK cadence are decided from them identically on every rank, and the manifest, which
the recorders read back. Interval-matrix rows, which the recorders append to files they get from
:meth:`NullSink.rows_path`, go to a private scratch folder that is removed when the sink closes. Under FSDP a
resumed run's null sinks get rank 0's plan (the resume step and the kept snapshot records), broadcast when rank 0
opens the run, so that every rank continues from the same step.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dynprobe.store.writer import json_safe

__all__ = ["NullSink"]


class NullSink:
    """A run sink that touches no file of the run directory (see the module docstring).

    Args:
        root: the run directory rank 0 writes (for messages; never written here).
        manifest: the manifest rank 0 writes (kept in memory).
        resume_step: a resumed run (FSDP): the step rank 0 continues from (None: a new run).
        snapshots: a resumed run: the snapshot records rank 0 kept.
    """

    writes = False  # what a recorder may skip here: nothing it computes is stored

    def __init__(self, root: str | os.PathLike, manifest: dict[str, Any], *, resume_step: int | None = None,
                 snapshots: list[dict[str, Any]] | None = None) -> None:
        self.root = Path(root)
        self.manifest = dict(manifest)
        self.resumed = resume_step is not None
        self.resume_step = resume_step
        self.snapshots: list[dict[str, Any]] = list(snapshots or [])
        self._scratch: Path | None = None
        self._cleanup: weakref.finalize | None = None

    def resume_from_step(self, resume_step: int | None = None) -> int:
        if self.resume_step is not None:
            return self.resume_step
        return 0 if resume_step is None else int(resume_step)

    def event(self, event: str, /, **fields: Any) -> None:
        pass

    def save_array(self, step: int, name: str, array: np.ndarray) -> None:
        pass

    def save_arrays(self, step: int, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        pass

    def save_run_array(self, name: str, array: np.ndarray) -> None:
        pass

    def save_matrix(self, metric: str, matrix: np.ndarray) -> None:
        pass

    def append_separation(self, ghost: int, steps: np.ndarray, values: np.ndarray) -> None:
        pass

    def commit_snapshot(self, record: dict[str, Any]) -> None:
        self.snapshots.append(json_safe({"snapshot_index": len(self.snapshots), **record}))

    def update_manifest(self, **fields: Any) -> None:
        self.manifest.update(json_safe(fields))

    def rows_path(self, metric: str) -> Path:
        """A file in this rank's private scratch folder (rows appended there are never read by anyone else)."""
        return self._scratch_folder() / f"{metric}.rows"

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._cleanup is not None:
            self._cleanup()

    def _scratch_folder(self) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="dynprobe_rank_"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._scratch, True)
        return self._scratch
