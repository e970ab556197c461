"""One writer per run: an exclusive OS lock on the run directory itself and on ``writer.lock``, held for the
writer's lifetime.

Two writers appending to one event log interleave their records and leave a log no reader can trust, so a
writer takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the run directory (an ``O_DIRECTORY`` descriptor) and on the
run's lock file before it writes anything — for a new run and for ``resume=True`` alike. The directory lock is the
one that decides: deleting ``writer.lock`` (a cleanup script, a user) cannot admit a second writer, since the
directory cannot be deleted while it holds a run; the lock file only carries the holder's pid and host for the
next writer's error message. The kernel releases the lock when the holder's file is closed or the process dies
(SIGKILL included), so a lock is never stale: a crashed writer's run can be resumed at once. The holder writes its
pid, host and start time into the file, only for the error message of the next writer.

``flock`` locks belong to an open file description, so a second writer in the same process conflicts with the
first just as another process does. Readers (``load_run``) never touch the lock. Forked children (data-loader
workers) close their inherited copy, so they neither keep the lock alive nor release it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import weakref
from pathlib import Path

from .files import RunFormatError, open_for_writing
from .layout import LOCK
from .reading import read_small_file

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; one writer per run is not enforced there
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunInUseError", "WriterLock"]

_OPEN_LOCKS: weakref.WeakSet[WriterLock] = weakref.WeakSet()


class RunInUseError(RuntimeError):
    """The run directory is open for writing by another writer (another process, or another probe here)."""


class WriterLock:
    """The exclusive lock of the run at ``root``; :meth:`acquire` takes it or raises :class:`RunInUseError`."""

    def __init__(self, root: Path, fd: int, directory_fd: int | None = None) -> None:
        self.root, self._fd, self._directory_fd = Path(root), fd, directory_fd

    @classmethod
    def acquire(cls, root: Path) -> WriterLock:
        path = Path(root) / LOCK
        directory_fd = _lock_directory(Path(root))
        try:
            fd = open_for_writing(path, os.O_RDWR | os.O_CREAT)
        except BaseException:
            _close(directory_fd, unlock=True)
            raise
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a writer holds the file lock but not the directory: cannot happen in dynprobe
                holder = _read_holder(fd)
                os.close(fd)
                _close(directory_fd, unlock=True)
                raise RunInUseError(_in_use_message(Path(root), holder)) from None
            except BaseException:
                os.close(fd)
                _close(directory_fd, unlock=True)
                raise
        lock = cls(root, fd, directory_fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        _OPEN_LOCKS.add(lock)
        return lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Release the lock (idempotent); the lock file stays, so a waiting writer never races its removal."""
        fd, self._fd = self._fd, None
        directory_fd, self._directory_fd = self._directory_fd, None
        _OPEN_LOCKS.discard(self)
        if fd is None:
            return
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            _close(directory_fd, unlock=True)

    def __del__(self) -> None:  # a writer dropped without close(): the descriptors (and the locks) go with it
        for name in ("_fd", "_directory_fd"):
            fd = getattr(self, name, None)
            setattr(self, name, None)
            _close(fd, unlock=False)

    def _forget_in_child(self) -> None:
        # A forked child shares the locks' open file descriptions: closing its copies leaves the parent's locks
        # held, where flock(LOCK_UN) would release them for the parent too.
        for name in ("_fd", "_directory_fd"):
            fd = getattr(self, name, None)
            setattr(self, name, None)
            _close(fd, unlock=False)


def _lock_directory(root: Path) -> int | None:
    """An exclusive flock on the run directory itself (None where flock or O_DIRECTORY is not available)."""
    if fcntl is None or not hasattr(os, "O_DIRECTORY"):
        return None
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:  # the holder's record, for the message only
            holder = _parse_holder(read_small_file(root / LOCK, limit=4096))
        except (OSError, RunFormatError):
            holder = None
        raise RunInUseError(_in_use_message(root, holder)) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _close(fd: int | None, *, unlock: bool) -> None:
    if fd is None:
        return
    try:
        if unlock and fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def _after_fork_in_child() -> None:
    for lock in list(_OPEN_LOCKS):
        lock._forget_in_child()
    _OPEN_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _read_holder(fd: int) -> dict | None:
    try:
        return _parse_holder(os.pread(fd, 4096, 0))
    except OSError:
        return None


def _parse_holder(data: bytes) -> dict | None:
    try:
        holder = json.loads(data.decode()) if data.strip() else None
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _in_use_message(root: Path, holder: dict | None) -> str:
    if holder is None:
        who = f"another writer (its {LOCK} record is not written yet, or was deleted)"
    elif holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        who = ("another probe (or RunWriter) in this process, opened at " + str(holder.get("since", "?"))
               + "; close it first (probe.close())")
    else:
        who = f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {holder.get('since', '?')})"
    return (f"out={str(root)!r} is open for writing by {who}. A run has one writer at a time (two would interleave "
            "its event log): wait for that writer to finish or stop it, then resume=True; or choose another out=")
