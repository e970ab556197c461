"""lag_pairs: the one definition of which snapshots a kernel velocity at lag Δ pairs (checked by brute force)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from dynprobe._util.steps import lag_pairs, most_common_gap


def _brute_force(steps, lag):
    pairs = []
    for i, a in enumerate(steps):
        later = [j for j, b in enumerate(steps) if b - a == lag]
        if later:
            pairs.append((i, later[0]))
    return pairs


@pytest.mark.parametrize("seed", range(5))
def test_lag_pairs_equal_a_brute_force_search(seed):
    rng = np.random.default_rng(seed)
    steps = np.unique(rng.integers(0, 200, size=40))
    for lag in (1, 2, 5, 10, 50):
        i, j = lag_pairs(steps, lag)
        assert list(zip(i.tolist(), j.tolist())) == _brute_force(steps.tolist(), lag)
        assert np.all(steps[j] - steps[i] == lag)


def test_only_exact_gaps_pair():
    steps = [0, 1, 2, 5, 10, 11, 20]
    i, j = lag_pairs(steps, 10)
    assert [(steps[a], steps[b]) for a, b in zip(i, j)] == [(0, 10), (1, 11), (10, 20)]
    assert lag_pairs(steps, 7)[0].size == 0  # no gap of exactly 7: nothing, not the nearest pairs


@pytest.mark.parametrize(("lag", "error"), [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError),
                                            ("2", TypeError), (None, TypeError)])
def test_the_lag_is_a_positive_integer(lag, error):
    with pytest.raises(error, match="lag must be an int >= 1"):
        lag_pairs([0, 1], lag)


def test_steps_must_be_integers():
    with pytest.raises(ValueError, match="integer steps"):
        lag_pairs(np.array([0.0, 1.0]), 1)


def test_most_common_gap():
    assert most_common_gap([0, 2, 5, 10, 15]) == 5
    assert most_common_gap([0, 1, 3, 4, 6]) == 1  # a tie between 1 and 2: the smaller
    assert most_common_gap([3]) is None
    for steps in itertools.permutations([0, 4, 8, 9]):
        assert most_common_gap(steps) == 4
