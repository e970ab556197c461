"""Records appended to a run after (or beside) its snapshots: loss barriers between snapshots and
switching-experiment results. Their writers (:mod:`dynprobe.recording.barriers`,
:mod:`dynprobe.experiments`) and the reader (:class:`dynprobe.store.Run`) go through these functions only."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .files import append_jsonl, read_jsonl
from .layout import barriers_path, switching_results_path

__all__ = ["append_barrier", "append_switching_result", "read_barriers", "read_switching_results"]


def read_barriers(root: Path) -> list[dict[str, Any]]:
    """Every barrier record of a run (``{"i": step_i, "j": step_j, "value": B, ...}``), in file order."""
    return read_jsonl(barriers_path(root))


def append_barrier(root: Path, step_i: int, step_j: int, result: Any) -> None:
    """Append B(θ_{step_i}, θ_{step_j}) (a :class:`dynprobe.metrics.BarrierResult`) to ``metrics/B.jsonl``."""
    record = {"i": int(step_i), "j": int(step_j), "value": float(result),
              "argmax_alpha": float(result.argmax_alpha), "alphas": len(result.alphas), "metric": result.metric}
    append_jsonl(barriers_path(root), record)


def read_switching_results(run: Any, *, config_id: str | None = None) -> list[dict[str, Any]]:
    """Every switching-experiment record of ``run`` (a :class:`Run` or its directory) in file order, of one
    configuration if ``config_id`` is given."""
    records = read_jsonl(switching_results_path(Path(getattr(run, "path", run))))
    return [r for r in records if config_id is None or r.get("config_id") == config_id]


def append_switching_result(root: Path, record: Mapping[str, Any]) -> None:
    """Append one switch point's result (JSON-safe) to ``switching/results.jsonl``."""
    path = switching_results_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    append_jsonl(path, record)
