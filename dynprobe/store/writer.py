"""The writing side of a run directory: create or reattach, snapshot files, events, commit, close.

Only the probe writes; :class:`dynprobe.store.Run` reads. :class:`RunWriter` implements
:class:`dynprobe.store.sink.RunSink`. Its guarantees:

* **one writer per run** — an exclusive OS lock (:mod:`dynprobe.store.lock`) is taken before anything is written
  (new run or ``resume=True``) and held until :meth:`RunWriter.close`;
* **crash safety** — a snapshot's files and rows are written before its commit line (:mod:`dynprobe.store.files`);
* **never outside the run** — a run directory holding a symbolic link is refused, and every file is opened
  without following links;
* **durability** (``durable=True``) — files and folders are fsynced at every commit point;
* **resume that is right or refuses** — see :mod:`dynprobe.store.resume` for what a resumed run keeps. A resume
  is planned and checked when the writer opens, and applied at its first write: a probe that refuses the resume
  before writing (its model does not match the resume step) leaves the run exactly as it found it; what a resume
  drops is moved to ``set-aside-STAMP/``, never deleted.
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

from dynprobe._util.checks import check_int

from .files import (
    RunFormatError,
    append_jsonl,
    atomic_save_npy,
    atomic_save_npz,
    atomic_write_json,
    check_no_links,
    fsync_dir,
    fsync_file,
    load_npy,
    read_jsonl_prefix,
    read_manifest,
)
from .layout import (
    EVENTS,
    FORMAT_NAME,
    FORMAT_VERSION,
    GHOSTS,
    LOCK,
    MANIFEST,
    METRICS,
    PARAMS,
    SNAPSHOTS,
    barriers_path,
    is_temporary,
    lr_files,
    matrix_path,
    rows_files,
    rows_path,
    run_array_path,
    separation_files,
    separation_path,
    snapshot_archive,
    snapshot_dir,
    snapshot_file,
    train_loss_path,
)
from .lock import RunInUseError, WriterLock
from .resume import ResumePlan, apply_resume, check_same_run, plan_resume
from .rows import PairLog
from .validate import validate_manifest

__all__ = ["RunInUseError", "RunWriter", "check_out", "json_safe", "now"]


def now() -> str:
    """UTC time stamp for manifests and events."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def check_out(out: Any) -> Path:
    """Validate a run directory argument (``Probe(out=...)``): a non-empty ``str`` or ``os.PathLike``."""
    if isinstance(out, bool) or not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a directory path (a str or os.PathLike, e.g. out='runs/exp1'); got "
                        f"{type(out).__name__} {out!r}")
    text = os.fspath(out)
    text = os.fsdecode(text) if isinstance(text, bytes) else text
    if not text.strip():
        raise ValueError(f"out={text!r} names no directory (the run would be written into the current directory); "
                         "pass a run directory such as out='runs/exp1'")
    if "\x00" in text:
        raise ValueError("out contains a NUL character; pass a plain directory path")
    return Path(text)


class RunWriter:
    """Owns one run directory for writing (a :class:`dynprobe.store.sink.RunSink`).

    Args:
        root: the run directory (``Probe(out=...)``): a new or empty directory, or (``resume=True``) a run.
        manifest: the manifest of a new run (format fields, versions, status and writer are filled in here).
        resume: reattach to an existing run instead of refusing it.
        resume_step: the step the user's training restarts from (see :mod:`dynprobe.store.resume`); ``None``:
            continue after the last committed snapshot.
        durable: fsync every file and folder at its commit point, so that a committed snapshot survives a power
            loss, not only a killed process (costs one disk flush per snapshot).

    Raises:
        TypeError / ValueError: ``out`` is not a usable path; a resume does not match the run.
        FileExistsError: ``out`` holds a run and ``resume`` is False, or holds files that are not a run.
        RunInUseError: another writer (process, or probe in this process) has the run open.
        RunFormatError: the run is damaged beyond its valid prefix, or holds a symbolic link.
    """

    writes = True  # a RunSink that stores what it is given (see dynprobe.store.sink)

    def __init__(self, root: str | os.PathLike, manifest: dict[str, Any], *, resume: bool,
                 resume_step: int | None = None, durable: bool = False) -> None:
        self.root = check_out(root)
        if resume_step is not None:
            check_int("resume_step", resume_step, minimum=0, hint="a step, or None")
        self.durable = bool(durable)
        self.resumed = False
        self.resume_step: int | None = None
        self.previous_events: list[dict[str, Any]] = []  # a resumed run's kept events (ghosts continue from them)
        self.snapshots: list[dict[str, Any]] = []
        self.manifest: dict[str, Any] = {}
        self._lock: WriterLock | None = None
        self._pending_resume: tuple[ResumePlan, dict[str, Any], dict[str, Any]] | None = None
        self._prepare_directory()
        try:
            self._lock = WriterLock.acquire(self.root)
        except (RunInUseError, RunFormatError):
            raise
        except OSError as error:
            raise PermissionError(f"out={str(self.root)!r} is not writable ({error}); choose another "
                                  "directory") from error
        try:
            check_no_links(self.root)
            if (self.root / MANIFEST).exists():
                if not resume:
                    raise FileExistsError(self._existing_run_message())
                self._reattach(manifest, resume_step)
            else:
                self._check_nothing_but_the_lock()
                self._create(manifest)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------------------------------- lifecycle

    def _prepare_directory(self) -> None:
        root = self.root
        if os.path.lexists(root) and not root.exists():
            raise FileNotFoundError(f"out={str(root)!r} is a broken symbolic link; pass an existing or new directory")
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"out={str(root)!r} is a file; pass a directory path for the run")
        try:
            root.mkdir(parents=True, exist_ok=True)
            entries = set(os.listdir(root))
        except OSError as error:
            raise PermissionError(f"out={str(root)!r} is not writable: it cannot be created or listed ({error}); "
                                  "choose another directory") from error
        if entries and MANIFEST not in entries and LOCK not in entries:
            raise FileExistsError(self._foreign_message(entries))

    def _foreign_message(self, entries: set[str]) -> str:
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        return (f"out={str(self.root)!r} exists, is not empty ({shown}) and is not a dynprobe run; choose a new "
                "directory (dynprobe never writes into a directory it did not create)")

    def _check_nothing_but_the_lock(self) -> None:
        """A directory without a manifest may hold only the lock, temporary files of an interrupted creation and
        the empty folders it made; anything else is someone else's."""
        others = set()
        for name in os.listdir(self.root):
            path = self.root / name
            if name == LOCK or is_temporary(name):
                continue
            if name in (SNAPSHOTS, METRICS) and path.is_dir() and not any(path.iterdir()):
                continue
            others.add(name)
        if others:
            raise FileExistsError(self._foreign_message(others))
        for name in os.listdir(self.root):
            if is_temporary(name):
                (self.root / name).unlink()

    def _existing_run_message(self) -> str:
        try:
            events, _ = read_jsonl_prefix(self.root / EVENTS)
            snapshots = [e for e in events if e.get("event") == "snapshot"]
            last = f", last step {snapshots[-1].get('step')}" if snapshots else ""
            held = f" ({len(snapshots)} snapshots{last})"
        except (RunFormatError, OSError):
            held = ""
        return (
            f"out={str(self.root)!r} already holds a dynprobe run{held}. Pass resume=True to continue it (after "
            "restoring your own training checkpoint), or choose another out= directory"
        )

    def _writer_info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname()}

    def _create(self, manifest: dict[str, Any]) -> None:
        self.manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            **manifest,
            "created": now(),
            "updated": now(),
            "status": "running",
            "writer": self._writer_info(),
            "resumes": [],
        }
        atomic_write_json(self.root / MANIFEST, self.manifest, durable=self.durable)
        (self.root / SNAPSHOTS).mkdir(exist_ok=True)
        (self.root / METRICS).mkdir(exist_ok=True)
        if self.durable:
            fsync_dir(self.root)
        self.event("attach", step=0)

    def _reattach(self, manifest: dict[str, Any], resume_step: int | None) -> None:
        """Plan the resume and check it (nothing is written: :meth:`begin` applies it at the first write)."""
        old = read_manifest(self.root)
        validate_manifest(old, self.root)
        check_same_run(old, manifest, self.root)
        events, problem = read_jsonl_prefix(self.root / EVENTS)
        plan = plan_resume(self.root, old, events, problem, resume_step)
        self.resumed, self.resume_step = True, plan.step
        self.snapshots, self.previous_events = plan.snapshots, plan.events
        self.manifest = old
        self._pending_resume = (plan, old, manifest)

    def begin(self) -> None:
        """Apply the planned resume now (once; the first write does it otherwise). Closing a writer that never
        wrote leaves the run as it was: a probe that refuses a resume closes its writer before writing."""
        pending, self._pending_resume = self._pending_resume, None
        if pending is None:
            return
        plan, old, manifest = pending
        if plan.discarded:
            warnings.warn(
                f"resuming {self.root} at step {plan.step}: {len(plan.discarded)} snapshots recorded after it (steps "
                f"{plan.discarded[0]}..{plan.discarded[-1]}) are moved aside", stacklevel=5)
        aside = apply_resume(self.root, plan, durable=self.durable)
        self.manifest = {**old, "status": "running", "updated": now(), "writer": self._writer_info()}
        self.manifest["resumes"] = [*old.get("resumes", []), {"time": now(), "step": plan.step}]
        # The new configuration wins (a user may change the schedule on resume); the old one stays in events.
        self.manifest["config"] = manifest.get("config", old.get("config"))
        atomic_write_json(self.root / MANIFEST, self.manifest, durable=self.durable)
        self.event("resume", step=plan.step, previous_config=old.get("config"), rebuilt=sorted(plan.rebuilt),
                   set_aside=aside.folder.name if aside.moved else None)

    def resume_from_step(self, resume_step: int | None = None) -> int:
        """The step the run continues from: the resume step of a resumed run (``resume_step`` when given, else the
        last committed snapshot's step), 0 for a new run."""
        if self.resume_step is not None:
            return self.resume_step
        return int(resume_step) if resume_step is not None else 0

    @property
    def closed(self) -> bool:
        return self._lock is None or not self._lock.held

    def flush(self) -> None:
        """Every write returns once it is done: nothing to wait for."""

    def close(self) -> None:
        """Release the run's lock (idempotent). The probe calls it last in ``Probe.close``; nothing is written
        after it."""
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"RunWriter({str(self.root)!r}, {len(self.snapshots)} snapshots, {state})"

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"the run writer of {self.root} is closed; nothing more can be written to the run")
        if self._pending_resume is not None:
            self.begin()

    # ----------------------------------------------------------------------------------------- writing

    def event(self, event: str, /, **fields: Any) -> None:
        """Append one event line (``{"event": event, "time": ..., **fields}``).

        A ``close`` event is the writer's last record: it is fsynced and the writer closes (:meth:`close`).
        """
        self._check_open()
        closing = event == "close"
        append_jsonl(self.root / EVENTS, {"event": event, "time": now(), **json_safe(fields)},
                     durable=self.durable and closing)
        if closing:
            self.close()

    def snapshot_path(self, step: int) -> Path:
        """The folder of the snapshot at ``step`` (created)."""
        self._check_open()
        path = snapshot_dir(self.root, step)
        if path.is_symlink():
            raise RunFormatError(f"{path} is a symbolic link; dynprobe never writes through links in a run")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def save_array(self, step: int, name: str, array: np.ndarray) -> None:
        """Store ``array`` as ``NAME.npy`` of the snapshot at ``step`` (atomically)."""
        self.snapshot_path(step)
        atomic_save_npy(snapshot_file(self.root, step, name), array, durable=self.durable)

    def save_arrays(self, step: int, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Store named arrays as ``NAME.npz`` of the snapshot at ``step`` (atomically)."""
        self.snapshot_path(step)
        atomic_save_npz(snapshot_archive(self.root, step, name), arrays, durable=self.durable)

    def save_run_array(self, name: str, array: np.ndarray) -> None:
        """A run-level array (``layout.EVAL_INDICES``, ``layout.KERNEL_PROBE_INDICES``), written once."""
        self._check_open()
        atomic_save_npy(run_array_path(self.root, name), array, durable=self.durable)

    def rows_path(self, metric: str) -> Path:
        """``metrics/METRIC.rows``: the append-only rows of an interval matrix (handed out for writing)."""
        self._check_open()
        return rows_path(self.root, metric)

    def save_matrix(self, metric: str, matrix: np.ndarray) -> None:
        """``metrics/METRIC.npy``: a full interval matrix, materialized at close (a copy of the rows)."""
        self._check_open()
        atomic_save_npy(matrix_path(self.root, metric), matrix, durable=self.durable)

    def append_separation(self, ghost: int, steps: np.ndarray, values: np.ndarray) -> None:
        """Append (step, l2) pairs to ``ghosts/ghost_NNN.separation``."""
        self._check_open()
        folder = self.root / GHOSTS
        if folder.is_symlink():
            raise RunFormatError(f"{folder} is a symbolic link; dynprobe never writes through links in a run")
        folder.mkdir(exist_ok=True)
        PairLog(separation_path(self.root, ghost)).append(steps, values)

    def commit_snapshot(self, record: dict[str, Any]) -> None:
        """The commit point of a snapshot: everything it refers to is already on disk (fsynced first when
        ``durable``), then its event line is appended."""
        self._check_open()
        record = {"snapshot_index": len(self.snapshots), **record}
        if self.durable:
            self._sync_before_commit(int(record["step"]))
        append_jsonl(self.root / EVENTS, {"event": "snapshot", "time": now(), **json_safe(record)},
                     durable=self.durable)
        self.snapshots.append(json_safe(record))

    def _sync_before_commit(self, step: int) -> None:
        """Flush everything the commit line vouches for: the snapshot's folder (each array was fsynced before its
        rename), the metric rows and barrier records, the (step, value) logs — watched training loss, learning
        rates, ghost separations — and the folders holding them."""
        folder = snapshot_dir(self.root, step)
        if folder.is_dir():
            fsync_dir(folder)
        fsync_dir(self.root / SNAPSHOTS)
        logs = [*rows_files(self.root).values(), barriers_path(self.root), train_loss_path(self.root),
                *lr_files(self.root).values(), *separation_files(self.root).values()]
        for path in logs:
            if path.is_file():
                fsync_file(path)
        for directory in {path.parent for path in logs if path.is_file()} | {self.root / METRICS, self.root}:
            fsync_dir(directory)

    def update_manifest(self, **fields: Any) -> None:
        """Set manifest fields and rewrite ``run.json`` atomically."""
        self._check_open()
        self.manifest.update(json_safe(fields))
        self.manifest["updated"] = now()
        atomic_write_json(self.root / MANIFEST, self.manifest, durable=self.durable)

    # ----------------------------------------------------------------------------------------- reading back

    def snapshot_params(self, step: int) -> np.ndarray:
        """The stored flat ``vec(θ)`` of the committed snapshot at ``step`` (memory-mapped, the storage dtype)."""
        steps = [int(s["step"]) for s in self.snapshots]
        if step not in steps:
            raise KeyError(f"{self.root} has no committed snapshot at step {step}; committed steps: "
                           f"{steps[:5]}{'...' if len(steps) > 5 else ''}")
        size = (self.manifest.get("model") or {}).get("num_parameters")
        return load_npy(snapshot_file(self.root, step, PARAMS), mmap=True,
                        shape=(size,) if isinstance(size, int) else None)

    def find_matching_snapshot(self, flat_params: Any) -> int | None:
        """The latest committed step whose stored θ equals ``flat_params`` exactly (a flat array or tensor of the
        model's parameters in ``vec(θ)`` order, any float dtype the storage dtype holds exactly), or None.

        Values are compared in float64, which holds float32, bfloat16 and float64 exactly: equal there means equal
        bit for bit in the storage dtype. A few leading entries are compared first, so non-matching snapshots cost
        little to rule out.
        """
        flat = _as_float64(flat_params)
        head = min(flat.size, 4096)
        for record in reversed(self.snapshots):
            stored = self.snapshot_params(int(record["step"]))
            if stored.shape != flat.shape:
                continue
            if np.array_equal(np.asarray(stored[:head], dtype=np.float64), flat[:head]) and np.array_equal(
                    np.asarray(stored, dtype=np.float64), flat):
                return int(record["step"])
        return None


def _as_float64(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().reshape(-1).double().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


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
