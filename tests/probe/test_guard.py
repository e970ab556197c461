"""``dynprobe.probe.guard``: the fault barrier between the probe and the user's loop, driven with failing actions
and with record / detach callbacks that fail themselves."""
from __future__ import annotations

import warnings

import pytest

from dynprobe.probe.guard import FaultGuard, attempt


class Calls:
    def __init__(self, *, record_fails: bool = False, detach_fails: bool = False) -> None:
        self.recorded: list[str] = []
        self.detached: list[str] = []
        self.record_fails, self.detach_fails = record_fails, detach_fails

    def record(self, summary: str, trace: str) -> None:
        assert "Traceback" in trace and summary.split(":")[0] in trace
        self.recorded.append(summary)
        if self.record_fails:
            raise OSError(28, "No space left on device")

    def detach(self, summary: str) -> None:
        self.detached.append(summary)
        if self.detach_fails:
            raise PermissionError("read-only run directory")


def failing(message: str):
    def action():
        raise ValueError(message)
    return action


def test_under_warn_a_failure_is_recorded_detaches_the_probe_and_is_told_once():
    calls = Calls()
    guard = FaultGuard("warn", record=calls.record, detach=calls.detach, describe=lambda: "/runs/r")
    ran = []
    guard.run(lambda: ran.append(1), step=1)
    assert ran == [1] and guard.tripped is None and calls.recorded == []
    with pytest.warns(RuntimeWarning) as told:
        guard.run(failing("bad shape"), step=7)
        guard.run(failing("second"), step=8)
    assert len(told) == 1
    assert str(told[0].message) == ("dynprobe: the probe failed at step 7 (ValueError: bad shape) and detached "
                                    "itself; training continues unaffected. Snapshots committed before the failure "
                                    "are kept in /runs/r")
    assert calls.recorded == ["ValueError: bad shape", "ValueError: second"]
    assert calls.detached == ["ValueError: bad shape", "ValueError: second"]
    assert guard.tripped == "ValueError: bad shape"  # the first failure


def test_under_raise_the_failure_is_recorded_then_re_raised_without_detaching():
    calls = Calls()
    guard = FaultGuard("raise", record=calls.record, detach=calls.detach, describe=lambda: "/runs/r")
    with pytest.raises(ValueError, match="bad shape"):
        guard.run(failing("bad shape"), step=3)
    assert calls.recorded == ["ValueError: bad shape"] and calls.detached == [] and guard.tripped is None


def test_when_recording_and_detaching_fail_too_the_message_says_so_and_nothing_escapes():
    calls = Calls(record_fails=True, detach_fails=True)

    def describe():
        raise RuntimeError("no path")

    guard = FaultGuard("warn", record=calls.record, detach=calls.detach, describe=describe)
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        guard.run(failing("disk"), step=2)
    (message,) = [str(w.message) for w in told]
    assert message.endswith("kept in its run directory; recording the failure also failed (OSError: [Errno 28] "
                            "No space left on device; PermissionError: read-only run directory)")


def test_a_warnings_filter_set_to_error_does_not_turn_the_notice_into_an_exception(capsys):
    calls = Calls()
    guard = FaultGuard("warn", record=calls.record, detach=calls.detach, describe=lambda: "/runs/r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard.run(failing("bad"), step=4)  # does not raise
    assert "dynprobe: the probe failed at step 4 (ValueError: bad)" in capsys.readouterr().err


def test_attempt_returns_the_value_or_notes_the_failure():
    failures: list[str] = []
    assert attempt(lambda: 5, failures) == 5 and failures == []
    assert attempt(failing("x"), failures) is None and failures == ["ValueError: x"]
