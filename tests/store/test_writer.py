"""RunWriter: one writer per run (a real OS lock, real processes), never outside the run directory (real symbolic
links), the out= argument, what a resume keeps, reading snapshots back, durability, the sink interface."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import dynprobe
from dynprobe.store import RunInUseError, RunSink
from dynprobe.store.disk import free_space_warning, projected_run_bytes
from dynprobe.store.files import RunFormatError, RunFormatWarning, read_jsonl
from dynprobe.store.layout import (
    EVENTS,
    LOCK,
    MANIFEST,
    SNAPSHOTS,
    barriers_path,
    rows_path,
    separation_path,
    snapshot_dir,
    switching_results_path,
    train_loss_path,
)
from dynprobe.store.rows import PairLog, TriangularRows
from dynprobe.store.writer import RunWriter, check_out

from ..small_runs import manifest, write_small_run

TESTS_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tree(path):
    """Every file under ``path`` with its bytes: what must stay untouched."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- out=


@pytest.mark.parametrize(("out", "error", "match"), [
    (None, TypeError, "out must be a directory path .* got NoneType None"),
    (123, TypeError, "out must be a directory path .* got int 123"),
    (True, TypeError, "out must be a directory path"),
    ("", ValueError, "out='' names no directory"),
    ("   ", ValueError, "names no directory"),
    ("a\x00b", ValueError, "out contains a NUL"),
])
def test_out_is_validated_naming_the_argument(out, error, match):
    with pytest.raises(error, match=match):
        check_out(out)
    with pytest.raises(error, match=match):
        RunWriter(out, manifest(), resume=False)


def test_out_accepts_str_and_pathlike(tmp_path):
    assert check_out(str(tmp_path / "a")) == tmp_path / "a"
    assert check_out(tmp_path / "a") == tmp_path / "a"


def test_a_foreign_directory_is_refused_and_left_untouched(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"is not empty \(notes.txt\) and is not a dynprobe run"):
        RunWriter(tmp_path / "mine", manifest(), resume=True)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]  # no lock file written into it


def test_a_creation_interrupted_before_the_manifest_is_taken_over(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / LOCK).write_text('{"pid": 1}')  # the creator died after taking the lock
    (root / f".{MANIFEST}.abcd1234.tmp").write_text("{")  # ... while writing the manifest
    with RunWriter(root, manifest(), resume=False):
        pass
    assert len(dynprobe.load_run(root)) == 0
    assert not list(root.glob(".*.tmp"))


def test_resume_step_is_checked(tmp_path):
    with pytest.raises(ValueError, match="resume_step must be an int >= 0"):
        RunWriter(tmp_path / "r", manifest(), resume=True, resume_step=-1)


# ---------------------------------------------------------------------------------------------- one writer


def test_a_second_writer_in_the_same_process_is_refused_until_the_first_closes(tmp_path):
    first = RunWriter(tmp_path / "r", manifest(), resume=False)
    with pytest.raises(RunInUseError, match="another probe \\(or RunWriter\\) in this process"):
        RunWriter(tmp_path / "r", manifest(), resume=True)
    assert dynprobe.load_run(tmp_path / "r").status == "running"  # readers are not locked out
    first.close()
    with RunWriter(tmp_path / "r", manifest(), resume=True) as second:
        assert second.resumed


def test_the_close_event_is_the_writers_last_record(tmp_path):
    writer = RunWriter(tmp_path / "r", manifest(), resume=False)
    writer.event("close", step=0, status="closed")
    assert writer.closed
    with pytest.raises(RuntimeError, match="is closed"):
        writer.event("anything", step=0)
    RunWriter(tmp_path / "r", manifest(), resume=True).close()


HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {parent!r})
    from dynprobe.store.writer import RunWriter
    from tests.small_runs import manifest
    writer = RunWriter(sys.argv[1], manifest(), resume=sys.argv[2] == "resume")
    writer.event("holder", step=0)
    print("LOCKED", flush=True)
    time.sleep(120)
""")


def _holder(tmp_path, root, mode="new"):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER.format(parent=TESTS_PARENT))
    process = subprocess.Popen([sys.executable, str(script), str(root), mode], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.strip() == "LOCKED", process.stderr.read()  # the child proves it holds the lock
    return process


def test_another_process_is_named_and_a_sigkilled_writers_lock_is_recovered(tmp_path):
    root = tmp_path / "r"
    process = _holder(tmp_path, root)
    try:
        with pytest.raises(RunInUseError, match=f"process {process.pid} on host .* \\(since [^)]*\\)\\. A run"):
            RunWriter(root, manifest(), resume=True)
        run = dynprobe.load_run(root)  # a reader works while another process writes
        assert run.status == "running" and any(e["event"] == "holder" for e in run.events)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert dynprobe.load_run(root).status == "interrupted"
    with RunWriter(root, manifest(), resume=True) as writer:  # the kernel released the dead writer's lock
        assert writer.resumed


RACER = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {parent!r})
    from dynprobe.store.writer import RunWriter
    from tests.small_runs import manifest
    base, start, trials = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    held, outcomes = [], []
    for trial in range(trials):
        while time.time() < start + 0.3 * trial:
            pass
        try:
            held.append(RunWriter(f"{{base}}/run{{trial}}", manifest(), resume=False))
            outcomes.append("won")
        except Exception as error:
            outcomes.append(f"{{type(error).__name__}}: {{error}}")
    print(json.dumps(outcomes), flush=True)
    time.sleep(0.3 * trials + 1)  # keep the runs open until the other process is done too
    for writer in held:
        writer.close()
""")


def test_two_new_runs_started_at_once_one_wins_and_the_other_is_told_why(tmp_path):
    script = tmp_path / "racer.py"
    script.write_text(RACER.format(parent=TESTS_PARENT))
    trials, start = 8, time.time() + 3.0
    processes = [subprocess.Popen([sys.executable, str(script), str(tmp_path), str(start), str(trials)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in processes]
    for trial in range(trials):
        outcomes = [results[0][trial], results[1][trial]]
        assert outcomes.count("won") == 1, outcomes
        lost = next(o for o in outcomes if o != "won")
        assert lost.startswith("RunInUseError: ") and "is open for writing by" in lost or (
            lost.startswith("FileExistsError: ") and "already holds a dynprobe run" in lost), lost
        assert "not a dynprobe run" not in lost
        assert len(dynprobe.load_run(tmp_path / f"run{trial}").events) == 1  # one attach: one writer wrote


def _sleep_in_child(seconds):
    time.sleep(seconds)


def test_a_forked_child_neither_keeps_nor_releases_the_lock(tmp_path):
    writer = RunWriter(tmp_path / "r", manifest(), resume=False)
    child = multiprocessing.get_context("fork").Process(target=_sleep_in_child, args=(30,))
    child.start()
    try:
        with pytest.raises(RunInUseError):  # the child's exit or existence does not release the parent's lock
            RunWriter(tmp_path / "r", manifest(), resume=True)
        writer.close()
        with RunWriter(tmp_path / "r", manifest(), resume=True):  # the live child does not keep it either
            pass
    finally:
        child.kill()
        child.join()


# ---------------------------------------------------------------------------------------------- links


def _outside(tmp_path):
    outside = tmp_path / "outside"
    (outside / "step_00000002").mkdir(parents=True)
    (outside / "step_00000002" / "precious.npy").write_bytes(b"precious")
    (outside / "step_00000004").mkdir()
    (outside / "file.txt").write_text("do not touch\n")
    (outside / "C.rows").write_bytes(np.arange(100, dtype="<f8").tobytes())
    return outside


LINKS = {
    "events.jsonl": lambda root, out: (root / EVENTS, out / "file.txt"),
    "C.rows": lambda root, out: (rows_path(root, "C"), out / "C.rows"),
    "snapshots/": lambda root, out: (root / SNAPSHOTS, out),
    "a snapshot folder": lambda root, out: (snapshot_dir(root, 4), out / "step_00000004"),
    "an uncommitted snapshot folder": lambda root, out: (snapshot_dir(root, 10), out / "step_00000002"),
    "run.json": lambda root, out: (root / MANIFEST, out / "file.txt"),
    "train_loss.f8": lambda root, out: (train_loss_path(root), out / "C.rows"),
    "a separation log": lambda root, out: (separation_path(root, 1), out / "C.rows"),
    "B.jsonl": lambda root, out: (barriers_path(root), out / "file.txt"),
}


@pytest.mark.parametrize("which", sorted(LINKS))
@pytest.mark.parametrize("resume_step", [None, 2])
def test_resume_refuses_links_inside_the_run_and_touches_nothing_outside(tmp_path, which, resume_step):
    root, outside = tmp_path / "run", _outside(tmp_path)
    write_small_run(root, close=False)
    link, target = LINKS[which](root, outside)
    if link.exists():
        if link.is_dir():
            import shutil
            shutil.rmtree(link)
        else:
            link.unlink()
    link.symlink_to(target, target_is_directory=target.is_dir())
    before = _tree(outside)
    with pytest.raises(RunFormatError, match="is a symbolic link .* never writes through links"):
        RunWriter(root, manifest(), resume=True, resume_step=resume_step)
    assert _tree(outside) == before
    assert sorted(p.name for p in outside.iterdir()) == ["C.rows", "file.txt", "step_00000002", "step_00000004"]


def test_a_link_planted_while_the_writer_runs_is_not_followed(tmp_path):
    root, outside = tmp_path / "run", _outside(tmp_path)
    writer = RunWriter(root, manifest(), resume=False)
    before = _tree(outside)
    (root / EVENTS).unlink()
    (root / EVENTS).symlink_to(outside / "file.txt")
    with pytest.raises(RunFormatError, match="symbolic link"):
        writer.event("x", step=1)
    rows_path(root, "C").symlink_to(outside / "C.rows")
    with pytest.raises(RunFormatError, match="symbolic link"):
        TriangularRows(rows_path(root, "C")).append(np.zeros(1), 0)
    with pytest.raises(RunFormatError, match="symbolic link"):
        TriangularRows(rows_path(root, "C")).truncate(0)
    snapshot_dir(root, 6).parent.mkdir(exist_ok=True)
    snapshot_dir(root, 6).symlink_to(outside / "step_00000002", target_is_directory=True)
    with pytest.raises(RunFormatError, match="symbolic link"):
        writer.save_array(6, "params", np.zeros(3))
    writer.close()
    assert _tree(outside) == before


def test_out_itself_may_be_a_link_to_a_directory(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    with RunWriter(tmp_path / "alias", manifest(), resume=False):
        pass
    assert (tmp_path / "real" / MANIFEST).exists()


# ---------------------------------------------------------------------------------------------- resume


def _events(root):
    return read_jsonl(root / EVENTS)


def _kill_after_uncommitted_snapshot(root):
    """A run whose process died inside the snapshot at step 10: its files, rows, ghost records and losses are
    on disk, its commit line is not."""
    write_small_run(root, close=False)
    with RunWriter(root, manifest(), resume=True) as writer:
        writer.save_array(10, "params", np.zeros(8, np.float32))
        writer.event("ghost_spawn", ghost=2, step=10, spawn_step=10, control=False, kind="l2", seed=1,
                     nominal_norm=1e-3, realized_norm=1e-3, changed=8, total=8)
        writer.event("ghost_compare", ghost=1, step=10, C=0.5)
        writer.append_separation(1, np.array([9, 10]), np.array([1.0, 1.0]))
        writer.append_separation(2, np.array([10]), np.array([0.0]))
        for name in ("C", "D", "S"):
            TriangularRows(writer.rows_path(name)).append(np.zeros(6), 5)
    PairLog(train_loss_path(root)).append(np.array([7, 8, 9, 10]), np.array([1.0, 2.0, 3.0, 4.0]))
    with open(root / EVENTS, "a") as handle:
        handle.write('{"event": "snapshot", "snapshot_index": 5, "st')  # torn commit line


def test_resume_keeps_exactly_what_the_last_committed_snapshot_vouches_for(tmp_path):
    root = tmp_path / "run"
    _kill_after_uncommitted_snapshot(root)
    with RunWriter(root, manifest(), resume=True) as writer:
        assert writer.resume_from_step(None) == 8 and [s["step"] for s in writer.snapshots] == [0, 2, 4, 6, 8]
        writer.begin()
    events = _events(root)
    assert not [e for e in events if e.get("step", 0) > 8]  # ghost 2's spawn and the step-10 comparison are gone
    assert not snapshot_dir(root, 10).exists()
    assert not separation_path(root, 2).exists()
    aside = events[-1]["set_aside"]  # nothing is deleted: the dropped folder and log are moved aside
    assert (root / aside / "snapshots" / "step_00000010" / "params.npy").is_file()
    assert (root / aside / separation_path(root, 2).relative_to(root)).is_file()
    assert PairLog(root / aside / "train_loss.f8").read()[0].tolist() == [7, 8, 9, 10]
    assert PairLog(separation_path(root, 1)).read()[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert PairLog(train_loss_path(root)).read()[0].tolist() == [7, 8]
    assert all(TriangularRows(rows_path(root, n)).complete_rows() == 5 for n in ("C", "D", "S"))
    assert [e["event"] for e in events][-1] == "resume" and events[-1]["step"] == 8
    run = dynprobe.load_run(root)
    assert run.damage == [] and len(run) == 5


def test_resume_at_an_earlier_step_rewinds_every_file(tmp_path):
    root = tmp_path / "run"
    write_small_run(root, close=False)
    writer = RunWriter(root, manifest(), resume=True, resume_step=4)
    with pytest.warns(UserWarning, match=r"2 snapshots recorded after it \(steps 6..8\) are moved aside"):
        writer.begin()
    writer.close()
    run = dynprobe.load_run(root)
    assert list(run.steps) == [0, 2, 4] and run.C.shape == (3, 3)
    assert [(r["i"], r["j"]) for r in read_jsonl(barriers_path(root))] == [(2, 0), (4, 2)]
    assert [r["switch_step"] for r in read_jsonl(switching_results_path(root))] == [0, 2, 4]
    assert PairLog(separation_path(root, 1)).read()[0].max() == 4
    assert not snapshot_dir(root, 6).exists() and not snapshot_dir(root, 8).exists()
    assert not [e for e in run.events if (e.get("step") or 0) > 4]
    assert run.manifest["resumes"][-1]["step"] == 4


def test_resume_at_a_step_without_a_snapshot_drops_that_steps_snapshot_records(tmp_path):
    root = tmp_path / "run"
    write_small_run(root, close=False, steps=(0, 2, 4, 6))
    with RunWriter(root, manifest(), resume=True, resume_step=5) as writer, \
            pytest.warns(UserWarning, match="1 snapshots recorded after it .* are moved aside"):
        writer.begin()
    run = dynprobe.load_run(root)
    assert list(run.steps) == [0, 2, 4] and run.manifest["resumes"][-1]["step"] == 5


def test_resume_beyond_the_end_of_a_closed_run_is_refused(tmp_path):
    root = tmp_path / "run"
    write_small_run(root, close=True)
    with pytest.raises(ValueError, match=r"resume_step=12 is beyond the end of .*closed at step 8"):
        RunWriter(root, manifest(), resume=True, resume_step=12)
    RunWriter(root, manifest(), resume=True, resume_step=8).close()  # its own end is fine


def test_resume_beyond_the_last_record_of_an_interrupted_run_warns(tmp_path):
    root = tmp_path / "run"
    write_small_run(root, close=False)
    with pytest.warns(UserWarning, match=r"resume_step=12 is after the last step .* recorded \(8\)"):
        writer = RunWriter(root, manifest(), resume=True, resume_step=12)
    assert writer.resume_from_step(12) == 12
    writer.close()


@pytest.mark.parametrize(("change", "match"), [
    (dict(model_class="Other"), "model class 'Tiny'; this model is 'Other'"),
    (dict(optimizer_class="Adam"), "optimizer class 'SGD'; this optimizer is 'Adam'"),
    (dict(fingerprint="g"), "eval_data differs"),
])
def test_resume_with_another_model_class_optimizer_or_eval_set_is_refused(tmp_path, change, match):
    write_small_run(tmp_path / "run")
    with pytest.raises(ValueError, match=f"cannot resume .*{match}"):
        RunWriter(tmp_path / "run", manifest(**change), resume=True)


def test_resume_with_other_shapes_or_dtypes_is_refused(tmp_path):
    write_small_run(tmp_path / "run")
    other = manifest()
    other["model"]["parameters"][1]["dtype"] = "float64"
    with pytest.raises(ValueError, match=r"\('layer.bias', \[2\], 'float32'\) recorded, .*'float64'\) now"):
        RunWriter(tmp_path / "run", other, resume=True)


def test_resume_of_a_damaged_log_continues_from_its_valid_prefix_and_keeps_the_original(tmp_path):
    root = tmp_path / "run"
    write_small_run(root, close=False)
    original = (root / EVENTS).read_bytes()
    lines = original.decode().splitlines()
    position = [i for i, line in enumerate(lines) if '"snapshot"' in line][3]
    lines.insert(position, json.dumps({"event": "snapshot", "snapshot_index": 0, "step": 0}))  # a second writer's line
    (root / EVENTS).write_text("\n".join(lines) + "\n")
    writer = RunWriter(root, manifest(), resume=True)
    assert [s["step"] for s in writer.snapshots] == [0, 2, 4]
    with pytest.warns(RunFormatWarning, match=r"Resuming from its valid prefix \(3 snapshots\); the original files"):
        writer.begin()
    writer.close()
    kept = list(root.glob(f"set-aside-*/{EVENTS}"))
    assert len(kept) == 1 and kept[0].read_text().count("\n") == len(lines)
    run = dynprobe.load_run(root)
    assert run.damage == [] and list(run.steps) == [0, 2, 4] and run.C.shape == (3, 3)


def test_a_run_killed_before_its_first_snapshot_resumes_at_step_0(tmp_path):
    RunWriter(tmp_path / "r", manifest(), resume=False).close()
    with RunWriter(tmp_path / "r", manifest(), resume=True) as writer:
        assert writer.resume_from_step(None) == 0 and writer.snapshots == []


# ---------------------------------------------------------------------------------------------- reading back


def test_snapshot_params_and_the_matching_snapshot(tmp_path):
    truth = write_small_run(tmp_path / "run", close=False)
    with RunWriter(tmp_path / "run", manifest(), resume=True) as writer:
        np.testing.assert_array_equal(writer.snapshot_params(4), truth["theta"][2])
        assert writer.find_matching_snapshot(truth["theta"][2]) == 4
        assert writer.find_matching_snapshot(truth["theta"][2].astype(np.float64)) == 4
        import torch
        assert writer.find_matching_snapshot(torch.from_numpy(truth["theta"][0])) == 0
        nudged = truth["theta"][3].copy()
        nudged[-1] = np.nextafter(nudged[-1], np.float32(np.inf))
        assert writer.find_matching_snapshot(nudged) is None  # one ulp in the last entry: no match
        with pytest.raises(KeyError, match="no committed snapshot at step 3"):
            writer.snapshot_params(3)


# ---------------------------------------------------------------------------------------------- durability, sink


def test_durable_commits_fsync_files_and_folders(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    for durable in (False, True):
        synced.clear()
        with RunWriter(tmp_path / f"r{durable}", manifest(), resume=False, durable=durable) as writer:
            writer.save_array(0, "params", np.zeros(8, np.float32))
            TriangularRows(writer.rows_path("C")).append(np.zeros(1), 0)
            TriangularRows(writer.rows_path("D")).append(np.zeros(1), 0)
            before_commit = len(synced)
            writer.commit_snapshot({"step": 0})
            at_commit = synced[before_commit:]
        if not durable:
            assert synced == []
        else:
            root = str(tmp_path / "rTrue")
            assert any(p.endswith(".tmp") and "params.npy" in p for p in synced[:before_commit])  # before rename
            assert {str(snapshot_dir(root, 0)), f"{root}/{SNAPSHOTS}", str(rows_path(root, "C")),
                    str(rows_path(root, "D")), f"{root}/{EVENTS}"} <= set(at_commit)
            assert at_commit[-1] == f"{root}/{EVENTS}"  # the commit line last
    assert len(dynprobe.load_run(tmp_path / "rTrue")) == 1


def test_the_writer_and_the_null_sink_implement_the_sink_protocol(tmp_path):
    from dynprobe.distributed.sink import NullSink

    with RunWriter(tmp_path / "r", manifest(), resume=False) as writer:
        assert isinstance(writer, RunSink)
    assert isinstance(NullSink(tmp_path / "n", {}), RunSink)


# ---------------------------------------------------------------------------------------------- disk


def test_projected_size_matches_a_written_run(tmp_path):
    P, T, n = 50_000, 12, 200
    with RunWriter(tmp_path / "r", manifest(), resume=False) as writer:
        for k in range(T):
            writer.save_array(k, "params", np.zeros(P, np.float32))
            writer.save_arrays(k, "buffers", {})
            writer.save_array(k, "preds", np.zeros(n, np.int16))
            for name in ("C", "D"):
                TriangularRows(writer.rows_path(name)).append(np.zeros(k + 1), k)
            writer.commit_snapshot({"step": k, "eval_loss": 1.0, "eval_accuracy": 0.5, "kernel": False})
        for name in ("C", "D"):
            writer.save_matrix(name, np.zeros((T, T)))
    measured = dynprobe.load_run(tmp_path / "r").disk_usage.total_bytes
    projected = projected_run_bytes(num_parameters=P, snapshots=T, eval_n=n)
    assert abs(projected - measured) / measured < 0.05, (projected, measured)


def test_projection_arguments_are_checked():
    with pytest.raises(ValueError, match="snapshots must be an int >= 0"):
        projected_run_bytes(num_parameters=10, snapshots=-1)


def test_free_space_warning(tmp_path):
    assert free_space_warning(tmp_path / "new" / "run", 1000) is None
    message = free_space_warning(tmp_path / "new" / "run", 10**18)
    assert "projected to take" in message and "out=" in message and "free" in message


def test_deleting_the_lock_file_does_not_admit_a_second_writer(tmp_path):
    root = tmp_path / "run"
    first = RunWriter(root, manifest(), resume=False)
    (root / LOCK).unlink()  # a cleanup script removes the lock file while the first writer runs
    with pytest.raises(RunInUseError, match="open for writing by another writer"):
        RunWriter(root, manifest(), resume=True)
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
              "from dynprobe.store.writer import RunWriter, RunInUseError\n"
              "from tests.small_runs import manifest\n"
              f"try:\n    RunWriter({str(root)!r}, manifest(), resume=True)\n"
              "except RunInUseError:\n    print('refused')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "refused", done.stderr  # another process too
    first.close()
    with RunWriter(root, manifest(), resume=True) as writer:  # released: the next writer gets the run
        assert writer.resumed
