"""Crash-safe file primitives of the run directory: atomic whole files, append-only JSON lines, safe loading.

Crash safety rests on two rules. (1) Whole files are written to a temporary name and ``os.replace``d, so a file
is either absent or complete. (2) Append-only files (events, rows) may end with a partial record after a
kill; readers take only what the committed "snapshot" events vouch for, and a resuming writer truncates the
rest. A snapshot's files and metric rows are written *before* its event line, so a run killed at any moment
loads with every snapshot whose event line is complete. Nothing is ever unpickled.
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

from .layout import (
    BUFFERS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    PARAMS,
    snapshot_file,
)

__all__ = [
    "RunFormatError",
    "append_jsonl",
    "atomic_save_npy",
    "atomic_save_npz",
    "atomic_write_json",
    "load_npy",
    "load_npz",
    "load_snapshot_state",
    "read_jsonl",
    "read_manifest",
    "remove_tree",
    "rewrite_jsonl",
    "truncate_torn_tail",
]



class RunFormatError(ValueError):
    """A directory is not a readable dynprobe run (not a run, truncated manifest, newer format, bad arrays)."""


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


def load_snapshot_state(root: Path, manifest: Mapping[str, Any], step: int) -> dict[str, Any]:
    """Parameters (unflattened, by name, in their recorded dtypes) and buffers of the snapshot at ``step``, as
    torch tensors on the CPU, ready for ``model.load_state_dict(state, strict=False)``."""
    import torch

    flat = np.asarray(load_npy(snapshot_file(root, step, PARAMS)))
    state: dict[str, Any] = {}
    for spec in manifest["model"]["parameters"]:
        chunk = flat[spec["offset"] : spec["offset"] + spec["numel"]].reshape(spec["shape"])
        state[spec["name"]] = torch.from_numpy(chunk.copy()).to(getattr(torch, spec["dtype"]))
    dtypes = {spec["name"]: spec["dtype"] for spec in manifest["model"].get("buffers", [])}
    for name, array in load_npz(snapshot_file(root, step, BUFFERS)).items():
        tensor = torch.from_numpy(array.copy())
        state[name] = tensor.to(getattr(torch, dtypes[name])) if name in dtypes else tensor
    return state


def remove_tree(path: Path) -> None:
    """Remove a directory tree if it exists (a snapshot a resumed run rewound)."""
    shutil.rmtree(path, ignore_errors=True)
