"""Benchmark of ``dynprobe report`` end to end on a run with 200 snapshots, 4 ghosts (+ the ε = 0 control) and
kernels at every snapshot (the acceptance target: ≤ 10 s on 2 cores).

Run: ``python tests/benchmarks/bench_report.py [--repeats 3]``. The run is synthetic (tests/synthetic_runs.py,
written through the real store/writer API). Two commands are timed as fresh processes, interleaved (A, B, A, B,
…; this machine's speed drifts between minutes):

* A = ``dynprobe report RUN -o …`` (load, analysis, 14 figures, HTML) — the number to compare with 10 s;
* B = ``dynprobe show RUN`` (load, analysis, terminal summary): the baseline, so ``report / show`` is the price
  of the figures and the HTML on top of interpreter start-up, imports and analysis.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.synthetic_runs import write_synthetic_run  # noqa: E402


def two_hundred_steps() -> np.ndarray:
    """0, 1, 2, … log-spaced to 300 (the early, dense part), then evenly spaced to 10,000: 200 snapshots."""
    early = np.unique(np.round(np.logspace(0, np.log10(300), 40)).astype(np.int64))
    late = np.linspace(350, 10_000, 200 - 1 - early.size).round().astype(np.int64)
    steps = np.unique(np.concatenate([[0], early, late]))
    assert steps.size == 200, steps.size
    return steps


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "run"
        write_synthetic_run(root, steps=two_hundred_steps(), transition=800, ghosts=(0, 300, 2000, 6000))
        output = Path(folder) / "report.html"
        report = [sys.executable, "-m", "dynprobe.cli", "report", str(root), "-o", str(output)]
        show = [sys.executable, "-m", "dynprobe.cli", "show", str(root)]
        reports, shows = [], []
        for _ in range(args.repeats):
            reports.append(timed(report))
            shows.append(timed(show))
        size = output.stat().st_size / 1e6
    median_report, median_show = statistics.median(reports), statistics.median(shows)
    print("run: 200 snapshots, 4 ghosts + control, kernels at every snapshot (synthetic)")
    print(f"dynprobe report: median {median_report:.2f} s (runs: {', '.join(f'{t:.2f}' for t in reports)}), "
          f"HTML {size:.1f} MB — target ≤ 10 s")
    print(f"dynprobe show:   median {median_show:.2f} s (runs: {', '.join(f'{t:.2f}' for t in shows)})")
    print(f"report / show = {median_report / median_show:.2f}")


if __name__ == "__main__":
    main()
