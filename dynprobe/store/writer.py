"""The writing side of a run directory: create or reattach, snapshot files, events, commit, rewind.

Only the probe writes; :mod:`dynprobe.run` reads. See :mod:`dynprobe.store` for the layout and the
crash-safety rules this class follows.
"""
from __future__ import annotations

import datetime as _dt
import os
import socket
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .files import (
    RunFormatError,
    append_jsonl,
    atomic_save_npy,
    atomic_save_npz,
    atomic_write_json,
    load_npy,
    read_jsonl,
    read_manifest,
    remove_tree,
    rewrite_jsonl,
    truncate_torn_tail,
)
from .layout import (
    EVENTS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    METRICS,
    PARAMS,
    SNAPSHOTS,
    snapshot_dir,
    snapshot_dirname,
    snapshot_file,
)

__all__ = ["RunWriter", "json_safe", "now"]


def now() -> str:
    """UTC time stamp for manifests and events."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class RunWriter:
    """Owns one run directory for writing.

    Args:
        root: the run directory (``Probe(out=...)``).
        manifest: the manifest of a new run (format fields, versions, status and writer are filled in here).
        resume: reattach to an existing run instead of refusing it.
        resume_step: the step the user's training restarts from; committed snapshots after it are discarded
            (the run rewinds) with a warning. ``None``: continue after the last committed snapshot.
    """

    def __init__(self, root: str | os.PathLike, manifest: dict[str, Any], *, resume: bool,
                 resume_step: int | None = None) -> None:
        self.root = Path(root)
        self._check_writable_location()
        self.resumed = False
        if (self.root / MANIFEST).exists():
            if not resume:
                raise FileExistsError(self._existing_run_message())
            self._reattach(manifest, resume_step)
        else:
            if self.root.exists() and any(self.root.iterdir()):
                raise FileExistsError(
                    f"out={str(self.root)!r} exists, is not empty and is not a dynprobe run; choose a new directory "
                    "(dynprobe never writes into a directory it did not create)"
                )
            self._create(manifest)

    # ----------------------------------------------------------------------------------------- lifecycle

    def _check_writable_location(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"out={str(self.root)!r} is a file; pass a directory path for the run")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe_file = self.root / f".write-test-{os.getpid()}"
            probe_file.write_bytes(b"")
            probe_file.unlink()
        except OSError as error:
            raise PermissionError(f"out={str(self.root)!r} is not writable ({error}); choose another directory") from error

    def _existing_run_message(self) -> str:
        try:
            snapshots = [e for e in read_jsonl(self.root / EVENTS) if e.get("event") == "snapshot"]
            last = f", last step {snapshots[-1]['step']}" if snapshots else ""
            held = f" ({len(snapshots)} snapshots{last})"
        except (RunFormatError, OSError, KeyError):
            held = ""
        return (
            f"out={str(self.root)!r} already holds a dynprobe run{held}. Pass resume=True to continue it (after "
            "restoring your own training checkpoint), or choose another out= directory"
        )

    def _create(self, manifest: dict[str, Any]) -> None:
        (self.root / SNAPSHOTS).mkdir(parents=True, exist_ok=True)
        (self.root / METRICS).mkdir(exist_ok=True)
        self.manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            **manifest,
            "created": now(),
            "updated": now(),
            "status": "running",
            "writer": {"pid": os.getpid(), "host": socket.gethostname()},
            "resumes": [],
        }
        atomic_write_json(self.root / MANIFEST, self.manifest)
        self.snapshots: list[dict[str, Any]] = []
        self.event("attach", step=0)

    def _reattach(self, manifest: dict[str, Any], resume_step: int | None) -> None:
        old = read_manifest(self.root)
        _check_same_model(old, manifest, self.root)
        self.resumed = True
        truncate_torn_tail(self.root / EVENTS)
        events = read_jsonl(self.root / EVENTS)
        snapshots = _committed_snapshots(events, self.root)
        if resume_step is not None and snapshots and snapshots[-1]["step"] > resume_step:
            kept = [s for s in snapshots if s["step"] <= resume_step]
            warnings.warn(
                f"resuming {self.root} at step {resume_step}: discarding {len(snapshots) - len(kept)} snapshots "
                f"recorded after it (steps {snapshots[len(kept)]['step']}..{snapshots[-1]['step']})",
                stacklevel=4,
            )
            self._rewind(events, kept, resume_step)
            snapshots = kept
        self.snapshots = snapshots
        self._remove_uncommitted_snapshot_dirs()
        self.manifest = {**old, "status": "running", "updated": now(),
                         "writer": {"pid": os.getpid(), "host": socket.gethostname()}}
        self.manifest.setdefault("resumes", []).append({"time": now(), "step": self.resume_from_step(resume_step)})
        # The new configuration wins (a user may change the schedule on resume); the old one stays in events.
        self.manifest["config"] = manifest.get("config", old.get("config"))
        atomic_write_json(self.root / MANIFEST, self.manifest)
        self.event("resume", step=self.resume_from_step(resume_step), previous_config=old.get("config"))

    def resume_from_step(self, resume_step: int | None) -> int:
        if resume_step is not None:
            return int(resume_step)
        return int(self.snapshots[-1]["step"]) if self.snapshots else 0

    def _rewind(self, events: list[dict[str, Any]], kept: list[dict[str, Any]], step: int) -> None:
        keep_steps = {s["step"] for s in kept}
        survivors = [e for e in events if e.get("event") == "snapshot" and e["step"] in keep_steps
                     or e.get("event") != "snapshot" and e.get("step", 0) <= step]
        rewrite_jsonl(self.root / EVENTS, survivors)

    def _remove_uncommitted_snapshot_dirs(self) -> None:
        committed = {snapshot_dirname(s["step"]) for s in self.snapshots}
        for path in (self.root / SNAPSHOTS).glob("step_*"):
            if path.name not in committed:
                remove_tree(path)

    # ----------------------------------------------------------------------------------------- writing

    def event(self, event: str, /, **fields: Any) -> None:
        """Append one event line (``{"event": event, "time": ..., **fields}``)."""
        append_jsonl(self.root / EVENTS, {"event": event, "time": now(), **json_safe(fields)})

    def snapshot_path(self, step: int) -> Path:
        path = snapshot_dir(self.root, step)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def save_array(self, step: int, name: str, array: np.ndarray) -> None:
        atomic_save_npy(self.snapshot_path(step) / f"{name}.npy", array)

    def save_arrays(self, step: int, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        atomic_save_npz(self.snapshot_path(step) / f"{name}.npz", arrays)

    def save_run_array(self, name: str, array: np.ndarray) -> None:
        """A run-level array (e.g. ``eval_indices``), written once."""
        atomic_save_npy(self.root / f"{name}.npy", array)

    def commit_snapshot(self, record: dict[str, Any]) -> None:
        """The commit point of a snapshot: everything it refers to is already on disk."""
        record = {"index": len(self.snapshots), **record}
        self.event("snapshot", **record)
        self.snapshots.append(json_safe(record))

    def update_manifest(self, **fields: Any) -> None:
        self.manifest.update(json_safe(fields))
        self.manifest["updated"] = now()
        atomic_write_json(self.root / MANIFEST, self.manifest)

    def metrics_path(self, name: str) -> Path:
        return self.root / METRICS / name

    def load_params(self, index: int) -> np.ndarray:
        return load_npy(snapshot_file(self.root, self.snapshots[index]["step"], PARAMS),
                              mmap=True)


def _committed_snapshots(events: list[dict[str, Any]], root: Path) -> list[dict[str, Any]]:
    snapshots = [e for e in events if e.get("event") == "snapshot"]
    for i, record in enumerate(snapshots):
        if record.get("index") != i:
            raise RunFormatError(f"{root}/{EVENTS}: snapshot records are out of order at index {i}")
    return snapshots


def _check_same_model(old: dict[str, Any], new: dict[str, Any], root: Path) -> None:
    def layout(manifest: dict[str, Any]) -> list[tuple[str, list[int]]]:
        return [(p["name"], list(p["shape"])) for p in manifest.get("model", {}).get("parameters", [])]

    if layout(old) != layout(new):
        raise ValueError(
            f"cannot resume {root}: the model's trainable parameters differ from the run's "
            f"({len(layout(old))} recorded, {len(layout(new))} now). Resume with the same architecture, or choose "
            "another out="
        )
    old_eval, new_eval = old.get("eval", {}), new.get("eval", {})
    if old_eval.get("fingerprint") != new_eval.get("fingerprint"):
        raise ValueError(
            f"cannot resume {root}: eval_data differs from the run's (D compares predictions example by example, "
            "so every snapshot must see the same eval set). Pass the same eval_data and seed"
        )


def json_safe(value: Any) -> Any:
    """Convert numbers, tensors, tuples and paths into plain JSON values; anything else becomes its repr."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):
        return json_safe(value.tolist())
    return repr(value)

