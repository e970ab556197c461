"""Records appended to a run after (or beside) its snapshots: loss barriers between snapshots and
switching-experiment results. Their writers (:mod:`dynprobe.recording.barriers`, :mod:`dynprobe.experiments`)
and the reader (:class:`dynprobe.store.Run`) go through these functions only.

Switching results are keyed by their configuration: every record carries the ``config_id`` (a hash of the
experiment's configuration) it was computed under, and results of different configurations are never mixed —
:func:`group_switching_results` separates them.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .files import append_jsonl, read_jsonl
from .layout import barriers_path, switching_results_path
from .validate import validate_records

__all__ = ["LEGACY_CONFIG_ID", "RecordsView", "append_barrier", "append_switching_result", "group_switching_results",
           "read_barriers", "read_switching_results", "switching_configs", "switching_table"]

LEGACY_CONFIG_ID = "unversioned"  # switching records written before configurations had ids


def read_barriers(root: Path) -> list[dict[str, Any]]:
    """Every barrier record of a run (``{"i": step_i, "j": step_j, "value": B, "B_linear": ..., ...}``), in file
    order; a damaged record raises :class:`dynprobe.RunFormatError` naming it."""
    path = barriers_path(root)
    records = read_jsonl(path)
    validate_records(records, "barrier", path)
    return records


def append_barrier(root: Path, step_i: int, step_j: int, result: Any) -> None:
    """Append B(θ_{step_i}, θ_{step_j}) (a :class:`dynprobe.metrics.BarrierResult`) to ``metrics/B.jsonl``:
    ``value`` is the barrier against the mean of the endpoint losses (eq. 5 of the two-phase paper) and, when the
    result carries it, ``B_linear`` the barrier against the linear interpolation of the endpoint losses."""
    record = {"i": int(step_i), "j": int(step_j), "value": float(getattr(result, "mean", result)),
              "argmax_alpha": float(result.argmax_alpha), "alphas": len(result.alphas), "metric": result.metric}
    linear = getattr(result, "linear", None)
    if linear is not None:
        record["B_linear"] = float(linear)
    append_jsonl(barriers_path(root), record)


def read_switching_results(run: Any, *, config_id: str | None = None) -> list[dict[str, Any]]:
    """Every switching-experiment record of ``run`` (a :class:`Run` or its directory) in file order, of one
    configuration if ``config_id`` is given; a damaged record raises :class:`dynprobe.RunFormatError`."""
    path = switching_results_path(Path(getattr(run, "path", run)))
    records = read_jsonl(path)
    validate_records(records, "switching", path)
    return [r for r in records if config_id is None or _config_id(r) == config_id]


def group_switching_results(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records by configuration id, configurations in the order of their latest record (the last one is the
    configuration computed most recently)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        key = _config_id(record)
        groups[key] = [*groups.pop(key, []), record]  # re-inserted: the dict ends with the latest configuration
    return groups


def switching_configs(records: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """``{config_id: config}`` of the records, ordered by each configuration's latest record."""
    return {key: group[-1].get("config") for key, group in group_switching_results(records).items()}


def switching_table(records: list[dict[str, Any]], config_id: str | None, path: Path) -> dict[str, Any] | None:
    """The results of one configuration as arrays sorted by switch step (the latest record wins for a repeated
    step), with ``"config_id"`` and ``"config"``; None without records. ``config_id=None`` means the only
    configuration: with several it is an error naming them."""
    groups = group_switching_results(records)
    if not groups:
        return None
    if config_id is None:
        if len(groups) > 1:
            raise ValueError(f"{path} holds switching results of {len(groups)} configurations ({', '.join(groups)}); "
                             "pass config_id= (see run.switching_configs)")
        config_id = next(iter(groups))
    if config_id not in groups:
        raise KeyError(f"no switching results with config_id={config_id!r}; the run has {list(groups)}")
    latest = {r["switch_step"]: r for r in groups[config_id]}
    rows = [latest[k] for k in sorted(latest)]

    def column(key: str) -> np.ndarray:
        return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=np.float64)

    return {
        "switch_step": np.array([r["switch_step"] for r in rows], dtype=np.int64),
        "total_steps": np.array([r["total_steps"] for r in rows], dtype=np.int64),
        "eval_loss": column("eval_loss"), "eval_accuracy": column("eval_accuracy"), "train_loss": column("train_loss"),
        "config_id": config_id, "config": rows[-1].get("config"),
    }


def _config_id(record: Mapping[str, Any]) -> str:
    return record.get("config_id") or LEGACY_CONFIG_ID


def append_switching_result(root: Path, record: Mapping[str, Any]) -> None:
    """Append one switch point's result (JSON-safe, with its ``config_id``) to ``switching/results.jsonl``."""
    path = switching_results_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    append_jsonl(path, record)

class RecordsView:
    """The records of a run as :class:`dynprobe.store.Run` shows them (``run.B``, ``run.B_linear``,
    ``run.switching``, ...); the class that mixes it in provides ``path``, ``steps`` and ``len()``."""

    path: Path
    steps: np.ndarray

    def _barrier_matrix(self, field: str) -> np.ndarray:
        index = {int(step): i for i, step in enumerate(self.steps)}
        matrix = np.full((len(self), len(self)), np.nan)
        np.fill_diagonal(matrix, 0.0)
        for record in read_barriers(self.path):
            i, j, value = index.get(record["i"]), index.get(record["j"]), record.get(field)
            if i is not None and j is not None and value is not None:
                matrix[i, j] = matrix[j, i] = value
        return matrix

    @functools.cached_property
    def B(self) -> np.ndarray:  # noqa: N802
        """Loss barrier between snapshots against the mean endpoint loss, eq. (5); float64 (T, T), NaN where not
        computed (trajectory barriers, :func:`dynprobe.fill_barriers`); diagonal 0."""
        return self._barrier_matrix("value")

    @functools.cached_property
    def B_linear(self) -> np.ndarray:  # noqa: N802
        """Loss barrier between snapshots against the linear interpolation of the endpoint losses (linear mode
        connectivity, Frankle et al. 2020); float64 (T, T), NaN where not computed; diagonal 0."""
        return self._barrier_matrix("B_linear")

    @functools.cached_property
    def switching_configs(self) -> dict[str, dict[str, Any] | None]:
        """The switching-experiment configurations of the run: ``{config_id: config}``, ordered by their latest
        record (the last one was computed most recently)."""
        return switching_configs(read_switching_results(self.path))

    def switching_results(self, config_id: str | None = None) -> dict[str, Any] | None:
        """Results of :func:`dynprobe.switching_experiment` (the two-phase paper's Fig. 6) under one
        configuration, or None if the run has none: ``{"switch_step", "total_steps", "eval_loss",
        "eval_accuracy", "train_loss"}`` arrays sorted by switch step (the latest record wins for a repeated step),
        plus ``"config_id"`` and ``"config"``.

        Args:
            config_id: which configuration (see :attr:`switching_configs`); required when the run has several,
                else the only one.
        """
        return switching_table(read_switching_results(self.path), config_id, self.path)

    @functools.cached_property
    def switching(self) -> dict[str, Any] | None:
        """The switching results of the run's configuration (:meth:`switching_results`), or None if not run.
        With several configurations it is the most recently computed one, with a warning naming the others."""
        configs = list(self.switching_configs)
        if not configs:
            return None
        if len(configs) > 1:
            warnings.warn(f"{self.path} holds switching results of {len(configs)} configurations; run.switching "
                          f"shows the latest, config_id={configs[-1]!r}. Choose one with "
                          "run.switching_results(config_id=...) (ids: run.switching_configs)", UserWarning,
                          stacklevel=3)  # the user's line, past functools.cached_property
        return self.switching_results(configs[-1])
