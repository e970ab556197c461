"""The comparison page (dynprobe.report.compare.build_comparison) of synthetic runs with known truths: one column per
run with its own snapshot count, final accuracy and status, the headline's transition side by side, the spread
column as the largest over the smallest step, overlays drawn on each run's own steps, and one answer box per
run."""
from __future__ import annotations

import re
from html import unescape

import numpy as np
import pytest

from dynprobe.analysis import analyze
from dynprobe.report.compare import build_comparison
from dynprobe.report.figures._base import capture_figures
from dynprobe.store.run import load_run

from ..synthetic_runs import uniform_steps, write_synthetic_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    write_synthetic_run(root / "early", steps=uniform_steps(1000, 21), transition=200, ghosts=(0, 100, 400),
                        switching=False, seed=1)
    write_synthetic_run(root / "late", steps=uniform_steps(2000, 21), transition=500, ghosts=(0, 50, 150, 600, 1200),
                        switching=False, kernels=False, status="running", seed=2)
    return [load_run(root / "early"), load_run(root / "late")]


def table_rows(html: str) -> dict[str, list[str]]:
    table = html.split('<section id="table">', 1)[1].split("</table>", 1)[0]
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", table):
        cells = [unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<t[dh]>(.*?)</t[dh]>", row)]
        rows[cells[0]] = cells[1:]
    return rows


def test_the_table_has_each_runs_own_numbers_and_the_spread_of_its_transitions(runs):
    results = [analyze(run) for run in runs]
    ticks: list[str] = []
    with capture_figures() as figures:
        html = build_comparison(runs, results=results, tick=ticks.append)
    rows = table_rows(html)
    assert rows["status"][:2] == [run.status for run in runs] == ["closed", "running"]
    assert rows["snapshots"][:2] == [f"{len(run)} (last step {run.steps[-1]})" for run in runs]
    assert rows["final eval accuracy"][:2] == [f"{run.eval_accuracy[-1]:.3g}" for run in runs]
    steps = [result.transition.step for result in results]
    headline = rows["transition (headline)"]
    for cell, step in zip(headline[:2], steps):
        assert cell == "undetermined" if step is None else cell.startswith(f"{step} (")
    assert None not in steps and steps[0] != steps[1]  # the two runs' transitions differ (bracketed by spawns)
    assert headline[2] == f"×{max(steps) / min(steps):.2g} ({min(steps)}–{max(steps)})"
    overlays = [f for f in figures if f.axes and f.axes[0].get_title() == "Eval loss"]
    lines = {line.get_label(): line for line in overlays[0].axes[0].get_lines()}
    assert len(lines) == 2
    for run, line in zip(runs, lines.values()):
        np.testing.assert_array_equal(line.get_xdata(), run.steps)
        np.testing.assert_allclose(line.get_ydata(), run.eval_loss)
    assert html.count('<div class="box"><h3>') == 2 and ticks[0] == "analysis"


def test_a_comparison_needs_two_runs(runs):
    with pytest.raises(ValueError, match="at least two runs; got 1"):
        build_comparison(runs[:1])
