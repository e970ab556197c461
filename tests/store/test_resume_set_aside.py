"""Resume never deletes (dynprobe/store/resume.py, set_aside.py, rebuild.py): what it drops is moved or copied to
set-aside-STAMP/, a refused resume leaves the run byte for byte as it was, derived row files are rebuilt from the
snapshots instead of cutting snapshots away, and a missing old params.npy is a clear refusal."""
from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

import dynprobe
from dynprobe.store.layout import EVENTS, LOCK, MANIFEST, rows_path, snapshot_file
from dynprobe.store.rows import TriangularRows
from dynprobe.store.writer import RunWriter

from ..conftest import mlp_setup, train
from ..small_runs import manifest, write_small_run


def _tree(root: Path) -> dict[str, str]:
    """Every file of the run by path, as a hash of its bytes (the lock file's holder record aside: the refused
    writer held the lock while it checked)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK}


def _assert_nothing_deleted(before: dict[str, str], root: Path) -> None:
    """Each file the run held is still there unchanged, or its original bytes are under set-aside-*/ at the same
    path — but the manifest (updated, every field kept) and the materialized matrices (copies of the row files)."""
    after = _tree(root)
    for path, digest in before.items():
        kept = [after.get(path)] + [after.get(str(Path(a.name) / path)) for a in root.glob("set-aside-*")]
        derived = path == MANIFEST or (path.startswith("metrics/") and path.endswith(".npy"))
        assert derived or digest in kept, f"{path}: its original bytes are gone"


def _damage_line(root: Path, snapshot: int) -> None:
    lines = (root / EVENTS).read_bytes().split(b"\n")
    position = [i for i, line in enumerate(lines) if b'"snapshot"' in line][snapshot]
    lines[position] = lines[position][:20] + b"#damaged"
    (root / EVENTS).write_bytes(b"\n".join(lines))


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe") / "run"
    model, optimizer, scheduler, data = mlp_setup()
    with dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=root, schedule=2):
        train(model, optimizer, scheduler, data, 12)
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _resume_probe(root: Path, step: int | None, *, model_step: int) -> None:
    model, optimizer, scheduler, data = mlp_setup()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_state_dict(dynprobe.load_run(root).state_dict(step=model_step), strict=False)
        with dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=root, schedule=2,
                            resume=True, resume_step=step):
            train(model, optimizer, scheduler, data, 2)


def test_a_refused_resume_changes_nothing_on_disk(probe_run, tmp_path):
    root = _copy(probe_run, tmp_path / "run")
    _damage_line(root, 2)  # the resume would cut the log to its first 2 snapshots and move the rest aside
    before = _tree(root)
    model, optimizer, _, data = mlp_setup()  # parameters of step 0, not of the resume step 2: refused
    with pytest.raises(ValueError, match="parameters differ from the run's snapshot at step 2"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=root, schedule=2, resume=True)
    assert _tree(root) == before
    assert not list(root.glob("set-aside-*"))


def test_a_damaged_line_moves_the_later_snapshots_aside_instead_of_deleting_them(probe_run, tmp_path):
    root = _copy(probe_run, tmp_path / "run")
    _damage_line(root, 3)
    before = _tree(root)
    _resume_probe(root, None, model_step=4)
    _assert_nothing_deleted(before, root)
    (aside,) = root.glob("set-aside-*")
    assert sorted(p.name for p in (aside / "snapshots").iterdir()) == [f"step_{s:08d}" for s in (6, 8, 10, 12)]
    assert (aside / EVENTS).read_bytes() == (probe_run / EVENTS).read_bytes()[:0] + _original_events(before, root)
    run = dynprobe.load_run(root)
    assert run.damage == [] and list(run.steps) == [0, 2, 4, 6]


def _original_events(before: dict[str, str], root: Path) -> bytes:
    (aside,) = root.glob("set-aside-*")
    data = (aside / EVENTS).read_bytes()
    assert hashlib.sha256(data).hexdigest() == before[EVENTS]
    return data


@pytest.mark.parametrize("metric", ["C", "D", "S"])
def test_a_missing_row_file_is_rebuilt_from_the_snapshots_and_every_snapshot_kept(tmp_path, metric):
    root = tmp_path / "run"
    truth = write_small_run(root, close=False)
    rows_path(root, metric).unlink()
    with RunWriter(root, manifest(), resume=True) as writer:
        assert [s["step"] for s in writer.snapshots] == [0, 2, 4, 6, 8]
        writer.begin()
    run = dynprobe.load_run(root)
    assert len(run) == 5 and run.events[-1]["rebuilt"] == [metric]
    np.testing.assert_allclose(getattr(run, metric), truth[metric], rtol=0, atol=1e-12)


def test_rebuilt_c_layer_rows_match_the_layer_slices_of_theta(tmp_path):
    root = tmp_path / "run"
    truth = write_small_run(root, close=False)
    with RunWriter(root, manifest(), resume=True) as writer:
        writer.begin()
        for i in range(5):
            TriangularRows(writer.rows_path("C.layer_000")).append(np.full(i + 1, np.nan), i)
    TriangularRows(rows_path(root, "C.layer_000")).truncate(2)  # short: rebuilt
    with RunWriter(root, manifest(), resume=True) as writer:
        writer.begin()
    theta = truth["theta"][:, :8].astype(np.float64)  # one layer ("layer") owns all 8 entries
    unit = theta / np.linalg.norm(theta, axis=1, keepdims=True)
    np.testing.assert_allclose(dynprobe.load_run(root).C_layers[0], 1 - unit @ unit.T, atol=1e-12)


def test_rows_that_cannot_be_rebuilt_keep_the_snapshots_they_cover_and_move_the_rest_aside(tmp_path):
    root = tmp_path / "run"
    write_small_run(root, close=False)
    TriangularRows(rows_path(root, "D")).truncate(3)
    snapshot_file(root, 6, "preds").unlink()  # D of step 6 cannot be recomputed
    with RunWriter(root, manifest(), resume=True) as writer:
        assert [s["step"] for s in writer.snapshots] == [0, 2, 4]
        with pytest.warns(UserWarning):
            writer.begin()
    (aside,) = root.glob("set-aside-*")
    assert {p.name for p in (aside / "snapshots").iterdir()} == {"step_00000006", "step_00000008"}


def test_a_missing_old_params_file_is_a_clear_refusal_that_changes_nothing(tmp_path):
    root = tmp_path / "run"
    write_small_run(root, close=False)
    snapshot_file(root, 4, "params").unlink()
    before = _tree(root)
    with pytest.raises(ValueError, match=r"step_00000004/params.npy is missing.*resume_step=2.*Restore the file|"
                                         r"step_00000004/params.npy is missing.*Restore the file.*resume_step=2"):
        RunWriter(root, manifest(), resume=True)
    assert _tree(root) == before
    with RunWriter(root, manifest(), resume=True, resume_step=2) as writer:  # the recovery the message names
        writer.begin()
    assert list(dynprobe.load_run(root).steps) == [0, 2]
    assert json.loads((root / EVENTS).read_text().splitlines()[-1])["set_aside"].startswith("set-aside-")
