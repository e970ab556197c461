"""The recorded command line (dynprobe/_util/command.py): absent unless asked, secrets redacted in both option
forms, never in report.html without --include-command, never in writer.lock."""
from __future__ import annotations

import json
import sys

import pytest

import dynprobe
from dynprobe._util.command import redacted_command
from dynprobe.cli import main
from dynprobe.store.layout import LOCK, MANIFEST

from ..conftest import mlp_setup, train

SECRET_ARGV = ["train.py", "--api-key=sk-live-123", "--wandb_token", "tok-456", "--Client-Secret", "s3cr3t",
               "--db-password=hunter2", "--passwd", "pw", "--lr", "0.1", "--name", "key run"]
SECRETS = ["sk-live-123", "tok-456", "s3cr3t", "hunter2", "pw "]


def test_secret_option_values_are_redacted_in_both_forms():
    line = redacted_command(SECRET_ARGV)
    assert line == ("train.py --api-key=*** --wandb_token *** --Client-Secret *** --db-password=*** --passwd *** "
                    "--lr 0.1 --name 'key run'")


def test_a_secret_option_followed_by_another_option_redacts_nothing_else():
    assert redacted_command(["x", "--token", "--lr", "1", "-k", "v"]) == "x --token --lr 1 -k v"


def _run(tmp_path, monkeypatch, **options):
    monkeypatch.setattr(sys, "argv", SECRET_ARGV)
    model, optimizer, scheduler, data = mlp_setup()
    root = tmp_path / "run"
    with dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=root, schedule=4, **options):
        train(model, optimizer, scheduler, data, 4)
    return root


def _files_text(root):
    return "".join(p.read_bytes().decode(errors="replace") for p in root.rglob("*") if p.is_file())


def test_no_command_line_is_recorded_by_default(tmp_path, monkeypatch):
    root = _run(tmp_path, monkeypatch)
    assert "command" not in json.loads((root / MANIFEST).read_text())
    assert "train.py" not in (root / LOCK).read_text()
    assert not any(secret in _files_text(root) for secret in SECRETS)


def test_a_recorded_command_is_redacted_and_shown_in_the_report_only_when_asked(tmp_path, monkeypatch):
    root = _run(tmp_path, monkeypatch, record_command=True)
    assert json.loads((root / MANIFEST).read_text())["command"] == redacted_command(SECRET_ARGV)
    assert not any(secret in _files_text(root) for secret in SECRETS)
    assert main(["report", str(root)]) == 0
    assert "--api-key=***" not in (root / "report.html").read_text()
    assert main(["report", str(root), "--include-command"]) == 0
    html = (root / "report.html").read_text()
    assert "--api-key=***" in html and not any(secret in html for secret in SECRETS)


def test_record_command_must_be_a_bool(tmp_path):
    model, optimizer, _, data = mlp_setup()
    with pytest.raises(TypeError, match="record_command must be True or False"):
        dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r",
                       record_command="yes")
