"""Time and peak memory of ``dynprobe show`` (and the reader call that reaches the damaged file) on each hostile
run directory of ``tests/hostile_runs.py``, against the intact run measured in the same invocation.

Run: ``python tests/benchmarks/bench_hostile.py [--timeout 60] [--memory-gib 8]``

Each case runs in a fresh child process (``Run(root)``, the case's reader call, then ``dynprobe show``) under an
address-space limit (``--memory-gib``, so a regression fails with MemoryError instead of taking the machine) and a
wall-clock timeout (a FIFO that blocks is killed and reported as ``timeout``). Reported per case: the outcome
(``RunFormatError``, a warning-only ``prefix`` read, or the exception), the exit code of ``show``, wall time, peak
RSS of the child (``wait4``), and both as a ratio to the intact run. The machine is shared: ``uptime`` is printed
first.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.hostile_runs import CASES, build_case, write_base_run  # noqa: E402

_CHILD = """
import resource, sys, time, warnings
warnings.simplefilter("ignore")
from dynprobe.cli import main
from dynprobe.store.run import Run
from tests.hostile_runs import CASES
name, root = sys.argv[1], sys.argv[2]
started, imported_kib = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    run = Run(root)
    if name in CASES and CASES[name].read is not None:
        CASES[name].read(run)
    outcome = "read"
except BaseException as error:
    outcome = type(error).__name__
import io, contextlib
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        code = main(["show", root])
    except BaseException as error:
        code = type(error).__name__
print("RESULT", outcome, code, time.perf_counter() - started, imported_kib, sep="|", flush=True)
"""


def measure(name: str, root: Path, timeout: float, memory: int) -> tuple[str, str, float, float]:
    """(outcome, show's exit code, seconds, peak RSS in MiB) of one child process, imports excluded: seconds from
    after the imports, and the peak RSS above the RSS the imports left (the whole run when it timed out)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", _CHILD, name, str(root)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, preexec_fn=limit, cwd=str(Path(__file__).resolve().parents[2]))
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - started > timeout:
            child.kill()
            _, status, usage = os.wait4(child.pid, 0)
            child.stdout.close()
            return "timeout", "-", time.perf_counter() - started, usage.ru_maxrss / 1024
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    lines = [line for line in child.stdout.read().decode().splitlines() if line.startswith("RESULT|")]
    child.stdout.close()
    if not lines:
        return f"died (status {status})", "-", elapsed, usage.ru_maxrss / 1024
    outcome, code, seconds, imported_kib = lines[-1].split("|")[1:]
    return outcome, code, float(seconds), (usage.ru_maxrss - int(imported_kib)) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--memory-gib", type=float, default=8.0)
    args = parser.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    memory = int(args.memory_gib * 2**30)
    with tempfile.TemporaryDirectory() as folder:
        base = write_base_run(Path(folder) / "base")
        outcome, code, base_s, base_mib = measure("intact", base, args.timeout, memory)
        base_mib = max(base_mib, 1.0)  # the ratio's floor: 1 MiB
        print(f"{'case':<28} {'outcome':<16} {'show':>5} {'time s':>7} {'× intact':>8} {'peak +MiB':>9} "
              f"{'× intact':>8}")
        print(f"{'intact run':<28} {outcome:<16} {code:>5} {base_s:7.3f} {1:8.2f} {base_mib:9.1f} {1:8.2f}")
        for i, name in enumerate(CASES):
            root = build_case(base, name, Path(folder) / f"case{i}")
            outcome, code, seconds, mib = measure(name, root, args.timeout, memory)
            print(f"{name:<28} {outcome:<16} {code:>5} {seconds:7.3f} {seconds / base_s:8.2f} {mib:9.1f} "
                  f"{mib / base_mib:8.2f}", flush=True)


if __name__ == "__main__":
    main()
