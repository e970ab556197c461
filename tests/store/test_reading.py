"""Readers of the run format on hostile or damaged directories (dynprobe/store/reading.py): every case raises
RunFormatError naming the file, in bounded time and memory, and ``dynprobe show`` exits 3 — never hangs on a FIFO,
reads /dev/zero forever, recurses into nested JSON or allocates what a sparse file or a zip bomb declares."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import dynprobe
from dynprobe.cli import EXIT_BAD_RUN, main
from dynprobe.store import reading
from dynprobe.store.files import RunFormatWarning, load_npy, read_jsonl_prefix, read_manifest
from dynprobe.store.reading import json_depth, open_regular, parse_json
from dynprobe.store.run import Run

from ..hostile_runs import CASES, build_case, write_base_run

BOUND_S = 10.0  # loose: each case takes milliseconds; a regression takes minutes or never ends
NON_BLOCKING = [name for name, case in CASES.items() if not case.blocks]
BLOCKING = [name for name, case in CASES.items() if case.blocks]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return write_base_run(tmp_path_factory.mktemp("base") / "run")


def _open_and_read(root, name):
    """Open the run and make the case's reader call; the RunFormatError it raises, or the RunFormatWarning of a
    damaged event log (None when neither)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run = Run(root)
            if CASES[name].read is not None:
                CASES[name].read(run)
        except dynprobe.RunFormatError as error:
            return error
    damage = [w.message for w in caught if issubclass(w.category, RunFormatWarning)]
    return damage[0] if damage and CASES[name].prefix else None


@pytest.mark.parametrize("name", NON_BLOCKING)
def test_hostile_file_raises_run_format_error_quickly(base_run, tmp_path, name):
    root = build_case(base_run, name, tmp_path / "run")
    started = time.perf_counter()
    error = _open_and_read(root, name)
    assert error is not None, f"{name}: no RunFormatError (or RunFormatWarning for damage in the event log)"
    assert str(root) in str(error)  # the message names the file
    assert time.perf_counter() - started < BOUND_S


@pytest.mark.parametrize("name", NON_BLOCKING)
def test_show_on_a_hostile_run_exits_3_or_shows_what_is_intact(base_run, tmp_path, name, capsys):
    root = build_case(base_run, name, tmp_path / "run")
    started = time.perf_counter()
    code = main(["show", str(root)])
    assert time.perf_counter() - started < BOUND_S
    # Files show does not read (a per-layer kernel, buffers, a separation log) leave the summary intact.
    assert code in (0, EXIT_BAD_RUN)
    if CASES[name].read is None:
        assert code == (0 if CASES[name].prefix else EXIT_BAD_RUN), capsys.readouterr().err


_FIFO_SCRIPT = """
import sys, time, warnings
warnings.simplefilter("ignore")
from dynprobe.cli import main
from dynprobe.store.run import Run
from tests.hostile_runs import CASES
for name, root in zip(sys.argv[1::2], sys.argv[2::2]):
    started = time.perf_counter()
    try:
        run = Run(root)
        if CASES[name].read is not None:
            CASES[name].read(run)
        outcome = "read"
    except ValueError as error:
        outcome = type(error).__name__
    code = main(["show", root])
    print("RESULT", name, outcome, code, round(time.perf_counter() - started, 3), sep="|", flush=True)
"""


def test_fifos_are_refused_without_blocking(base_run, tmp_path):
    args = []
    for i, name in enumerate(BLOCKING):
        args += [name, str(build_case(base_run, name, tmp_path / f"run{i}"))]
    # A subprocess with a timeout: a regression that opens a FIFO blocks forever, and must not hang the suite.
    done = subprocess.run([sys.executable, "-c", _FIFO_SCRIPT, *args], capture_output=True, text=True, timeout=120,
                          cwd=str(Path(__file__).resolve().parents[2]))
    assert done.returncode == 0, done.stderr
    lines = [line.split("|")[1:] for line in done.stdout.splitlines() if line.startswith("RESULT|")]
    assert [line[0] for line in lines] == BLOCKING
    for name, outcome, code, _ in lines:
        assert outcome == "RunFormatError", name
        assert int(code) in (0, EXIT_BAD_RUN), name
        if CASES[name].read is None:
            assert int(code) == EXIT_BAD_RUN, name


def test_load_runs_skip_survives_every_hostile_run(base_run, tmp_path):
    for i, name in enumerate(NON_BLOCKING + BLOCKING):
        build_case(base_run, name, tmp_path / f"sweep-{i:02d}")
    build_case(base_run, "folder at params.npy", tmp_path / "sweep-zz")  # opens fine: it is kept
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = dynprobe.load_runs(tmp_path / "sweep-*", errors="skip")
    opened = {run.path.name for run in runs}
    refused_at_open = {f"sweep-{i:02d}" for i, name in enumerate(NON_BLOCKING + BLOCKING)
                       if CASES[name].read is None and not CASES[name].prefix}
    assert opened.isdisjoint(refused_at_open) and "sweep-zz" in opened
    assert sum("skipped" in str(w.message) for w in caught) == len(refused_at_open)


def test_open_regular_refuses_a_fifo_folder_and_device(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "folder").mkdir()
    for path in (tmp_path / "pipe", tmp_path / "folder", "/dev/zero"):
        with pytest.raises(dynprobe.RunFormatError, match="regular file|cannot be read"):
            open_regular(path)
    with pytest.raises(FileNotFoundError):
        open_regular(tmp_path / "missing")


def test_json_depth_ignores_brackets_inside_strings():
    assert json_depth(b'{"a": "[[[[{{{{", "b": [[1]]}') == 3
    assert json_depth(b'"\\"[[["') == 0
    assert parse_json(json.dumps({"s": "[" * 500}).encode(), "x") == {"s": "[" * 500}
    with pytest.raises(dynprobe.RunFormatError, match="nested more than"):
        parse_json(b"[" * 65 + b"]" * 65, "x")
    assert parse_json(b"[" * 64 + b"]" * 64, "x") is not None


def test_a_line_longer_than_the_cap_ends_the_valid_prefix(tmp_path, monkeypatch):
    path = tmp_path / "e.jsonl"
    path.write_bytes(b'{"a": 1}\n' + b'{"b": "' + b"x" * 5000 + b'"}\n{"c": 3}\n')
    monkeypatch.setattr("dynprobe.store.reading.MAX_LINE_BYTES", 1000)
    monkeypatch.setattr("dynprobe.store.reading._CHUNK", 64)  # lines split across many chunks
    records, problem = read_jsonl_prefix(path)
    assert records == [{"a": 1}] and "line 2 is longer" in problem


def test_chunked_jsonl_reading_matches_the_whole_file(tmp_path, monkeypatch):
    lines = [{"event": "e", "i": i, "pad": "y" * (i * 7 % 50)} for i in range(200)]
    path = tmp_path / "e.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in lines) + b'{"torn": ')
    monkeypatch.setattr(reading, "_CHUNK", 37)
    assert read_jsonl_prefix(path) == (lines, None)


def test_npy_loads_c_and_fortran_order_and_empty_arrays(tmp_path):
    for array in (np.arange(12.0).reshape(3, 4), np.asfortranarray(np.arange(12.0).reshape(3, 4)),
                  np.zeros((0, 3), dtype=np.int16)):
        np.save(tmp_path / "a.npy", array)
        for mmap in (False, True):
            loaded = load_npy(tmp_path / "a.npy", mmap=mmap)
            assert loaded.dtype == array.dtype and np.array_equal(loaded, array)


def test_a_manifest_over_the_size_cap_is_refused_before_reading(tmp_path, monkeypatch):
    root = write_base_run(tmp_path / "run")
    monkeypatch.setattr("dynprobe.store.files.read_small_file.__kwdefaults__", {"limit": 100})
    with pytest.raises(dynprobe.RunFormatError, match="at most 100 bytes"):
        read_manifest(root)
