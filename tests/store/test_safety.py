"""``dynprobe.store.safety``: nothing is written through a symbolic link, and a run directory holding a link or a
special file anywhere inside it is refused (the run folder itself may be a link: it is the path the user chose)."""
from __future__ import annotations

import os

import pytest

from dynprobe.store.safety import RunFormatError, check_no_links, open_for_writing

pytestmark = pytest.mark.skipif(not hasattr(os, "symlink") or not hasattr(os, "mkfifo"), reason="POSIX only")


def test_writing_through_a_link_is_refused_and_the_target_is_untouched(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.jsonl").symlink_to(outside)
    with pytest.raises(RunFormatError, match="is a symbolic link .*outside.txt.*never writes through links"):
        open_for_writing(run / "events.jsonl", os.O_WRONLY | os.O_TRUNC)
    assert outside.read_text() == "precious"
    fd = open_for_writing(run / "manifest.json", os.O_WRONLY | os.O_CREAT)  # a plain new file is fine
    os.close(fd)


@pytest.mark.parametrize("where", ["top", "nested"])
@pytest.mark.parametrize("what", ["file link", "folder link", "fifo"])
def test_a_link_or_special_file_anywhere_inside_the_run_is_refused(tmp_path, where, what):
    run = tmp_path / "run"
    folder = run / "snapshots" / "step_00000002" if where == "nested" else run
    folder.mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    check_no_links(run)  # clean so far
    target = tmp_path / "elsewhere"
    target.mkdir()
    entry = folder / "params.npy"
    if what == "file link":
        entry.symlink_to(run / "manifest.json")
    elif what == "folder link":
        entry.symlink_to(target, target_is_directory=True)
    else:
        os.mkfifo(entry)
    with pytest.raises(RunFormatError, match=str(entry)):
        check_no_links(run)


def test_the_run_folder_itself_may_be_a_link(tmp_path):
    real = tmp_path / "real"
    (real / "snapshots").mkdir(parents=True)
    (real / "manifest.json").write_text("{}")
    (tmp_path / "run").symlink_to(real, target_is_directory=True)
    check_no_links(tmp_path / "run")
