"""The prepared GPU check (tests/benchmarks/bench_gpu.py) runs in its dry mode on the CPU and reports what it
measures: no host sync on plain steps but one read per READ_EVERY with ghosts, the control exact, the eNTK at the
float64 reference."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_dry_on_the_cpu_and_prints_one_json_summary():
    done = subprocess.run([sys.executable, "tests/benchmarks/bench_gpu.py", "--dry-run", "--device", "cpu",
                           "--skip-tests"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    syncs = summary["syncs"]
    assert syncs["bare"]["max_per_step"] == 0 and syncs["probe"]["max_per_step"] == 0
    for name in ("ghosts_sequential", "ghosts_vectorized"):
        assert syncs[name]["syncs_on_those_steps"] == [1] * len(syncs[name]["steps_with_syncs"]) != []
    assert summary["control"]["control_separation_all_zero"] and summary["control"]["control_drift_events"] == 0
    assert summary["control"]["main_run_bitwise_equal_to_probe_free_run"]
    assert summary["entk"]["relative_error_vs_float64_tutorial"] < 1e-6
    assert all(summary["step_time"][name]["ratio_to_bare"] > 0 for name in ("recording", "kernel"))
    assert summary["rows"]["snapshots"] == 6 and summary["rows"]["cost_over_floor"] > 0
