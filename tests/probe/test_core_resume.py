"""Crash safety (SIGKILL mid-snapshot, in a subprocess) and resuming a run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import dynprobe
from dynprobe import schedule
from dynprobe.store.files import read_jsonl
from dynprobe.store.layout import EVENTS, MANIFEST, rows_path, snapshot_dir
from dynprobe.store.rows import TriangularRows

from ..conftest import mlp_setup, on_device, train

# A training script that kills itself (SIGKILL: no cleanup, no atexit) at a chosen point inside the snapshot at
# kill_step. Each kill point first performs the real, partial write it names and prints a marker: the parent
# asserts the marker and the partial write on disk, so a child that dies anywhere else fails the test.
SCRIPT = textwrap.dedent(
    """
    import io, os, signal, sys
    import numpy as np, torch
    sys.path.insert(0, {tests_parent!r})
    from tests.conftest import mlp_setup, train
    import dynprobe
    from dynprobe.store import files, rows, writer
    from dynprobe.store.layout import snapshot_dirname

    where, kill_step, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    def die():
        print("KILL-POINT", where, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "before_commit":          # files and metric rows written, commit line not yet
        original = writer.RunWriter.commit_snapshot
        def commit(self, record):
            if record["step"] == kill_step:
                die()
            return original(self, record)
        writer.RunWriter.commit_snapshot = commit
    elif where == "torn_row":             # the first half of a metric row appended
        original_append = rows.TriangularRows.append
        def append(self, row, index):
            if self.path.name == "D.rows" and index == kill_step // 2:
                data = np.ascontiguousarray(row, dtype="<f8").tobytes()
                files.append_bytes(self.path, data[: len(data) // 2])
                die()
            return original_append(self, row, index)
        rows.TriangularRows.append = append
    elif where == "torn_event":           # the first half of the commit line appended
        original_append_jsonl = writer.append_jsonl
        def append_jsonl(path, record, **options):
            if record.get("event") == "snapshot" and record["step"] == kill_step:
                line = files._line(record)
                files.append_bytes(path, line[: len(line) // 2])
                die()
            return original_append_jsonl(path, record, **options)
        writer.append_jsonl = append_jsonl
    elif where == "mid_params":           # inside the atomic write of params.npy: half of its temporary file
        original_save = writer.atomic_save_npy
        def save(path, array, **options):
            if path.name == "params.npy" and path.parent.name == snapshot_dirname(kill_step):
                buffer = io.BytesIO()
                np.save(buffer, array)
                data = buffer.getvalue()
                def partial(handle):
                    handle.write(data[: len(data) // 2])
                    handle.flush()
                    die()
                files.atomic_write(path, partial)
            return original_save(path, array, **options)
        writer.atomic_save_npy = save

    model, optimizer, scheduler, data = mlp_setup()
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=out, schedule=2,
                           errors="raise")
    train(model, optimizer, scheduler, data, 30, criterion=probe.watch(torch.nn.CrossEntropyLoss()))
    probe.close()
    print("FINISHED", flush=True)
    """
)


def _run_script(tmp_path, where, kill_step):
    script = tmp_path / "train.py"
    tests_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script.write_text(SCRIPT.format(tests_parent=tests_parent))
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(script), where, str(kill_step), str(out)], capture_output=True,
                            text=True, timeout=300)
    return result, out


def _partial_write_on_disk(where, out, kill_step):
    """The evidence that the child died inside the write it names, not before it."""
    folder = snapshot_dir(out, kill_step)
    if where == "before_commit":
        return (folder / "params.npy").exists() and not any(
            e.get("step") == kill_step and e["event"] == "snapshot" for e in read_jsonl(out / EVENTS))
    if where == "torn_row":
        size = rows_path(out, "D").stat().st_size
        return TriangularRows.bytes_for(kill_step // 2) < size < TriangularRows.bytes_for(kill_step // 2 + 1)
    if where == "torn_event":
        return not (out / EVENTS).read_bytes().endswith(b"\n")
    temporary = list(folder.glob(".params.npy.*.tmp"))
    return not (folder / "params.npy").exists() and len(temporary) == 1 and temporary[0].stat().st_size > 0


@pytest.mark.parametrize("where", ["before_commit", "torn_row", "torn_event", "mid_params"])
def test_sigkill_mid_snapshot_keeps_every_earlier_snapshot(tmp_path, where):
    result, out = _run_script(tmp_path, where, kill_step=14)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert f"KILL-POINT {where}" in result.stdout, result.stderr  # it died at the kill point, not elsewhere
    assert _partial_write_on_disk(where, out, 14)
    run = dynprobe.load_run(out)
    np.testing.assert_array_equal(run.steps, np.arange(0, 14, 2))  # 0, 2, ..., 12 survive; 14 never committed
    assert run.status == "interrupted" and run.damage == []
    assert np.isfinite(run.C).all() and np.isfinite(run.D).all()
    assert run.C.shape == (7, 7)
    for i in range(len(run)):
        assert run.params(snapshot_index=i).shape == run.params(snapshot_index=0).shape
    # and the killed run can be continued from its last snapshot (the model restored to it, as from a checkpoint)
    model, optimizer, scheduler, data = mlp_setup()
    model.load_state_dict(run.state_dict(snapshot_index=-1), strict=False)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=out, resume=True,
                           schedule=2, errors="raise")
    assert probe.global_step == 12
    assert not snapshot_dir(out, 14).exists() and not list(out.rglob(".*.tmp"))  # the torn snapshot is gone
    probe.close()
    resumed = dynprobe.load_run(out)  # every line readable again after the resume appended to the log
    assert list(resumed.steps) == list(range(0, 14, 2)) and resumed.status == "closed" and resumed.damage == []


def test_kill_at_random_moments_always_leaves_a_loadable_run(tmp_path):
    script = tmp_path / "train.py"
    tests_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script.write_text(SCRIPT.format(tests_parent=tests_parent))
    rng = np.random.default_rng(0)
    loaded = 0
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        process = subprocess.Popen([sys.executable, str(script), "none", "-1", str(out)],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        deadline = time.time() + 120
        while not (out / EVENTS).exists() and time.time() < deadline and process.poll() is None:
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0.0, 0.3)))
        process.send_signal(signal.SIGKILL)
        process.communicate()
        assert (out / MANIFEST).exists(), "the run was being written when the kill came (its event log existed)"
        run = dynprobe.load_run(out)  # killed mid-write or (rarely) just after it finished: loadable either way
        assert run.damage == [] and run.C.shape == (len(run), len(run)) and np.isfinite(run.C).all()
        for i in range(len(run)):
            run.params(snapshot_index=i)
            run.predictions(snapshot_index=i)
        loaded += 1
    assert loaded == 3  # every attempt counts: none is skipped


def test_resume_after_restoring_a_checkpoint_reproduces_an_uninterrupted_run(device, tmp_path):
    # reference: one uninterrupted run of 16 steps
    model, optimizer, scheduler, data = on_device(mlp_setup, device)()
    torch.manual_seed(7)
    with dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "ref", schedule=2):
        train(model, optimizer, scheduler, data, 16)

    # interrupted: train to 10 with a checkpoint (model, optimizer, RNG) at step 6, then "crash"
    model, optimizer, scheduler, data = on_device(mlp_setup, device)()
    torch.manual_seed(7)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run", schedule=2)
    checkpoint = {}

    def save(step):
        if step == 6:
            checkpoint.update(model=_copy(model.state_dict()), optimizer=_copy(optimizer.state_dict()),
                              rng=torch.get_rng_state(), cuda_rng=_cuda_rng(device))

    train(model, optimizer, scheduler, data, 10, after_step=save)
    _simulate_crash(probe)

    # restart from the step-6 checkpoint
    model, optimizer, scheduler, data = on_device(mlp_setup, device)()
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"])
    if checkpoint["cuda_rng"] is not None:  # dropout on a GPU draws from its generator
        torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)
    with pytest.warns(UserWarning, match="2 snapshots recorded after it .* are moved aside"):
        probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                               schedule=2, resume=True, resume_step=6)
    train(model, optimizer, scheduler, data, 10)
    probe.close()

    ref, run = dynprobe.load_run(tmp_path / "ref"), dynprobe.load_run(tmp_path / "run")
    np.testing.assert_array_equal(run.steps, ref.steps)
    np.testing.assert_array_equal(run.C, ref.C)
    np.testing.assert_array_equal(run.D, ref.D)
    np.testing.assert_array_equal(run.eval_loss, ref.eval_loss)
    assert run.manifest["resumes"][0]["step"] == 6
    assert run.status == "closed"


def _cuda_rng(device: torch.device) -> torch.Tensor | None:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def test_resume_with_a_different_model_is_rejected(tmp_path):
    model, optimizer, _, data = mlp_setup()
    dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r").close()
    other = torch.nn.Sequential(torch.nn.Linear(20, 5))
    with pytest.raises(ValueError, match="cannot resume"):
        dynprobe.Probe(other, torch.optim.SGD(other.parameters(), lr=0.1), eval_data=(data.x_test, data.y_test),
                       out=tmp_path / "r", resume=True)


def test_resume_with_different_eval_data_is_rejected(tmp_path):
    model, optimizer, _, data = mlp_setup()
    dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r").close()
    with pytest.raises(ValueError, match="eval_data differs"):
        dynprobe.Probe(model, optimizer, eval_data=(data.x_test[:50], data.y_test[:50]), out=tmp_path / "r",
                       resume=True)


def test_resume_true_on_a_new_directory_starts_a_run(tmp_path):
    model, optimizer, _, data = mlp_setup()
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "new", resume=True)
    probe.close()
    assert len(dynprobe.load_run(tmp_path / "new")) == 1


def test_run_is_readable_while_training_runs(tmp_path):
    model, optimizer, scheduler, data = mlp_setup()
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r",
                           schedule=schedule.every(2))
    train(model, optimizer, scheduler, data, 6)
    live = dynprobe.load_run(tmp_path / "r")
    assert live.status == "running" and list(live.steps) == [0, 2, 4, 6]
    probe.close()


def _simulate_crash(probe):
    """What a killed process leaves: no close(); its hooks and its lock on the run die with it."""
    probe._closed = True
    for handle in probe._handles:
        handle.remove()
    probe.writer.close()


def _copy(state):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else _copy(v) if isinstance(v, dict) else v)
            for k, v in state.items()}


def test_resuming_a_run_with_ghosts_continues_their_numbering_and_ends_the_interrupted_ones(tmp_path):
    ghosts = dynprobe.Ghosts(at=[0, 4, 12], perturbation=dynprobe.Perturbation(norm=1e-3))
    model, optimizer, scheduler, data = mlp_setup()
    torch.manual_seed(7)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=2, ghosts=ghosts)
    train(model, optimizer, scheduler, data, 8, criterion=probe.watch(torch.nn.CrossEntropyLoss()))
    _simulate_crash(probe)

    with pytest.warns(UserWarning, match=r"ghosts \[0, 1, 2\] alive at the interruption"):
        probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                               schedule=2, ghosts=ghosts, resume=True)
    train(model, optimizer, scheduler, data, 8, criterion=probe.watch(torch.nn.CrossEntropyLoss()))
    probe.close()

    run = dynprobe.load_run(tmp_path / "run")
    assert [(g.ghost_id, g.spawn_step, g.control) for g in run.ghosts] == [
        (0, 0, True), (1, 0, False), (2, 4, False), (3, 12, False)]  # one control, no index reused
    assert [(g.status, g.status_step) for g in run.ghosts] == [("interrupted", 8)] * 3 + [("finished", 16)]
    spawns = [e for e in run.events if e["event"] == "ghost_spawn"]
    assert [e["seed"] for e in spawns if not e["control"]] == [0, 1, 2]
    ended = [e for e in run.events if e["event"] == "ghost_status" and e["step"] == 8]
    assert sorted(e["ghost"] for e in ended) == [0, 1, 2]
    late = run.chaos["C"][3]
    assert np.isnan(late[run.steps < 12]).all() and np.isfinite(late[run.steps >= 12]).all()
    assert np.isnan(run.chaos["C"][1][run.steps > 8]).all()  # the interrupted ghost has no numbers after 8
