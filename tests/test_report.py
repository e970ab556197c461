"""``dynprobe report`` / ``show`` / ``compare``: the HTML report, the terminal summary, exit codes, escaping."""
from __future__ import annotations

import base64
import io
import re
import struct

import matplotlib
import numpy as np
import pytest
from rich.console import Console

import dynprobe
from dynprobe.cli import _LazyProgress, main
from dynprobe.report.html import build_report, write_html
from dynprobe.store.files import RunFormatError
from dynprobe.store.writer import RunWriter

from .synthetic_runs import uniform_steps, write_synthetic_run

HOSTILE = "<script>alert('x')</script>"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def images(text: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk (the first chunk, right after the signature)."""
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "full"
    write_synthetic_run(root, steps=uniform_steps(2000, 41), transition=300, ghosts=(0, 150, 600, 1200))
    return root


@pytest.fixture(scope="module")
def full_report(full_run):
    assert main(["report", str(full_run)]) == 0
    return (full_run / "report.html").read_text(encoding="utf-8")


def test_full_report_has_every_section_and_every_figure_decodes(full_report):
    for section in ("summary", "training", "trajectory", "chaos", "cone", "switching", "evidence", "configuration"):
        assert f'<section id="{section}">' in full_report
    pictures = images(full_report)
    # loss, accuracy, C/S/D/B maps, chaos maps, ghost-C peaks, Fig. 5a/5b/5c (+ zoom), velocity, Fig. 6, C peaks
    assert len(pictures) == 15
    for data in pictures:
        width, height = png_size(data)
        assert width > 100 and height > 100
        decoded = matplotlib.image.imread(io.BytesIO(data), format="png")
        assert decoded.shape[:2] == (height, width) and np.ptp(decoded) > 0  # not a blank image
    assert 'class="missing"' not in full_report


def test_report_is_self_contained_and_has_no_script(full_report):
    assert "<script" not in full_report.lower()
    assert not re.search(r'(src|href)="(https?:)?//', full_report)
    assert full_report.count("<img") == len(images(full_report))


def test_report_shows_the_estimates_cone_numbers_and_conventions(full_run, full_report):
    result = dynprobe.analysis.analyze(dynprobe.load_run(full_run))
    for estimate in result.transition.estimates:
        assert estimate.summary.replace("'", "&#x27;") in full_report
    for numbers in result.cone.cones:
        assert f"{numbers.half_angle_deg:.2f}°" in full_report
    for text in ("mode trace, n = 128, BN eval", "ε kind l2, nominal norm 1e-07", "α grid of 30 points",
                 "sequential deep copies compared with the main model itself", "realized ‖ε‖"):
        assert text in full_report


def test_report_of_a_short_real_run_with_kernels_and_ghosts(tmp_path):
    import torch

    from .conftest import mlp_setup, train

    model, optimizer, scheduler, data = mlp_setup()
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "real", schedule=2,
                           ghosts=dynprobe.Ghosts(at=[0, 6], barrier=False), kernel=dynprobe.KernelConfig(n=8),
                           trajectory_barriers=1)
    criterion = probe.watch(torch.nn.CrossEntropyLoss())
    train(model, optimizer, scheduler, data, 16, criterion=criterion)
    probe.close()
    assert main(["report", str(tmp_path / "real")]) == 0
    text = (tmp_path / "real" / "report.html").read_text()
    for data_png in images(text):
        assert png_size(data_png)[0] > 100
    assert "mode trace, n = 8, BN eval" in text and "control ε=0" not in text  # labels live in the PNGs
    assert text.count('class="missing"') == 1 and "switching_experiment" in text  # only Fig. 6 is missing


def test_report_of_a_run_without_kernels_or_ghosts_says_what_is_missing(tmp_path, capsys):
    write_synthetic_run(tmp_path / "bare", steps=uniform_steps(1000, 21), kernels=False, ghosts=(), switching=False,
                        barriers=False)
    assert main(["report", str(tmp_path / "bare"), "-o", str(tmp_path / "bare.html")]) == 0
    text = (tmp_path / "bare.html").read_text()
    for hint in ("Probe(..., kernel=dynprobe.KernelConfig())", "Probe(..., ghosts=dynprobe.Ghosts(at=[0, 100, 1000]))",
                 "dynprobe.fill_barriers", "dynprobe.switching_experiment", "probe.watch(criterion)"):
        assert hint in text
    assert len(images(text)) == 5  # loss, accuracy, C map, D map, C peaks
    assert "Report written to" in capsys.readouterr().out


@pytest.mark.parametrize("status,banner", [("running", "still <b>running</b>"), ("interrupted", "<b>interrupted</b>")])
def test_report_of_an_unfinished_run_says_so(tmp_path, status, banner):
    write_synthetic_run(tmp_path / "run", steps=uniform_steps(500, 12), status=status, ghosts=(0, 300),
                        kernels=False, switching=False)
    assert dynprobe.load_run(tmp_path / "run").status == status
    assert main(["report", str(tmp_path / "run")]) == 0
    assert banner in (tmp_path / "run" / "report.html").read_text()


def test_report_of_a_run_with_no_snapshot_yet(tmp_path):
    RunWriter(tmp_path / "empty", {"config": {}, "model": {"class": "Net"}, "conventions": {}}, resume=False)
    assert main(["report", str(tmp_path / "empty")]) == 0
    text = (tmp_path / "empty" / "report.html").read_text()
    assert "No snapshot has been committed yet" in text and "has 0 committed snapshot" in text


def test_hostile_strings_are_escaped(tmp_path):
    root = tmp_path / f"run {HOSTILE}"
    write_synthetic_run(root, steps=uniform_steps(500, 12), model_class=HOSTILE, ghosts=(0, 300), kernels=False)
    from dynprobe.store.files import append_jsonl

    append_jsonl(root / "events.jsonl", {"event": "probe_error", "step": 3, "error": f"boom {HOSTILE}"})
    output = tmp_path / "out.html"
    assert main(["report", str(root), "-o", str(output)]) == 0
    text = output.read_text()
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert text.count("&lt;script&gt;") >= 4  # title/header path, model class, configuration, event


def test_not_a_run_exits_3(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 3
    assert "not a dynprobe run" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 3
    assert main(["compare", str(tmp_path), str(tmp_path)]) == 3


def test_unwritable_output_exits_4_before_any_figure_is_drawn(full_run, tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the report was built before the output was checked")

    monkeypatch.setattr("dynprobe.report.html.build_report", fail)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["report", str(full_run), "-o", str(blocker / "report.html")]) == 4
    assert f"directory {blocker} does not exist" in capsys.readouterr().err
    assert main(["report", str(full_run), "-o", str(tmp_path)]) == 4
    assert "is a directory" in capsys.readouterr().err
    assert main(["compare", str(full_run), str(full_run), "-o", str(blocker / "c.html")]) == 4
    with pytest.raises(PermissionError, match="does not exist"):
        write_html(tmp_path / "no" / "such" / "dir.html", "x")


def test_corrupted_arrays_exit_3_with_the_file_named(tmp_path, capsys):
    write_synthetic_run(tmp_path / "run", steps=uniform_steps(500, 12), ghosts=())
    rows = tmp_path / "run" / "metrics" / "S.rows"
    data = bytearray(rows.read_bytes())
    data[16:24] = struct.pack("<d", -7.5)
    rows.write_bytes(bytes(data))
    assert main(["report", str(tmp_path / "run")]) == 3
    error = capsys.readouterr().err
    assert "S.rows is damaged" in error and "-7.5" in error
    assert not (tmp_path / "run" / "report.html").exists()
    events = tmp_path / "run" / "events.jsonl"
    lines = events.read_text().splitlines()
    lines[3] = lines[3][:20]
    events.write_text("\n".join(lines) + "\n")
    assert main(["show", str(tmp_path / "run")]) == 3
    assert "line 4 is not valid JSON" in capsys.readouterr().err


def test_open_flag_opens_the_written_file(tmp_path, monkeypatch):
    write_synthetic_run(tmp_path / "run", steps=uniform_steps(500, 12), kernels=False, ghosts=())
    opened = []
    monkeypatch.setattr("webbrowser.open", lambda url: opened.append(url) or True)
    output = tmp_path / "opened.html"
    assert main(["report", str(tmp_path / "run"), "-o", str(output), "--open", "--log-steps"]) == 0
    assert opened == [output.resolve().as_uri()]


def test_show_prints_the_transition_and_cone_summary(full_run, capsys):
    assert main(["show", str(full_run)]) == 0
    out = capsys.readouterr().out
    assert "Phase transition" in out and "Cone" in out and "half-angle" in out and "agree" in out


def test_compare_writes_a_side_by_side_report(full_run, tmp_path, monkeypatch, capsys):
    other = tmp_path / "lr=$x^$"  # "$...$" is matplotlib mathtext, and "$x^$" fails to parse
    write_synthetic_run(other, steps=uniform_steps(1000, 21), transition=600, kernels=False, ghosts=(0, 800))
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(full_run), str(other)]) == 0
    output = tmp_path / "compare-full-vs-lr=$x^$.html"
    text = output.read_text()
    assert "Comparison: full vs lr=$x^$" in text and text.count('<div class="cols">') == 1 + 8
    assert "Overlaid curves" in text
    for data in images(text):
        assert png_size(data)[0] > 100
    out = capsys.readouterr().out
    assert "Comparison" in out and "full" in out and "lr=$x^$" in out


def test_report_leaves_pyplot_and_the_backend_alone(tmp_path):
    import matplotlib.pyplot as plt

    write_synthetic_run(tmp_path / "run", steps=uniform_steps(500, 12), kernels=False, ghosts=(0, 300))
    backend = matplotlib.get_backend()
    before = plt.get_fignums()
    build_report(dynprobe.load_run(tmp_path / "run"))
    assert plt.get_fignums() == before and matplotlib.get_backend() == backend


def test_progress_bar_appears_only_after_the_delay():
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, width=100)
    quiet = _LazyProgress(console, total=3, delay=60.0)
    for label in ("a", "b", "c"):
        quiet(label)
    quiet.close()
    assert quiet.progress is None and stream.getvalue() == ""
    shown = _LazyProgress(console, total=3, delay=0.0)
    for label in ("a", "b", "c"):
        shown(label)
    shown.close()
    assert shown.progress is not None and "report:" in stream.getvalue()


def test_report_and_compare_help(capsys):
    for command in ("report", "compare"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "--log-steps" in out and "--open" in out and "-o OUTPUT" in out


def test_build_report_raises_run_format_error_before_writing(tmp_path):
    write_synthetic_run(tmp_path / "run", steps=uniform_steps(500, 12), ghosts=())
    rows = tmp_path / "run" / "metrics" / "D.rows"
    data = bytearray(rows.read_bytes())
    data[8:16] = struct.pack("<d", float("inf"))
    rows.write_bytes(bytes(data))
    with pytest.raises(RunFormatError, match=r"D\.rows is damaged"):
        build_report(dynprobe.load_run(tmp_path / "run"))
