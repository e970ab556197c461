"""The report's sections on synthetic runs with a known truth (dynprobe.report._sections, ._context, ._chaos,
._cone, ._layers, ._evidence): the context carries the headline's transition, the header says how the run ended,
the ghost table has one row per ghost with the run's own spawn steps, and what a run lacks is a note saying how
to get it, not an empty section."""
from __future__ import annotations

import re
from html import unescape

import numpy as np
import pytest

from dynprobe.analysis import analyze
from dynprobe.report._chaos import chaos_section
from dynprobe.report._cone import cone_section
from dynprobe.report._context import SectionContext
from dynprobe.report._evidence import level_offs
from dynprobe.report._layers import layers_section
from dynprobe.report._sections import MISSING, RunSections
from dynprobe.report.figures._base import capture_figures
from dynprobe.store.run import load_run

from ..synthetic_runs import uniform_steps, write_synthetic_run

SPAWNS = (0, 150, 600)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    root = tmp_path_factory.mktemp("sections") / "run"
    write_synthetic_run(root, steps=uniform_steps(1000, 21), transition=300, ghosts=SPAWNS, switching=False)
    run = load_run(root)
    return run, analyze(run)


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    root = tmp_path_factory.mktemp("sections") / "bare"
    write_synthetic_run(root, steps=uniform_steps(500, 11), kernels=False, ghosts=(), switching=False,
                        barriers=False, status="interrupted")
    run = load_run(root)
    return run, analyze(run)


def rows_of(html: str, heading: str) -> list[list[str]]:
    """The body rows of the table that follows ``heading``, as cell texts."""
    table = html.split(heading, 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", table)
    return [[unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td>(.*?)</td>", r)] for r in rows[1:]]


def test_the_context_carries_the_runs_steps_and_the_headlines_transition(full):
    run, result = full
    ticks: list[str] = []
    context = SectionContext(run, result, log_steps=True, tick=ticks.append)
    np.testing.assert_array_equal(context.steps, run.steps)
    assert context.transition == result.transition.step and context.include_command is False


def test_the_ghost_table_has_one_row_per_ghost_with_its_spawn_step(full):
    run, result = full
    ticks: list[str] = []
    html = chaos_section(SectionContext(run, result, log_steps=False, tick=ticks.append))
    rows = rows_of(html, "<h3>Every ghost</h3>")
    assert len(rows) == len(run.ghosts)
    assert [int(r[1]) for r in rows] == [g.spawn_step for g in run.ghosts]
    assert sorted({g.spawn_step for g in run.ghosts}) == list(SPAWNS)
    assert [r[2] == "yes" for r in rows] == [bool(g.control) for g in run.ghosts]
    assert ticks  # every piece of figure work is announced


def test_an_interrupted_run_says_so_and_each_missing_part_says_how_to_get_it(bare):
    run, result = bare
    sections = RunSections(run, result, log_steps=False, tick=lambda label: None)
    header = sections.header()
    assert "This run was <b>interrupted</b>" in header and f"{len(run)} snapshots" in header
    assert chaos_section(sections) == f'<div class="missing">{MISSING["ghosts"]}</div>'
    cone = cone_section(sections)
    assert cone.startswith('<div class="missing">') and "<img" not in cone
    layers = layers_section(sections)  # per-layer C only: no kernels for S, no ghosts for separation shares
    assert layers.count("<figure>") == 1 and 'alt="per-layer C"' in layers and 'class="missing"' in layers


def test_the_evidence_figure_shows_at_most_eight_of_the_estimates_rows(full):
    run, result = full
    estimate = result.transition.get("trajectory_C")
    starts = estimate.evidence.get("row_starts", [])
    if not starts:
        pytest.skip("the synthetic run's C estimate kept no rows")
    context = SectionContext(run, result, log_steps=False, tick=lambda label: None)
    with capture_figures() as figures:
        html = level_offs(context, estimate, "C rows", "C")
    labels = [line.get_label() for line in figures[0].axes[0].get_lines() if line.get_label().startswith("t0 = ")]
    assert len(labels) == min(len(starts), 8) and len(set(labels)) == len(labels)
    assert {int(label.removeprefix("t0 = ")) for label in labels} <= set(starts)
    assert html.startswith("<figure>")
