"""Run-directory primitives: atomic files, torn append-only records, manifest validation."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dynprobe.store import files as store
from dynprobe.store.files import RunFormatError
from dynprobe.store.rows import TriangularRows


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
