"""No host synchronisation on a plain training step (a step without a snapshot, spawn or status change).

Counted with :class:`tests.host_syncs.HostSyncCounter` (on CUDA also with ``torch.cuda.set_sync_debug_mode``) over
plain steps of a small CNN with BatchNorm trained by SGD
with momentum: the bare loop makes none, and neither does the probed loop — without ghosts, with 3 ghosts and the
ε = 0 control, sequential or vectorized. The ghosts' per-step values are read in one transfer every
:data:`dynprobe.ghosts.readings.READ_EVERY` plain steps (and at snapshots). Before this was built the probed loop
made 24 per step (sequential: 4 ``float(l2)``, 4 ``bool(isfinite)``, 16 ``torch.equal``; vectorized: 16
``torch.equal`` and 2 ``.tolist()``).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dynprobe
from dynprobe import Ghosts, schedule
from dynprobe.ghosts.readings import READ_EVERY

from ..conftest import SmallCNN, make_data
from ..host_syncs import HostSyncCounter

PLAIN_STEPS = 2 * READ_EVERY + 3
SPAWNS = [1, 2, 3]  # 3 perturbed ghosts, and the control at step 1
LAST_SNAPSHOT = 4  # then plain steps only, until close


def _loop(device: torch.device, probe_kwargs: dict | None, tmp_path) -> list[tuple[int, HostSyncCounter]]:
    """Train; the host synchronisations of each step after the last snapshot (one counter per step)."""
    torch.manual_seed(0)
    model = SmallCNN().to(device)
    data = make_data((3, 8, 8))
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()
    probe = None
    if probe_kwargs is not None:
        probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                               schedule=schedule.at([0, LAST_SNAPSHOT]), progress=False, **probe_kwargs)
        criterion = probe.watch(criterion)
    generator = torch.Generator(device).manual_seed(1)
    counts = []
    for step in range(1, LAST_SNAPSHOT + PLAIN_STEPS + 1):
        counter = HostSyncCounter(cuda=device.type == "cuda")
        with counter:
            index = torch.randint(0, x_train.shape[0], (32,), device=device, generator=generator)
            loss = criterion(model(x_train[index]), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if step > LAST_SNAPSHOT:
            counts.append((step, counter))
    if probe is not None:
        probe.close()
    return counts


def _describe(counts: list[tuple[int, HostSyncCounter]]) -> str:
    return "; ".join(f"step {step}: {dict(counter.where)}" for step, counter in counts if counter.total)


@pytest.mark.filterwarnings("ignore:dynprobe. at step")  # the vectorized shadow's drift: not what is tested here
@pytest.mark.parametrize("vectorize", [False, True], ids=["sequential", "vectorized"])
def test_a_plain_step_with_ghosts_makes_no_host_sync_and_reads_once_every_read_every_steps(vectorize, device,
                                                                                          tmp_path):
    ghosts = Ghosts(at=SPAWNS, control=True, vectorize=vectorize)
    counts = _loop(device, {"ghosts": ghosts}, tmp_path)
    reads = [step for step, counter in counts if counter.total]
    # the last event that read the ghosts' values is the snapshot at LAST_SNAPSHOT: then one read per READ_EVERY steps
    assert reads == list(range(LAST_SNAPSHOT + READ_EVERY, LAST_SNAPSHOT + PLAIN_STEPS + 1, READ_EVERY)), \
        _describe(counts)
    assert all(counter.total == 1 for _, counter in counts if counter.total), _describe(counts)


@pytest.mark.parametrize("probed", [False, True], ids=["bare", "probe-without-ghosts"])
def test_a_plain_step_without_ghosts_makes_no_host_sync(probed, device, tmp_path):
    counts = _loop(device, {} if probed else None, tmp_path)
    assert all(counter.total == 0 for _, counter in counts), _describe(counts)


def test_the_counter_sees_every_kind_of_host_read():
    t = torch.ones(3)
    with HostSyncCounter() as counter:
        float(t.sum()), bool(t.any()), torch.equal(t, t), t.tolist(), t.cpu(), t.sum().item()
        t.to(torch.float64), t + 1  # not reads
    assert counter.total == 6, dict(counter.counts)
