"""``load_run``: a read-only, numpy view of a run directory (while it is written, or after).

>>> run = dynprobe.load_run("runs/resnet20")
>>> run.steps, run.C, run.D, run.eval_accuracy       # (T,), (T, T), (T, T), (T,)

Only committed snapshots are visible: a run killed mid-snapshot loads with every snapshot before it. Nothing is
unpickled (arrays are ``.npy``/``.npz`` loaded with ``allow_pickle=False``; everything else is JSON).
"""
from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .files import RunFormatError, load_npy, load_npz, load_snapshot_state, read_jsonl, read_manifest
from .layout import (
    BUFFERS,
    EVAL_INDICES,
    EVENTS,
    KERNEL,
    PARAMS,
    PREDS,
    ghost_array,
    rows_path,
    snapshot_file,
)
from .records import read_barriers, read_switching_results
from .rows import TriangularRows

__all__ = ["GhostInfo", "Run", "RunFormatError", "load_run"]

CHAOS_METRICS = ("C", "L2", "D", "S", "B", "eval_loss", "eval_accuracy")


@dataclass(frozen=True)
class GhostInfo:
    """One ghost replica of a run (row ``index`` of every ``run.chaos`` map)."""

    index: int
    spawn_step: int
    control: bool
    kind: str
    seed: int
    nominal_norm: float
    realized_norm: float
    changed: int
    total: int
    status: str  # alive / diverged / failed / finished
    status_step: int | None = None
    reason: str | None = None


def load_run(path: str | os.PathLike) -> Run:
    """Open the run directory at ``path`` for reading.

    Raises :class:`dynprobe.RunFormatError` (a ``ValueError``) when ``path`` is not a run, its manifest is
    truncated, or it was written by a newer dynprobe.
    """
    return Run(path)


class Run:
    """A read-only view of a run directory; arrays are numpy, indexed by snapshot (``run.steps[i]``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.manifest: dict[str, Any] = read_manifest(self.path)
        self.events: list[dict[str, Any]] = read_jsonl(self.path / EVENTS)
        snapshots = [e for e in self.events if e.get("event") == "snapshot"]
        for i, record in enumerate(snapshots):
            if record.get("index") != i or "step" not in record:
                raise RunFormatError(f"{self.path / EVENTS}: snapshot record {i} is malformed or out of order")
        self.snapshots: list[dict[str, Any]] = snapshots

    # ------------------------------------------------------------------------------------------ metadata

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.get("config", {})

    @property
    def conventions(self) -> dict[str, str]:
        """How every stored number was computed (formulas, precision, modes)."""
        return self.manifest.get("conventions", {})

    @property
    def status(self) -> str:
        """``running``, ``closed``, ``failed``, ``probe_failed`` — or ``interrupted`` when the manifest says
        running but the writing process (on this host) no longer exists."""
        status = self.manifest.get("status", "unknown")
        writer = self.manifest.get("writer", {})
        if status == "running" and writer.get("host") == socket.gethostname() and not _pid_alive(writer.get("pid")):
            return "interrupted"
        return status

    @property
    def name(self) -> str:
        return self.path.name

    def __len__(self) -> int:
        return len(self.snapshots)

    def __repr__(self) -> str:
        last = f", last step {self.snapshots[-1]['step']}" if self.snapshots else ""
        return f"Run({str(self.path)!r}, {len(self)} snapshots{last}, status={self.status!r})"

    # ------------------------------------------------------------------------------------------ per snapshot

    @functools.cached_property
    def steps(self) -> np.ndarray:
        """Step of each snapshot (optimizer steps taken; 0 = initialization), int64 (T,)."""
        return np.array([s["step"] for s in self.snapshots], dtype=np.int64)

    def _column(self, key: str) -> np.ndarray:
        return np.array([np.nan if s.get(key) is None else s[key] for s in self.snapshots], dtype=np.float64)

    @functools.cached_property
    def eval_loss(self) -> np.ndarray:
        """Mean cross-entropy on the eval set at each snapshot (eval mode), float64 (T,)."""
        return self._column("eval_loss")

    @functools.cached_property
    def eval_accuracy(self) -> np.ndarray:
        """Accuracy on the eval set at each snapshot, float64 (T,)."""
        return self._column("eval_accuracy")

    @functools.cached_property
    def train_loss(self) -> np.ndarray:
        """Mean watched training loss over the steps since the previous snapshot (NaN if not watched)."""
        return self._column("train_loss")

    @functools.cached_property
    def lr(self) -> np.ndarray:
        """Learning rate of the first param group at each snapshot (NaN if unknown)."""
        return np.array([(s.get("lr") or [np.nan])[0] for s in self.snapshots], dtype=np.float64)

    def index_of(self, step: int) -> int:
        """Snapshot index of ``step``; KeyError naming the nearest recorded steps if it was not recorded."""
        matches = np.flatnonzero(self.steps == step)
        if matches.size == 0:
            below, above = self.steps[self.steps < step], self.steps[self.steps > step]
            nearest = ([int(below.max())] if below.size else []) + ([int(above.min())] if above.size else [])
            raise KeyError(f"step {step} was not recorded; nearest recorded steps: {nearest}")
        return int(matches[0])

    def _snapshot_file(self, index: int, name: str) -> Path:
        return snapshot_file(self.path, self.snapshots[index]["step"], name)

    def params(self, index: int, *, mmap: bool = True) -> np.ndarray:
        """Flat ``vec(θ)`` of snapshot ``index`` (memory-mapped by default)."""
        return load_npy(self._snapshot_file(index, PARAMS), mmap=mmap)

    def buffers(self, index: int) -> dict[str, np.ndarray]:
        """The model's buffers at snapshot ``index`` by name (BatchNorm statistics, ...)."""
        return load_npz(self._snapshot_file(index, BUFFERS))

    def predictions(self, index: int) -> np.ndarray:
        """Predicted labels (argmax) on the eval set at snapshot ``index``."""
        return load_npy(self._snapshot_file(index, PREDS))

    def state_dict(self, index: int) -> dict[str, Any]:
        """Parameters (unflattened, by name) and buffers of snapshot ``index`` as torch tensors, ready for
        ``model.load_state_dict(..., strict=False)`` (only trainable parameters are stored)."""
        return load_snapshot_state(self.path, self.manifest, int(self.snapshots[index]["step"]))

    @property
    def eval_indices(self) -> np.ndarray:
        """Indices into the user's eval data of the examples the run evaluates on."""
        return load_npy(self.path / EVAL_INDICES)

    # ------------------------------------------------------------------------------------------ matrices

    def _matrix(self, name: str) -> np.ndarray:
        return TriangularRows(rows_path(self.path, name)).read(len(self))

    @functools.cached_property
    def C(self) -> np.ndarray:  # noqa: N802 - the paper's symbol
        """Parameter cosine dissimilarity between snapshots, eq. (1); float64 (T, T), NaN where not computed."""
        return self._matrix("C")

    @functools.cached_property
    def D(self) -> np.ndarray:  # noqa: N802
        """Disagreement rate between snapshots on the eval set, eq. (6); float64 (T, T)."""
        return self._matrix("D")

    # ------------------------------------------------------------------------------------------ ghosts

    @functools.cached_property
    def ghosts(self) -> list[GhostInfo]:
        """Every ghost spawned by the time of the last committed snapshot, in spawn order."""
        last = int(self.steps[-1]) if len(self) else -1
        infos: dict[int, dict[str, Any]] = {}
        for event in self.events:
            kind = event.get("event")
            if kind == "ghost_spawn" and event["step"] <= last:
                infos[event["ghost"]] = {
                    "index": event["ghost"], "spawn_step": event["spawn_step"], "control": event["control"],
                    "kind": event["kind"], "seed": event["seed"], "nominal_norm": event["nominal_norm"],
                    "realized_norm": event["realized_norm"], "changed": event["changed"], "total": event["total"],
                    "status": "alive",
                }
            elif kind == "ghost_status" and event["ghost"] in infos:
                infos[event["ghost"]].update(status=event["status"], status_step=event["step"],
                                             reason=event.get("reason"))
        return [GhostInfo(**infos[i]) for i in sorted(infos)]

    @functools.cached_property
    def chaos(self) -> dict[str, np.ndarray]:
        """Ghost × snapshot maps (G, T) of main-vs-ghost metrics: ``"C"`` (1 − cos), ``"L2"``, ``"D"``, ``"S"``,
        ``"B"``, and the ghost's ``"eval_loss"`` / ``"eval_accuracy"``. Row i is ``run.ghosts[i]``; columns are
        ``run.steps``; NaN where the snapshot precedes the spawn, after the ghost stopped, or where the metric
        was not computed."""
        ghosts = self.ghosts
        column = {int(step): i for i, step in enumerate(self.steps)}
        row = {g.index: r for r, g in enumerate(ghosts)}
        maps = {name: np.full((len(ghosts), len(self)), np.nan) for name in CHAOS_METRICS}
        for event in self.events:
            if event.get("event") != "ghost_compare" or event["ghost"] not in row or event["step"] not in column:
                continue
            for name in CHAOS_METRICS:
                value = event.get(name)
                if value is not None:
                    maps[name][row[event["ghost"]], column[event["step"]]] = value
        return maps

    def ghost_predictions(self, ghost: int, index: int) -> np.ndarray:
        """Eval predictions of ghost ``ghost`` at snapshot ``index``."""
        return load_npy(self._snapshot_file(index, ghost_array(ghost, PREDS)))

    def ghost_params(self, ghost: int, index: int) -> np.ndarray:
        """Flat parameters of ghost ``ghost`` at snapshot ``index`` (runs with ``Ghosts(save_params=True)``)."""
        return load_npy(self._snapshot_file(index, ghost_array(ghost, PARAMS)), mmap=True)

    @functools.cached_property
    def S(self) -> np.ndarray:  # noqa: N802
        """eNTK kernel distance between snapshots, eq. (4); float64 (T, T), NaN where a kernel was not measured
        (all NaN for runs without ``Probe(kernel=...)``)."""
        return self._matrix("S")

    @property
    def has_kernels(self) -> bool:
        """Whether any snapshot has an eNTK (runs with ``Probe(kernel=KernelConfig(...))``)."""
        return any(s.get("kernel") for s in self.snapshots)

    @functools.cached_property
    def kernel_steps(self) -> np.ndarray:
        """Steps of the snapshots that have a kernel (int64)."""
        return np.array([s["step"] for s in self.snapshots if s.get("kernel")], dtype=np.int64)

    def kernel(self, index: int) -> np.ndarray | None:
        """H(θ_t) on the probe set at snapshot ``index`` (float64), or None if not measured there."""
        if not self.snapshots[index].get("kernel"):
            return None
        return load_npy(self._snapshot_file(index, KERNEL))

    def kernel_distance_to(self, tau: int) -> tuple[np.ndarray, np.ndarray]:
        """The cone curve S(θ_t, θ_τ) of the paper's Fig. 5a: ``(steps t, values)`` over the snapshots with a
        kernel. ``tau`` is a recorded step that has a kernel."""
        j = self.index_of(tau)
        if not self.snapshots[j].get("kernel"):
            raise KeyError(f"step {tau} has no kernel; steps with kernels: {self.kernel_steps.tolist()[:10]}...")
        have = np.array([bool(s.get("kernel")) for s in self.snapshots])
        return self.steps[have], self.S[have, j]

    def kernel_velocity(self, dt: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Kernel velocity v(t) = S(θ_t, θ_{t+dt}) / dt (Fort et al. 2020; the paper's Fig. 5b without the /dt).

        With ``dt``: over every pair of kernel snapshots exactly ``dt`` steps apart, returns ``(t, v)``. Without:
        over consecutive kernel snapshots, ``(t, S(t_k, t_{k+1}) / (t_{k+1} − t_k))``.
        """
        have = np.flatnonzero([bool(s.get("kernel")) for s in self.snapshots])
        steps, S = self.steps, self.S
        if dt is None:
            pairs = list(zip(have[:-1], have[1:]))
        else:
            if dt <= 0:
                raise ValueError(f"dt must be a positive number of steps; got {dt}")
            position = {int(steps[i]): i for i in have}
            pairs = [(i, position[int(steps[i]) + dt]) for i in have if int(steps[i]) + dt in position]
        t = np.array([steps[i] for i, _ in pairs], dtype=np.int64)
        v = np.array([S[i, j] / (steps[j] - steps[i]) for i, j in pairs], dtype=np.float64)
        return t, v

    @functools.cached_property
    def B(self) -> np.ndarray:  # noqa: N802
        """Loss barrier between snapshots, eq. (5); float64 (T, T), NaN where not computed (see
        ``Probe(trajectory_barriers=k)`` and :func:`dynprobe.fill_barriers`); diagonal 0."""
        index = {int(step): i for i, step in enumerate(self.steps)}
        matrix = np.full((len(self), len(self)), np.nan)
        np.fill_diagonal(matrix, 0.0)
        for record in read_barriers(self.path):
            i, j = index.get(record["i"]), index.get(record["j"])
            if i is not None and j is not None:
                matrix[i, j] = matrix[j, i] = record["value"]
        return matrix

    @functools.cached_property
    def switching(self) -> dict[str, np.ndarray] | None:
        """Results of :func:`dynprobe.switching_experiment` (the paper's Fig. 6), or None if not run:
        ``{"switch_step", "total_steps", "eval_loss", "eval_accuracy"}`` arrays sorted by switch step (the
        latest record wins for a repeated switch step)."""
        records = {r["switch_step"]: r for r in read_switching_results(self.path)}
        if not records:
            return None
        rows = [records[k] for k in sorted(records)]
        return {
            "switch_step": np.array([r["switch_step"] for r in rows], dtype=np.int64),
            "total_steps": np.array([r["total_steps"] for r in rows], dtype=np.int64),
            "eval_loss": np.array([r["eval_loss"] for r in rows], dtype=np.float64),
            "eval_accuracy": np.array([r["eval_accuracy"] for r in rows], dtype=np.float64),
        }

    def summary(self) -> dict[str, Any]:
        """Headline numbers (used by ``dynprobe show``)."""
        out: dict[str, Any] = {"snapshots": len(self), "status": self.status}
        if len(self):
            out.update(first_step=int(self.steps[0]), last_step=int(self.steps[-1]),
                       final_eval_loss=float(self.eval_loss[-1]), final_eval_accuracy=float(self.eval_accuracy[-1]))
        return out


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
