"""``dynprobe.store.resume``: what survives a resume at step R, on a written run, against the module docstring's
rule applied record by record (snapshots at steps ≤ R; other events before R, at R only when the snapshot at R is
kept or for lifecycle events; events without a step always), and the refusals."""
from __future__ import annotations

import json

import pytest

from dynprobe.store.layout import EVENTS, MANIFEST
from dynprobe.store.resume import check_same_run, plan_resume

from ..small_runs import manifest, write_small_run

STEPS = (0, 2, 4, 6, 8)


def events_of(root):
    return [json.loads(line) for line in (root / EVENTS).read_text().splitlines() if line.strip()]


def manifest_of(root):
    return json.loads((root / MANIFEST).read_text())


def survives_by_the_docstring(event, resume_step, kept_snapshot_steps) -> bool:
    kind, at = event["event"], event.get("step")
    if kind == "snapshot":
        return at <= resume_step
    if at is None:
        return True
    if at < resume_step:
        return True
    return at == resume_step and (kind in ("attach", "resume", "close") or resume_step in kept_snapshot_steps)


@pytest.mark.parametrize("resume_step", [None, 0, 2, 3, 5, 6, 8])
def test_the_kept_records_follow_the_documented_rule(tmp_path, resume_step):
    """The last snapshot (step 8) lost its commit line: its ghost events are in the log without it. A second
    attach at step 8 is a lifecycle event."""
    root = tmp_path / "run"
    write_small_run(root, steps=STEPS, close=False)
    events = [e for e in events_of(root) if not (e["event"] == "snapshot" and e["step"] == 8)]
    events.append({"event": "attach", "step": 8})
    assert any(e["event"] != "snapshot" and e.get("step") == 8 and e["event"] != "attach" for e in events)
    plan = plan_resume(root, manifest_of(root), events, None, resume_step)
    committed = STEPS[:-1]
    step = committed[-1] if resume_step is None else resume_step
    kept = [s for s in committed if s <= step]
    assert plan.step == step
    assert [s["step"] for s in plan.snapshots] == kept
    assert plan.discarded == [s for s in committed if s > step]
    assert plan.events == [e for e in events if survives_by_the_docstring(e, step, set(kept))]
    assert plan.rewrite == (len(plan.events) != len(events)) and plan.problems == []


def test_a_resume_beyond_a_closed_run_is_refused_and_beyond_an_interrupted_one_warned(tmp_path):
    write_small_run(tmp_path / "closed", steps=STEPS, close=True)
    with pytest.raises(ValueError, match="beyond the end of .* closed at step 8"):
        plan_resume(tmp_path / "closed", manifest_of(tmp_path / "closed"), events_of(tmp_path / "closed"), None, 9)
    closed = tmp_path / "closed"
    assert plan_resume(closed, manifest_of(closed), events_of(closed), None, 8).step == 8  # its last step
    write_small_run(tmp_path / "open", steps=STEPS, close=False)
    with pytest.warns(UserWarning, match="resume_step=12 is after the last step"):
        plan = plan_resume(tmp_path / "open", manifest_of(tmp_path / "open"), events_of(tmp_path / "open"), None, 12)
    assert plan.step == 12 and [s["step"] for s in plan.snapshots] == list(STEPS)


def test_another_model_optimizer_or_eval_set_cannot_continue_the_run(tmp_path):
    old = manifest()
    check_same_run(old, manifest(), tmp_path)  # the same run
    other_shape = json.loads(json.dumps(old))
    other_shape["model"]["parameters"][0]["shape"] = [3, 3]
    with pytest.raises(ValueError, match="trainable parameters .* differ"):
        check_same_run(old, other_shape, tmp_path)
    other_optimizer = json.loads(json.dumps(old))
    other_optimizer["optimizer"]["class"] = "Adam"
    with pytest.raises(ValueError, match="optimizer class"):
        check_same_run(old, other_optimizer, tmp_path)
    other_eval = json.loads(json.dumps(old))
    other_eval["eval"]["fingerprint"] = "something else"
    with pytest.raises(ValueError, match="eval_data differs"):
        check_same_run(old, other_eval, tmp_path)


def test_an_fsdp_run_continues_only_with_its_recorded_world_size(tmp_path):
    def sharded(world_size, attached_to="fully_shard"):
        return {**manifest(), "distributed": {"world_size": world_size, "attached_to": attached_to}}

    check_same_run(sharded(4), sharded(4), tmp_path)  # the same sharding
    check_same_run(manifest(), sharded(2, "DistributedDataParallel"), tmp_path)  # unsharded both: not this check
    with pytest.raises(ValueError, match=r"\(resume=True\): the run was recorded under FSDP \(fully_shard\) on 4 "
                                         r"ranks, and this probe runs under FSDP \(fully_shard\) on 2 ranks.*resume "
                                         r"it under fully_shard on 4 ranks \(the recorded world size\)"):
        check_same_run(sharded(4), sharded(2), tmp_path)
    with pytest.raises(ValueError, match="recorded under FSDP .* on 2 ranks, and this probe runs in one process, "
                                         "unsharded"):
        check_same_run(sharded(2), manifest(), tmp_path)
    with pytest.raises(ValueError, match="recorded under DistributedDataParallel on 2 ranks, unsharded, and this "
                                         r"probe runs under FSDP \(fully_shard\) on 2 ranks.*without fully_shard"):
        check_same_run(sharded(2, "DistributedDataParallel"), sharded(2), tmp_path)
