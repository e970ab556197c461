"""``dynprobe.recording.learning_rate``: the per-step rate log written where rates change, expanded back by a
brute-force reading of its (step, rate) pairs and compared with every rate the loop noted."""
from __future__ import annotations

import math

import numpy as np
import torch

from dynprobe.recording.learning_rate import LearningRateLog
from dynprobe.store.layout import lr_files, lr_path
from dynprobe.store.rows import PairLog


def expanded(path, steps: int) -> list[float]:
    """Each recorded rate holds from its step until the next record; NaN before the first record and after the last
    recorded step (a naive loop, not the reader's vectorized version)."""
    recorded_steps, rates = PairLog(path).read()
    out = []
    for step in range(steps):
        earlier = [k for k, s in enumerate(recorded_steps) if s <= step]
        out.append(float(rates[earlier[-1]]) if earlier and step <= recorded_steps[-1] else math.nan)
    return out


def same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


def test_the_log_expands_back_to_every_noted_rate_across_flushes(tmp_path):
    rng = np.random.default_rng(0)
    log = LearningRateLog(tmp_path)
    noted: dict[int, list[float]] = {0: [], 1: []}
    steps = 120
    rate = [0.1, 0.05]
    for step in range(steps):
        if rng.random() < 0.05:
            rate[0] *= float(rng.choice([0.1, 0.5, 2.0]))
        rate[1] = 0.05 * (1 + math.cos(step / 10))  # changes at every step
        groups = [{"lr": rate[0]}, {"lr": torch.tensor(rate[1])}]  # a CPU tensor rate is read too
        if step < 30:
            groups = groups[:1]  # the second group is added at step 30
        log.note(step, groups)
        noted[0].append(rate[0])
        noted[1].append(rate[1] if step >= 30 else math.nan)
        if rng.random() < 0.1:
            log.flush()
    log.flush()
    assert set(lr_files(tmp_path)) == {0, 1}
    assert same(expanded(lr_path(tmp_path, 0), steps), noted[0])
    assert same(expanded(lr_path(tmp_path, 1), steps), [float(np.float32(r)) if not math.isnan(r) else r
                                                         for r in noted[1]])  # the tensor held it in float32
    constant_steps, _ = PairLog(lr_path(tmp_path, 0)).read()
    assert len(constant_steps) < steps // 4  # stored where it changes, not at every step


def test_a_rate_that_cannot_be_read_without_waiting_is_nan_and_nothing_is_written_without_a_root(tmp_path):
    log = LearningRateLog(tmp_path)
    for step in range(4):
        log.note(step, [{"lr": torch.tensor(0.1, device="meta")}, {"lr": "not a number"}, {}])
    log.flush()
    for group in range(3):
        assert all(math.isnan(r) for r in expanded(lr_path(tmp_path, group), 4))
        assert len(PairLog(lr_path(tmp_path, group)).read()[0]) == 2  # the first NaN and the last step
    silent = LearningRateLog(None)
    silent.note(0, [{"lr": 0.1}])
    silent.flush()
    empty = LearningRateLog(tmp_path / "never")
    empty.flush()  # nothing noted: nothing to write
    assert not (tmp_path / "never").exists()
