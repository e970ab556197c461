"""Schedules: membership, composition, defaults, validation, manifest round trip."""
from __future__ import annotations

import pytest

from dynprobe import schedule


def test_every_k_from_start_to_stop():
    s = schedule.every(5, start=3, stop=20)
    assert [t for t in range(30) if t in s] == [3, 8, 13, 18]


def test_log_spaced_is_dense_early_and_includes_zero_and_until():
    steps = schedule.log_spaced(1000).steps(5000)
    assert steps[:8] == [0, 1, 2, 3, 4, 5, 6, 8]
    assert steps[-1] == 1000 and len(steps) == 29
    assert all(b > a for a, b in zip(steps, steps[1:]))


def test_union_contains_both():
    s = schedule.at([7]) | schedule.every(10)
    assert s.steps(30) == [0, 7, 10, 20, 30]


def test_default_schedule_is_log_spaced_then_every_250():
    s = schedule.default_schedule()
    assert 0 in s and 1 in s and 1000 in s and 1250 in s and 1100 not in s
    assert len(s.steps(10_000)) == 68


@pytest.mark.parametrize("steps, message", [([2, 1], "unsorted"), ([1, 1], "duplicated"), ([-3], ">= 0"),
                                            ([1.5], "must be an int")])
def test_explicit_lists_are_validated(steps, message):
    with pytest.raises((ValueError, TypeError), match=message):
        schedule.at(steps)


def test_as_schedule_coerces_ints_and_lists():
    assert schedule.as_schedule(4).steps(9) == [0, 4, 8]
    assert schedule.as_schedule([1, 5]).steps(9) == [1, 5]
    assert schedule.as_schedule(None).to_config() == schedule.default_schedule().to_config()


def test_config_round_trip():
    s = schedule.log_spaced(100, per_decade=5) | schedule.every(7, start=2) | schedule.at([3, 99])
    rebuilt = schedule.schedule_from_config(s.to_config())
    assert rebuilt.steps(500) == s.steps(500)


def test_next_after():
    assert schedule.every(10).next_after(10) == 20
    assert schedule.at([1, 2]).next_after(2, limit=100) is None
