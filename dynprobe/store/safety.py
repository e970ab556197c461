"""Errors of the run directory, and the rules that keep a writer inside it and its commits on the disk.

A writer opens every file with ``O_NOFOLLOW`` (:func:`open_for_writing`) and refuses a run directory that holds a
symbolic link (:func:`check_no_links`), so nothing outside the run is ever written, truncated or deleted — even
when a link inside the run points elsewhere. :func:`fsync_file` and :func:`fsync_dir` make a commit durable.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

__all__ = ["RunFormatError", "RunFormatWarning", "check_no_links", "fsync_dir", "fsync_file", "link_message",
           "open_for_writing"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class RunFormatError(ValueError):
    """A directory is not a readable dynprobe run (not a run, truncated manifest, newer format, bad arrays)."""


class RunFormatWarning(UserWarning):
    """Part of a run is damaged and was skipped (e.g. the event log is read up to its first damaged line)."""


# --------------------------------------------------------------------------------------------- safety


def open_for_writing(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that never follows a symbolic link at ``path`` (``ELOOP`` becomes a clear error)."""
    try:
        return os.open(path, flags | _NOFOLLOW | _CLOEXEC, mode)
    except OSError as error:
        if error.errno == errno.ELOOP or (error.errno == errno.EMLINK and os.path.islink(path)):
            raise RunFormatError(link_message(Path(path))) from error
        raise


def link_message(path: Path) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return (f"{path} is a symbolic link (to {target!r}); dynprobe never writes through links in a run directory, "
            "so that nothing outside it is touched. Replace the link by a copy of the file or folder, or choose "
            "another out= directory")


def check_no_links(root: Path) -> None:
    """Refuse a run directory holding a symbolic link or a special file anywhere inside it (``root`` itself may be
    a link to a directory: it is the path the user chose)."""
    for folder, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(folder) / name
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                raise RunFormatError(link_message(path))
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise RunFormatError(f"{path} is not a regular file or folder (a device, socket or pipe); a run "
                                     "directory holds only files and folders dynprobe wrote. Choose another out=")


def fsync_file(path: Path) -> None:
    """Flush a file's data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename or a new file inside it) to the disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


