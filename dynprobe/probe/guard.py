"""The fault barrier between the probe and the user's training loop.

Everything the probe does inside a hook (optimizer step, explicit ``probe.step``, close at exit) runs through
:meth:`FaultGuard.run`. Under ``errors="warn"`` nothing escapes it: an exception is recorded in the run when the run
directory still accepts writes, the user is told once — where and why — and the probe detaches itself, keeping
what is committed; the reporting and the detaching are themselves guarded, because the failure that triggered them
(a full disk, a read-only directory) usually breaks them too. Under ``errors="raise"`` the original exception is
re-raised after it is recorded.
"""
from __future__ import annotations

import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["FaultGuard", "attempt"]


def attempt(action: Callable[[], Any], failures: list[str]) -> Any:
    """Run ``action``; on any exception note ``"Type: message"`` in ``failures`` and return None."""
    try:
        return action()
    except Exception as error:  # noqa: BLE001 - best effort by design: the caller reports the failures
        failures.append(f"{type(error).__name__}: {error}")
        return None


class FaultGuard:
    """Runs probe work so that a probe failure never becomes a training failure.

    Args:
        errors: ``"warn"`` or ``"raise"`` (``Probe(errors=...)``).
        record: writes a ``probe_error`` event into the run (may itself fail).
        detach: removes the probe's hooks and closes the run as ``probe_failed`` (may itself fail part-way).
        describe: where the run lives, for the message (``Probe(out=...)``).
    """

    def __init__(self, errors: str, *, record: Callable[[str, str], None], detach: Callable[[str], None],
                 describe: Callable[[], str]) -> None:
        self.errors = errors
        self._record, self._detach, self._describe = record, detach, describe
        self.tripped: str | None = None  # the first failure, once the probe has detached itself

    def run(self, action: Callable[[], None], *, step: int) -> None:
        """Run ``action`` (probe work at training step ``step``)."""
        try:
            action()
        except Exception as error:  # noqa: BLE001 - a probe failure must not kill the user's training
            self._handle(error, step)

    def _handle(self, error: Exception, step: int) -> None:
        summary = f"{type(error).__name__}: {error}"
        trace = traceback.format_exc()
        failures: list[str] = []
        attempt(lambda: self._record(summary, trace), failures)
        if self.errors == "raise":
            raise error
        first = self.tripped is None
        self.tripped = self.tripped or summary
        attempt(lambda: self._detach(summary), failures)
        if first:
            self._tell(step, summary, failures)

    def _tell(self, step: int, summary: str, failures: list[str]) -> None:
        where = attempt(self._describe, []) or "its run directory"
        kept = ("; recording the failure also failed (" + "; ".join(failures) + ")") if failures else ""
        message = (f"dynprobe: the probe failed at step {step} ({summary}) and detached itself; training continues "
                   f"unaffected. Snapshots committed before the failure are kept in {where}{kept}")
        try:  # a warnings filter set to "error" must not turn this into an exception in the user's loop
            warnings.warn(message, RuntimeWarning, stacklevel=5)
        except Exception:  # noqa: BLE001
            attempt(lambda: print(message, file=sys.stderr), [])
