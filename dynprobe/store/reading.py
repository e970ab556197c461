"""Reading a run's files safely: regular files only, sizes and nesting bounded before anything is parsed.

A run directory is input like any other: copied from elsewhere, damaged, or crafted. Every reader of the run
format opens its files through this module, so that a hostile directory costs bounded time and memory and
raises :class:`RunFormatError` naming the file, instead of hanging or exhausting the machine:

* **regular files only** — a file is opened with ``O_NONBLOCK`` (opening a FIFO never waits for a writer) and
  ``fstat``-checked: a FIFO, a device (a link to ``/dev/zero``), a socket or a folder where a file belongs is
  refused before a byte is read;
* **sizes before contents** — whole-file reads are capped (:data:`MAX_JSON_BYTES`), JSON lines are read in chunks
  with a cap on one line (:data:`MAX_LINE_BYTES`), so a sparse file declaring terabytes is refused or read only
  up to the cap;
* **nesting before recursion** — JSON nested deeper than :data:`MAX_JSON_DEPTH` is refused before ``json.loads``
  could recurse (a run's JSON is a few levels deep).

Array headers and archive members are checked in :mod:`dynprobe.store.files`, through :func:`open_regular`.
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .safety import RunFormatError

__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "MAX_LINE_BYTES", "iter_lines", "open_regular", "parse_json",
           "read_small_file", "regular_size"]

MAX_JSON_BYTES = 64 * 2**20  # run.json and lock files: a manifest of a 10,000-tensor model is a few MB
MAX_LINE_BYTES = 16 * 2**20  # one JSON line of events.jsonl, B.jsonl or results.jsonl (a few KB when written)
MAX_JSON_DEPTH = 64  # dynprobe writes JSON at most ~6 levels deep
_CHUNK = 2**20

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = np.zeros(256, dtype=np.int64)
_DEPTH_STEP[list(b"[{")] = 1
_DEPTH_STEP[list(b"]}")] = -1


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _not_regular(path: Path, mode: int) -> RunFormatError:
    return RunFormatError(f"{path} is {_kind(mode)} where the run format has a regular file; dynprobe reads only "
                          "files it wrote. The run directory is damaged or was tampered with: replace the entry by "
                          "the file from a good copy of the run, or remove it")


def open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file (links are followed, to a regular file only).

    Never blocks: the open uses ``O_NONBLOCK``, so a FIFO is refused instead of waiting for a writer. A missing
    file raises ``FileNotFoundError`` (callers decide whether that is damage); anything that is not a regular
    file raises :class:`RunFormatError`.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK | _CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as error:
        if error.errno in (errno.ENXIO, errno.EISDIR, errno.ELOOP):  # a socket, a folder, a link loop
            raise RunFormatError(f"{path} cannot be read as a file ({error.strerror}); the run directory is "
                                 "damaged: replace the entry by the file from a good copy of the run") from error
        raise RunFormatError(f"{path} cannot be read: {error}") from error
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        if _NONBLOCK:  # a regular file ignores it; cleared so that nothing downstream sees EAGAIN semantics
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def regular_size(path: Path) -> int:
    """The size of the regular file at ``path`` (0 when missing); :class:`RunFormatError` for anything else
    (a folder, a FIFO, a device) — nothing is opened."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return 0
    except OSError as error:
        raise RunFormatError(f"{path} cannot be read: {error}") from error
    if not stat.S_ISREG(info.st_mode):
        raise _not_regular(Path(path), info.st_mode)
    return info.st_size


def read_small_file(path: Path, *, limit: int = MAX_JSON_BYTES) -> bytes:
    """The whole regular file at ``path``, refused with :class:`RunFormatError` when it is larger than ``limit``
    bytes (checked before reading; a file growing past the limit meanwhile is refused too)."""
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise RunFormatError(f"{path} is {size} bytes; dynprobe writes this file in at most {limit} bytes, so it "
                                 "is damaged (a sparse or foreign file). Replace it from a good copy of the run")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise RunFormatError(f"{path} grew past {limit} bytes while being read; it is not a file dynprobe wrote")
    return data


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (brackets inside strings are not counted)."""
    if data.count(b"[") + data.count(b"{") == 0:
        return 0
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    depth = np.cumsum(_DEPTH_STEP[np.frombuffer(brackets, dtype=np.uint8)])
    return int(depth.max())


def parse_json(data: bytes, where: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(data)`` after checking its nesting; any failure is a :class:`RunFormatError` naming
    ``where`` (a file, or a file and line)."""
    if data.count(b"[") + data.count(b"{") > max_depth and json_depth(data) > max_depth:
        raise RunFormatError(f"{where} is nested more than {max_depth} levels deep; dynprobe never writes such JSON, "
                             "so the file is damaged or crafted. Replace it from a good copy of the run")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise RunFormatError(f"{where} is not valid JSON: truncated or damaged ({error})") from error


def iter_lines(handle: BinaryIO, *, offset: int = 0, max_line: int | None = None
               ) -> Iterator[tuple[int, bytes | None]]:
    """``(end_offset, line)`` for every complete line from byte ``offset`` (without its newline), read in chunks.

    A line longer than ``max_line`` yields ``(offset_of_its_start, None)`` and ends the iteration (a sparse file of
    zeros, or a file that is not JSON lines): at most ``max_line`` bytes are held, whatever the file's size. A torn
    last line (no newline) is not yielded. ``max_line`` defaults to :data:`MAX_LINE_BYTES`.
    """
    max_line = MAX_LINE_BYTES if max_line is None else max_line
    position, pending = offset, b""
    while True:
        chunk = os.pread(handle.fileno(), _CHUNK, position + len(pending))
        if not chunk:
            return
        pending += chunk
        start = 0
        while True:
            newline = pending.find(b"\n", start)
            if newline < 0:
                break
            if newline - start > max_line:
                yield position + start, None
                return
            yield position + newline + 1, pending[start:newline]
            start = newline + 1
        position, pending = position + start, pending[start:]
        if len(pending) > max_line:
            yield position, None
            return
