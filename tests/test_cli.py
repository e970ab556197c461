"""The command line: show, demo, exit codes."""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dynprobe
from dynprobe.cli import build_parser, main
from dynprobe.demo import DEMO_DURATION

from .conftest import mlp_setup, train
from .synthetic_runs import uniform_steps, write_synthetic_run


@pytest.fixture()
def run_dir(tmp_path):
    model, optimizer, scheduler, data = mlp_setup()
    with dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r", schedule=3):
        train(model, optimizer, scheduler, data, 9)
    return tmp_path / "r"


def test_show_prints_the_summary(run_dir, capsys):
    assert main(["show", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "dynprobe run" in out and "Trajectory" in out and "closed" in out and "Transition undetermined" in out


def test_show_on_a_non_run_exits_3(tmp_path, capsys):
    assert main(["show", str(tmp_path)]) == 3
    assert "not a dynprobe run" in capsys.readouterr().err


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--steps", "0"])
    assert exit_info.value.code == 2


def test_help_works_for_every_command():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"demo", "show", "report", "compare"}  # a new command needs its line in docs/cli.md
    for command in ([], *([name] for name in commands)):
        result = subprocess.run([sys.executable, "-m", "dynprobe.cli", *command, "--help"], capture_output=True,
                                text=True, timeout=120)
        expected = (commands[command[0]] if command else parser).format_help()
        assert result.returncode == 0 and result.stdout.split() == expected.split()  # that command's own help


def test_demo_runs_end_to_end_on_a_few_steps(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert main(["demo", "--steps", "40", "--ghosts", "2", "--directions", "1", "--kernel-n", "16", "--out",
                 str(tmp_path / "demo")]) == 0
    torch.set_num_threads(threads)
    run = dynprobe.load_run(tmp_path / "demo")
    assert run.steps[-1] == 40 and run.status == "closed"
    assert [g.spawn_step for g in run.ghosts] == [0, 0, 25] and run.has_kernels
    assert (tmp_path / "demo" / "report.html").stat().st_size > 10_000
    assert "Run directory" in capsys.readouterr().out


def test_demo_never_overwrites_an_existing_run(tmp_path):
    quick = ["demo", "--steps", "5", "--ghosts", "0", "--kernel-n", "0", "--no-report", "--out", str(tmp_path / "demo")]
    assert main(quick) == 0
    assert main(quick) == 0
    assert dynprobe.load_run(tmp_path / "demo-2").steps[-1] == 5


# --------------------------------------------------------------------------------------------- terminal safety


def small_run(root, **kwargs):
    write_synthetic_run(root, steps=uniform_steps(300, 7), transition=100, kernels=False, ghosts=(0, 200), **kwargs)
    return root


@pytest.mark.parametrize("name", ["a[/]b", "sweep[lr]", "x[bold]y[/bold]", "z\\"])
def test_show_and_report_print_run_paths_with_markup_characters_verbatim(tmp_path, capsys, name):
    root = small_run(tmp_path / "runs" / name)
    assert main(["show", str(root)]) == 0
    assert str(root) in capsys.readouterr().out
    assert main(["report", str(root)]) == 0
    assert f"Report written to {root / 'report.html'}" in capsys.readouterr().out
    assert main(["show", str(root / "missing[/]")]) == 3  # an error message naming the path, not a MarkupError
    assert str(root / "missing[/]") in capsys.readouterr().err


def test_manifest_strings_cannot_make_links_or_reach_the_terminal_raw(tmp_path, capsys):
    hostile = "[link=https://evil.example]click[/link] \x1b[31mRED\x1b]0;title\x07 \u202egnp.exe \x9b"
    root = small_run(tmp_path / "run", model_class=hostile)
    for command in (["show", str(root)], ["report", str(root)], ["compare", str(root), str(root)]):
        assert main(command) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\x9b" not in out
    assert main(["show", str(root)]) == 0
    out = capsys.readouterr().out
    assert "[link=https://evil.example]click[/link]" in out
    assert "\\x1b[31mRED\\x1b]0;title\\x07 \\u202egnp.exe \\x9b" in out


def test_terminal_helpers_escape_markup_and_show_control_characters():
    from rich.console import Console

    from dynprobe.report.terminal import clean, safe_markup, safe_text

    assert clean("a\x1b[1mb\tc\nd\x00\x7f\u2066") == "a\\x1b[1mb c d\\x00\\x7f\\u2066"
    console = Console(file=io.StringIO(), width=200)
    hostile = "[/] sweep[lr] [link=x]y[/link] \\\\"
    console.print(f"[bold]{safe_markup(hostile)}[/bold]", safe_text("[red]z[/red]"))
    assert console.file.getvalue() == "[/] sweep[lr] [link=x]y[/link] \\\\ [red]z[/red]\n"


def test_json_format_is_parseable_and_complete(tmp_path, capsys):
    root = small_run(tmp_path / "run")
    assert main(["show", str(root), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    run = dynprobe.load_run(root)
    result = dynprobe.analysis.analyze(run)
    assert data["headline"] == result.transition.headline and data["snapshots"] == len(run)
    assert [e["method"] for e in data["transition"]["estimates"]] == [e.method for e in result.transition.estimates]
    assert main(["report", str(root), "--format", "json", "-o", str(tmp_path / "r.html")]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["name"] == "run" and "Report written to" in captured.err
    assert main(["compare", str(root), str(root), "--format", "json", "-o", str(tmp_path / "c.html")]) == 0
    both = json.loads(capsys.readouterr().out)
    assert len(both["runs"]) == 2 and "chaos" in both["spread"]


def test_piped_tables_use_the_full_width(tmp_path):
    root = small_run(tmp_path / "run")
    environment = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    result = subprocess.run([sys.executable, "-m", "dynprobe.cli", "show", str(root)], capture_output=True, text=True,
                            timeout=300, env=environment)
    assert result.returncode == 0, result.stderr
    summaries = [e.summary for e in dynprobe.analysis.analyze(dynprobe.load_run(root)).transition.estimates]
    assert max(len(line) for line in result.stdout.splitlines()) > 150
    assert all(any(summary in line for line in result.stdout.splitlines()) for summary in summaries)


def test_ghost_mode_and_run_size_are_shown(tmp_path, capsys):
    root = small_run(tmp_path / "run")
    assert main(["show", str(root)]) == 0
    out = capsys.readouterr().out
    assert "sequential: compared with the main model itself" in out and "size on disk" in out


def test_help_readme_and_docs_state_the_same_demo_duration():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    demo_help = next(action.help for action in commands._choices_actions if action.dest == "demo")
    root = Path(__file__).parents[1]
    readme = " ".join((root / "README.md").read_text().split())
    demo_page = " ".join((root / "docs" / "demo.md").read_text().split())
    assert DEMO_DURATION in demo_help and f"`dynprobe demo` ({DEMO_DURATION})" in readme
    assert f"`dynprobe demo` ({DEMO_DURATION}:" in demo_page
