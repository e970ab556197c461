"""Scalar export of each snapshot to a dashboard: TensorBoard or an active Weights & Biases run.

An exporter is a ``Probe(on_snapshot=...)`` callback (the framework callbacks take ``exporters=[...]``)::

    probe = dynprobe.Probe(model, optimizer, eval_data=..., out="runs/x",
                           on_snapshot=dynprobe.exporters.TensorBoardExporter("runs/x/tensorboard"))

At every committed snapshot t_k it writes, at x = step t_k (tags under ``prefix``, default ``"dynprobe/"``):

| tag | value |
|---|---|
| ``C_prev``, ``D_prev`` | C (eq. 1) and D (eq. 6) between this snapshot and the previous one |
| ``C_init`` | C between this snapshot and the run's first one |
| ``kernel_velocity`` | S(θ_t−Δ, θ_t), the eNTK snapshot exactly Δ steps earlier (eq. 4; Fig. 5b; not ÷ Δ) |
| ``kernel_distance_init`` | S(t_k, t_0), t_0 the first snapshot with an eNTK (the cone curve of Fig. 5a) |
| ``eval_loss``, ``eval_accuracy``, ``train_loss`` | the probe's eval set; mean watched loss since the last snapshot |
| ``ghost/NNN/C``, ``/L2``, ``/D``, ``/S``, ``/B``, ``/B_linear`` | main-vs-ghost metrics of each live ghost |
| ``transition_step`` | the online transition estimate, from the snapshot at which it fired on |

Δ is the probe's ``KernelConfig(lag_steps=)`` or the most common gap between kernel snapshots; NNN is the ghost
id (``run.ghosts[i].ghost_id``). The numbers are read from what the probe already computed (the new rows of the
interval matrices and the ``ghost_compare``/``ghost_barrier`` events of this snapshot, read incrementally from
``events.jsonl``); an exporter computes nothing expensive. The dashboards are optional: ``tensorboard`` /
``wandb`` are imported when an exporter is built, with an error naming the package to install. An exporter that
fails while training warns once and goes quiet; it never stops the probe or the training.

This module lives in the core package (not in ``dynprobe.integrations``) because plain-loop users want it too and
it depends on no training framework.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dynprobe._util.steps import lag_pairs, most_common_gap
from dynprobe.store.files import read_jsonl_from
from dynprobe.store.layout import EVENTS

__all__ = ["Exporter", "TensorBoardExporter", "WandbExporter", "check_exporters", "resolve_exporters",
           "snapshot_scalars"]


# ------------------------------------------------------------------------------------------------ pure math


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _kernel_scalars(row: np.ndarray, steps: Sequence[int], lag: int | None = None) -> dict[str, float]:
    """Kernel velocity and distance to the first kernel from the new S row (NaN where no kernel was measured).

    The velocity is S(θ_t−Δ, θ_t) with the kernel snapshot exactly Δ steps earlier (pairs from
    :func:`dynprobe._util.steps.lag_pairs`, the definition every kernel velocity uses; never divided by Δ). Δ is
    ``lag`` (the probe's ``KernelConfig(lag_steps=)``), else the most common gap between the kernel snapshots so
    far; without a kernel snapshot exactly Δ earlier, no velocity is exported at this snapshot."""
    k = len(row) - 1
    if k < 1 or not np.isfinite(row[k]):  # no kernel at this snapshot
        return {}
    measured = [j for j in range(k) if np.isfinite(row[j])]
    if not measured:
        return {}
    out = {"kernel_distance_init": float(row[measured[0]])}
    kernel_steps = [int(steps[j]) for j in measured] + [int(steps[k])]
    lag = lag if lag is not None else most_common_gap(kernel_steps)
    if lag is not None:
        earlier, later = lag_pairs(np.asarray(kernel_steps, dtype=np.int64), int(lag))
        ending_here = earlier[later == len(kernel_steps) - 1]
        if ending_here.size:
            out["kernel_velocity"] = float(row[measured[int(ending_here[0])]])
    return out


def snapshot_scalars(info: Mapping[str, Any], ghost_records: Sequence[Mapping[str, Any]] = ()) -> dict[str, float]:
    """The dashboard numbers of one snapshot (see the module docstring), without prefix; non-finite values and
    quantities not measured at this snapshot are left out.

    Args:
        info: what ``Probe(on_snapshot=...)`` receives (record, ``rows``, ``steps``, ``transition``, and
            ``kernel_lag_steps`` when the probe places companion kernel snapshots).
        ghost_records: the ``ghost_compare`` and ``ghost_barrier`` events of this snapshot.
    """
    scalars: dict[str, float | None] = {
        "C_prev": info.get("C_prev"),
        "D_prev": info.get("D_prev"),
        "eval_loss": info.get("eval_loss"),
        "eval_accuracy": info.get("eval_accuracy"),
        "train_loss": info.get("train_loss"),
    }
    rows = info.get("rows") or {}
    c_row = rows.get("C")
    if c_row is not None and len(c_row) > 1:
        scalars["C_init"] = c_row[0]
    if rows.get("S") is not None:
        scalars.update(_kernel_scalars(np.asarray(rows["S"], dtype=np.float64), list(info["steps"]),
                                       info.get("kernel_lag_steps")))
    for record in ghost_records:
        for name in ("C", "L2", "D", "S", "B", "B_linear"):
            if name in record:
                scalars[f"ghost/{int(record['ghost']):03d}/{name}"] = record[name]
    transition = info.get("transition")
    if transition is not None:
        scalars["transition_step"] = getattr(transition, "step", None)
    return {name: v for name, value in scalars.items() if (v := _finite(value)) is not None}


# ------------------------------------------------------------------------------------------------ base


class _EventTail:
    """Reads the lines appended to a run's ``events.jsonl`` since the previous call (complete lines only)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.offset = 0

    def new_events(self, out: os.PathLike | str) -> list[dict[str, Any]]:
        path = Path(out) / EVENTS
        if path != self.path:
            self.path, self.offset = path, 0
        events, self.offset = read_jsonl_from(path, self.offset)  # a torn last line is read next time
        return events


class Exporter:
    """Base class: turns ``Probe(on_snapshot=...)`` calls into :func:`snapshot_scalars` and hands them to
    :meth:`write`. Subclasses implement ``write(scalars, step)`` (and ``flush``/``close`` where needed)."""

    def __init__(self, prefix: str = "dynprobe/") -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string; got {type(prefix).__name__}")
        self.prefix = prefix
        self._tail = _EventTail()
        self._failed = False

    def __call__(self, info: Mapping[str, Any]) -> None:
        if self._failed:
            return
        try:
            step = int(info["step"])
            ghosts = [e for e in self._tail.new_events(info["out"])
                      if e.get("event") in ("ghost_compare", "ghost_barrier") and e.get("step") == step]
            scalars = snapshot_scalars(info, ghosts)
            self.write({self.prefix + name: value for name, value in scalars.items()}, step)
        except Exception as error:  # noqa: BLE001 - a dashboard problem must not stop the probe
            self._failed = True
            warnings.warn(f"dynprobe: {type(self).__name__} failed ({type(error).__name__}: {error}) and stopped "
                          "exporting; the run directory is unaffected", RuntimeWarning, stacklevel=2)

    def write(self, scalars: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release what the exporter opened itself (never a writer or run you passed in)."""


class TensorBoardExporter(Exporter):
    """Writes the snapshot scalars with ``torch.utils.tensorboard.SummaryWriter.add_scalar`` at x = step.

    Args:
        log_dir: where to create a ``SummaryWriter`` (ignored when ``writer`` is given).
        writer: an existing ``SummaryWriter`` (e.g. Lightning's ``TensorBoardLogger.experiment``): the scalars join
            your own curves; the exporter never closes it.
        prefix: tag prefix.
    """

    def __init__(self, log_dir: str | os.PathLike | None = None, *, writer: Any = None,
                 prefix: str = "dynprobe/") -> None:
        super().__init__(prefix)
        if writer is None:
            if log_dir is None:
                raise ValueError("TensorBoardExporter needs log_dir= (a directory) or writer= (a SummaryWriter)")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError(
                    "TensorBoardExporter needs the tensorboard package: pip install tensorboard "
                    "(or pip install 'dynprobe[tensorboard]')"
                ) from error
            writer, self._owned = SummaryWriter(log_dir=str(log_dir)), True
        else:
            if not hasattr(writer, "add_scalar"):
                raise TypeError(f"writer must be a SummaryWriter (with add_scalar); got {type(writer).__name__}")
            self._owned = False
        self.writer = writer

    def write(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self._owned:
            self.writer.close()


class WandbExporter(Exporter):
    """Logs the snapshot scalars to a Weights & Biases run, against their own x-axis ``<prefix>step``.

    W&B's own ``step`` belongs to your logging; the exporter declares ``define_metric(prefix + "*",
    step_metric=prefix + "step")`` so its points never conflict with it.

    Args:
        run: the W&B run (default: the active ``wandb.run``; ``wandb.init()`` must have been called).
        prefix: tag prefix.
    """

    def __init__(self, run: Any = None, *, prefix: str = "dynprobe/") -> None:
        super().__init__(prefix)
        if run is None:
            try:
                import wandb
            except ImportError as error:
                raise ImportError("WandbExporter needs the wandb package: pip install wandb") from error
            run = wandb.run
            if run is None:
                raise RuntimeError("WandbExporter needs an active W&B run: call wandb.init(...) first, or pass run=")
        if not hasattr(run, "log"):
            raise TypeError(f"run must be a W&B run (with .log); got {type(run).__name__}")
        self.run = run
        step_metric = prefix + "step"
        if hasattr(run, "define_metric"):
            run.define_metric(step_metric)
            run.define_metric(prefix + "*", step_metric=step_metric)
        self._step_metric = step_metric

    def write(self, scalars: dict[str, float], step: int) -> None:
        self.run.log({self._step_metric: step, **scalars})


def check_exporters(exporters: Any) -> None:
    """Validate an ``exporters=`` option early (names, installed packages) without building anything."""
    for item in [] if exporters is None else exporters if isinstance(exporters, (list, tuple)) else [exporters]:
        if item == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError as error:
                raise ImportError("exporters=['tensorboard'] needs the tensorboard package: pip install tensorboard "
                                  "(or pip install 'dynprobe[tensorboard]')") from error
        elif item == "wandb":
            try:
                import wandb  # noqa: F401
            except ImportError as error:
                raise ImportError("exporters=['wandb'] needs the wandb package: pip install wandb") from error
        elif not callable(item):
            raise ValueError(f"exporters= takes 'tensorboard', 'wandb' or exporter objects "
                             f"(dynprobe.exporters.TensorBoardExporter(...)); got {item!r}")


def resolve_exporters(exporters: Any, *, tensorboard_dir: Callable[[], str | os.PathLike],
                      tensorboard_writer: Callable[[], Any] | None = None) -> list[Exporter]:
    """The framework callbacks' ``exporters=`` option: a list of exporters and/or the names ``"tensorboard"``
    (a :class:`TensorBoardExporter` on ``tensorboard_writer()`` when it returns one, else in ``tensorboard_dir()``)
    and ``"wandb"`` (a :class:`WandbExporter` on the active run). Validates the names; builds nothing for None."""
    if exporters is None:
        return []
    if isinstance(exporters, (str, Exporter)) or callable(exporters):
        exporters = [exporters]
    resolved: list[Exporter] = []
    for item in exporters:
        if item == "tensorboard":
            writer = tensorboard_writer() if tensorboard_writer is not None else None
            resolved.append(TensorBoardExporter(writer=writer) if writer is not None
                            else TensorBoardExporter(tensorboard_dir()))
        elif item == "wandb":
            resolved.append(WandbExporter())
        elif callable(item):
            resolved.append(item)
        else:
            raise ValueError(f"exporters= takes 'tensorboard', 'wandb' or exporter objects "
                             f"(dynprobe.exporters.TensorBoardExporter(...)); got {item!r}")
    return resolved


def combined(callbacks: Sequence[Callable[[dict[str, Any]], None]]) -> Callable[[dict[str, Any]], None] | None:
    """One ``on_snapshot`` callback calling each of ``callbacks`` in turn (None when there are none)."""
    callbacks = [c for c in callbacks if c is not None]
    if not callbacks:
        return None
    if len(callbacks) == 1:
        return callbacks[0]

    def call_all(info: dict[str, Any]) -> None:
        for callback in callbacks:
            callback(info)

    return call_all
