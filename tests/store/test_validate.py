"""``dynprobe.store.validate``: the valid prefix of an event log. Random well-formed logs are whole; one damaged
record at a random position cuts the log exactly before it, whatever the damage."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dynprobe.store.validate import valid_event_prefix


def well_formed_log(rng: np.random.Generator, snapshots: int) -> list[dict]:
    events, step, ghosts = [{"event": "attach", "step": 0}], 0, 0
    for k in range(snapshots):
        events.append({"event": "snapshot", "snapshot_index": k, "step": step, "eval_loss": float(rng.random()),
                       "eval_accuracy": None, "train_loss": 0.5, "kernel": bool(k % 2)})
        if rng.random() < 0.4:
            events.append({"event": "ghost_spawn", "ghost": ghosts, "step": step, "spawn_step": step,
                           "control": ghosts == 0, "kind": "l2", "seed": ghosts, "nominal_norm": 1e-3,
                           "realized_norm": 1e-3, "changed": 3, "total": 3})
            ghosts += 1
        for ghost in range(ghosts):
            events.append({"event": "ghost_compare", "ghost": ghost, "step": step, "C": float(rng.random())})
        step += int(rng.integers(1, 5))
    return events


DAMAGE = {
    "no event name": lambda e, log: e.pop("event"),
    "snapshot numbered again": lambda e, log: e.update(snapshot_index=e["snapshot_index"] - 1),
    "snapshot number skipped": lambda e, log: e.update(snapshot_index=e["snapshot_index"] + 1),
    "snapshot step negative": lambda e, log: e.update(step=-1),
    "snapshot step equal to the previous one": lambda e, log: e.update(
        step=[x for x in log[: log.index(e)] if x.get("event") == "snapshot"][-1]["step"]),
    "snapshot eval_loss a string": lambda e, log: e.update(eval_loss="low"),
    "snapshot without its step": lambda e, log: e.pop("step"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("seed", range(3))
def test_one_damaged_snapshot_record_cuts_the_log_exactly_before_it(damage, seed):
    rng = np.random.default_rng(seed)
    log = well_formed_log(rng, snapshots=8)
    assert valid_event_prefix(log, Path("run")) == (log, None)
    positions = [k for k, e in enumerate(log) if e["event"] == "snapshot" and e["snapshot_index"] > 0]
    position = int(rng.choice(positions))
    damaged = [dict(e) for e in log]
    DAMAGE[damage](damaged[position], damaged)
    prefix, problem = valid_event_prefix(damaged, Path("run"))
    assert prefix == damaged[:position]
    assert problem.startswith(f"{Path('run') / 'events.jsonl'}: record {position + 1} ")


def test_a_ghost_spawned_twice_or_an_unnamed_ghost_cuts_the_log():
    log = well_formed_log(np.random.default_rng(0), snapshots=6)
    spawn = next(k for k, e in enumerate(log) if e["event"] == "ghost_spawn")
    again = log[: spawn + 1] + [dict(log[spawn])] + log[spawn + 1:]
    assert valid_event_prefix(again, Path("run"))[0] == log[: spawn + 1]
    assert "spawns ghost 0 a second time" in valid_event_prefix(again, Path("run"))[1]
    compare = next(k for k, e in enumerate(log) if e["event"] == "ghost_compare")
    unnamed = [dict(e) for e in log]
    unnamed[compare]["ghost"] = "0"
    assert valid_event_prefix(unnamed, Path("run"))[0] == log[:compare]
