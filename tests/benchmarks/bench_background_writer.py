"""How long the training thread waits for the run directory with the background writer, against writing it itself.

Run: ``python tests/benchmarks/bench_background_writer.py [--snapshots 8] [--delay 0.05] [--in-flight 1]``

A sink that sleeps ``--delay`` seconds per array stands in for a slow disk; one snapshot is a params array, a
buffers archive, an event and the commit line. Two configurations in the same run:

* **baseline**: the snapshots written straight through the sink on the calling thread;
* **background**: the same snapshots handed to a :class:`dynprobe.recording.background.BackgroundWriter`.

Reported: the time the calling thread spent submitting (before ``close()``) in each, and the ratio background /
baseline. A submission waits only while more than ``in_flight`` commits are queued, so the calling thread is
spared the last ``in_flight`` snapshots' writes: the ratio is about ``(snapshots − in_flight) / snapshots`` plus
the handover cost, and drops toward 0 with a larger ``--in-flight``; the timing view of ``tests/recording/
test_snapshot.py::test_background_writes_keep_the_order_and_leave_the_calling_thread``, which checks the same
property without a clock. The machine is shared: ``uptime`` is printed first.
"""
from __future__ import annotations

import argparse
import subprocess
import time

import numpy as np

from dynprobe.recording.background import BackgroundWriter


class SleepySink:
    def __init__(self, delay: float) -> None:
        self.root, self.manifest, self.resumed, self.delay = "nowhere", {"model": {}}, False, delay
        self.snapshots: list[dict] = []

    def event(self, event, /, **fields):
        pass

    def save_array(self, step, name, array):
        time.sleep(self.delay)

    def save_arrays(self, step, name, arrays):
        pass

    def commit_snapshot(self, record):
        self.snapshots.append(record)

    def close(self):
        pass


def submit(writer, snapshots: int) -> float:
    started = time.perf_counter()
    for step in range(snapshots):
        writer.save_array(step, "params", np.zeros(3))
        writer.save_arrays(step, "buffers", {})
        writer.event("ghost_compare", step=step)
        writer.commit_snapshot({"step": step})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=8)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--in-flight", type=int, default=1)
    args = parser.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    baseline = submit(SleepySink(args.delay), args.snapshots)
    writer = BackgroundWriter(SleepySink(args.delay), in_flight=args.in_flight)
    background = submit(writer, args.snapshots)
    writer.close()
    print(f"{args.snapshots} snapshots, {args.delay * 1e3:.0f} ms per array, in_flight={args.in_flight}")
    print(f"  baseline (synchronous): {baseline * 1e3:8.1f} ms on the calling thread")
    print(f"  background writer:      {background * 1e3:8.1f} ms on the calling thread")
    expected = max(args.snapshots - args.in_flight, 0) / args.snapshots
    print(f"  ratio background / baseline: {background / baseline:.3f}  (≈ {expected:.3f} + handover)")


if __name__ == "__main__":
    main()
