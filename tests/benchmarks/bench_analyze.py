"""What the chaos estimate (where each ghost's separation saturates) adds to ``analyze``.

Run: ``python tests/benchmarks/bench_analyze.py [--ghosts 24] [--steps 100000]``

A synthetic run directory (``tests/synthetic_runs.py``: 40 snapshots, kernels, a C map) gets ``--ghosts`` perturbed
ghosts whose separation logs hold one (step, l2) pair per step for ``--steps`` steps — a long run with several
directions per spawn. Reported (median of 5, same process): ``analyze(run)`` end to end; reading the separation
curves; ``transition_from_saturation`` on the curves read (the new estimate); the share of ``analyze`` it takes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import dynprobe  # noqa: E402
from dynprobe import analysis  # noqa: E402
from dynprobe.store.layout import separation_path  # noqa: E402
from dynprobe.store.rows import PairLog  # noqa: E402
from tests.synthetic_runs import write_synthetic_run  # noqa: E402


def median_seconds(action, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ghosts", type=int, default=24)
    parser.add_argument("--steps", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spawns = tuple(int(s) for s in np.linspace(0, args.steps // 2, args.ghosts))
        truth = write_synthetic_run(Path(tmp) / "run", steps=np.linspace(0, args.steps, 40).astype(int),
                                    ghosts=spawns, transition=args.steps // 8)
        run = dynprobe.load_run(truth.root)
        rng = np.random.default_rng(0)
        for ghost in run.ghosts:  # per-step curves over the whole run, replacing the synthetic ones
            path = separation_path(run.path, ghost.ghost_id)
            path.unlink()
            steps = np.arange(ghost.spawn_step, args.steps + 1, dtype=np.float64)
            PairLog(path).append(steps, np.exp(rng.normal(-5, 1, steps.size)))
        run = dynprobe.load_run(truth.root)
        curves = analysis.separation_curves(run)
        pairs = sum(c.steps.size for c in curves)
        total = median_seconds(lambda: analysis.analyze(run))
        read = median_seconds(lambda: analysis.separation_curves(run))
        estimate = median_seconds(lambda: analysis.transition_from_saturation(curves))
        print(json.dumps({"ghosts": len(curves), "separation_pairs": pairs, "analyze_s": round(total, 4),
                          "read_curves_s": round(read, 4), "chaos_estimate_s": round(estimate, 4),
                          "estimate_share_of_analyze": round(estimate / total, 3)}, indent=1))


if __name__ == "__main__":
    main()
