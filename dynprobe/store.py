"""Run-directory I/O: crash-safe, append-only, readable while training runs, no pickle.

Layout (format version 1; the README's "Run directory" section is the user-facing description)::

    runs/NAME/
      run.json                  manifest: format version, versions, full config, model summary, status
      events.jsonl              append-only event log; a "snapshot" line is the commit point of a snapshot
      eval_indices.npy          which examples of the user's eval data form the fixed eval set
      snapshots/step_00000100/  params.npy (flat θ), buffers.npz, preds.npy (eval argmax), kernel.npy, ...
      metrics/C.rows, D.rows …  append-only lower-triangular float64 rows: row k holds M[k, 0..k]
      metrics/C.npy, D.npy …    full T×T matrices, materialized when the probe closes (for other tools)

Crash safety rests on two rules. (1) Whole files are written to a temporary name and ``os.replace``d, so a file
is either absent or complete. (2) Append-only files (events, rows) may end with a partial record after a
kill; readers take only what the committed "snapshot" events vouch for, and a resuming writer truncates the
rest. A snapshot's files and metric rows are written *before* its event line, so a run killed at any moment
loads with every snapshot whose event line is complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "RunFormatError",
    "TriangularRows",
    "append_jsonl",
    "atomic_save_npy",
    "atomic_save_npz",
    "atomic_write_json",
    "read_jsonl",
    "read_manifest",
    "snapshot_dirname",
]

FORMAT_VERSION = 1
FORMAT_NAME = "dynprobe-run"
MANIFEST = "run.json"
EVENTS = "events.jsonl"
SNAPSHOTS = "snapshots"
METRICS = "metrics"
SWITCHING = "switching"


class RunFormatError(ValueError):
    """A directory is not a readable dynprobe run (not a run, truncated manifest, newer format, bad arrays)."""


def snapshot_dirname(step: int) -> str:
    """``step_00000100``: zero-padded so that a directory listing sorts by step."""
    return f"step_{int(step):08d}"


# --------------------------------------------------------------------------------------------- whole files


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
        os.replace(tmp, path)
    except BaseException:
        with _suppress_os_error():
            os.unlink(tmp)
        raise


class _suppress_os_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, traceback) -> bool:
        return kind is not None and issubclass(kind, OSError)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    data = (json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n").encode()
    _atomic_write(path, lambda handle: handle.write(data))


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary file, then rename (never pickles: object arrays are refused)."""
    array = np.asarray(array)
    if array.dtype == object:
        raise TypeError(f"refusing to store an object array in {path}")
    _atomic_write(path, lambda handle: np.save(handle, array, allow_pickle=False))


def atomic_save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez`` of named arrays (loaded back with ``allow_pickle=False``), atomically."""
    clean = {name: np.asarray(a) for name, a in arrays.items()}
    for name, a in clean.items():
        if a.dtype == object:
            raise TypeError(f"refusing to store object array {name!r} in {path}")
    _atomic_write(path, lambda handle: np.savez(handle, **clean))


def load_npy(path: Path, *, mmap: bool = False) -> np.ndarray:
    """Load an array without ever unpickling; a damaged file raises :class:`RunFormatError`."""
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as error:
        raise RunFormatError(f"{path} is damaged or unreadable: {error}") from error


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` file without unpickling."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError) as error:
        raise RunFormatError(f"{path} is damaged or unreadable: {error}") from error


# --------------------------------------------------------------------------------------------- JSON lines


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line and flush it to the OS (survives a kill of this process).

    A torn last line left by an earlier kill is cut first, so it never ends up in the middle of the file.
    """
    line = (json.dumps(record, allow_nan=True, separators=(",", ":")) + "\n").encode()
    with open(path, "a+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size:
            handle.seek(size - 1)
            if handle.read(1) != b"\n":
                handle.close()
                truncate_torn_tail(path)
                return append_jsonl(path, record)
        handle.write(line)
        handle.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of ``path``; a torn last line (a kill mid-write) is ignored."""
    records: list[dict[str, Any]] = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return records
    lines = text.split("\n")
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines) - 1:  # no trailing newline: the write was torn by a kill
                break
            raise RunFormatError(f"{path}: line {number + 1} is not valid JSON ({error})") from error
    return records


def truncate_torn_tail(path: Path) -> None:
    """Cut a JSON-lines file after its last complete line (a resuming writer must not append after a torn one)."""
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(end)


def rewrite_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Replace a JSON-lines file atomically (used only when a resumed run rewinds)."""
    data = "".join(json.dumps(r, allow_nan=True, separators=(",", ":")) + "\n" for r in records).encode()
    _atomic_write(path, lambda handle: handle.write(data))


# --------------------------------------------------------------------------------------------- manifest


def read_manifest(root: Path) -> dict[str, Any]:
    """The validated manifest of the run at ``root``; :class:`RunFormatError` says what is wrong."""
    root = Path(root)
    if not root.exists():
        raise RunFormatError(f"{root} does not exist")
    if not root.is_dir():
        raise RunFormatError(f"{root} is a file, not a run directory")
    path = root / MANIFEST
    if not path.exists():
        raise RunFormatError(f"{root} is not a dynprobe run: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RunFormatError(f"{path} is truncated or not JSON ({error}); the run's manifest is damaged") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise RunFormatError(f"{path} is not a dynprobe run manifest (no 'format': '{FORMAT_NAME}')")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise RunFormatError(f"{path} has no integer format_version")
    if version > FORMAT_VERSION:
        raise RunFormatError(
            f"{root} was written in run format {version} by dynprobe {manifest.get('dynprobe_version', '?')}; "
            f"this dynprobe reads formats up to {FORMAT_VERSION}: upgrade dynprobe (pip install -U dynprobe)"
        )
    return manifest


# --------------------------------------------------------------------------------------------- metric rows


class TriangularRows:
    """An append-only file of the lower triangle of a T×T float64 matrix: row k holds ``M[k, 0..k]``.

    Appending a row costs O(k) bytes (the online metrics' O(T) per snapshot); the file size says how many rows
    are complete, so a torn final row is simply not counted. Values are little-endian float64; NaN marks
    entries that were not computed.
    """

    itemsize = 8

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @staticmethod
    def bytes_for(rows: int) -> int:
        return rows * (rows + 1) // 2 * TriangularRows.itemsize

    def complete_rows(self) -> int:
        size = self.path.stat().st_size if self.path.exists() else 0
        rows = int((np.sqrt(8 * size / self.itemsize + 1) - 1) // 2)
        while self.bytes_for(rows + 1) <= size:
            rows += 1
        while rows and self.bytes_for(rows) > size:
            rows -= 1
        return rows

    def append(self, row: np.ndarray, index: int) -> None:
        row = np.ascontiguousarray(row, dtype="<f8").reshape(-1)
        if row.size != index + 1:
            raise ValueError(f"row {index} of {self.path.name} must have {index + 1} entries; got {row.size}")
        size = self.path.stat().st_size if self.path.exists() else 0
        if size != self.bytes_for(index):
            if size < self.bytes_for(index):
                raise ValueError(f"{self.path} holds {self.complete_rows()} complete rows; cannot append row {index}")
            self.truncate(index)  # a torn row, or rows of snapshots that were never committed
        with open(self.path, "ab") as handle:
            handle.write(row.tobytes())
            handle.flush()

    def truncate(self, rows: int) -> None:
        """Keep the first ``rows`` rows (drops a torn row, or rows of snapshots a resumed run rewound)."""
        if self.path.exists():
            with open(self.path, "r+b") as handle:
                handle.truncate(self.bytes_for(rows))

    def read(self, rows: int) -> np.ndarray:
        """The symmetric ``rows × rows`` matrix (NaN where not computed or where the file is short)."""
        matrix = np.full((rows, rows), np.nan)
        if rows == 0 or not self.path.exists():
            return matrix
        available = min(rows, self.complete_rows())
        flat = np.fromfile(self.path, dtype="<f8", count=self.bytes_for(available) // self.itemsize)
        lower = np.tril_indices(available)
        # np.tril_indices walks row by row, left to right: the file's order.
        matrix[lower] = flat
        matrix[(lower[1], lower[0])] = flat
        return matrix


def load_snapshot_state(root: Path, manifest: Mapping[str, Any], step: int) -> dict[str, Any]:
    """Parameters (unflattened, by name, in their recorded dtypes) and buffers of the snapshot at ``step``, as
    torch tensors on the CPU, ready for ``model.load_state_dict(state, strict=False)``."""
    import torch

    folder = Path(root) / SNAPSHOTS / snapshot_dirname(step)
    flat = np.asarray(load_npy(folder / "params.npy"))
    state: dict[str, Any] = {}
    for spec in manifest["model"]["parameters"]:
        chunk = flat[spec["offset"] : spec["offset"] + spec["numel"]].reshape(spec["shape"])
        state[spec["name"]] = torch.from_numpy(chunk.copy()).to(getattr(torch, spec["dtype"]))
    dtypes = {spec["name"]: spec["dtype"] for spec in manifest["model"].get("buffers", [])}
    for name, array in load_npz(folder / "buffers.npz").items():
        tensor = torch.from_numpy(array.copy())
        state[name] = tensor.to(getattr(torch, dtypes[name])) if name in dtypes else tensor
    return state


def remove_tree(path: Path) -> None:
    """Remove a directory tree if it exists (a snapshot a resumed run rewound)."""
    shutil.rmtree(path, ignore_errors=True)
