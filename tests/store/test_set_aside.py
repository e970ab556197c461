"""Moving aside, never deleting (dynprobe.store.set_aside): files and folders moved or copied keep their path
relative to the run under set-aside-STAMP/, byte for byte, and nothing the run held is lost."""
from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

from dynprobe.store.set_aside import SetAside


def contents(root: Path) -> dict[str, str]:
    """Every file under ``root`` by path relative to it, as a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def make_run(root: Path) -> None:
    (root / "snapshots" / "step_00000100").mkdir(parents=True)
    (root / "snapshots" / "step_00000100" / "params.npy").write_bytes(b"\x93NUMPY params" * 7)
    (root / "snapshots" / "step_00000100" / "meta.json").write_text('{"step": 100}')
    (root / "ghosts").mkdir()
    (root / "ghosts" / "ghost_0.separation").write_text("1 0.5\n2 0.7\n")
    (root / "events.jsonl").write_text('{"a": 1}\n{"b": 2}\n')
    (root / "empty.log").write_text("")


def test_moved_and_copied_entries_keep_their_path_under_the_dated_folder_and_nothing_is_lost(tmp_path):
    make_run(tmp_path)
    before = contents(tmp_path)
    aside = SetAside(tmp_path, stamp="20260101T000000", durable=True)
    assert aside.folder == tmp_path / "set-aside-20260101T000000"
    aside.move(tmp_path / "snapshots" / "step_00000100")  # a folder
    aside.move(tmp_path / "ghosts" / "ghost_0.separation")  # a file
    aside.copy(tmp_path / "events.jsonl")  # copied before being cut: the original stays
    after = contents(tmp_path)
    prefix = "set-aside-20260101T000000/"
    for path, digest in before.items():  # every original byte string is still somewhere
        assert after.get(path) == digest or after.get(prefix + path) == digest, path
    assert not (tmp_path / "snapshots" / "step_00000100").exists()
    assert not (tmp_path / "ghosts" / "ghost_0.separation").exists()
    assert after["events.jsonl"] == after[prefix + "events.jsonl"] == before["events.jsonl"]
    assert aside.moved == ["snapshots/step_00000100", "ghosts/ghost_0.separation", "events.jsonl"]


def test_nothing_to_drop_leaves_no_folder(tmp_path):
    make_run(tmp_path)
    before = contents(tmp_path)
    aside = SetAside(tmp_path, stamp="20260101T000001")
    aside.move(tmp_path / "snapshots" / "step_00000200")  # missing: nothing to move
    aside.copy(tmp_path / "empty.log")  # empty: nothing to keep
    aside.copy(tmp_path / "missing.log")
    aside.copy_if_longer(tmp_path / "events.jsonl", keep=len(b'{"a": 1}\n{"b": 2}\n'))  # cutting drops nothing
    assert not aside.folder.exists() and aside.moved == []
    assert contents(tmp_path) == before


def test_copy_if_longer_copies_exactly_when_a_cut_would_drop_bytes(tmp_path):
    make_run(tmp_path)
    size = (tmp_path / "events.jsonl").stat().st_size
    for k, (keep, copied) in enumerate(((size + 1, False), (size, False), (size - 1, True), (0, True))):
        aside = SetAside(tmp_path, stamp=f"20260101T00000{k}")
        aside.copy_if_longer(tmp_path / "events.jsonl", keep)
        assert (aside.folder / "events.jsonl").is_file() is copied, keep


def test_the_default_stamp_is_the_utc_time_in_the_documented_form(tmp_path):
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0, tzinfo=None)
    stamp = SetAside(tmp_path).stamp
    after = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    assert before <= dt.datetime.strptime(stamp, "%Y%m%dT%H%M%S") <= after
