"""load_run: the read-only view, its accessors by step, its errors, and every damaged-file case."""
from __future__ import annotations

import io
import json
import math
import shutil
import socket
import warnings
import zipfile

import numpy as np
import pytest
import torch

import dynprobe
from dynprobe import RunFormatError
from dynprobe.store.files import RunFormatWarning
from dynprobe.store.layout import (
    EVENTS,
    MANIFEST,
    barriers_path,
    rows_path,
    separation_path,
    snapshot_dir,
    snapshot_file,
    switching_results_path,
)
from dynprobe.store.run import Run

from ..conftest import cnn_setup, train
from ..small_runs import EVAL_N, write_small_run


@pytest.fixture()
def cnn_run(tmp_path):
    model, optimizer, scheduler, data = cnn_setup()
    with dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r", schedule=4):
        train(model, optimizer, scheduler, data, 8)
    return model, data, dynprobe.load_run(tmp_path / "r")


@pytest.fixture()
def small(tmp_path):
    truth = write_small_run(tmp_path / "small")
    return truth, dynprobe.load_run(tmp_path / "small")


def test_run_arrays_have_the_documented_shapes(cnn_run):
    _, data, run = cnn_run
    T = len(run)
    assert run.steps.dtype == np.int64 and list(run.steps) == [0, 4, 8]
    assert run.C.shape == run.D.shape == (T, T)
    assert run.eval_loss.shape == run.eval_accuracy.shape == run.train_loss.shape == (T,)
    assert run.lr.shape == (8, 1) and np.all(run.lr == 3e-3)  # every optimizer step, one column per param group
    assert run.predictions(snapshot_index=0).shape == (data.x_test.shape[0],)
    assert np.allclose(np.diag(run.C), 0) and np.allclose(run.C, run.C.T)


def test_state_dict_restores_the_model_exactly(cnn_run):
    model, data, run = cnn_run
    fresh, *_ = cnn_setup(seed=99)
    fresh.load_state_dict(run.state_dict(step=8))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_snapshot_index_of_an_unknown_step_names_the_nearest(cnn_run):
    *_, run = cnn_run
    with pytest.raises(KeyError, match=r"nearest recorded steps: \[4, 8\]"):
        run.snapshot_index_of(6)


def test_materialized_matrices_equal_the_row_files(cnn_run):
    *_, run = cnn_run
    np.testing.assert_array_equal(np.load(run.path / "metrics" / "C.npy"), run.C)


def test_load_run_on_a_non_run_directory(tmp_path):
    with pytest.raises(RunFormatError, match="not a dynprobe run"):
        dynprobe.load_run(tmp_path)


def test_load_run_on_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunFormatError, match="is a file"):
        dynprobe.load_run(tmp_path / "f")


def test_load_run_path_must_be_a_path():
    with pytest.raises(TypeError, match="path must be a run directory"):
        dynprobe.load_run(None)


# ---------------------------------------------------------------------------------------- accessors by step


def test_accessors_by_step_and_by_index_read_the_stored_arrays(small):
    truth, run = small
    np.testing.assert_array_equal(run.steps, truth["steps"])
    for i, step in enumerate(truth["steps"]):
        np.testing.assert_array_equal(run.params(step=int(step)), truth["theta"][i])
        np.testing.assert_array_equal(run.params(snapshot_index=i), truth["theta"][i])
        np.testing.assert_array_equal(run.predictions(step=int(step)), truth["preds"][i])
        np.testing.assert_array_equal(run.kernel(step=int(step)), truth["kernels"][i])
        np.testing.assert_array_equal(run.buffers(snapshot_index=i)["running_mean"], truth["theta"][i, :2])
    np.testing.assert_array_equal(run.params(snapshot_index=-1), truth["theta"][-1])
    state = run.state_dict(step=4)
    assert state["layer.weight"].shape == (2, 3) and state["layer.weight"].dtype == torch.float32
    np.testing.assert_array_equal(state["layer.weight"].numpy().reshape(-1), truth["theta"][2, :6])
    np.testing.assert_array_equal(run.ghost_predictions(1, step=4), truth["preds"][2])


def test_accessors_take_the_snapshot_by_keyword_only(small):
    truth, run = small
    np.testing.assert_array_equal(run.params(snapshot_index=2), truth["theta"][2])
    np.testing.assert_array_equal(run.ghost_predictions(0, snapshot_index=1), truth["preds"][1])
    with pytest.raises(TypeError):
        run.params(2)
    with pytest.raises(TypeError):
        run.ghost_predictions(0, 1)


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda run: run.params(), TypeError, "exactly one of step= .* or snapshot_index="),
    (lambda run: run.params(step=2, snapshot_index=1), TypeError, "exactly one of"),
    (lambda run: run.params(step=3), KeyError, r"step 3 was not recorded; nearest recorded steps: \[2, 4\]"),
    (lambda run: run.params(snapshot_index=5), IndexError, "out of range: the run has 5 snapshots"),
    (lambda run: run.params(snapshot_index=1.0), TypeError, "snapshot_index must be an integer"),
    (lambda run: run.params(step="2"), TypeError, "step must be an integer"),
    (lambda run: run.ghost_predictions("0", step=2), TypeError, "ghost must be a ghost id"),
])
def test_accessor_arguments_are_checked(small, call, error, match):
    _, run = small
    with pytest.raises(error, match=match):
        call(run)


def test_matrices_and_records_equal_an_independent_computation(small):
    truth, run = small
    np.testing.assert_allclose(run.C, truth["C"], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(run.D, truth["D"])
    np.testing.assert_allclose(run.S, truth["S"], rtol=0, atol=1e-15)
    expected_b = np.full((5, 5), np.nan)
    np.fill_diagonal(expected_b, 0.0)
    for k in range(1, 5):
        expected_b[k, k - 1] = expected_b[k - 1, k] = 0.1 * k
    np.testing.assert_array_equal(run.B, expected_b)
    np.testing.assert_array_equal(run.B_linear[np.arange(1, 5), np.arange(4)], 0.05 * np.arange(1, 5))


def test_kernel_velocity_pairs_snapshots_exactly_the_lag_apart(small):
    truth, run = small
    assert run.kernel_lag_steps == 2  # KernelConfig(lag_steps=2) of the run
    t, v = run.kernel_velocity()
    np.testing.assert_array_equal(t, [0, 2, 4, 6])
    np.testing.assert_array_equal(v, [run.S[i, i + 1] for i in range(4)])  # S at the lag, not divided by it
    t, v = run.kernel_velocity(4)
    np.testing.assert_array_equal(t, [0, 2, 4])
    np.testing.assert_array_equal(v, [run.S[i, i + 2] for i in range(3)])
    assert run.kernel_velocity(3)[0].size == 0  # no pair is exactly 3 steps apart: nothing, not a nearest match
    np.testing.assert_array_equal(run.kernel_velocity(lag_steps=4)[1], v)


def test_ghosts_chaos_and_separation(small):
    _, run = small
    assert [(g.ghost_id, g.spawn_step, g.control, g.status) for g in run.ghosts] == [
        (0, 2, True, "finished"), (1, 2, False, "finished")]
    np.testing.assert_array_equal(run.chaos["C"][1], [np.nan, 1e-3, 2e-3, 3e-3, 4e-3])
    assert np.isnan(run.chaos["B_linear"]).all()
    steps, l2 = run.separation(1)
    np.testing.assert_array_equal(steps, [1, 2, 3, 4, 5, 6, 7, 8])
    np.testing.assert_array_equal(l2, [1e-3, 2e-3] * 4)
    assert run.separation(7)[0].size == 0  # a ghost without a log


def test_switching_results_are_keyed_by_configuration(tmp_path):
    write_small_run(tmp_path / "r")
    run = dynprobe.load_run(tmp_path / "r")
    assert list(run.switching_configs) == ["abc"] and run.switching["config_id"] == "abc"
    np.testing.assert_array_equal(run.switching["switch_step"], [0, 2, 4])
    with open(switching_results_path(tmp_path / "r"), "a") as handle:  # a second configuration, computed later
        handle.write(json.dumps({"switch_step": 2, "total_steps": 8, "eval_loss": 9.0, "eval_accuracy": 0.9,
                                 "config_id": "xyz", "config": {"lr": 0.2}}) + "\n")
    run = dynprobe.load_run(tmp_path / "r")
    assert list(run.switching_configs) == ["abc", "xyz"]
    with pytest.warns(UserWarning, match="2 configurations; run.switching shows the latest, config_id='xyz'"):
        latest = run.switching
    assert latest["config_id"] == "xyz" and latest["eval_loss"].tolist() == [9.0]
    assert run.switching_results("abc")["eval_loss"].tolist() == [1.0, 3.0, 5.0]  # never mixed with xyz
    with pytest.raises(ValueError, match="pass config_id="):
        run.switching_results()
    with pytest.raises(KeyError, match="no switching results with config_id='nope'"):
        run.switching_results("nope")


def test_disk_usage_counts_every_file(small, tmp_path):
    _, run = small
    usage = run.disk_usage
    files = [p for p in run.path.rglob("*") if p.is_file()]
    snapshot_files = [p for p in (run.path / "snapshots").rglob("*") if p.is_file()]
    assert usage.total_bytes == sum(p.stat().st_size for p in files)
    assert usage.snapshot_bytes == sum(p.stat().st_size for p in snapshot_files)
    assert usage.bytes_per_snapshot == usage.snapshot_bytes / 5


def test_a_live_run_is_readable_while_its_writer_holds_the_lock(tmp_path):
    from dynprobe.store.writer import RunWriter

    from ..small_runs import manifest

    writer = RunWriter(tmp_path / "live", manifest(), resume=False)
    try:
        run = dynprobe.load_run(tmp_path / "live")
        assert run.status == "running" and len(run) == 0
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------- damaged runs


def _manifest_edit(change):
    def mutate(root):
        data = json.loads((root / MANIFEST).read_text())
        change(data)
        (root / MANIFEST).write_text(json.dumps(data))
    return mutate


def _events_edit(change):
    def mutate(root):
        events = [json.loads(line) for line in (root / EVENTS).read_text().splitlines()]
        events = change(events) or events
        (root / EVENTS).write_text("".join(json.dumps(e) + "\n" for e in events))
    return mutate


def _snapshot_edit(position, /, **fields):
    def change(events):
        [e for e in events if e["event"] == "snapshot"][position].update(fields)
    return _events_edit(change)


def _first(kind, **fields):
    def change(events):
        next(e for e in events if e["event"] == kind).update(fields)
    return _events_edit(change)


def _write(relative, data):
    def mutate(root):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return mutate


def _snap(step, name):
    return snapshot_file(".", step, name).relative_to(".")


def _npy_header(shape, descr="<f4"):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + b"\0" * 64


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _zip_of(name, data):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


def _append_line(relative, line):
    def mutate(root):
        with open(root / relative, "a") as handle:
            handle.write(line + "\n")
    return mutate


def _many_snapshot_lines(root):
    lines = [json.dumps({"event": "snapshot", "snapshot_index": i, "step": i, "eval_loss": 1.0})
             for i in range(100_000)]
    (root / EVENTS).write_text("\n".join(lines) + "\n")  # ~5 MB claiming 100k snapshots; the rows hold 5


def _interleaved_second_writer(events):
    first = [e for e in events if e["event"] == "snapshot"]
    position = events.index(first[3])
    intruder = {"event": "snapshot", "snapshot_index": 0, "step": 0, "eval_loss": 2.0}  # another writer's first commit
    return events[:position] + [intruder] + events[position:]


def _replace_by_dir(relative):
    def mutate(root):
        path = root / relative
        path.unlink()
        path.mkdir()
    return mutate


B_PATH = barriers_path(".").relative_to(".")
SWITCHING_PATH = switching_results_path(".").relative_to(".")
DAMAGED = {
    # manifest
    "manifest truncated": lambda root: (root / MANIFEST).write_text('{"format": "dynprobe-run", "form'),
    "manifest is a list": _write(MANIFEST, b"[1, 2]"),
    "manifest is a directory": _replace_by_dir(MANIFEST),
    "model null": _manifest_edit(lambda m: m.update(model=None)),
    "model a string": _manifest_edit(lambda m: m.update(model="Net")),
    "parameters not a list": _manifest_edit(lambda m: m["model"].update(parameters={"a": 1})),
    "parameter shape with a string": _manifest_edit(lambda m: m["model"]["parameters"][0].update(shape=["2", 3])),
    "parameter dtype unknown": _manifest_edit(lambda m: m["model"]["parameters"][0].update(dtype="float99")),
    "parameter numel wrong": _manifest_edit(lambda m: m["model"]["parameters"][0].update(numel=7)),
    "parameter offset wrong": _manifest_edit(lambda m: m["model"]["parameters"][1].update(offset=0)),
    "num_parameters 2^40": _manifest_edit(lambda m: m["model"].update(num_parameters=2**40)),
    "buffer spec not an object": _manifest_edit(lambda m: m["model"].update(buffers=[5])),
    "status 5": _manifest_edit(lambda m: m.update(status=5)),
    "huge pid": _manifest_edit(lambda m: (m.update(status="running"),
                                          m["writer"].update(pid=10**30, host=socket.gethostname()))),
    "pid a string": _manifest_edit(lambda m: m["writer"].update(pid="1234")),
    "config a list": _manifest_edit(lambda m: m.update(config=[1])),
    "conventions a number": _manifest_edit(lambda m: m.update(conventions=5)),
    "eval.n negative": _manifest_edit(lambda m: m["eval"].update(n=-1)),
    "eval a string": _manifest_edit(lambda m: m.update(eval="x")),
    "format_version a string": _manifest_edit(lambda m: m.update(format_version="1")),
    "format_version newer": _manifest_edit(lambda m: m.update(format_version=99)),
    "resumes a number": _manifest_edit(lambda m: m.update(resumes=5)),
    # event log
    "snapshot step '../x'": _snapshot_edit(2, step="../x"),
    "snapshot step negative": _snapshot_edit(2, step=-4),
    "snapshot step 10^30": _snapshot_edit(4, step=10**30),
    "snapshot steps decrease": _snapshot_edit(3, step=1),
    "snapshot index repeated": _snapshot_edit(2, snapshot_index=1),
    "snapshot without snapshot_index": _events_edit(
        lambda ev: [e.pop("snapshot_index") for e in ev if e["event"] == "snapshot"][:0]),
    "snapshot eval_loss a string": _snapshot_edit(1, eval_loss="low"),
    "snapshot kernel 'yes'": _snapshot_edit(1, kernel="yes"),
    "ghost id a string": _first("ghost_spawn", ghost="1"),
    "ghost control 'no'": _first("ghost_spawn", control="no"),
    "ghost seed a float": _first("ghost_spawn", seed=0.5),
    "ghost spawn without a kind": _events_edit(lambda ev: next(e for e in ev if e["event"] == "ghost_spawn")
                                               .pop("kind") and None),
    "ghost status 5": _first("ghost_status", status=5),
    "ghost compare C a string": _first("ghost_compare", C="0.1"),
    "event without a name": _first("ghost_compare", event=None),
    "event line a JSON list": _append_line(EVENTS, "[1, 2, 3]"),
    "garbage line in the middle": lambda root: (root / EVENTS).write_text(
        (root / EVENTS).read_text().replace("\n", "\n{garbage\n", 3)),
    "invalid UTF-8 in a line": lambda root: (root / EVENTS).write_bytes(
        (root / EVENTS).read_bytes().replace(b"\n", b"\n\xff\xfe\n", 2)),
    "two writers interleaved": _events_edit(_interleaved_second_writer),
    "100k snapshot lines": _many_snapshot_lines,
    "events is a directory": _replace_by_dir(EVENTS),
    # arrays
    "params is a zip": _write(_snap(2, "params"), _zip_of("a.npy", _npy_bytes(np.zeros(8, np.float32)))),
    "params header declares 2^40 elements": _write(_snap(2, "params"), _npy_header((2**40,))),
    "params of another shape": _write(_snap(2, "params"), _npy_bytes(np.zeros(9, np.float32))),
    "params truncated": lambda root: (root / _snap(2, "params")).write_bytes(
        (root / _snap(2, "params")).read_bytes()[:-10]),
    "params holds pickled objects": _write(_snap(2, "params"), _npy_bytes(np.array([{"x": 1}], dtype=object))),
    "params npy version 9": _write(_snap(2, "params"), b"\x93NUMPY\x09\x00" + b"\0" * 64),
    "params missing": lambda root: (root / _snap(2, "params")).unlink(),
    "preds garbage": _write(_snap(4, "preds"), b"not an array"),
    "preds of another length": _write(_snap(4, "preds"), _npy_bytes(np.zeros(EVAL_N + 1, np.int16))),
    "buffers not a zip": _write(_snap(4, "buffers"), _npy_bytes(np.zeros(2, np.float32))),
    "buffers member declares 2^40": _write(_snap(4, "buffers"), _zip_of("running_mean.npy", _npy_header((2**40,)))),
    "buffers member of another shape": _write(_snap(4, "buffers"),
                                              _zip_of("running_mean.npy", _npy_bytes(np.zeros(5, np.float32)))),
    "kernel truncated": lambda root: (root / _snap(6, "kernel")).write_bytes(
        (root / _snap(6, "kernel")).read_bytes()[:90]),
    "ghost preds declares 2^40": _write(_snap(4, "ghost_001.preds"), _npy_header((2**40,), "<i2")),
    "eval_indices of another shape": _write("eval_indices.npy", _npy_bytes(np.arange(3))),
    "snapshot folder is a file": lambda root: (shutil.rmtree(snapshot_dir(root, 6)),
                                               snapshot_dir(root, 6).write_bytes(b"x")),
    # metric rows and records
    "C rows cut to 3 rows": lambda root: open(rows_path(root, "C"), "r+b").truncate(6 * 8),
    "C rows missing": lambda root: rows_path(root, "C").unlink(),
    "D rows empty": lambda root: rows_path(root, "D").write_bytes(b""),
    "barrier i a list": _append_line(B_PATH, json.dumps({"i": [1], "j": 0, "value": 0.1})),
    "barrier value a string": _append_line(B_PATH, json.dumps({"i": 2, "j": 0, "value": "high"})),
    "barrier line garbage": lambda root: (root / B_PATH).write_text("{oops\n" + (root / B_PATH).read_text()),
    "barriers file is a directory": _replace_by_dir(B_PATH),
    "switching eval_loss a string": _append_line(SWITCHING_PATH, json.dumps(
        {"switch_step": 6, "total_steps": 8, "eval_loss": "x", "eval_accuracy": 0.5})),
    "switching without switch_step": _append_line(SWITCHING_PATH, json.dumps(
        {"total_steps": 8, "eval_loss": 1.0, "eval_accuracy": 0.5})),
    "separation steps go back": lambda root: separation_path(root, 1).write_bytes(
        np.array([(5.0, 1.0), (3.0, 1.0)]).tobytes()),
}


def touch_everything(path):
    """load_run and every accessor; returns what was reported as damaged (errors and warnings). Any exception
    other than RunFormatError propagates: that is the traceback a damaged run must never give."""
    noticed = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run = dynprobe.load_run(path)
        except RunFormatError as error:
            return [f"load_run: {error}"]
        checks = [
            lambda: run.steps, lambda: run.C, lambda: run.D, lambda: run.S, lambda: run.B, lambda: run.B_linear,
            lambda: run.eval_loss, lambda: run.eval_accuracy, lambda: run.train_loss, lambda: run.lr,
            lambda: run.ghosts, lambda: run.chaos, lambda: run.switching, lambda: run.switching_configs,
            lambda: run.status, lambda: run.summary(), lambda: repr(run), lambda: run.disk_usage,
            lambda: run.eval_indices, lambda: run.kernel_steps, lambda: run.kernel_velocity(),
            lambda: run.has_kernels, lambda: run.config, lambda: run.conventions, lambda: run.num_parameters,
        ]
        for i in range(len(run)):
            checks += [lambda i=i: run.params(snapshot_index=i),
                       lambda i=i: np.asarray(run.params(snapshot_index=i, mmap=False)),
                       lambda i=i: run.buffers(snapshot_index=i), lambda i=i: run.predictions(snapshot_index=i),
                       lambda i=i: run.state_dict(snapshot_index=i), lambda i=i: run.kernel(snapshot_index=i)]
        ghosts = []
        try:
            ghosts = [g.ghost_id for g in run.ghosts]
        except RunFormatError:
            pass
        for g in ghosts:
            checks.append(lambda g=g: run.separation(g))
            for i in range(1, len(run)):
                checks.append(lambda g=g, i=i: run.ghost_predictions(g, snapshot_index=i))
        for check in checks:
            try:
                check()
            except RunFormatError as error:
                noticed.append(str(error))
    noticed += [str(w.message) for w in caught if issubclass(w.category, RunFormatWarning)]
    return noticed


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine") / "run"
    write_small_run(root)
    return root


def test_the_pristine_run_reports_no_damage_and_reads_back_what_was_written(tmp_path):
    """Every accessor of the undamaged run answers, and with the written values: arrays bit for bit, C (eq. 1) and
    D (eq. 6) against naive float64 loops over the parameters and predictions read back, ghosts as spawned."""
    truth = write_small_run(tmp_path / "run")
    assert touch_everything(tmp_path / "run") == []
    run = dynprobe.load_run(tmp_path / "run")
    T = len(truth["steps"])
    np.testing.assert_array_equal(run.steps, truth["steps"])
    for k, step in enumerate(truth["steps"]):
        np.testing.assert_array_equal(run.params(snapshot_index=k), truth["theta"][k])
        np.testing.assert_array_equal(run.params(step=int(step)), truth["theta"][k])
        np.testing.assert_array_equal(run.buffers(snapshot_index=k)["running_mean"], truth["theta"][k, :2])
        np.testing.assert_array_equal(run.predictions(snapshot_index=k), truth["preds"][k])
        np.testing.assert_array_equal(run.kernel(snapshot_index=k), truth["kernels"][k])
    for i in range(T):
        for j in range(T):
            a, b = (run.params(snapshot_index=i).astype(np.float64), run.params(snapshot_index=j).astype(np.float64))
            dot = sum(x * y for x, y in zip(a, b))
            cosine = dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
            assert run.C[i, j] == pytest.approx(1 - cosine, rel=1e-9, abs=1e-12), (i, j)
            differing = sum(int(x != y) for x, y in zip(run.predictions(snapshot_index=i),
                                                        run.predictions(snapshot_index=j)))
            assert run.D[i, j] == differing / EVAL_N, (i, j)
    np.testing.assert_array_equal(run.eval_loss, [1.0 / (k + 1) for k in range(T)])
    np.testing.assert_array_equal(run.train_loss, [np.nan] + [1.5 / k for k in range(1, T)])
    assert [(g.ghost_id, g.control, g.spawn_step, g.status) for g in run.ghosts] == [
        (0, True, 2, "finished"), (1, False, 2, "finished")]
    for k in range(1, T):
        np.testing.assert_array_equal(run.ghost_predictions(1, snapshot_index=k), truth["preds"][k])


def test_every_damaged_case_damages_a_different_part_of_the_pristine_run(pristine, tmp_path):
    """The damage catalogue is not padded: each case leaves a run directory different from every other case's."""
    contents = {}
    for case in sorted(DAMAGED):
        root = tmp_path / case.replace(" ", "_").replace("/", "_")
        shutil.copytree(pristine, root)
        DAMAGED[case](root)
        contents[case] = tuple(sorted((str(f.relative_to(root)), f.read_bytes()) for f in root.rglob("*")
                                      if f.is_file()))
    pristine_content = tuple(sorted((str(f.relative_to(pristine)), f.read_bytes()) for f in pristine.rglob("*")
                                    if f.is_file()))
    assert len(DAMAGED) >= 40
    assert pristine_content not in contents.values()
    assert len(set(contents.values())) == len(DAMAGED)


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_run_is_a_run_format_error_never_a_traceback(pristine, tmp_path, case):
    root = tmp_path / "run"
    shutil.copytree(pristine, root)
    DAMAGED[case](root)
    noticed = touch_everything(root)
    assert noticed, f"{case}: the damage went unnoticed"


def test_a_damaged_event_log_keeps_its_committed_prefix(pristine, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(pristine, root)
    _events_edit(_interleaved_second_writer)(root)
    with pytest.warns(RunFormatWarning, match=r"snapshot\) has snapshot_index 0 where the next snapshot's index is 3"):
        run = dynprobe.load_run(root)
    assert list(run.steps) == [0, 2, 4] and run.C.shape == (3, 3) and run.damage
    np.testing.assert_array_equal(run.params(step=4), dynprobe.load_run(pristine).params(step=4))


def test_a_huge_claimed_snapshot_count_is_bounded_by_the_row_files(pristine, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(pristine, root)
    _many_snapshot_lines(root)
    with pytest.warns(RunFormatWarning, match="commits 100000 snapshots but .* holds metric rows for 5"):
        run = dynprobe.load_run(root)
    assert len(run) == 5 and run.C.shape == (5, 5) and run.B.shape == (5, 5)


def test_run_lr_holds_the_rate_of_every_optimizer_step_and_param_group(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.SGD([{"params": model[0].parameters()},
                                 {"params": model[2].parameters(), "lr": 0.05}], lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    used = []  # independently: the rates each update used, read in the loop before optimizer.step()
    with dynprobe.Probe(model, optimizer, eval_data=(x, y), out=tmp_path / "r", schedule=5) as probe:
        criterion = probe.watch(torch.nn.CrossEntropyLoss())
        for _ in range(20):
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            used.append([group["lr"] for group in optimizer.param_groups])
            optimizer.step()
            scheduler.step()
    run = dynprobe.load_run(tmp_path / "r")
    assert run.lr.shape == (20, 2)
    np.testing.assert_array_equal(run.lr, np.array(used))
    assert not any("lr" in record for record in run.snapshots)  # one owner: the per-step logs, not the records
    changes = dynprobe.analysis.lr_changes(run.lr)
    assert [(c.step, c.group) for c in changes] == [(7, 0), (7, 1), (14, 0), (14, 1)]
    assert changes[0].text == "the lr drop ÷10 at step 7"


@pytest.mark.parametrize("steps", [(0, 2, 4, 6, 8), (0, 1, 5, 100, 101, 5000)])
def test_snapshot_positions_by_step_and_by_index_agree_with_a_brute_force_search(tmp_path, steps):
    write_small_run(tmp_path / "run", steps=steps, ghosts=False)
    run = Run(tmp_path / "run")
    assert isinstance(dynprobe.load_run(tmp_path / "run"), Run)
    for step in range(-1, steps[-1] + 2):
        positions = [k for k, s in enumerate(steps) if s == step]
        if positions:
            assert run.snapshot_index_of(step) == positions[0]
            np.testing.assert_array_equal(run.params(step=step), run.params(snapshot_index=positions[0]))
        else:
            below = [s for s in steps if s < step][-1:]
            above = [s for s in steps if s > step][:1]
            with pytest.raises(KeyError, match=rf"step {step} was not recorded; nearest recorded steps: "
                                               rf"\[{', '.join(map(str, below + above))}\]"):
                run.snapshot_index_of(step)
    for position in range(-len(steps), len(steps)):
        np.testing.assert_array_equal(run.predictions(snapshot_index=position),
                                      run.predictions(step=steps[position]))
