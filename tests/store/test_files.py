"""Run-directory primitives: atomic files, torn append-only records, safe array loading, links, the layout."""
from __future__ import annotations

import ast
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dynprobe.store import files as store
from dynprobe.store import layout
from dynprobe.store.files import RunFormatError
from dynprobe.store.rows import PairLog, TriangularRows


def test_triangular_rows_round_trip_to_a_symmetric_matrix(tmp_path):
    rows = TriangularRows(tmp_path / "M.rows")
    full = np.array([[0, 1, 2], [1, 0, 3], [2, 3, 0]], dtype=float)
    for i in range(3):
        rows.append(full[i, : i + 1], i)
    np.testing.assert_array_equal(rows.read(3), full)
    assert rows.complete_rows() == 3


def test_a_torn_row_is_not_counted_and_is_truncated_before_the_next_append(tmp_path):
    rows = TriangularRows(tmp_path / "M.rows")
    rows.append(np.array([0.0]), 0)
    with open(rows.path, "ab") as handle:
        handle.write(np.array([5.0]).tobytes())  # half of row 1
    assert rows.complete_rows() == 1
    rows.append(np.array([7.0, 0.0]), 1)
    np.testing.assert_array_equal(rows.read(2), [[0, 7], [7, 0]])


def test_reading_more_rows_than_stored_gives_nan(tmp_path):
    rows = TriangularRows(tmp_path / "M.rows")
    rows.append(np.array([0.0]), 0)
    matrix = rows.read(2)
    assert matrix[0, 0] == 0 and np.isnan(matrix[1]).all()


def test_row_length_is_checked(tmp_path):
    with pytest.raises(ValueError, match="must have 1 entries"):
        TriangularRows(tmp_path / "M.rows").append(np.array([1.0, 2.0]), 0)


def test_jsonl_ignores_a_torn_last_line_but_not_a_corrupt_middle(tmp_path):
    path = tmp_path / "e.jsonl"
    store.append_jsonl(path, {"a": 1})
    with open(path, "a") as handle:
        handle.write('{"b": ')
    assert store.read_jsonl(path) == [{"a": 1}]
    path.write_text('{"a": 1}\n{oops\n{"c": 3}\n')
    with pytest.raises(RunFormatError, match="line 2"):
        store.read_jsonl(path)


def test_atomic_npy_leaves_no_temporary_files_and_refuses_objects(tmp_path):
    store.atomic_save_npy(tmp_path / "a.npy", np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]
    with pytest.raises(TypeError, match="object"):
        store.atomic_save_npy(tmp_path / "b.npy", np.array([{"x": 1}], dtype=object))


def test_load_npy_never_unpickles(tmp_path):
    np.save(tmp_path / "evil.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(RunFormatError, match="Python objects"):
        store.load_npy(tmp_path / "evil.npy")


def _manifest(tmp_path, **fields):
    data = {"format": store.FORMAT_NAME, "format_version": store.FORMAT_VERSION, **fields}
    (tmp_path / "run.json").write_text(json.dumps(data))


def test_read_manifest_errors(tmp_path):
    with pytest.raises(RunFormatError, match="does not exist"):
        store.read_manifest(tmp_path / "nope")
    with pytest.raises(RunFormatError, match="no run.json"):
        store.read_manifest(tmp_path)
    (tmp_path / "run.json").write_text('{"format": "dynprobe-run", "form')
    with pytest.raises(RunFormatError, match="truncated"):
        store.read_manifest(tmp_path)
    _manifest(tmp_path, format_version=store.FORMAT_VERSION + 1)
    with pytest.raises(RunFormatError, match="upgrade dynprobe"):
        store.read_manifest(tmp_path)
    (tmp_path / "run.json").write_text('{"something": "else"}')
    with pytest.raises(RunFormatError, match="not a dynprobe run manifest"):
        store.read_manifest(tmp_path)


def test_appending_after_a_torn_line_cuts_it_first(tmp_path):
    path = tmp_path / "e.jsonl"
    store.append_jsonl(path, {"a": 1})
    with open(path, "a") as handle:
        handle.write('{"torn": ')
    store.append_jsonl(path, {"b": 2})
    assert store.read_jsonl(path) == [{"a": 1}, {"b": 2}]


# ---------------------------------------------------------------------------------------------- atomic files


def test_atomic_write_replaces_whole_files_and_cleans_up_after_a_failure(tmp_path):
    path = tmp_path / "f.json"
    store.atomic_write_json(path, {"a": 1}, durable=True)
    assert json.loads(path.read_text()) == {"a": 1}

    def fail(handle):
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.atomic_write(path, fail)
    assert json.loads(path.read_text()) == {"a": 1}  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]  # no temporary file left
    store.atomic_write(tmp_path / "shared.html", b"x", mode=0o644)
    assert (tmp_path / "shared.html").stat().st_mode & 0o777 == 0o644


def test_an_atomic_write_replaces_a_link_instead_of_following_it(tmp_path):
    (tmp_path / "outside.txt").write_text("keep")
    (tmp_path / "run.json").symlink_to(tmp_path / "outside.txt")
    store.atomic_write_json(tmp_path / "run.json", {"a": 1})
    assert (tmp_path / "outside.txt").read_text() == "keep" and not (tmp_path / "run.json").is_symlink()


def test_appends_and_truncations_never_follow_a_link(tmp_path):
    (tmp_path / "outside").write_bytes(b"keep\n")
    (tmp_path / "e.jsonl").symlink_to(tmp_path / "outside")
    for action in (lambda: store.append_jsonl(tmp_path / "e.jsonl", {"a": 1}),
                   lambda: store.truncate_torn_tail(tmp_path / "e.jsonl"),
                   lambda: store.truncate_file(tmp_path / "e.jsonl", 0),
                   lambda: store.append_bytes(tmp_path / "e.jsonl", b"x"),
                   lambda: PairLog(tmp_path / "e.jsonl").append(np.zeros(1), np.zeros(1))):
        with pytest.raises(RunFormatError, match="symbolic link"):
            action()
    assert (tmp_path / "outside").read_bytes() == b"keep\n"


def test_check_no_links_finds_links_at_any_depth(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    store.check_no_links(tmp_path)
    (tmp_path / "a" / "b" / "link").symlink_to("/etc")
    with pytest.raises(RunFormatError, match="a/b/link is a symbolic link \\(to '/etc'\\)"):
        store.check_no_links(tmp_path)


# ---------------------------------------------------------------------------------------------- JSON lines


def test_read_jsonl_prefix_stops_at_the_first_damaged_line(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"a": 1}\n[2]\n{"c": 3}\n')
    records, problem = store.read_jsonl_prefix(path)
    assert records == [{"a": 1}] and "line 2 is not a JSON object" in problem
    assert store.read_jsonl(path, strict=False) == [{"a": 1}]
    with pytest.raises(RunFormatError, match="line 2"):
        store.read_jsonl(path)
    assert store.read_jsonl_prefix(tmp_path / "missing.jsonl") == ([], None)


def test_read_jsonl_from_reads_only_new_complete_lines(tmp_path):
    path = tmp_path / "e.jsonl"
    assert store.read_jsonl_from(path, 0) == ([], 0)
    store.append_jsonl(path, {"a": 1})
    with open(path, "a") as handle:
        handle.write('{"b": ')
    records, offset = store.read_jsonl_from(path, 0)
    assert records == [{"a": 1}] and offset == len(b'{"a":1}\n')
    with open(path, "a") as handle:
        handle.write('2}\n')
    assert store.read_jsonl_from(path, offset) == ([{"b": 2}], path.stat().st_size)


def test_truncate_torn_tail_on_a_file_without_any_newline(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_bytes(b'{"half": ')
    store.truncate_torn_tail(path)
    assert path.read_bytes() == b""
    big = b"".join(b'{"i": %d}\n' % i for i in range(20000)) + b'{"torn'  # the newline is > 64 KiB back
    path.write_bytes(big)
    store.truncate_torn_tail(path)
    assert path.read_bytes() == big[: big.rfind(b"\n") + 1]


# ---------------------------------------------------------------------------------------------- arrays


def _header(shape, descr="<f8"):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_2_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def test_array_headers_are_checked_before_anything_is_allocated(tmp_path):
    (tmp_path / "huge.npy").write_bytes(_header((2**20, 2**20)) + b"\0" * 100)
    with pytest.raises(RunFormatError, match=r"declares shape \(1048576, 1048576\) .* only 100 bytes follow"):
        store.load_npy(tmp_path / "huge.npy")
    np.savez(tmp_path / "a.npz", x=np.arange(3))
    (tmp_path / "a.npz").rename(tmp_path / "zip.npy")
    with pytest.raises(RunFormatError, match="is a zip archive"):
        store.load_npy(tmp_path / "zip.npy")
    np.save(tmp_path / "m.npy", np.zeros((4, 3)))
    assert store.load_npy(tmp_path / "m.npy", shape=(4, ...)).shape == (4, 3)
    with pytest.raises(RunFormatError, match=r"holds shape \(4, 3\); the run's manifest says \(5, ...\)"):
        store.load_npy(tmp_path / "m.npy", shape=(5, ...))
    with pytest.raises(RunFormatError, match="missing"):
        store.load_npy(tmp_path / "absent.npy")


def test_npz_members_are_checked_and_never_unpickled(tmp_path):
    np.savez(tmp_path / "ok.npz", x=np.arange(3), y=np.zeros(2))
    arrays = store.load_npz(tmp_path / "ok.npz", shapes={"x": (3,)})
    np.testing.assert_array_equal(arrays["x"], np.arange(3))
    with pytest.raises(RunFormatError, match=r"holds shape \(3,\)"):
        store.load_npz(tmp_path / "ok.npz", shapes={"x": (4,)})
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as archive:
        archive.writestr("x.npy", _header((2**40,)))
    with pytest.raises(RunFormatError, match="declares shape"):
        store.load_npz(tmp_path / "bomb.npz")
    np.savez(tmp_path / "evil.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(RunFormatError, match="Python objects"):
        store.load_npz(tmp_path / "evil.npz")
    with open(tmp_path / "plain.npz", "wb") as handle:
        np.save(handle, np.arange(3))
    with pytest.raises(RunFormatError, match="not a zip file"):
        store.load_npz(tmp_path / "plain.npz")


# ---------------------------------------------------------------------------------------------- pair logs


def test_pair_log_appends_reads_and_cuts(tmp_path):
    log = PairLog(tmp_path / "x.separation")
    assert log.read()[0].size == 0
    log.append(np.array([0, 1, 2]), np.array([0.0, 0.5, 1.5]))
    with open(log.path, "ab") as handle:
        handle.write(b"\1\2\3")  # a pair torn by a kill
    steps, values = log.read()
    assert steps.dtype == np.int64 and steps.tolist() == [0, 1, 2] and values.tolist() == [0.0, 0.5, 1.5]
    log.append(np.array([3]), np.array([2.5]))  # the torn pair is cut first
    assert log.read()[0].tolist() == [0, 1, 2, 3]
    log.truncate_after(1)
    assert log.read()[0].tolist() == [0, 1]
    with pytest.raises(ValueError, match="2 steps but 1 values"):
        log.append(np.array([5, 6]), np.array([1.0]))
    log.remove()
    assert not log.path.exists()


# ---------------------------------------------------------------------------------------------- layout


FILE_NAMES = re.compile(r"run\.json|events\.jsonl|eval_indices\.npy|kernel_probe_indices\.npy|\.rows\b|B\.jsonl|"
                        r"results\.jsonl|train_loss\.f8|writer\.lock|step_\{|step_%|\.separation|params\.npy|"
                        r"preds\.npy|buffers\.npz|kernel\.npy|\bmetrics/|\bsnapshots/|\bswitching/|\bghosts/")
# String literals naming such files that are not paths of a run directory.
NOT_RUN_PATHS = {
    ("dynprobe/distributed/sink.py", ".rows"),  # a rank's private scratch folder
    ("dynprobe/recording/cost.py", "params.npy"),  # a temporary file timing one parameter write
    ("dynprobe/recording/kernel_probe.py", "kernel_probe_indices.npy"),  # prose of a convention string
}


def _docstring_ids(tree):
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def test_every_run_directory_file_name_is_spelled_only_in_the_layout():
    root = Path(__file__).resolve().parents[2]
    found = []
    for folder in ("dynprobe", "integrations"):
        for path in sorted((root / folder).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            if relative == "dynprobe/store/layout.py":
                continue
            tree = ast.parse(path.read_text())
            skip = _docstring_ids(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                    for match in FILE_NAMES.finditer(node.value):
                        if (relative, match.group()) not in NOT_RUN_PATHS:
                            found.append(f"{relative}:{node.lineno}: {node.value[:60]!r}")
    assert not found, "use dynprobe.store.layout names instead of:\n" + "\n".join(found)


def test_layout_paths():
    root = Path("r")
    assert layout.snapshot_file(root, 100, layout.PARAMS) == Path("r/snapshots/step_00000100/params.npy")
    assert layout.snapshot_file(root, 100, layout.BUFFERS).name == "buffers.npz"
    assert layout.snapshot_archive(root, 3, "buffers") == Path("r/snapshots/step_00000003/buffers.npz")
    assert layout.separation_path(root, 7) == Path("r/ghosts/ghost_007.separation")
    assert layout.run_array_path(root, layout.EVAL_INDICES) == layout.run_array_path(root, "eval_indices")
    assert layout.is_temporary(".params.npy.abcd1234.tmp") and not layout.is_temporary("params.npy")
    assert layout.set_aside_dir(Path("r"), "T") == Path("r/set-aside-T")
