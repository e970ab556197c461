"""The history of earlier vectors (dynprobe/store/history.py): committed lazily, bounded by what the process may
still allocate, shed to the run directory instead of failing, and undone by a rollback."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dynprobe.store.history import GROWTH_SHARE, VectorHistory

P = 1000
ROW = P * 4  # bytes of one float32 vector
ROOT = Path(__file__).resolve().parents[2]


def _history(budget: int, headroom: float = float("inf"), stored: dict | None = None) -> VectorHistory:
    stored = {} if stored is None else stored
    return VectorHistory("cpu", dtype=torch.float32, memory_budget=budget, load=lambda i: stored.get(i),
                         headroom=lambda: headroom)


def _append(history: VectorHistory, vector: torch.Tensor, stored: dict | None = None) -> bool:
    if stored is not None:
        stored[len(history)] = vector.numpy().copy()
    return history.append(vector, np.ones(1))


def test_the_buffer_is_committed_lazily_by_doubling_never_reserved_up_front():
    history = _history(2 * 2**30)  # half a million vectors' budget
    held = []
    for k in range(40):
        _append(history, torch.full((P,), float(k)))
        held.append(history.bytes_held // ROW)
    assert history.capacity == 2 * 2**30 // ROW and not history.spilled
    assert held[0] == 8 and held[8] == 18 and held[-1] == 78  # max(8, 2·needed) rows at each growth
    assert sorted(set(held)) == [8, 18, 38, 78]


def test_a_growth_takes_at_most_its_share_of_the_headroom_and_the_history_spills_instead():
    """With room for 30 vectors the buffer may grow to 15 rows (GROWTH_SHARE = 1/2), then the next vector spills:
    memory keeps the anchor and a ring of the newest, the rest is read back from the run directory."""
    stored: dict = {}
    history = _history(2 * 2**30, headroom=30 * ROW, stored=stored)
    for k in range(40):
        _append(history, torch.full((P,), float(k)), stored)
        assert history.bytes_held <= GROWTH_SHARE * 30 * ROW
    assert history.spilled and history.anchored and history.shed >= 1
    assert history.capacity == 15 and len(history.slots) == 15
    assert history.slots[0] == 0 and sorted(history.slots[1:]) == list(range(26, 40))  # the anchor, the newest
    assert history.far == list(range(1, 26))
    resident, stack = history.resident()
    for index, vector in zip(resident, stack):
        assert torch.equal(vector, torch.full((P,), float(index)))


def test_an_allocation_that_fails_sheds_instead_of_failing(monkeypatch):
    empty = torch.empty

    def refuse_large(*shape, **kwargs):
        size = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if len(size) == 2 and size[0] > 8:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return empty(*shape, **kwargs)

    monkeypatch.setattr(torch, "empty", refuse_large)
    history = _history(2 * 2**30)
    for k in range(12):
        _append(history, torch.full((P,), float(k)))
    assert history.spilled and history.capacity == 8 and history.shed == 1


def test_the_history_never_changes_the_deterministic_fill_flag(monkeypatch):
    """Under torch.use_deterministic_algorithms new memory is NaN-filled; the history must not switch that off
    process-wide (another thread could allocate meanwhile): it allocates only what it uses."""
    seen = []
    empty = torch.empty

    def watching(*shape, **kwargs):
        seen.append(torch.utils.deterministic.fill_uninitialized_memory)
        return empty(*shape, **kwargs)

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    monkeypatch.setattr(torch, "empty", watching)
    try:
        history = _history(2 * 2**30)
        for k in range(10):
            _append(history, torch.full((P,), float(k)))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert seen and all(seen)
    assert history.bytes_held == 18 * ROW


def test_a_rollback_restores_the_ring_slot_an_uncommitted_vector_overwrote():
    stored: dict = {}
    history = _history(4 * ROW, stored=stored)
    for k in range(6):
        _append(history, torch.full((P,), float(k)), stored)
    before = (list(history.slots), list(history.far), history.resident()[1].clone(), dict(history.summaries))
    savepoint = history.savepoint()
    _append(history, torch.full((P,), 99.0))  # replaces the oldest snapshot of the ring
    assert 6 in history.slots
    history.rollback(savepoint)
    assert len(history) == 6 and history.slots == before[0] and history.far == before[1]
    assert torch.equal(history.resident()[1], before[2]) and history.summaries.keys() == before[3].keys()
    _append(history, torch.full((P,), 6.0), stored)  # the next snapshot: as if nothing had happened
    for index, vector in zip(*history.resident()):
        assert torch.equal(vector, torch.full((P,), float(index)))


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="the child limits itself from /proc")
@pytest.mark.parametrize("history_memory", [None, 10 * 2**30], ids=["default-budget", "budget-beyond-the-limit"])
def test_a_probed_run_completes_inside_an_address_space_limit(tmp_path, history_memory):
    """A child process limits its address space (RLIMIT_AS) to what it maps plus 400 MiB and trains a 1 M-parameter
    model for 40 snapshots (160 MiB of vectors); with a 10 GiB ``history_memory`` the buffer grows only within its
    share of the headroom and spills (the landed code reserved the whole budget at the first snapshot and failed).
    Every snapshot commits and the run closes."""
    command = [sys.executable, str(ROOT / "tests" / "memory_limited_run.py"), str(tmp_path / "run"),
               "--limit-mib", "400"]
    if history_memory is not None:
        command += ["--history-memory", str(history_memory)]
    # One thread and two malloc arenas: RLIMIT_AS counts address space, and each extra thread reserves 64 MiB arenas
    # and BLAS buffers it never touches (measured: with 2 threads OpenBLAS failed to allocate its own buffers under
    # this limit); the probe's own memory is what this test limits.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    child = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["snapshots"] == 41 and report["status"] == "closed"
    print(f"child peak RSS {report['peak_rss_kib'] / 1024:.0f} MiB; RUSAGE_CHILDREN max "
          f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB")



def test_a_cpu_history_sheds_when_the_headroom_falls_after_its_buffer_grew():
    """Rows of the buffer not yet written cost no memory on the CPU until written: when the process's headroom
    falls below two vectors (the user's memory grew) the next vector spills instead of filling one."""
    headroom = [float("inf")]
    history = VectorHistory("cpu", dtype=torch.float32, memory_budget=2 * 2**30, load=lambda i: None,
                            headroom=lambda: headroom[0])
    for k in range(5):
        _append(history, torch.full((P,), float(k)))
    assert history.bytes_held == 8 * ROW and not history.spilled  # room for 8, 5 written
    headroom[0] = 1.5 * ROW
    for k in range(5, 9):
        _append(history, torch.full((P,), float(k)))
    assert history.spilled and history.capacity == 5 and history.shed == 1
    assert history.slots[0] == 0 and sorted(history.slots) == [0, 5, 6, 7, 8]  # the anchor and the newest
