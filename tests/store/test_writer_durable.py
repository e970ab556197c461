"""``durable=True`` (dynprobe/store/writer.py): before a snapshot's commit line is written, every file it depends on
— the snapshot's arrays, metric rows, the watched training loss, learning-rate and ghost separation logs — and
the folders holding them are fsynced."""
from __future__ import annotations

import os
from pathlib import Path

import torch

import dynprobe
from dynprobe.store import writer as writer_module
from dynprobe.store.layout import lr_files, rows_files, separation_files, snapshot_dir, train_loss_path

from ..conftest import mlp_setup, train


def test_every_dependency_of_a_commit_is_fsynced_before_its_commit_line(tmp_path, monkeypatch):
    log: list[tuple[str, object]] = []  # ("fsync", path) and ("commit", step), in order
    real_fsync, real_append = os.fsync, writer_module.append_jsonl

    def fsync(fd: int) -> None:
        log.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def append_jsonl(path, record, **options):
        if record.get("event") == "snapshot":
            log.append(("commit", record["step"]))
        return real_append(path, record, **options)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(writer_module, "append_jsonl", append_jsonl)
    model, optimizer, _, data = mlp_setup()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    root = tmp_path / "run"
    with dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=root, schedule=4, durable=True,
                        ghosts=dynprobe.Ghosts(at=[0], control=False)) as probe:
        train(model, optimizer, scheduler, data, 8, criterion=probe.watch(torch.nn.CrossEntropyLoss()))
    commits = [i for i, (kind, _) in enumerate(log) if kind == "commit"]
    last = log[commits[-1]][1]
    synced = {path for kind, path in log[commits[-2] + 1: commits[-1]] if kind == "fsync"}
    needed = [*rows_files(root).values(), train_loss_path(root), *lr_files(root).values(),
              *separation_files(root).values(), snapshot_dir(root, last), root / "metrics", root, root / "ghosts",
              root / "lr"]
    assert separation_files(root) and lr_files(root) and train_loss_path(root).is_file()
    missing = [str(Path(p).relative_to(root)) for p in needed if os.path.realpath(p) not in synced]
    assert not missing, f"not fsynced before the commit of step {last}: {missing}"
