"""``dynprobe report`` / ``show`` / ``compare``: the HTML report, the terminal summary, exit codes, escaping."""
from __future__ import annotations

import base64
import io
import math
import re
import struct

import matplotlib
import numpy as np
import pytest
from rich.console import Console

import dynprobe
from dynprobe.cli import _LazyProgress, main
from dynprobe.report import figures
from dynprobe.report.html import build_comparison, build_report, write_html
from dynprobe.report.summary import display_names
from dynprobe.store.files import RunFormatError
from dynprobe.store.runs import load_runs
from dynprobe.store.writer import RunWriter

from ..synthetic_runs import uniform_steps, write_synthetic_run

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


SECTIONS = ("summary", "training", "chaos", "trajectory", "cone", "layers", "switching", "evidence", "glossary",
            "reference", "configuration")


def test_full_report_has_every_section_and_every_figure_decodes(full_report):
    for section in SECTIONS:
        assert f'<section id="{section}">' in full_report
    pictures = images(full_report)
    # loss, accuracy, separation curves, growth rates, chaos maps, ghost-C level-offs, C/S/D/B/B_linear maps,
    # Fig. 5a/5b, kernel velocity, Fig. 5c (+ zoom), per-layer C, S and S(t, τ), separation shares, Fig. 6,
    # C level-offs
    assert len(pictures) == 22
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

    from ..conftest import mlp_setup, train

    model, optimizer, scheduler, data = mlp_setup()
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "real", schedule=2,
                           ghosts=dynprobe.Ghosts(at=[0, 6]), kernel=dynprobe.KernelConfig(n=8),
                           barriers=dynprobe.Barriers(ghosts=False, previous_snapshots=1, time_budget=math.inf))
    criterion = probe.watch(torch.nn.CrossEntropyLoss())
    train(model, optimizer, scheduler, data, 16, criterion=criterion)
    probe.close()
    assert main(["report", str(tmp_path / "real")]) == 0
    text = (tmp_path / "real" / "report.html").read_text()
    for data_png in images(text):
        assert png_size(data_png)[0] > 100
    assert "mode trace (the default for classification outputs), n = 8, BN eval" in text
    assert "control ε=0" not in text  # labels live in the PNGs
    notes = re.findall(r'<div class="missing">(.*?)</div>', text)
    assert any("switching_experiment" in n for n in notes)  # Fig. 6, and per-layer views this probe did not record
    assert all("switching_experiment" in n or "per-layer" in n for n in notes), notes


def test_report_of_a_run_without_kernels_or_ghosts_says_what_is_missing(tmp_path, capsys):
    write_synthetic_run(tmp_path / "bare", steps=uniform_steps(1000, 21), kernels=False, ghosts=(), switching=False,
                        barriers=False)
    assert main(["report", str(tmp_path / "bare"), "-o", str(tmp_path / "bare.html")]) == 0
    text = (tmp_path / "bare.html").read_text()
    for hint in ("Probe(..., kernel=dynprobe.KernelConfig())", "Probe(..., ghosts=dynprobe.Ghosts(at=[0, 100, 1000]))",
                 "dynprobe.fill_barriers", "dynprobe.switching_experiment", "probe.watch(criterion)"):
        assert hint in text
    assert len(images(text)) == 6  # loss, accuracy, C map, D map, per-layer C, C level-offs
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
    assert f"boom {HOSTILE}".replace("<", "&lt;").replace(">", "&gt;").replace("'", "&#x27;") in text


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
    captured = capsys.readouterr()
    assert f"directory {blocker} does not exist" in captured.err
    assert captured.out == ""  # failed before the summary was printed
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
    write_synthetic_run(tmp_path / "events", steps=uniform_steps(500, 12), ghosts=())
    events = tmp_path / "events" / "events.jsonl"
    lines = events.read_text().splitlines()
    lines[3] = lines[3][:20]
    events.write_text("\n".join(lines) + "\n")
    assert main(["show", str(tmp_path / "events")]) == 0  # the intact prefix, with a warning
    assert "warning:" in (err := capsys.readouterr().err) and "line 4 is not valid JSON" in err


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
    assert "Phase transition" in out and "Cone" in out and "half-angle" in out and "settles" in out


def test_compare_of_several_runs_writes_next_to_the_first_run(full_run, tmp_path, monkeypatch, capsys):
    other = tmp_path / "lr=$x^$"  # "$...$" is matplotlib mathtext, and "$x^$" fails to parse
    third = tmp_path / "seed-2"
    write_synthetic_run(other, steps=uniform_steps(1000, 21), transition=600, kernels=False, ghosts=(0, 800))
    write_synthetic_run(third, steps=uniform_steps(2000, 41), transition=300, seed=2)
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(full_run), str(other), str(third)]) == 0
    output = full_run.parent / "compare-full-vs-lr=_x__-vs-seed-2.html"  # next to the first run, not in the cwd
    text = output.read_text()
    assert "Comparison of 3 runs: full, lr=$x^$, seed-2" in text
    for section in ("table", "spread", "overlays", "runs"):
        assert f'<section id="{section}">' in text
    assert text.count('id="headline"') == 3 and "spread (max / min)" in text
    for data in images(text):
        assert png_size(data)[0] > 100
    out = capsys.readouterr().out
    assert "Comparison" in out and "full" in out and "lr=$x^$" in out and "seed-2" in out and "×" in out
    results = [dynprobe.analysis.analyze(dynprobe.load_run(p)) for p in (full_run, other, third)]
    steps = [r.transition.get("chaos").step for r in results]
    found = [s for s in steps if s is not None]
    assert f"×{max(found) / min(found):.2g} ({min(found)}–{max(found)})" in text
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(full_run)])
    assert exit_info.value.code == 2


def test_runs_with_the_same_folder_name_are_told_apart_by_their_parents(tmp_path, monkeypatch, capsys):
    for seed in (0, 1):
        write_synthetic_run(tmp_path / f"seed{seed}" / "demo", steps=uniform_steps(600, 13), transition=200,
                            kernels=False, ghosts=(), seed=seed)
    runs = [dynprobe.load_run(tmp_path / f"seed{seed}" / "demo") for seed in (0, 1)]
    assert display_names(runs) == ["seed0/demo", "seed1/demo"]
    assert display_names([runs[0], runs[0]]) == ["demo (1)", "demo (2)"]
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["compare", str(runs[0].path), str(runs[1].path)]) == 0
    out = capsys.readouterr().out
    assert "seed0/demo" in out and "seed1/demo" in out
    assert (tmp_path / "seed0" / "compare-seed0_demo-vs-seed1_demo.html").exists()


def test_build_comparison_keeps_the_two_run_spelling(full_run, tmp_path):
    write_synthetic_run(tmp_path / "b", steps=uniform_steps(500, 12), kernels=False, ghosts=())
    text = build_comparison(dynprobe.load_run(full_run), dynprobe.load_run(tmp_path / "b"))
    assert "Comparison of 2 runs: full, b" in text


def test_load_runs_globs_run_directories(full_run, tmp_path):
    for name in ("sweep-1", "sweep-2"):
        write_synthetic_run(tmp_path / name, steps=uniform_steps(500, 12), kernels=False, ghosts=())
    (tmp_path / "sweep-notes").mkdir()  # not a run: skipped
    runs = load_runs(str(tmp_path / "sweep-*"))
    assert [r.name for r in runs] == ["sweep-1", "sweep-2"]
    (tmp_path / "sweep-3").mkdir()
    (tmp_path / "sweep-3" / "run.json").write_text("{")
    with pytest.raises(RunFormatError):
        load_runs(str(tmp_path / "sweep-*"))
    with pytest.warns(UserWarning, match="skipped"):
        assert len(load_runs(str(tmp_path / "sweep-*"), errors="skip")) == 2
    with pytest.raises(FileNotFoundError, match="no dynprobe run matches"):
        load_runs(str(tmp_path / "nothing-*"))


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
        assert "--log-steps" in out and "--open" in out and "-o OUTPUT" in out and "--log-y" in out
        assert "--format {table,json}" in out


def test_build_report_raises_run_format_error_before_writing(tmp_path):
    write_synthetic_run(tmp_path / "run", steps=uniform_steps(500, 12), ghosts=())
    rows = tmp_path / "run" / "metrics" / "D.rows"
    data = bytearray(rows.read_bytes())
    data[8:16] = struct.pack("<d", float("inf"))
    rows.write_bytes(bytes(data))
    with pytest.raises(RunFormatError, match=r"D\.rows is damaged"):
        build_report(dynprobe.load_run(tmp_path / "run"))


# --------------------------------------------------------------------------------------------- readable report


def test_report_opens_with_the_headline_and_ends_with_a_glossary_and_the_reference(full_run, full_report):
    result = dynprobe.analysis.analyze(dynprobe.load_run(full_run))
    headline = re.search(r'<div class="headline" id="headline"><p class="answer">(.*?)</p>', full_report).group(1)
    assert headline == result.transition.headline.replace("'", "&#x27;")
    assert full_report.index('id="headline"') < full_report.index('<section id="summary">')
    assert re.search(r"left its chaotic phase between steps \d+ and \d+", headline)
    glossary = full_report[full_report.index('<section id="glossary">'):]
    for term in ("ghost", "B_linear", "λ(t0, Δ), growth rate", "undetermined"):
        assert f"<dt>{term}</dt>" in glossary
    reference = full_report[full_report.index('<section id="reference">'):]
    assert "<i>New Evidence of the Two-Phase Learning Dynamics of Neural Networks</i>" in reference
    assert "Zhou, Yongyi Yang, Masashi Sugiyama and Junchi Yan" in reference
    for equation in ("eq. (1)", "eq. (4)", "eq. (5)", "eq. (6)"):
        assert equation in reference
    # Each section opens in plain language; the paper's internal names stay out of the openings.
    for intro in re.findall(r'<p class="intro">(.*?)</p>', full_report):
        assert "Finding" not in intro and "eq. (" not in intro
    assert len(re.findall(r'<p class="intro">', full_report)) >= 8
    assert "<title>dynprobe report — full</title>" in full_report
    assert "<h1>Training dynamics of full</h1>" in full_report


def test_undetermined_headline_says_why(tmp_path):
    write_synthetic_run(tmp_path / "run", steps=uniform_steps(500, 12), kernels=False, ghosts=(0, 300), horizon=350,
                        transition=5000)
    text = build_report(dynprobe.load_run(tmp_path / "run"))
    headline = re.search(r'<p class="answer">(.*?)</p>', text).group(1)
    assert headline.startswith("Transition undetermined, because")


def captured_report(run: dynprobe.Run, **kwargs):
    with figures.capture_figures() as captured:
        text = build_report(run, **kwargs)
    return text, captured


def test_every_figure_has_labelled_axes_and_a_title(full_run):
    """Read from the matplotlib figures right before they are rendered: every plotting axes has a title and both
    axis labels; the other axes are colorbars or twins (sharing x with a titled one) and carry their own label."""
    _, captured = captured_report(dynprobe.load_run(full_run))
    assert len(captured) == 22
    for figure in captured:
        titled = [ax for ax in figure.axes if ax.get_title()]
        assert titled, [ax.get_ylabel() for ax in figure.axes]
        for ax in figure.axes:
            if ax in titled:
                assert ax.get_xlabel() and ax.get_ylabel(), (ax.get_title(), ax.get_xlabel(), ax.get_ylabel())
            else:
                twin = any(ax.get_shared_x_axes().joined(ax, other) for other in titled)
                assert hasattr(ax, "_colorbar") or twin, ax
                assert ax.get_ylabel() or ax.get_xlabel(), ax


def test_one_transition_marker_in_every_figure_and_method_markers_are_labelled(full_run):
    run = dynprobe.load_run(full_run)
    result = dynprobe.analysis.analyze(run)
    step = result.transition.step
    assert step is not None
    _, captured = captured_report(run, result=result)
    colour = matplotlib.colors.to_rgba(figures.TRANSITION_STYLE["color"])
    marked = 0
    for figure in captured:
        for ax in figure.axes:
            for line in ax.get_lines():
                if matplotlib.colors.to_rgba(line.get_color()) == colour and line.get_linestyle() == "--":
                    label = line.get_label()
                    assert label.startswith("_") or label == f"transition (headline) ≈ {step}", label
                    marked += 1
                if line.get_linestyle() == ":" and not line.get_label().startswith("_"):
                    assert " estimate " in line.get_label()  # e.g. "kernel-velocity estimate 300"
    assert marked >= 12


def test_exact_zeros_are_hatched_and_labelled_on_log_scales(full_run):
    _, captured = captured_report(dynprobe.load_run(full_run))
    hatched = {}
    for figure in captured:
        for ax in figure.axes:
            patches = [p for p in ax.patches if p.get_hatch()]
            legend = ax.get_legend()
            labels = [t.get_text() for t in legend.get_texts()] if legend else []
            if patches:
                hatched[ax.get_title()] = labels
    assert "main vs ghost: C" in hatched and "main vs ghost: L2" in hatched
    assert "exactly 0" in hatched["main vs ghost: C"]
    assert "control ε = 0: separation exactly 0" in hatched["How much each ghost's perturbation has grown"]


def test_loss_axis_is_logarithmic_with_a_spike_or_when_asked(tmp_path):
    write_synthetic_run(tmp_path / "run", steps=uniform_steps(500, 12), kernels=False, ghosts=())
    run = dynprobe.load_run(tmp_path / "run")
    assert figures.wants_log_y(np.array([1.0, 0.9, 55_000.0, 0.8]), None)
    assert not figures.wants_log_y(np.array([2.3, 1.5, 0.9, 0.5]), None)
    for kwargs, scale in (({}, "linear"), ({"log_y": True}, "log")):
        _, captured = captured_report(run, **kwargs)
        loss = next(ax for f in captured for ax in f.axes if ax.get_title() == "Loss")
        assert loss.get_yscale() == scale
    output = tmp_path / "log.html"
    assert main(["report", str(tmp_path / "run"), "-o", str(output), "--log-y"]) == 0


def test_event_details_are_filled(full_run, tmp_path):
    from dynprobe.store.files import append_jsonl

    root = tmp_path / "run"
    write_synthetic_run(root, steps=uniform_steps(500, 12), kernels=False, ghosts=())
    detected = {"method": "online", "step": 100, "interval": [50, 100], "quality": "high",
                "summary": "S(t, t+50) fell below 1/5 of its peak", "evidence": {}}
    append_jsonl(root / "events.jsonl", {"event": "transition", "step": 150, "estimate": detected})
    append_jsonl(root / "events.jsonl", {"event": "shadow_drift", "step": 200, "L2": 1e-6, "C": 1e-12})
    text = build_report(dynprobe.load_run(root))
    assert "<td>transition</td><td>150</td><td>S(t, t+50) fell below 1/5 of its peak</td>" in text
    assert "&quot;L2&quot;: 1e-06" in text


def test_per_layer_section_shows_c_s_and_separation_shares(full_run, tmp_path):
    from dynprobe.analysis.layers import layer_view

    from ..synthetic_runs import SEPARATION_SHARES

    run = dynprobe.load_run(full_run)
    view = layer_view(run, transition=300)
    assert view.layers == ["features.0", "features.3", "head"] and view.C_lag == 50 and not view.missing
    k = int(np.flatnonzero(run.steps == 300)[0])
    np.testing.assert_array_equal(view.C[:, list(view.C_steps).index(300)], run.C_layers[:, k, k + 1])
    np.testing.assert_array_equal(view.S[:, list(view.S_steps).index(300)], run.S_layers[:, k, k + 1])
    assert view.S_lag == 50 and view.tau == 300
    np.testing.assert_array_equal(view.S_tau[:, 0], run.S_layers[:, k, k])
    np.testing.assert_allclose(view.separation_share[:, 0], SEPARATION_SHARES[True])
    np.testing.assert_allclose(view.separation_share[:, -1], SEPARATION_SHARES[False])
    _, captured = captured_report(run)
    titles = [ax.get_title() for f in captured for ax in f.axes]
    tau = layer_view(run, transition=dynprobe.analysis.analyze(run).transition.step).tau
    for title in ("Direction change per layer, C_l(t, t + 50)", "Kernel change per layer, S_l(t, t + 50)",
                  f"Per-layer kernel distance to step {tau}, S_l(t, {tau})"):
        assert title in titles
    write_synthetic_run(tmp_path / "flat", steps=uniform_steps(500, 12), kernels=False, ghosts=(), layers=False)
    text = build_report(dynprobe.load_run(tmp_path / "flat"))
    section = text[text.index('<section id="layers">'):text.index('<section id="switching">')]
    assert "no per-layer C" in section and "<img" not in section
