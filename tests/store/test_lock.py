"""``dynprobe.store.lock``: one writer per run. A second acquire — in this process or in a forked child — is
refused with the holder's pid in the message while the lock is held, and succeeds once it is released; a forked
child neither keeps nor releases the parent's lock."""
from __future__ import annotations

import json
import os

import pytest

from dynprobe.store.layout import LOCK
from dynprobe.store.lock import RunInUseError, WriterLock

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="flock and fork: POSIX only")


def test_a_second_writer_is_refused_until_the_first_releases(tmp_path):
    first = WriterLock.acquire(tmp_path)
    holder = json.loads((tmp_path / LOCK).read_text())
    assert holder["pid"] == os.getpid() and first.held
    with pytest.raises(RunInUseError, match=r"another probe \(or RunWriter\) in this process"):
        WriterLock.acquire(tmp_path)
    first.release()
    first.release()  # idempotent
    assert not first.held and (tmp_path / LOCK).exists()  # the file stays: no race with a waiting writer
    second = WriterLock.acquire(tmp_path)
    assert second.held
    second.release()


def _in_child(action) -> int:
    """Run ``action`` in a forked child; its exit status (0: returned, 1: RunInUseError naming the parent process,
    2: anything else)."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 2
        try:
            action()
            code = 0
        except RunInUseError as error:
            code = 1 if f"by process {parent} on host" in str(error) else 2
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_another_process_is_refused_and_a_forked_child_does_not_release_the_parents_lock(tmp_path):
    lock = WriterLock.acquire(tmp_path)
    assert _in_child(lambda: WriterLock.acquire(tmp_path)) == 1  # another process: refused
    assert _in_child(lambda: None) == 0  # a child that exits (closing its inherited copy)...
    assert _in_child(lambda: WriterLock.acquire(tmp_path)) == 1  # ...left the parent's lock held
    lock.release()
    assert _in_child(lambda: WriterLock.acquire(tmp_path)) == 0
