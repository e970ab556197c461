"""The snapshot progress line against the wall clock: phase durations it reports, and what it costs.

Run: ``python tests/benchmarks/bench_progress.py [--snapshots 50] [--phase 0.02]``

Two measurements in the same run:

* **accuracy**: snapshots of two phases that each sleep ``--phase`` seconds; the ratio of the durations
  :class:`dynprobe.recording.progress.SnapshotProgress` reports to the slept time (≈ 1, above by the scheduler's
  wake-up latency);
* **overhead**: ``--snapshots`` empty snapshots through a ``SnapshotProgress`` (its timer thread started and
  cancelled each time, printing to a log) against the same loop over ``contextlib.nullcontext`` (the baseline);
  printed as the time per snapshot of each and the difference.

The deterministic checks of the same behaviour (which snapshots print, the line's text, phase sums) are in
``tests/recording/test_cost.py`` with a manual clock. The machine is shared: ``uptime`` is printed first.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import subprocess
import time

from rich.console import Console

from dynprobe.recording.progress import SnapshotProgress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=50)
    parser.add_argument("--phase", type=float, default=0.02)
    args = parser.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    progress = SnapshotProgress(delay=3600.0, console=Console(file=io.StringIO(), force_terminal=False))
    ratios = []
    for step in range(5):
        with progress.snapshot(step):
            progress.phase("evaluating")
            time.sleep(args.phase)
            progress.phase("barriers")
            time.sleep(args.phase)
        ratios += [progress.last_durations[name] / args.phase for name in ("evaluating", "barriers")]
    print(f"reported / slept phase time: median {statistics.median(ratios):.3f}, max {max(ratios):.3f}")

    def loop(make) -> float:
        started = time.perf_counter()
        for step in range(args.snapshots):
            with make(step):
                pass
        return (time.perf_counter() - started) / args.snapshots

    baseline = loop(lambda step: contextlib.nullcontext())
    probed = loop(progress.snapshot)
    print(f"per snapshot: baseline {baseline * 1e6:.1f} µs, with SnapshotProgress {probed * 1e6:.1f} µs "
          f"(+{(probed - baseline) * 1e6:.1f} µs, ratio {probed / max(baseline, 1e-9):.0f}×)")


if __name__ == "__main__":
    main()
