"""``dynprobe.metrics.history``: where the earlier snapshots' vectors live. Checked against a plain dict of every
vector ever appended (the disk) and the documented policy: all in memory while they fit, then the first one
(when two or more fit) and the newest ``capacity − 1``; everything else read back, every byte read counted."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dynprobe.store.history import VectorHistory

DIM = 7


@pytest.mark.parametrize("fits", [0, 1, 2, 3, 5, 100])
def test_memory_holds_the_documented_snapshots_and_everything_reads_back_exactly(fits):
    disk: dict[int, np.ndarray] = {}
    history = VectorHistory("cpu", dtype=torch.float64, memory_budget=fits * DIM * 8, load=lambda i: disk.get(i))
    rng = np.random.default_rng(fits)
    appended = 12
    for index in range(appended):
        vector = rng.normal(size=DIM)
        disk[index] = vector
        history.append(None if index == 4 else torch.from_numpy(vector), np.zeros(1))  # snapshot 4 has none

    stored = [i for i in range(appended) if i != 4]
    if fits >= len(stored):
        expected = set(stored)
    elif fits >= 2:
        expected = {0} | set(stored[-(fits - 1):])
    else:
        expected = set(stored[-fits:]) if fits else set()
    indices, stacked = history.resident()
    assert set(indices) == expected and history.present == [i != 4 for i in range(appended)]
    for slot, index in enumerate(indices):
        np.testing.assert_array_equal(stacked[slot].numpy(), disk[index])  # memory holds the right vector
    assert history.bytes_loaded == 0
    read = 0
    for index in stored:
        assert history.in_memory(index) == (index in expected)
        np.testing.assert_array_equal(history.columns(index, 2, 5, {}).numpy(), disk[index][2:5])
        read += 0 if index in expected else DIM * 8  # no load_columns given: the whole vector is read
    assert history.bytes_loaded == read
    extra = {99: torch.arange(DIM, dtype=torch.float64)}
    np.testing.assert_array_equal(history.columns(99, 0, 3, extra).numpy(), [0.0, 1.0, 2.0])


def test_a_deferred_budget_is_measured_at_the_second_vector():
    asked = []

    def budget():
        asked.append(len(history))
        return 2 * DIM * 8

    history = VectorHistory("cpu", dtype=torch.float64, memory_budget=budget, load=lambda i: None)
    history.append(torch.zeros(DIM), np.zeros(1))
    assert asked == [] and history.capacity == 1  # provisional
    history.append(torch.ones(DIM), np.zeros(1))
    assert asked == [2] and history.capacity == 2
    history.append(torch.full((DIM,), 2.0), np.zeros(1))
    assert set(history.resident()[0]) == {0, 2}  # anchor and the newest
