"""A progress line for slow snapshots: what the probe is doing while the user's loop waits.

A snapshot of a real-size model (evaluations, ghost comparisons, eNTK, barriers) can take minutes, during which
the training loop looks frozen. :class:`SnapshotProgress` shows one transient line on stderr (rich) — the step,
the current phase and the elapsed time — but only once a snapshot has run longer than ``delay`` seconds, so fast
snapshots print nothing. On a console that is not a terminal (a log file) it prints, instead, one summary line
per slow snapshot, with the time each phase took.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from rich.console import Console
from rich.live import Live
from rich.text import Text

__all__ = ["SnapshotProgress"]


class SnapshotProgress:
    """``with progress.snapshot(step): ... progress.phase("barriers", "ghost 2") ...``.

    Args:
        enabled: False: never print anything.
        delay: seconds a snapshot must run before the line appears.
        console: where to print (default: a rich console on stderr).
    """

    def __init__(self, *, enabled: bool = True, delay: float = 2.0, console: Console | None = None) -> None:
        self.enabled, self.delay = enabled, delay
        self.console = console or Console(stderr=True)
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._live: Live | None = None
        self._step = -1
        self._what: str | None = None
        self._phase, self._detail = "", ""
        self._started = self._phase_started = 0.0
        self._durations: dict[str, float] = {}
        self.last_durations: dict[str, float] = {}  # per phase, of the latest snapshot

    @contextlib.contextmanager
    def snapshot(self, step: int, *, what: str | None = None) -> Iterator[SnapshotProgress]:
        """Time one snapshot; the line appears after ``delay`` seconds and disappears when the block ends.
        ``what``: the name of the work on the line (default: the step, and "snapshot at step …" when done)."""
        self._step, self._durations = step, {}
        self._what = what
        self._started = self._phase_started = time.perf_counter()
        self._phase, self._detail = "measuring", ""
        if self.enabled:
            self._timer = threading.Timer(self.delay, self._show)
            self._timer.daemon = True
            self._timer.start()
        try:
            yield self
        finally:
            self._close_phase()
            self.last_durations = dict(self._durations)
            self._stop()

    def phase(self, name: str, detail: str = "") -> None:
        """Enter phase ``name`` (``"evaluating"``, ``"ghosts"``, ``"kernel"``, ``"barriers"``, ...) with a detail."""
        if name != self._phase:
            self._close_phase()
            self._phase = name
        self._detail = detail
        with self._lock:
            if self._live is not None:
                self._live.update(self._line())

    def _close_phase(self) -> None:
        now = time.perf_counter()
        self._durations[self._phase] = self._durations.get(self._phase, 0.0) + now - self._phase_started
        self._phase_started = now

    def _line(self) -> Text:
        elapsed = time.perf_counter() - self._started
        detail = f": {self._detail}" if self._detail else ""
        what = self._what or f"step {self._step}"
        return Text(f"dynprobe · {what} · {self._phase}{detail} · {elapsed:.0f} s", style="dim")

    def _show(self) -> None:
        with self._lock:
            if self._timer is None or not (self.console.is_terminal or self.console.is_jupyter):
                return
            self._live = Live(self._line(), console=self.console, transient=True, refresh_per_second=2,
                              redirect_stdout=False, redirect_stderr=False, get_renderable=self._line)
            self._live.start()

    def _stop(self) -> None:
        with self._lock:
            timer, self._timer = self._timer, None
            live, self._live = self._live, None
        if timer is not None:
            timer.cancel()
        if live is not None:
            live.stop()
        total = time.perf_counter() - self._started
        if self.enabled and total > self.delay and not (self.console.is_terminal or self.console.is_jupyter):
            parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self._durations.items() if seconds >= 0.05)
            what = self._what or f"snapshot at step {self._step}"
            self.console.print(f"dynprobe: {what} took {total:.1f} s ({parts})",
                               markup=False, highlight=False, soft_wrap=True)
