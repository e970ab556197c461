"""Keeping Ctrl-C out of a commit point: :func:`interrupts_deferred`.

A commit point is a few statements that must happen together (an event line written *and* the snapshot
registered). A ``KeyboardInterrupt`` can surface between any two Python bytecodes, and blocking ``SIGINT`` in the
main thread is not enough (the kernel hands a process-directed signal to any thread that does not block it, and
Python then raises in the main thread all the same). So, in the main thread, the Python-level ``SIGINT`` handler is
replaced for the duration of the section by one that only notes the signal; when the section ends the user's
handler is restored and called with what was noted — ``KeyboardInterrupt`` is raised right there. Nothing is lost
or swallowed; only the moment moves. In another thread, or when ``SIGINT`` has no Python handler (ignored or the
OS default), it is a no-op.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["interrupts_deferred"]


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Deliver a ``SIGINT`` that arrives inside the block only once the block is done (module docstring)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # SIG_IGN, SIG_DFL, or installed from outside Python: nothing to defer
        yield
        return
    noted: list[tuple[int, FrameType | None]] = []
    signal.signal(signal.SIGINT, lambda signum, frame: noted.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if noted:
            previous(*noted[0])
