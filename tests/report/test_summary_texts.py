"""Every sentence ``dynprobe show`` and the report print is checked against the data it describes (issue 24, items
3, 5 and 6): the control's drift, the cone ratio's reading, the chaos estimate's counts, the kernel-velocity
figure and a constant chaos map."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from matplotlib.colors import Normalize
from rich.console import Console

import dynprobe
from dynprobe.analysis.cone import ConeSummary
from dynprobe.analysis.estimators import transition_from_kernel_velocity
from dynprobe.analysis.saturation import transition_from_saturation
from dynprobe.analysis.sensitivity import SeparationCurve
from dynprobe.report import figures
from dynprobe.report.figures._base import norm_for
from dynprobe.report.html import build_report
from dynprobe.report.summary import render_summary
from dynprobe.store.layout import MANIFEST

from ..synthetic_runs import log_linear_steps, write_synthetic_run

DRIFT = {"event": "control_drift", "step": 7, "ghost": 0, "reference": "main", "tensors": ["fc.weight"],
         "max_abs_diff": 3e-7, "likely_causes": ["nondeterministic kernels"]}


def shown(run: dynprobe.Run) -> str:
    console = Console(record=True, width=400, file=io.StringIO())
    render_summary(run, console)
    return console.export_text()


def drifted_run(root: Path, control_D: float = 0.2) -> dynprobe.Run:
    """A synthetic run whose ε = 0 control drifted at step 7 and then disagrees with the main run on
    ``control_D`` of the eval set."""
    write_synthetic_run(root, control_drift=1e-5)
    path = root / "events.jsonl"
    lines = []
    for line in path.read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "ghost_compare" and event["ghost"] == 0 and event["step"] > 0:
            event["D"] = control_D
        if event["event"] == "close":
            lines.append(json.dumps(DRIFT))
        lines.append(json.dumps(event))
    path.write_text("\n".join(lines) + "\n")
    return dynprobe.load_run(root)


def test_control_drift_reaches_the_headline_show_the_ghost_table_and_the_configuration(tmp_path):
    run = drifted_run(tmp_path / "drift")
    result = dynprobe.analysis.analyze(run)
    assert "the ε = 0 control ghost drifted from the main run at step 7 (max |Δ| 3e-07)" in result.transition.headline
    text = " ".join(shown(run).split())
    assert "Caution: the ε = 0 control ghost drifted" in text
    assert "/ 0.2 (control)" in text and "the threshold is the ε = 0 control's own value" in text
    html = build_report(run)
    configuration = html[html.index('id="configuration"'):]
    assert "(not a vmapped shadow). In this run, the ε = 0 control ghost drifted from the main run" in configuration
    assert "(the drifted control's own value)" in html


def test_a_control_that_never_drifted_is_not_mentioned(tmp_path):
    write_synthetic_run(tmp_path / "exact")
    run = dynprobe.load_run(tmp_path / "exact")
    text = shown(run)
    assert "drifted" not in text and "(control)" not in text
    assert "In this run" not in build_report(run)


def cone(ratio_bounds: dict[int, float]) -> ConeSummary:
    values = list(ratio_bounds.values())
    return ConeSummary(True, None, np.arange(4), lags=tuple(ratio_bounds), lag_bounds=ratio_bounds,
                       lag_bound_ratio=max(values) / min(values))


def test_cone_ratio_is_read_against_one_and_the_lag_ratio():
    assert cone({10: 1.0e-3, 80: 1.2e-3}).lag_bound_reading.startswith("close to 1: the curves share one")
    assert cone({10: 1.0e-3, 80: 7.0e-3}).lag_bound_reading.startswith("close to the lag ratio 8: ")
    far = cone({10: 1.0e-3, 80: 1.14532})  # the "ratio 1145.32 (≈ 1: …)"
    assert far.lag_bound_ratio > 1000 and far.lag_bound_reading.startswith("far above both 1 and the lag ratio 8")
    assert cone({10: 1.0e-3, 80: 3.0e-3}).lag_bound_reading.startswith("between 1 and the lag ratio 8")


def test_show_reads_the_cone_ratio_of_the_run_it_describes(tmp_path):
    write_synthetic_run(tmp_path / "r")
    run = dynprobe.load_run(tmp_path / "r")
    reading = dynprobe.analysis.analyze(run).cone.lag_bound_reading
    text = " ".join(shown(run).split())
    assert reading is not None and reading in text and "(≈ 1: one shared bound" not in text


def plateau(ghost: int, spawn: int, level: float) -> SeparationCurve:
    steps = np.arange(spawn, 2001, 10)
    return SeparationCurve(ghost, spawn, 1e-7, steps, np.full(steps.size, level), status="finished")


def test_chaos_texts_count_the_ghosts_on_the_chaotic_level():
    # two spawns of three directions: all of the first on the chaotic level, one of the second (the issue's "every
    # ghost is sensitive" when one of three is): every spawn has a ghost there, so no spawn is low throughout
    curves = [plateau(1 + d, 0, 1.0) for d in range(3)] + [plateau(4 + d, 100, 1.0 if d == 0 else 1e-4)
                                                           for d in range(3)]
    estimate = transition_from_saturation(curves)
    assert "4 of 6 ghosts" in estimate.summary and "every ghost saturates" not in estimate.summary
    diverged = transition_from_saturation(curves, verdicts={c.ghost: "diverged" for c in curves})
    assert diverged.summary.startswith("4 of 6 ghosts, one spawned last (step 100) among them, end up on the chaotic")


def test_a_lag_read_off_a_log_spaced_start_gives_no_vote(tmp_path):
    write_synthetic_run(tmp_path / "r", steps=log_linear_steps(2000))
    run = dynprobe.load_run(tmp_path / "r")
    estimate = transition_from_kernel_velocity(run.steps, run.S, lag=1)  # pairs at the first few steps only
    assert estimate.quality == "unavailable" and estimate.step is None
    assert "in the first half of the kernel record" in estimate.summary and "lag_steps=Δ" in estimate.summary
    with_companions = tmp_path / "companions"
    write_synthetic_run(with_companions, kernel_lag=100)
    run = dynprobe.load_run(with_companions)
    assert transition_from_kernel_velocity(run.steps, run.S, lag=100).step is not None


def test_show_states_the_velocity_lag_and_where_it_came_from(tmp_path):
    write_synthetic_run(tmp_path / "gap")
    text = " ".join(shown(dynprobe.load_run(tmp_path / "gap")).split())
    assert "kernel velocity at the most common gap between kernel snapshots, Δ = 50 steps (no companion" in text
    write_synthetic_run(tmp_path / "lag", kernel_lag=100)
    manifest = json.loads((tmp_path / "lag" / MANIFEST).read_text())
    manifest["config"]["kernel"].update(lag_steps=100, chosen=["mode", "lag_steps"])  # as a probe records defaults
    manifest["eval"]["task"] = {"name": "tokens"}
    (tmp_path / "lag" / MANIFEST).write_text(json.dumps(manifest))
    text = " ".join(shown(dynprobe.load_run(tmp_path / "lag")).split())
    assert "mode trace (the default for tokens outputs)" in text
    assert ("kernel velocity S(t, t+100) on companion snapshots 100 steps later (Δ chosen from the schedule and run "
            "length; set KernelConfig(lag_steps=Δ) to change it)") in text


def test_kernel_velocity_figure_says_step_for_a_lag_of_one_and_keeps_its_y_label_inside():
    with figures.capture_figures() as captured:
        figures.velocity_figure(np.arange(1, 30), np.geomspace(1e-2, 1e-5, 29), lag=1, estimate=None)
    figure = captured[0]
    ax = figure.axes[0]
    assert "Δ = 1 step (" in ax.get_title() and "1 steps" not in ax.get_title()
    label = ax.yaxis.label.get_window_extent()  # laid out when the PNG was drawn
    frame = figure.bbox
    assert label.x0 >= frame.x0 and label.y0 >= frame.y0 and label.y1 <= frame.y1


def test_an_all_zero_map_gets_a_unit_colour_scale_and_says_so():
    norm = norm_for(np.zeros((3, 4)), False)
    assert isinstance(norm, Normalize) and (norm.vmin, norm.vmax) == (0.0, 1.0)
    with figures.capture_figures() as captured:
        figures.chaos_maps_figure(np.arange(4), {"D": np.zeros((2, 4))}, ["control", "t0=0"])
    titles = [ax.get_title() for ax in captured[0].axes]
    assert any(title.startswith("main vs ghost: D (all 0)") for title in titles)
    colorbar = next(ax for ax in captured[0].axes if ax.get_ylabel() == "D")
    assert colorbar.get_ylim() == (0.0, 1.0)


def test_an_undetermined_transition_is_never_titled_as_agreement(tmp_path):
    write_synthetic_run(tmp_path / "r", ghosts=())  # no ghosts: no chaos estimate, the trajectory ones still vote
    run = dynprobe.load_run(tmp_path / "r")
    headline = dynprobe.analysis.analyze(run).transition.headline
    text = " ".join(shown(run).split())
    html = build_report(run)
    assert headline.startswith("Transition undetermined") and headline in text
    assert "estimates agree" not in text and "estimates agree" not in html
