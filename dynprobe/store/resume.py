"""Continuing a run (``resume=True``): which records survive, and every file cut to match.

The resume step R is ``resume_step`` when given, else the step of the last committed snapshot (0 without one).
The model restarts from its state at R, so everything the run recorded *after* R describes a trajectory that no
longer exists. The rule, applied to every file of the run:

* snapshot records: committed snapshots at steps ≤ R are kept; a metric row file that is missing or short is
  rebuilt from the snapshots' stored arrays (:mod:`dynprobe.store.rebuild`), and only when it cannot be are the
  snapshots it lacks rows for dropped;
* other events: kept when their step is < R; at step R only when the snapshot at R is kept (ghost spawns,
  comparisons and statuses of an uncommitted snapshot at R go) — lifecycle events (attach, resume, close) at R
  are kept; events without a step are kept;
* metric rows: cut to the kept snapshots; materialized ``metrics/*.npy`` (a copy of the rows, which are kept)
  removed, and written again at close;
* (step, value) logs — ``train_loss.f8`` and the ghosts' separation logs — cut after R; the separation log of a
  ghost whose spawn event was dropped is removed;
* trajectory barriers (``metrics/B.jsonl``) between a dropped snapshot and any other, and switching results at a
  dropped switch step, are removed;
* snapshot folders without a commit line are dropped; temporary files of interrupted atomic writes (the writer's
  scratch, never a committed file) are removed.

Nothing recorded is deleted (only the writer's scratch and the matrix copies above): whatever is dropped is moved,
and whatever is cut or rewritten is first copied, to ``set-aside-STAMP/`` (:mod:`dynprobe.store.set_aside`). A
resume that is refused changes nothing on disk: every check (the model, the eval set, the resume step, the stored
arrays the run continues from) runs in :func:`plan_resume`, before :func:`apply_resume` touches a file.

A resume step beyond the end of a *closed* run is refused (the step count would jump over steps the probe never
saw); beyond the last recorded step of an *interrupted* run it is accepted with a warning, since the process may
have trained past its last record before it died.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dynprobe._util.modules import layer_slices

from .files import (
    RunFormatError,
    RunFormatWarning,
    atomic_write,
    read_jsonl_prefix,
    rewrite_jsonl,
    truncate_file,
    truncate_torn_tail,
)
from .layout import (
    EVENTS,
    METRICS,
    PARAMS,
    PREDS,
    SNAPSHOTS,
    barriers_path,
    is_temporary,
    layer_metric,
    lr_files,
    matrix_files,
    rows_files,
    rows_path,
    separation_files,
    snapshot_dirname,
    snapshot_file,
    switching_results_path,
    train_loss_path,
)
from .reading import regular_size
from .rebuild import lower_triangle_bytes, rebuild_rows
from .rows import PAIR_BYTES, PairLog, TriangularRows
from .set_aside import SetAside
from .sharded import has_sharded_params
from .validate import ROW_METRICS, valid_event_prefix

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
    rebuilt: dict[str, Any] = field(default_factory=dict)  # metric -> its rebuilt T×T matrix (missing/short rows)


def check_same_run(old: dict[str, Any], new: dict[str, Any], root: Path) -> None:
    """Refuse to continue a run with another model layout, sharding (FSDP world size), model class, optimizer class or
    eval set."""
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
    _check_same_sharding(old, new, root)  # before the class: fully_shard renames it (FSDPSequential)
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


def _sharded_over(manifest: dict[str, Any]) -> int | None:
    """The world size an FSDP run (``fully_shard``) was sharded over, or None for an unsharded run."""
    distributed = manifest.get("distributed") or {}
    if distributed.get("attached_to") != "fully_shard":
        return None
    return int(distributed.get("world_size", 0))


def _describe_sharding(manifest: dict[str, Any], ranks: int | None) -> str:
    if ranks is not None:
        return f"under FSDP (fully_shard) on {ranks} rank{'s' if ranks != 1 else ''}"
    distributed = manifest.get("distributed") or {}
    if distributed:
        return f"under {distributed.get('attached_to')} on {distributed.get('world_size')} ranks, unsharded"
    return "in one process, unsharded"


def _check_same_sharding(old: dict[str, Any], new: dict[str, Any], root: Path) -> None:
    """An FSDP run continues only under FSDP with the world size it was recorded with: its snapshots store θ as
    that many ranks' shard files (``params.dcp/``), each rank reloads its own shards of the kept snapshots, and the
    C rows sum the ranks' partial sums in the same order as the uninterrupted run (the same values)."""
    before, now = _sharded_over(old), _sharded_over(new)
    if before == now:
        return
    wanted = (f"resume it under fully_shard on {before} rank{'s' if before != 1 else ''} (the recorded world size)"
              if before is not None else "continue it without fully_shard, as it was recorded")
    raise ValueError(
        f"cannot resume {root} (resume=True): the run was recorded {_describe_sharding(old, before)}, and this "
        f"probe runs {_describe_sharding(new, now)}. A run continues with the sharding it was recorded with (θ's "
        f"shard files and the sums of C follow it): {wanted}, or start a new run in another out= directory")


def _closed_at(events: list[dict[str, Any]]) -> int | None:
    """The step the run closed at, when its last lifecycle event is a close."""
    for event in reversed(events):
        if event.get("event") in LIFECYCLE_EVENTS:
            return event.get("step") if event.get("event") == "close" else None
    return None


def _expected_row_metrics(root: Path, manifest: dict[str, Any], snapshots: list[dict[str, Any]]) -> list[str]:
    """The row files an intact run has for ``snapshots``: C, D, S (with kernels), and every layer of C once one
    per-layer file exists."""
    present = set(rows_files(root))
    expected = set(ROW_METRICS) | present
    if any(s.get("kernel") for s in snapshots):
        expected.add("S")
    if any(name.startswith("C.layer_") for name in present):
        specs = (manifest.get("model") or {}).get("parameters") or []
        layers = len(layer_slices((spec["name"], int(spec["numel"])) for spec in specs))
        expected |= {layer_metric("C", i) for i in range(layers)}
    return sorted(expected)


def _rows_for(root: Path, manifest: dict[str, Any], snapshots: list[dict[str, Any]]
              ) -> tuple[list[dict[str, Any]], dict[str, Any], str | None]:
    """``(snapshots, rebuilt, problem)``: rebuild every missing or short row file from the snapshots; where one
    cannot be rebuilt, keep only the snapshots every such file has rows for."""
    short = {metric: TriangularRows(rows_path(root, metric)).complete_rows()
             for metric in _expected_row_metrics(root, manifest, snapshots)}
    short = {metric: rows for metric, rows in short.items() if rows < len(snapshots)}
    rebuilt, failed = {}, {}
    for metric in short:
        try:
            rebuilt[metric] = rebuild_rows(root, manifest, metric, snapshots)
        except RunFormatError as error:
            failed[metric] = str(error)
    if not failed:
        return snapshots, rebuilt, None
    keep = min(short[metric] for metric in failed)
    problem = (f"{Path(root) / METRICS} holds rows of {', '.join(sorted(failed))} for {keep} of {len(snapshots)} "
               f"committed snapshots, and they cannot be rebuilt ({next(iter(failed.values()))}): the run continues "
               f"from its first {keep} snapshots")
    return snapshots[:keep], {m: matrix[:keep, :keep] for m, matrix in rebuilt.items()}, problem


def _check_stored_arrays(root: Path, snapshots: list[dict[str, Any]], step: int) -> None:
    """The kept snapshots' θ and predictions must be stored: every new snapshot is compared with them."""
    for position, record in enumerate(snapshots):
        for name in (PARAMS, PREDS):
            path = snapshot_file(root, record["step"], name)
            if name == PARAMS and has_sharded_params(root, record["step"]):
                continue  # FSDP: θ as the ranks' shards (each rank reloads and checks its own at attach)
            if regular_size(path) == 0:
                earlier = snapshots[position - 1]["step"] if position else None
                hint = (f"pass resume_step={earlier} with the checkpoint of that step (the later snapshots are then "
                        "moved aside under set-aside-*/, nothing is deleted), or " if earlier is not None else "")
                raise ValueError(
                    f"cannot resume {root} from step {step}: {path} is missing or empty, and a resumed run compares "
                    f"every new snapshot with each kept one (C needs θ, D the predictions). Restore the file from a "
                    f"copy of the run, {hint}start a new run in another out= directory")


def plan_resume(root: Path, manifest: dict[str, Any], events: list[dict[str, Any]], parse_problem: str | None,
                resume_step: int | None) -> ResumePlan:
    """Decide what survives a resume at ``resume_step`` (None: after the last committed snapshot), and check it
    can be continued (ValueError otherwise); reads only, so that a refusal changes nothing."""
    valid, problem = valid_event_prefix(events, root)
    problems = [p for p in (parse_problem, problem) if p]
    snapshots = [e for e in valid if e["event"] == "snapshot"]
    snapshots, rebuilt, unbacked = _rows_for(root, manifest, snapshots)
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
    _check_stored_arrays(root, kept, step)
    return ResumePlan(step=step, snapshots=kept, events=survivors,
                      discarded=[s["step"] for s in snapshots if s["step"] > step], problems=problems,
                      rewrite=bool(problems) or len(survivors) != len(events),
                      rebuilt={m: matrix[:len(kept), :len(kept)] for m, matrix in rebuilt.items()})


def apply_resume(root: Path, plan: ResumePlan, *, durable: bool = False) -> SetAside:
    """Cut every file of the run at ``root`` to ``plan`` (the event log first, so that a kill in between leaves
    a log that still matches the rows it refers to); what is dropped goes to the returned :class:`SetAside`."""
    root = Path(root)
    aside = SetAside(root, durable=durable)
    events = root / EVENTS
    if plan.rewrite:
        aside.copy(events)
        rewrite_jsonl(events, plan.events, durable=durable)
    else:
        _cut(aside, events, None)
    if plan.problems:
        warnings.warn("; ".join(plan.problems) + f". Resuming from its valid prefix ({len(plan.snapshots)} "
                      f"snapshots); the original files are kept in {aside.folder.name}/", RunFormatWarning,
                      stacklevel=5)
    kept = len(plan.snapshots)
    for metric, matrix in plan.rebuilt.items():
        aside.move(rows_path(root, metric))
        atomic_write(rows_path(root, metric), lower_triangle_bytes(matrix), durable=durable)
    for metric, path in rows_files(root).items():
        if metric not in plan.rebuilt:
            _cut(aside, path, TriangularRows.bytes_for(kept))
    for path in matrix_files(root).values():  # a copy of the rows (kept above), written again at close
        path.unlink()
    _cut_pairs(aside, train_loss_path(root), plan.step)
    for path in lr_files(root).values():  # row t is the update from θ_t: the resumed run takes update R again
        _cut_pairs(aside, path, plan.step - 1)
    ghosts = {e["ghost"] for e in plan.events if e["event"] == "ghost_spawn"}
    for ghost, path in separation_files(root).items():
        if ghost in ghosts:
            _cut_pairs(aside, path, plan.step)
        else:
            aside.move(path)
    steps = {s["step"] for s in plan.snapshots}
    _filter_records(aside, barriers_path(root), lambda r: r.get("i") in steps and r.get("j") in steps, durable)
    _filter_records(aside, switching_results_path(root), lambda r: r.get("switch_step") in steps, durable)
    for folder in (root, root / METRICS, *(root / SNAPSHOTS).glob("step_*")):
        for path in folder.glob(".*"):
            if is_temporary(path.name) and path.is_file():
                path.unlink()  # the writer's own scratch: part of a file whose atomic rename never happened
    committed = {snapshot_dirname(step) for step in steps}
    for path in sorted((root / SNAPSHOTS).glob("step_*")):
        if path.name not in committed:
            aside.move(path)
    if aside.moved:
        warnings.warn(f"resuming {root} at step {plan.step}: what the resumed run drops is kept in "
                      f"{aside.folder.name}/ ({len(aside.moved)} entries: {', '.join(aside.moved[:4])}"
                      f"{', ...' if len(aside.moved) > 4 else ''}); nothing was deleted", UserWarning, stacklevel=5)
    return aside


def _cut(aside: SetAside, path: Path, keep: int | None) -> None:
    """Cut ``path`` to ``keep`` bytes (None: after its last complete line), copying it aside first if that drops
    anything."""
    if keep is None:
        size = regular_size(path)
        if size and not _ends_with_newline(path, size):
            aside.copy(path)
            truncate_torn_tail(path)
        return
    aside.copy_if_longer(path, keep)
    truncate_file(path, keep)


def _ends_with_newline(path: Path, size: int) -> bool:
    with open(path, "rb") as handle:
        handle.seek(size - 1)
        return handle.read(1) == b"\n"


def _cut_pairs(aside: SetAside, path: Path, step: int) -> None:
    """Cut a (step, value) log after ``step``; a damaged one is moved aside whole (the run goes on without it)."""
    log = PairLog(path)
    try:
        steps, _ = log.read()
    except RunFormatError:
        aside.move(path)
        return
    _cut(aside, path, int(np.count_nonzero(steps <= step)) * PAIR_BYTES)


def _filter_records(aside: SetAside, path: Path, keep: Any, durable: bool) -> None:
    records, problem = read_jsonl_prefix(path)
    survivors = [r for r in records if keep(r)]
    if problem is not None or len(survivors) != len(records):
        aside.copy(path)
        rewrite_jsonl(path, survivors, durable=durable)
