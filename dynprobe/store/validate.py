"""The fields of a run that :class:`dynprobe.store.Run` reads, validated in one place.

A run directory is input like any other file: it may be truncated by a crash, edited by hand, or damaged. Every
manifest field and event field the reader interprets is checked here (type and range) before it is used, so a
damaged run raises :class:`RunFormatError` naming the file and the field — never a ``KeyError`` or
``TypeError`` from deep inside an accessor, and never a path or an allocation computed from a bad value.

The event log is the run's commit log. A damaged event (a malformed field, a snapshot out of order, a step that
goes back) ends its *valid prefix*: the snapshots committed before it are intact (their files and rows were
written before their commit line), so the reader keeps them and warns instead of refusing the whole run.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dynprobe._util.checks import is_int

from .files import RunFormatError
from .layout import EVENTS, MANIFEST, METRICS, rows_path
from .rows import TriangularRows

__all__ = ["CHAOS_FIELDS", "MAX_PID", "ROW_METRICS", "TORCH_DTYPES", "backed_snapshots", "valid_event_prefix",
           "validate_manifest", "validate_records"]

MAX_PID = 2**31 - 1
MAX_COUNT = 2**62  # steps, indices and sizes fit an int64 with room to add
TORCH_DTYPES = frozenset({
    "float16", "bfloat16", "float32", "float64", "complex64", "complex128", "uint8", "int8", "int16", "int32",
    "int64", "bool", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64",
})
# Interval matrices every snapshot appends a row to, before its commit line.
ROW_METRICS = ("C", "D")
# Per-ghost metrics of ghost_compare / ghost_barrier events that Run.chaos reads (numbers or null). L2_active: L2
# without the inert parameter tensors (dynprobe.recording.inert), where some were found.
CHAOS_FIELDS = ("C", "L2", "L2_active", "D", "S", "B", "B_linear", "eval_loss", "eval_accuracy")


# --------------------------------------------------------------------------------------------- value checks


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return is_int(value) and 0 <= value <= MAX_COUNT


def _number_or_null(value: Any) -> bool:
    return value is None or _is_number(value)


def _str_or_null(value: Any) -> bool:
    return value is None or isinstance(value, str)


# --------------------------------------------------------------------------------------------- manifest


def _fail(root: Path, field: str, expected: str, value: Any) -> RunFormatError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return RunFormatError(f"{Path(root) / MANIFEST}: '{field}' must be {expected}; got {shown}. The run's manifest "
                          "is damaged")


def validate_manifest(manifest: Mapping[str, Any], root: Path) -> None:
    """Check every manifest field the reader uses; :class:`RunFormatError` names the first bad one."""
    for key in ("config", "conventions"):
        if key in manifest and not isinstance(manifest[key], (dict, type(None))):
            raise _fail(root, key, "an object", manifest[key])
    for key in ("status", "created", "updated", "dynprobe_version", "command"):
        if key in manifest and not isinstance(manifest[key], str):
            raise _fail(root, key, "a string", manifest[key])
    writer = manifest.get("writer", {})
    if not isinstance(writer, dict):
        raise _fail(root, "writer", "an object", writer)
    if "pid" in writer and not (is_int(writer["pid"]) and 0 <= writer["pid"] <= MAX_PID):
        raise _fail(root, "writer.pid", f"a process id (an integer 0..{MAX_PID})", writer["pid"])
    if "host" in writer and not isinstance(writer["host"], str):
        raise _fail(root, "writer.host", "a string", writer["host"])
    if "resumes" in manifest and not isinstance(manifest["resumes"], list):
        raise _fail(root, "resumes", "a list", manifest["resumes"])
    if "model" in manifest:
        _validate_model(manifest["model"], root)
    if "eval" in manifest:
        evaluation = manifest["eval"]
        if not isinstance(evaluation, dict):
            raise _fail(root, "eval", "an object", evaluation)
        for key in ("n", "num_classes"):
            if key in evaluation and not _is_count(evaluation[key]):
                raise _fail(root, f"eval.{key}", "a non-negative integer", evaluation[key])
    if "optimizer" in manifest and not isinstance(manifest["optimizer"], dict):
        raise _fail(root, "optimizer", "an object", manifest["optimizer"])


def _validate_model(model: Any, root: Path) -> None:
    if not isinstance(model, dict):
        raise _fail(root, "model", "an object", model)
    if "class" in model and not isinstance(model["class"], str):
        raise _fail(root, "model.class", "a string", model["class"])
    parameters = model.get("parameters", [])
    if not isinstance(parameters, list):
        raise _fail(root, "model.parameters", "a list", parameters)
    offset = 0
    for i, spec in enumerate(parameters):
        _validate_tensor_spec(spec, f"model.parameters[{i}]", root)
        for key in ("offset", "numel"):
            if not _is_count(spec.get(key)):
                raise _fail(root, f"model.parameters[{i}].{key}", "a non-negative integer", spec.get(key))
        if spec["numel"] != math.prod(spec["shape"]):
            raise _fail(root, f"model.parameters[{i}].numel", f"the product of its shape {spec['shape']}",
                        spec["numel"])
        if spec["offset"] != offset:
            raise _fail(root, f"model.parameters[{i}].offset", f"{offset} (the parameters tile vec(θ) in order)",
                        spec["offset"])
        offset += spec["numel"]
    if "num_parameters" in model and not (_is_count(model["num_parameters"])
                                          and (not parameters or model["num_parameters"] == offset)):
        raise _fail(root, "model.num_parameters", f"the total of the parameter sizes ({offset})",
                    model["num_parameters"])
    buffers = model.get("buffers", [])
    if not isinstance(buffers, list):
        raise _fail(root, "model.buffers", "a list", buffers)
    for i, spec in enumerate(buffers):
        _validate_tensor_spec(spec, f"model.buffers[{i}]", root)


def _validate_tensor_spec(spec: Any, where: str, root: Path) -> None:
    if not isinstance(spec, dict):
        raise _fail(root, where, "an object", spec)
    if not isinstance(spec.get("name"), str):
        raise _fail(root, f"{where}.name", "a string", spec.get("name"))
    shape = spec.get("shape")
    if not (isinstance(shape, list) and all(_is_count(n) for n in shape)):
        raise _fail(root, f"{where}.shape", "a list of non-negative integers", shape)
    if spec.get("dtype") not in TORCH_DTYPES:
        raise _fail(root, f"{where}.dtype", "a torch dtype name (e.g. 'float32')", spec.get("dtype"))


# --------------------------------------------------------------------------------------------- events

# event kind -> {field: (check, description)}; fields the reader does not use are not checked.
_STEP = (_is_count, "a non-negative integer step")
_COMMON = {"step": (lambda v: v is None or _is_count(v), "a non-negative integer step or null")}
_SCHEMAS: dict[str, dict[str, tuple[Any, str]]] = {
    "snapshot": {
        "step": _STEP,
        "snapshot_index": (_is_count, "the snapshot's position in the log"),
        "eval_loss": (_number_or_null, "a number or null"),
        "eval_accuracy": (_number_or_null, "a number or null"),
        "train_loss": (_number_or_null, "a number or null"),
        "kernel": (lambda v: v is None or isinstance(v, bool), "true or false"),
    },
    "ghost_spawn": {
        "step": _STEP,
        "ghost": (_is_count, "a ghost id (a non-negative integer)"),
        "spawn_step": (_is_count, "a non-negative integer step"),
        "control": (lambda v: isinstance(v, bool), "true or false"),
        "kind": (lambda v: isinstance(v, str), "a string"),
        "seed": (is_int, "an integer"),
        "nominal_norm": (_number_or_null, "a number"),
        "realized_norm": (_number_or_null, "a number"),
        "changed": (_is_count, "a non-negative integer"),
        "total": (_is_count, "a non-negative integer"),
    },
    "ghost_status": {
        "step": _STEP,
        "ghost": (_is_count, "a ghost id (a non-negative integer)"),
        "status": (lambda v: isinstance(v, str), "a string"),
        "reason": (_str_or_null, "a string or null"),
    },
    "ghost_compare": {"step": _STEP, "ghost": (_is_count, "a ghost id (a non-negative integer)"),
                      **{name: (_number_or_null, "a number or null") for name in CHAOS_FIELDS}},
    "ghost_barrier": {"step": _STEP, "ghost": (_is_count, "a ghost id (a non-negative integer)"),
                      **{name: (_number_or_null, "a number or null") for name in ("B", "B_linear", "argmax_alpha")}},
}
# Fields that must be present (the others may be absent: older runs, optional values).
_REQUIRED = {
    "snapshot": ("snapshot_index", "step"),
    "ghost_spawn": ("ghost", "step", "spawn_step", "control", "kind", "seed", "nominal_norm", "realized_norm",
                    "changed", "total"),
    "ghost_status": ("ghost", "step", "status"),
    "ghost_compare": ("ghost", "step"),
    "ghost_barrier": ("ghost", "step"),
}


def _event_problem(event: Mapping[str, Any], snapshots: int, last_step: int, ghosts: set[int]) -> str | None:
    kind = event.get("event")
    if not isinstance(kind, str):
        return "has no 'event' name"
    for field in _REQUIRED.get(kind, ()):
        if field not in event:
            return f"({kind}) lacks '{field}'"
    for field, (check, description) in {**_COMMON, **_SCHEMAS.get(kind, {})}.items():
        if field in event and not check(event[field]):
            value = repr(event[field])
            return f"({kind}) has '{field}' = {value[:60]}; it must be {description}"
    if kind == "snapshot":
        if event["snapshot_index"] != snapshots:
            return (f"(snapshot) has snapshot_index {event['snapshot_index']} where the next snapshot's index is "
                    f"{snapshots}")
        if event["step"] <= last_step:
            return f"(snapshot) has step {event['step']}, not after the previous snapshot's step {last_step}"
    if kind == "ghost_spawn" and event["ghost"] in ghosts:
        return f"(ghost_spawn) spawns ghost {event['ghost']} a second time"
    return None


def valid_event_prefix(events: list[dict[str, Any]], root: Path) -> tuple[list[dict[str, Any]], str | None]:
    """``(events, problem)``: the events before the first damaged one, and what is wrong with it (None when the
    whole log is valid). Snapshot records must be numbered 0, 1, … with strictly increasing steps."""
    snapshots, last_step, ghosts = 0, -1, set()
    for position, event in enumerate(events):
        problem = _event_problem(event, snapshots, last_step, ghosts)
        if problem is not None:
            return events[:position], f"{Path(root) / EVENTS}: record {position + 1} {problem}"
        if event["event"] == "snapshot":
            snapshots, last_step = snapshots + 1, event["step"]
        elif event["event"] == "ghost_spawn":
            ghosts.add(event["ghost"])
    return events, None


def backed_snapshots(root: Path, snapshots: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """The snapshots whose metric rows exist, and what is wrong when some do not.

    A snapshot's C and D rows are appended before its commit line, so an intact run has at least as many rows as
    committed snapshots. A log committing more (a damaged or foreign ``events.jsonl``) is cut to the rows that
    exist: every matrix the reader allocates is then bounded by the size of the row files.
    """
    if not snapshots:
        return snapshots, None
    rows = min(TriangularRows(rows_path(root, metric)).complete_rows() for metric in ROW_METRICS)
    if rows >= len(snapshots):
        return snapshots, None
    return snapshots[:rows], (f"{Path(root) / EVENTS} commits {len(snapshots)} snapshots but {Path(root) / METRICS} "
                              f"holds metric rows for {rows}: only the first {rows} are intact")


# --------------------------------------------------------------------------------------------- records

_RECORDS: dict[str, dict[str, tuple[Any, str, bool]]] = {  # field -> (check, description, required)
    "barrier": {
        "i": (_is_count, "a snapshot step (a non-negative integer)", True),
        "j": (_is_count, "a snapshot step (a non-negative integer)", True),
        "value": (_number_or_null, "a number or null", True),
        "B_linear": (_number_or_null, "a number or null", False),
        "argmax_alpha": (_number_or_null, "a number or null", False),
    },
    "switching": {
        "switch_step": (_is_count, "a step (a non-negative integer)", True),
        "total_steps": (_is_count, "a step (a non-negative integer)", True),
        "eval_loss": (_number_or_null, "a number or null", True),
        "eval_accuracy": (_number_or_null, "a number or null", True),
        "train_loss": (_number_or_null, "a number or null", False),
        "linearized_steps": (_is_count, "a non-negative integer", False),
        "config_id": (_str_or_null, "a string", False),
        "config": (lambda v: v is None or isinstance(v, dict), "an object", False),
        "status": (_str_or_null, "a string", False),
    },
}


def validate_records(records: list[dict[str, Any]], kind: str, path: Path) -> None:
    """Check records of ``metrics/B.jsonl`` (``kind="barrier"``) or ``switching/results.jsonl``
    (``"switching"``); :class:`RunFormatError` names the file, the record and the field."""
    schema = _RECORDS[kind]
    for number, record in enumerate(records, start=1):
        for name, (check, description, required) in schema.items():
            if name not in record:
                if required:
                    raise RunFormatError(f"{path}: record {number} lacks '{name}'; the file is damaged")
                continue
            if not check(record[name]):
                raise RunFormatError(f"{path}: record {number} has '{name}' = {record[name]!r:.60}; it must be "
                                     f"{description}. The file is damaged")
