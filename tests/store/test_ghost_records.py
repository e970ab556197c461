"""``dynprobe.store.ghost_records``: ``run.ghosts`` and ``run.chaos`` assembled from random event logs, against a
brute-force replay of the same events (the latest status up to the last committed step; one cell per
(ghost, snapshot) and metric, the last event writing it)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dynprobe.ghosts.separation import SeparationLog
from dynprobe.store.ghost_records import CHAOS_METRICS, GhostInfo, chaos_maps, ghost_infos


def random_events(rng: np.random.Generator, ghosts: int, steps: list[int]) -> list[dict]:
    events = []
    for ghost in rng.permutation(ghosts):  # spawn order need not be id order
        spawn = int(rng.choice(steps))
        events.append({"event": "ghost_spawn", "ghost": int(ghost), "step": spawn, "spawn_step": spawn,
                       "control": bool(ghost == 0), "kind": "l2", "seed": int(ghost), "nominal_norm": 1e-3,
                       "realized_norm": 1e-3 * (1 + ghost), "changed": 10, "total": 10})
        for step in [s for s in steps if s >= spawn]:
            kind = "ghost_compare" if rng.random() < 0.8 else "ghost_barrier"
            fields = {name: float(rng.normal()) for name in CHAOS_METRICS if rng.random() < 0.7}
            events.append({"event": kind, "ghost": int(ghost), "step": step, **fields})
            if rng.random() < 0.2:
                events.append({"event": "ghost_status", "ghost": int(ghost), "step": step,
                               "status": str(rng.choice(["diverged", "failed", "finished"])), "reason": "r"})
    events.append({"event": "ghost_compare", "ghost": 99, "step": steps[0], "C": 1.0})  # a ghost never spawned
    order = rng.permutation(len(events))  # interleaved ghosts (statuses of one ghost keep their order)
    by_ghost: dict[int, list[dict]] = {}
    for event in events:
        by_ghost.setdefault(event["ghost"], []).append(event)
    queues = {g: iter(e) for g, e in by_ghost.items()}
    owners = [e["ghost"] for e in events]
    return [next(queues[owners[k]]) for k in order]


@pytest.mark.parametrize("seed", range(4))
def test_ghosts_and_chaos_maps_equal_a_brute_force_replay(seed):
    rng = np.random.default_rng(seed)
    steps = [0, 3, 7, 12, 20]
    events = random_events(rng, ghosts=5, steps=steps)
    last_step = 12  # the last committed snapshot: later events are not part of the run yet
    infos = ghost_infos(events, last_step)

    expected = []
    for ghost in range(5):
        spawn = next((e for e in events if e["event"] == "ghost_spawn" and e["ghost"] == ghost), None)
        if spawn is None or spawn["step"] > last_step:
            continue
        status, status_step, reason = "alive", None, None
        for event in events:
            if event["event"] == "ghost_status" and event["ghost"] == ghost and event["step"] <= last_step:
                status, status_step, reason = event["status"], event["step"], event["reason"]
        expected.append(GhostInfo(ghost, spawn["spawn_step"], spawn["control"], "l2", ghost, 1e-3,
                                  spawn["realized_norm"], 10, 10, status, status_step, reason))
    assert infos == expected

    committed = np.array([s for s in steps if s <= last_step])
    maps = chaos_maps(events, infos, committed)
    assert set(maps) == set(CHAOS_METRICS)
    for name in CHAOS_METRICS:
        assert maps[name].shape == (len(infos), len(committed))
        for row, info in enumerate(infos):
            for column, step in enumerate(committed):
                values = [e[name] for e in events if e["event"] in ("ghost_compare", "ghost_barrier")
                          and e["ghost"] == info.ghost_id and e["step"] == step and e.get(name) is not None]
                cell = maps[name][row, column]
                assert (math.isnan(cell) and not values) or cell == values[-1], (name, info.ghost_id, step)


class RecordingSink:
    def __init__(self) -> None:
        self.appended: list[tuple[int, list[float], list[float]]] = []

    def append_separation(self, ghost, steps, values):
        assert steps.dtype == values.dtype == np.float64
        self.appended.append((ghost, steps.tolist(), values.tolist()))


def test_the_separation_log_hands_each_ghosts_pairs_to_the_sink_once_in_order():
    sink = RecordingSink()
    log = SeparationLog(sink)
    noted = {0: [], 3: []}
    for step in range(6):
        for ghost in (3, 0):
            value = 0.1 * step + ghost
            log.note(ghost, step, value)
            noted[ghost].append((float(step), value))
        if step == 2:
            log.flush()
    log.flush()
    log.flush()  # nothing pending: nothing appended
    by_ghost: dict[int, list[tuple[float, float]]] = {0: [], 3: []}
    for ghost, steps, values in sink.appended:
        by_ghost[ghost] += list(zip(steps, values))
    assert by_ghost == noted
    assert len(sink.appended) == 4  # one append per ghost and flush that had pairs
