"""Continuing a run (``resume=True``): which records survive, and every file cut to match.

The resume step R is ``resume_step`` when given, else the step of the last committed snapshot (0 without one).
The model restarts from its state at R, so everything the run recorded *after* R describes a trajectory that no
longer exists. The rule, applied to every file of the run:

* snapshot records: committed snapshots at steps ≤ R are kept (and only those whose metric rows exist);
* other events: kept when their step is < R; at step R only when the snapshot at R is kept (ghost spawns,
  comparisons and statuses of an uncommitted snapshot at R go) — lifecycle events (attach, resume, close) at R
  are kept; events without a step are kept;
* metric rows: cut to the kept snapshots; materialized ``metrics/*.npy`` removed (rewritten at close);
* (step, value) logs — ``train_loss.f8`` and the ghosts' separation logs — cut after R; the separation log of a
  ghost whose spawn event was dropped is removed;
* trajectory barriers (``metrics/B.jsonl``) between a dropped snapshot and any other, and switching results at a
  dropped switch step, are removed;
* snapshot folders without a commit line and temporary files of interrupted atomic writes are removed.

A resume step beyond the end of a *closed* run is refused (the step count would jump over steps the probe never
saw); beyond the last recorded step of an *interrupted* run it is accepted with a warning, since the process may
have trained past its last record before it died.
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import (
    RunFormatWarning,
    read_jsonl_prefix,
    remove_tree,
    rewrite_jsonl,
    truncate_torn_tail,
)
from .layout import (
    EVENTS,
    METRICS,
    SNAPSHOTS,
    barriers_path,
    damaged_copy_path,
    is_temporary,
    lr_files,
    matrix_files,
    rows_files,
    separation_files,
    snapshot_dirname,
    switching_results_path,
    train_loss_path,
)
from .rows import PairLog, TriangularRows
from .validate import backed_snapshots, valid_event_prefix

__all__ = ["LIFECYCLE_EVENTS", "ResumePlan", "apply_resume", "check_same_run", "plan_resume"]

LIFECYCLE_EVENTS = frozenset({"attach", "resume", "close"})


@dataclass
class ResumePlan:
    """What a resumed run keeps (see the module docstring for the rule)."""

    step: int  # R: the step the run continues from
    snapshots: list[dict[str, Any]]  # committed snapshots kept
    events: list[dict[str, Any]]  # events kept, in order
    discarded: list[int] = field(default_factory=list)  # steps of committed snapshots after R
    problems: list[str] = field(default_factory=list)  # damage found in the log (the valid prefix is kept)
    rewrite: bool = False  # the event log must be rewritten (something was dropped)


def check_same_run(old: dict[str, Any], new: dict[str, Any], root: Path) -> None:
    """Refuse to continue a run with another model layout, model class, optimizer class or eval set."""
    def layout(manifest: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [(p.get("name"), list(p.get("shape", [])), p.get("dtype"))
                for p in (manifest.get("model") or {}).get("parameters", [])]

    before, now = layout(old), layout(new)
    if before != now:
        differ = next((f"{a} recorded, {b} now" for a, b in zip(before, now) if a != b),
                      f"{len(before)} tensors recorded, {len(now)} now")
        raise ValueError(
            f"cannot resume {root}: the model's trainable parameters (name, shape, dtype) differ from the run's "
            f"({differ}). Resume with the same architecture, or choose another out="
        )
    for part, what in (("model", "model"), ("optimizer", "optimizer")):
        was, is_ = (old.get(part) or {}).get("class"), (new.get(part) or {}).get("class")
        if was is not None and is_ is not None and was != is_:
            raise ValueError(
                f"cannot resume {root}: the run was recorded with {what} class {was!r}; this {what} is {is_!r}. "
                f"Resume with the same {what} class (and its restored state), or choose another out="
            )
    if (old.get("eval") or {}).get("fingerprint") != (new.get("eval") or {}).get("fingerprint"):
        raise ValueError(
            f"cannot resume {root}: eval_data differs from the run's (D compares predictions example by example, "
            "so every snapshot must see the same eval set). Pass the same eval_data and seed"
        )


def _closed_at(events: list[dict[str, Any]]) -> int | None:
    """The step the run closed at, when its last lifecycle event is a close."""
    for event in reversed(events):
        if event.get("event") in LIFECYCLE_EVENTS:
            return event.get("step") if event.get("event") == "close" else None
    return None


def plan_resume(root: Path, events: list[dict[str, Any]], parse_problem: str | None,
                resume_step: int | None) -> ResumePlan:
    """Decide what survives a resume at ``resume_step`` (None: after the last committed snapshot)."""
    valid, problem = valid_event_prefix(events, root)
    problems = [p for p in (parse_problem, problem) if p]
    snapshots = [e for e in valid if e["event"] == "snapshot"]
    snapshots, unbacked = backed_snapshots(root, snapshots)
    if unbacked:
        problems.append(unbacked)
    last = int(snapshots[-1]["step"]) if snapshots else None
    step = int(resume_step) if resume_step is not None else (last if last is not None else 0)
    if resume_step is not None:
        ended = _closed_at(valid)
        if ended is not None and step > ended:
            raise ValueError(
                f"resume_step={step} is beyond the end of {root}: the run closed at step {ended}. Pass the step your "
                f"restored checkpoint was saved at (at most {ended}), or start a new run in another out= directory"
            )
        known = max([e["step"] for e in valid if isinstance(e.get("step"), int)], default=0)
        if ended is None and step > known:
            warnings.warn(
                f"resume_step={step} is after the last step {root} recorded ({known}); the interrupted process may "
                f"have trained past it, but nothing of steps {known + 1}..{step} was recorded (if your checkpoint "
                "is from elsewhere, the step count jumps)", UserWarning, stacklevel=5)
    kept = [s for s in snapshots if s["step"] <= step]
    kept_steps = {s["step"] for s in kept}

    def survives(event: dict[str, Any]) -> bool:
        kind, at = event["event"], event.get("step")
        if kind == "snapshot":
            return at in kept_steps
        if at is None or at < step:
            return True
        return at == step and (kind in LIFECYCLE_EVENTS or step in kept_steps)

    survivors = [e for e in valid if survives(e)]
    return ResumePlan(step=step, snapshots=kept, events=survivors,
                      discarded=[s["step"] for s in snapshots if s["step"] > step], problems=problems,
                      rewrite=bool(problems) or len(survivors) != len(events))


def apply_resume(root: Path, plan: ResumePlan, *, durable: bool = False) -> None:
    """Cut every file of the run at ``root`` to ``plan`` (the event log first, so that a kill in between leaves
    a log that still matches the rows it refers to)."""
    root = Path(root)
    events = root / EVENTS
    if plan.problems and events.exists():
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        try:
            os.link(events, damaged_copy_path(events, stamp))  # the damaged log stays readable beside the run
        except OSError:  # a filesystem without hard links
            shutil.copyfile(events, damaged_copy_path(events, stamp))
        warnings.warn("; ".join(plan.problems) + f". Resuming from its valid prefix ({len(plan.snapshots)} "
                      f"snapshots); the original log is kept as {damaged_copy_path(events, stamp).name}",
                      RunFormatWarning, stacklevel=5)
    if plan.rewrite:
        rewrite_jsonl(events, plan.events, durable=durable)
    else:
        truncate_torn_tail(events)
    for path in rows_files(root).values():
        TriangularRows(path).truncate(len(plan.snapshots))
    for path in matrix_files(root).values():
        path.unlink()
    PairLog(train_loss_path(root)).truncate_after(plan.step)
    for path in lr_files(root).values():  # row t is the update from θ_t: the resumed run takes update R again
        PairLog(path).truncate_after(plan.step - 1)
    ghosts = {e["ghost"] for e in plan.events if e["event"] == "ghost_spawn"}
    for ghost, path in separation_files(root).items():
        if ghost in ghosts:
            PairLog(path).truncate_after(plan.step)
        else:
            PairLog(path).remove()
    steps = {s["step"] for s in plan.snapshots}
    _filter_records(barriers_path(root), lambda r: r.get("i") in steps and r.get("j") in steps, durable)
    _filter_records(switching_results_path(root), lambda r: r.get("switch_step") in steps, durable)
    committed = {snapshot_dirname(step) for step in steps}
    for path in sorted((root / SNAPSHOTS).glob("step_*")):
        if path.name not in committed:
            remove_tree(path)
    for folder in (root, root / METRICS, *(root / SNAPSHOTS).glob("step_*")):
        for path in folder.glob(".*"):
            if is_temporary(path.name) and path.is_file():
                path.unlink()


def _filter_records(path: Path, keep: Any, durable: bool) -> None:
    records, problem = read_jsonl_prefix(path)
    survivors = [r for r in records if keep(r)]
    if problem is not None or len(survivors) != len(records):
        rewrite_jsonl(path, survivors, durable=durable)
