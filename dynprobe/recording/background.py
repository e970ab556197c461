"""Writing a run directory off the training thread: :class:`BackgroundWriter`, a :class:`dynprobe.store.sink.RunSink`.

A snapshot's files (θ_t, buffers, predictions, kernel, ghost arrays) are handed to one worker thread that writes
them, in the order they were submitted, through the wrapped sink (a :class:`dynprobe.store.writer.RunWriter`);
the training step that takes a snapshot then pays for the copy, the evaluation and the metric rows, not for
the disk. The crash-safety order of the run directory is kept because the order of the operations is:
every file of a snapshot (and its events) is queued before its commit line, the metric rows are appended by
the recorder on the calling thread before the commit is queued, and one worker executes the queue first in,
first out. So:

* a kill at any moment leaves a run whose last commit line vouches only for files already written; queued
  writes are simply lost, like the unfinished snapshot of a synchronous writer;
* ``close()`` (and :meth:`flush`, and every method that reads the run back) waits for the queue to drain;
* an error in the worker (disk full, a bad array) stops it: every later queued write — the commit lines
  included — is discarded, and the error is raised on the calling thread at its next call into the writer,
  as a :class:`BackgroundWriteError` (a ``RuntimeError`` from the original), which the probe's fault guard
  handles like any other probe error. After that the writer writes synchronously (the guard's error event and
  the final status still reach the run), and :attr:`snapshots` lists only what was really committed.

Arrays passed to :meth:`save_array` / :meth:`save_arrays` are written later: the caller hands them over and
must not modify them afterwards (the recorders pass fresh copies). At most ``in_flight`` snapshot commits wait
in the queue; a snapshot that finds more waits for the oldest (this bounds memory to a few snapshots' arrays).
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dynprobe.store.sink import RunSink
from dynprobe.store.writer import json_safe

__all__ = ["BackgroundWriteError", "BackgroundWriter"]


class BackgroundWriteError(RuntimeError):
    """Writing the run directory failed on the background writer thread (the cause is chained)."""


class BackgroundWriter:
    """Queues a sink's writes for a worker thread, in order (module docstring).

    Args:
        sink: the sink that writes (a :class:`dynprobe.store.writer.RunWriter`).
        in_flight: snapshot commits allowed to wait in the queue before :meth:`commit_snapshot` blocks.
    """

    def __init__(self, sink: RunSink, *, in_flight: int = 1) -> None:
        self.sink = sink
        self.in_flight = max(1, int(in_flight))
        self.snapshots: list[dict[str, Any]] = list(sink.snapshots)  # as the caller sees them: queued included
        self._jobs: deque[tuple[Callable[..., Any], tuple, dict, bool]] = deque()
        self._condition = threading.Condition()
        self._busy = False
        self._commits = 0
        self._error: BaseException | None = None
        self._synchronous = False  # after an error was reported
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="dynprobe-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ the sink

    @property
    def root(self) -> Path:
        return self.sink.root

    @property
    def manifest(self) -> dict[str, Any]:
        return self.sink.manifest

    @property
    def resumed(self) -> bool:
        return self.sink.resumed

    @property
    def writes(self) -> bool:
        return self.sink.writes

    def event(self, event: str, /, **fields: Any) -> None:
        self._submit(self.sink.event, (event,), json_safe(fields))

    def save_array(self, step: int, name: str, array: np.ndarray) -> None:
        self._submit(self.sink.save_array, (step, name, array))

    def save_arrays(self, step: int, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        self._submit(self.sink.save_arrays, (step, name, dict(arrays)))

    def save_run_array(self, name: str, array: np.ndarray) -> None:
        self._submit(self.sink.save_run_array, (name, array))

    def save_matrix(self, metric: str, matrix: np.ndarray) -> None:
        self._submit(self.sink.save_matrix, (metric, matrix))

    def append_separation(self, ghost: int, steps: np.ndarray, values: np.ndarray) -> None:
        self._submit(self.sink.append_separation, (ghost, np.array(steps), np.array(values)))

    def rows_path(self, metric: str) -> Path:
        return self.sink.rows_path(metric)

    def commit_snapshot(self, record: dict[str, Any]) -> None:
        """Queue the commit line of a snapshot (after its files); waits while ``in_flight`` commits are queued."""
        self._raise_error()
        record = dict(record)
        self.snapshots.append(json_safe({"snapshot_index": len(self.snapshots), **record}))
        self._submit(self.sink.commit_snapshot, (record,), commit=True)
        with self._condition:
            while self._commits > self.in_flight and self._error is None:
                self._condition.wait()
        self._raise_error()

    def update_manifest(self, **fields: Any) -> None:
        self.flush()
        self.sink.update_manifest(**fields)

    def flush(self) -> None:
        """Wait until every queued write is done; raise a background error not reported yet."""
        with self._condition:
            while (self._jobs or self._busy) and self._thread.is_alive():
                self._condition.wait()
        self._raise_error()

    def close(self) -> None:
        """Write everything queued, stop the worker, close the sink; idempotent."""
        try:
            self.flush()
        finally:
            with self._condition:
                self._stopping = True
                self._condition.notify_all()
            self._thread.join()
            close = getattr(self.sink, "close", None)
            if close is not None:
                close()

    def __getattr__(self, name: str) -> Any:
        """Anything else of the sink (``resume_from_step``, ``durable``, readers): read after a :meth:`flush`."""
        if name.startswith("_") or name == "sink":
            raise AttributeError(name)
        attribute = getattr(self.sink, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            self.flush()
            return attribute(*args, **kwargs)

        return call

    # ------------------------------------------------------------------------------------------ the queue

    def _submit(self, function: Callable[..., Any], args: tuple, kwargs: dict | None = None, *,
                commit: bool = False) -> None:
        self._raise_error()
        if self._synchronous:
            function(*args, **(kwargs or {}))
            return
        with self._condition:
            if self._stopping:
                raise RuntimeError("the run's background writer is closed")
            self._jobs.append((function, args, kwargs or {}, commit))
            self._commits += commit
            self._condition.notify_all()

    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._jobs and not self._stopping:
                    self._condition.wait()
                if not self._jobs:
                    return
                function, args, kwargs, commit = self._jobs.popleft()
                self._busy = True
                failed = self._error is not None
            try:
                if not failed:  # after an error every later write is dropped: nothing commits past it
                    function(*args, **kwargs)
            except BaseException as error:  # noqa: BLE001 - reported on the caller's thread
                with self._condition:
                    self._error = error
            finally:
                with self._condition:
                    self._busy = False
                    self._commits -= commit
                    self._condition.notify_all()

    def _raise_error(self) -> None:
        if self._error is None or self._synchronous:
            return
        with self._condition:
            while (self._jobs or self._busy) and self._thread.is_alive():
                self._condition.wait()
            self._synchronous = True
        self.snapshots[:] = list(self.sink.snapshots)  # only what was really committed
        error = self._error
        raise BackgroundWriteError(
            f"writing the run directory {self.sink.root} failed in the background ({type(error).__name__}: "
            f"{error}); the snapshots after the last committed one were discarded") from error
