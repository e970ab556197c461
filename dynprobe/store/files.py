"""Crash-safe file primitives of the run directory: atomic whole files, append-only JSON lines, safe loading.

Crash safety rests on two rules. (1) Whole files are written to a temporary name and ``os.replace``d, so a file
is either absent or complete. (2) Append-only files (events, rows, pair logs) may end with a partial record after
a kill; readers take only what the committed "snapshot" events vouch for, and a resuming writer truncates the
rest. A snapshot's files and metric rows are written *before* its event line, so a run killed at any moment
loads with every snapshot whose event line is complete.

Durability against power loss (not only a killed process) needs ``fsync``: with ``durable=True`` a whole file is
fsynced before its rename and its folder after it, and an appended line is fsynced before the call returns.

Safety: nothing is ever unpickled; array headers are checked against the file's size (and the caller's expected
shape) before anything is allocated; writers open files with ``O_NOFOLLOW`` and :func:`check_no_links` refuses a
run directory holding symbolic links, so nothing outside the run is ever written, truncated or deleted.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from dynprobe._util.checks import is_int

from .layout import BUFFERS, FORMAT_NAME, FORMAT_VERSION, MANIFEST, PARAMS, TEMPORARY_SUFFIX, snapshot_file
from .reading import iter_lines, open_regular, parse_json, read_small_file
from .safety import (
    RunFormatError,
    RunFormatWarning,
    check_no_links,
    fsync_dir,
    fsync_file,
    link_message,
    open_for_writing,
)

__all__ = [
    "RunFormatError",
    "RunFormatWarning",
    "append_bytes",
    "append_jsonl",
    "atomic_save_npy",
    "atomic_save_npz",
    "atomic_write",
    "atomic_write_json",
    "check_no_links",
    "fsync_dir",
    "fsync_file",
    "load_npy",
    "load_npz",
    "load_snapshot_state",
    "open_for_writing",
    "read_jsonl",
    "read_jsonl_from",
    "read_jsonl_prefix",
    "read_manifest",
    "remove_tree",
    "rewrite_jsonl",
    "truncate_file",
    "truncate_torn_tail",
]

_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
_MAX_DEFLATE_RATIO = 1100  # deflate cannot expand more than ~1032×: a larger declared size is a damaged archive


def remove_tree(path: Path) -> None:
    """Remove a folder the writer created (a snapshot a resumed run rewound); never follows a link."""
    path = Path(path)
    if path.is_symlink():
        raise RunFormatError(link_message(path))
    if path.exists():
        shutil.rmtree(path)


# --------------------------------------------------------------------------------------------- whole files


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], None], *, durable: bool = False,
                 mode: int | None = None) -> None:
    """Write a whole file atomically: to ``.NAME.XXXXXXXX.tmp`` in the same folder, then ``os.replace``.

    Args:
        path: the file (a link at ``path`` is replaced by the file, never followed).
        data: the bytes, or a function writing them to a binary handle.
        durable: fsync the file before the rename and its folder after it (survives a power loss).
        mode: file permissions (``mkstemp`` creates 0600).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, (bytes, bytearray, memoryview)):
                handle.write(data)
            else:
                data(handle)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, *, durable: bool = False) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write(path, (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode(), durable=durable)


def atomic_save_npy(path: Path, array: np.ndarray, *, durable: bool = False) -> None:
    """``np.save`` to a temporary file, then rename (never pickles: object arrays are refused)."""
    array = np.asarray(array)
    if array.dtype.hasobject:
        raise TypeError(f"refusing to store an object array in {path}")
    atomic_write(path, lambda handle: np.save(handle, array, allow_pickle=False), durable=durable)


def atomic_save_npz(path: Path, arrays: Mapping[str, np.ndarray], *, durable: bool = False) -> None:
    """``np.savez`` of named arrays (loaded back without unpickling), atomically."""
    clean = {name: np.asarray(a) for name, a in arrays.items()}
    for name, a in clean.items():
        if a.dtype.hasobject:
            raise TypeError(f"refusing to store object array {name!r} in {path}")
    atomic_write(path, lambda handle: np.savez(handle, **clean), durable=durable)


# --------------------------------------------------------------------------------------------- arrays


def _check_header(path: Path, handle: BinaryIO, available: int, shape: tuple[Any, ...] | None
                  ) -> tuple[tuple[int, ...], np.dtype, bool]:
    """Parse a ``.npy`` header and check it against the bytes that follow (and the expected shape)."""
    head = handle.read(len(_NPY_MAGIC) + 2)
    if head[:4] == _ZIP_MAGIC:
        raise RunFormatError(f"{path} is a zip archive (an .npz), not a .npy array: the file is damaged or replaced")
    if head[: len(_NPY_MAGIC)] != _NPY_MAGIC or len(head) < len(_NPY_MAGIC) + 2:
        raise RunFormatError(f"{path} is not a .npy array (no NUMPY header): damaged or replaced")
    version = (head[-2], head[-1])
    if version == (1, 0):
        declared, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    elif version in ((2, 0), (3, 0)):
        declared, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    else:
        raise RunFormatError(f"{path} uses .npy format version {version}, which dynprobe does not read")
    if dtype.hasobject:
        raise RunFormatError(f"{path} holds Python objects (reading it would unpickle them): refused")
    needed = math.prod(declared) * dtype.itemsize
    if needed > available - handle.tell():
        raise RunFormatError(f"{path}: its header declares shape {tuple(declared)} of {dtype} ({needed} bytes) but "
                             f"only {max(available - handle.tell(), 0)} bytes follow: the file is truncated or damaged")
    if shape is not None and not _shape_matches(tuple(declared), tuple(shape)):
        wanted = ", ".join("..." if n is Ellipsis else str(n) for n in shape)
        raise RunFormatError(f"{path} holds shape {tuple(declared)}; the run's manifest says ({wanted}): the file "
                             "does not belong to this run or is damaged")
    return tuple(declared), dtype, bool(fortran)


def _shape_matches(declared: tuple[int, ...], expected: tuple[Any, ...]) -> bool:
    """``expected`` is a shape, or a leading part of one followed by ``...``."""
    if expected and expected[-1] is Ellipsis:
        return declared[: len(expected) - 1] == expected[:-1] and len(declared) >= len(expected) - 1
    return declared == expected


def load_npy(path: Path, *, mmap: bool = False, shape: tuple[Any, ...] | None = None) -> np.ndarray:
    """Load an array without ever unpickling; a missing, damaged or mis-shaped file raises :class:`RunFormatError`.

    The file must be a regular file (:func:`dynprobe.store.reading.open_regular`), and its header is checked before
    anything is allocated: the data it declares must fit in the file, and match ``shape`` when given (the size the
    manifest records; a trailing ``...`` accepts any further dimensions).
    """
    path = Path(path)
    try:
        with open_regular(path) as handle:
            declared, dtype, fortran = _check_header(path, handle, os.fstat(handle.fileno()).st_size, shape)
            offset, order, count = handle.tell(), "F" if fortran else "C", math.prod(declared)
            if count == 0:
                return np.zeros(declared, dtype=dtype, order=order)
            if mmap:
                return np.memmap(handle, dtype=dtype, mode="r", shape=declared, offset=offset, order=order)
            array = np.fromfile(handle, dtype=dtype, count=count)
            if array.size != count:  # pragma: no cover - the header check rules this out unless the file shrinks
                raise RunFormatError(f"{path} ended before its declared {count} values: the file is truncated")
            return array.reshape(declared, order=order)
    except RunFormatError:
        raise
    except (ValueError, OSError, EOFError, SyntaxError, TypeError, OverflowError, MemoryError) as error:
        raise RunFormatError(f"{path} is missing, damaged or unreadable: {error}") from error


_MEMBER_SLACK = 4096  # a .npy header inside an archive member
MAX_UNDECLARED_MEMBER_BYTES = 64 * 2**20  # an archive member the manifest does not describe


def _member_limit(expected: tuple[Any, ...] | None) -> int:
    """The most bytes a member may expand to: its manifest shape (16 bytes an entry at most) and a header, else a
    fixed cap."""
    if expected is None:
        return MAX_UNDECLARED_MEMBER_BYTES
    return math.prod(n for n in expected if n is not Ellipsis) * 16 + _MEMBER_SLACK


def load_npz(path: Path, *, shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, without unpickling; each member's declared size is checked against its
    compressed size and the manifest's shape (``shapes[name]``; :data:`MAX_UNDECLARED_MEMBER_BYTES` for a member
    without one) before anything is decompressed, and its header against that size before it is read."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    try:
        with open_regular(path) as handle, zipfile.ZipFile(handle) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise RunFormatError(f"{path}: member {info.filename!r} is not a .npy array")
                if info.compress_type != zipfile.ZIP_STORED and info.file_size > _MAX_DEFLATE_RATIO * max(
                        info.compress_size, 1):
                    raise RunFormatError(f"{path}: member {info.filename!r} declares an impossible size")
                if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
                    raise RunFormatError(f"{path}: member {info.filename!r} has inconsistent sizes")
                name = info.filename[: -len(".npy")]
                expected = None if shapes is None else shapes.get(name)
                if info.file_size > _member_limit(expected):
                    raise RunFormatError(
                        f"{path}: member {info.filename!r} expands to {info.file_size} bytes, more than "
                        f"{'its manifest shape ' + str(expected) if expected is not None else 'any buffer'} can "
                        "hold: the archive is damaged or crafted (a zip bomb). Replace it from a good copy")
                with archive.open(info) as member:
                    _check_header(path, member, info.file_size, expected)
                with archive.open(info) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
    except RunFormatError:
        raise
    except (ValueError, OSError, EOFError, SyntaxError, TypeError, OverflowError, MemoryError, zipfile.BadZipFile,
            KeyError, NotImplementedError) as error:
        raise RunFormatError(f"{path} is missing, damaged or unreadable: {error}") from error
    return arrays


# --------------------------------------------------------------------------------------------- append-only files


def append_bytes(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Append ``data`` to ``path`` (created if needed, never through a link), fsynced when ``durable``."""
    fd = open_for_writing(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def truncate_file(path: Path, size: int) -> None:
    """Cut ``path`` to ``size`` bytes if it is longer (never through a link; a missing file stays missing)."""
    try:
        fd = open_for_writing(path, os.O_WRONLY)
    except FileNotFoundError:
        return
    try:
        if os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _complete_length(fd: int) -> int:
    """Bytes up to and including the last newline of the file behind ``fd``."""
    end = os.fstat(fd).st_size
    position = end
    while position > 0:
        chunk = min(65536, position)
        position -= chunk
        block = os.pread(fd, chunk, position)
        newline = block.rfind(b"\n")
        if newline >= 0:
            return position + newline + 1
    return 0


def truncate_torn_tail(path: Path) -> None:
    """Cut a JSON-lines file after its last complete line (a writer must not append after a torn one)."""
    try:
        fd = open_for_writing(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        keep = _complete_length(fd)
        if keep != os.fstat(fd).st_size:
            os.ftruncate(fd, keep)
    finally:
        os.close(fd)


def _line(record: Mapping[str, Any]) -> bytes:
    return (json.dumps(record, allow_nan=True, separators=(",", ":")) + "\n").encode()


def append_jsonl(path: Path, record: Mapping[str, Any], *, durable: bool = False) -> None:
    """Append one JSON line (flushed to the OS: it survives a kill of this process; fsynced when ``durable``).

    A torn last line left by an earlier kill is cut first, so it never ends up in the middle of the file.
    """
    fd = open_for_writing(path, os.O_RDWR | os.O_CREAT)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            size = _complete_length(fd)
            os.ftruncate(fd, size)
        view = memoryview(_line(record))
        while view:
            written = os.pwrite(fd, view, size)
            size += written
            view = view[written:]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def rewrite_jsonl(path: Path, records: Iterable[Mapping[str, Any]], *, durable: bool = False) -> None:
    """Replace a JSON-lines file atomically (a resumed run that rewinds)."""
    atomic_write(path, b"".join(_line(r) for r in records), durable=durable)


def _parse_lines(path: Path, handle: BinaryIO, *, strict: bool) -> tuple[list[dict[str, Any]], str | None]:
    records: list[dict[str, Any]] = []
    for number, (_, line) in enumerate(iter_lines(handle), start=1):  # a torn last line is never yielded
        if line is None:
            problem = f"{path}: line {number} is longer than any line dynprobe writes (damaged or not JSON lines)"
        elif not line.strip():
            continue
        else:
            try:
                record = parse_json(line, f"{path}: line {number}")
            except RunFormatError as error:
                problem = str(error)
            else:
                if isinstance(record, dict):
                    records.append(record)
                    continue
                problem = f"{path}: line {number} is not a JSON object"
        if strict:
            raise RunFormatError(problem)
        return records, problem
    return records, None


def read_jsonl(path: Path, *, strict: bool = True) -> list[dict[str, Any]]:
    """Every complete JSON line of ``path`` (a missing file has none; a torn last line — a kill mid-write — is
    ignored). A damaged line elsewhere raises :class:`RunFormatError` naming it, or with ``strict=False`` ends
    the read (the records before it are returned: the file's intact prefix)."""
    return read_jsonl_prefix(path, strict=strict)[0]


def read_jsonl_prefix(path: Path, *, strict: bool = False) -> tuple[list[dict[str, Any]], str | None]:
    """``(records, problem)``: the JSON objects up to the first damaged line, and what is wrong with it (None
    when the whole file is intact). Read in chunks with bounded lines (:mod:`dynprobe.store.reading`); a path
    that is not a regular file raises :class:`RunFormatError`."""
    try:
        with open_regular(path) as handle:
            return _parse_lines(Path(path), handle, strict=strict)
    except FileNotFoundError:
        return [], None
    except OSError as error:
        raise RunFormatError(f"{path} cannot be read: {error}") from error


def read_jsonl_from(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The complete JSON lines appended to ``path`` since byte ``offset`` and the offset to continue from (a torn
    last line is read by the next call); a damaged line is skipped."""
    try:
        handle = open_regular(path)
    except FileNotFoundError:
        return [], offset
    records, end = [], offset
    with handle:
        for end, line in iter_lines(handle, offset=offset):
            if line is None:  # an endless line: nothing after it can be trusted
                break
            try:
                record = parse_json(line, str(path)) if line.strip() else None
            except RunFormatError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records, end


# --------------------------------------------------------------------------------------------- manifest


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of the run at ``root`` (format and version checked); :class:`RunFormatError` says what is
    wrong. The fields :class:`dynprobe.store.Run` reads are validated by :mod:`dynprobe.store.validate`."""
    root = Path(root)
    if not root.exists():
        raise RunFormatError(f"{root} does not exist")
    if not root.is_dir():
        raise RunFormatError(f"{root} is a file, not a run directory")
    path = root / MANIFEST
    try:
        manifest = parse_json(read_small_file(path), f"{path} (the run's manifest)")
    except FileNotFoundError:
        raise RunFormatError(f"{root} is not a dynprobe run: it has no {MANIFEST}") from None
    except OSError as error:
        raise RunFormatError(f"{path} cannot be read: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise RunFormatError(f"{path} is not a dynprobe run manifest (no 'format': '{FORMAT_NAME}')")
    version = manifest.get("format_version")
    if not is_int(version):
        raise RunFormatError(f"{path} has no integer format_version")
    if version > FORMAT_VERSION:
        raise RunFormatError(
            f"{root} was written in run format {version} by dynprobe {manifest.get('dynprobe_version', '?')}; "
            f"this dynprobe reads formats up to {FORMAT_VERSION}: upgrade dynprobe (pip install -U dynprobe)"
        )
    return manifest


def load_snapshot_state(root: Path, manifest: Mapping[str, Any], step: int) -> dict[str, Any]:
    """Parameters (unflattened, by name, in their recorded dtypes) and buffers of the snapshot at ``step``, as
    torch tensors on the CPU, ready for ``model.load_state_dict(state, strict=False)``.

    ``manifest`` is a validated one (:func:`dynprobe.store.validate.validate_manifest`): the parameter offsets
    tile ``vec(θ)`` and every dtype names a torch dtype.
    """
    import torch

    model = manifest["model"]
    specs = model.get("parameters", [])
    numel = sum(spec["numel"] for spec in specs)
    flat = np.asarray(load_npy(snapshot_file(root, step, PARAMS), mmap=True, shape=(numel,)))
    state: dict[str, Any] = {}
    for spec in specs:
        chunk = np.array(flat[spec["offset"]: spec["offset"] + spec["numel"]]).reshape(spec["shape"])
        state[spec["name"]] = torch.from_numpy(chunk).to(getattr(torch, spec["dtype"]))
    buffer_specs = {spec["name"]: spec for spec in model.get("buffers", [])}
    shapes = {name: tuple(spec["shape"]) for name, spec in buffer_specs.items()}
    for name, array in load_npz(snapshot_file(root, step, BUFFERS), shapes=shapes).items():
        tensor = torch.from_numpy(np.array(array))
        state[name] = tensor.to(getattr(torch, buffer_specs[name]["dtype"])) if name in buffer_specs else tensor
    return state
