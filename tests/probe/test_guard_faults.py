"""The fault barrier with real faults: a full disk, a run directory turned read-only mid-run, a file-size limit.

Each test trains with a probe attached while the fault happens and checks what the README promises: under
``errors="warn"`` nothing reaches the user's loop (training ends bit for bit as without the probe), the user is told
once, and the snapshots committed before the fault still load. The disk faults use a small tmpfs (mounting needs
root; skipped otherwise) and ``RLIMIT_FSIZE`` in a child process (works for any user).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import dynprobe

from ..conftest import assert_bitwise_equal, mlp_setup, state_of, train

STEPS = 60


def _reference_state() -> dict[str, torch.Tensor]:
    model, optimizer, scheduler, data = mlp_setup()
    torch.manual_seed(1)
    train(model, optimizer, scheduler, data, STEPS)
    return state_of(model)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs mounted inside ``tmp_path`` (needs root and a kernel that allows it)."""
    mount_point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'})")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def _train_with_probe(out: Path, *, after_step=None, errors: str = "warn", **options):
    model, optimizer, scheduler, data = mlp_setup()
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=out, schedule=1,
                           errors=errors, **options)
    torch.manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, optimizer, scheduler, data, STEPS, criterion=probe.watch(torch.nn.CrossEntropyLoss()),
              after_step=after_step)
        probe.close()
    return model, probe, [str(w.message) for w in caught if "dynprobe: the probe failed" in str(w.message)]


def test_a_full_disk_detaches_the_probe_and_training_goes_on(small_tmpfs):
    # Every snapshot stores θ (~4 kB here) plus predictions and metric rows; 2 MiB fills within the 60 steps
    # once a ballast file takes most of the space.
    (small_tmpfs / "ballast").write_bytes(b"\0" * (2 * 2**20 - 96 * 2**10))
    model, probe, messages = _train_with_probe(small_tmpfs / "run")
    assert_bitwise_equal(state_of(model), _reference_state())
    assert len(messages) == 1 and "OSError" in messages[0], messages
    assert not probe.attached
    (small_tmpfs / "ballast").unlink()  # the reader needs no space, but let the loader see a sane filesystem
    run = dynprobe.load_run(small_tmpfs / "run")
    assert 1 <= len(run) < STEPS + 1  # what was committed before the disk filled is kept
    assert np.isfinite(run.C).all()


def test_a_run_directory_turned_read_only_mid_run_detaches_the_probe(small_tmpfs):
    run_dir = small_tmpfs / "run"

    def remount_read_only(step: int) -> None:
        # A read-only bind mount over the run directory: every new open for writing fails with EROFS (root
        # ignores permission bits, so chmod would not do).
        if step == 20:
            subprocess.run(["mount", "--bind", str(run_dir), str(run_dir)], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(run_dir)], check=True)

    try:
        model, probe, messages = _train_with_probe(run_dir, after_step=remount_read_only)
    finally:
        subprocess.run(["umount", str(run_dir)], capture_output=True)
    assert_bitwise_equal(state_of(model), _reference_state())
    assert len(messages) == 1 and "Read-only file system" in messages[0], messages
    run = dynprobe.load_run(small_tmpfs / "run")
    assert list(run.steps) == list(range(0, 21))  # snapshots 0..20 were committed before the remount


def test_warnings_turned_into_errors_still_do_not_reach_the_loop(small_tmpfs):
    (small_tmpfs / "ballast").write_bytes(b"\0" * (2 * 2**20 - 64 * 2**10))
    model, optimizer, scheduler, data = mlp_setup()
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=small_tmpfs / "run",
                           schedule=1)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, optimizer, scheduler, data, STEPS, criterion=probe.watch(torch.nn.CrossEntropyLoss()))
        probe.close()
    assert_bitwise_equal(state_of(model), _reference_state())


def test_errors_raise_reraises_the_disk_error(small_tmpfs):
    (small_tmpfs / "ballast").write_bytes(b"\0" * (2 * 2**20 - 96 * 2**10))
    with pytest.raises(OSError):
        _train_with_probe(small_tmpfs / "run", errors="raise")


CHILD = textwrap.dedent("""
    import resource, sys, warnings
    import torch
    sys.path.insert(0, {tests_parent!r})
    from tests.conftest import mlp_setup, state_of, train
    import dynprobe

    out, limit = sys.argv[1], int(sys.argv[2])
    model, optimizer, scheduler, data = mlp_setup()
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=out, schedule=1)
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))  # every file of the run may grow to `limit` bytes
    torch.manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, optimizer, scheduler, data, {steps}, criterion=probe.watch(torch.nn.CrossEntropyLoss()))
        probe.close()
    failed = [str(w.message) for w in caught if "dynprobe: the probe failed" in str(w.message)]
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    torch.save(state_of(model), out + ".final.pt")
    print("FAILURES", len(failed), failed[0] if failed else "")
""")


def test_a_file_size_limit_detaches_the_probe_in_a_child_process(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests_parent=str(Path(__file__).resolve().parents[2]), steps=STEPS))
    out = tmp_path / "run"
    # events.jsonl grows by a few hundred bytes per snapshot: 8 kB runs out after a dozen snapshots
    result = subprocess.run([sys.executable, str(script), str(out), str(8 * 1024)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FAILURES 1" in result.stdout and "OSError" in result.stdout, result.stdout
    assert_bitwise_equal(torch.load(str(out) + ".final.pt"), _reference_state())
    run = dynprobe.load_run(out)
    assert 1 <= len(run) < STEPS + 1


def test_explicit_steps_after_the_probe_detached_itself_are_ignored(tmp_path):
    model, optimizer, scheduler, data = mlp_setup()

    def broken(info):  # inside the probe's fault guard
        if info["step"] > 0:
            raise RuntimeError("boom")

    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run", schedule=1,
                           on_snapshot=broken)
    with pytest.warns(RuntimeWarning, match="detached itself"):
        probe.step(data.x_train[:4], data.y_train[:4])
        probe.step(data.x_train[:4], data.y_train[:4])  # the snapshot of step 1 fails here
    assert not probe.attached
    probe.step(data.x_train[:4], data.y_train[:4])  # no error: the user was told once, training goes on
    probe.close()
