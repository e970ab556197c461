"""``load_run``: a read-only, numpy view of a run directory (while it is written, or after).

>>> run = dynprobe.load_run("runs/resnet20")
>>> run.steps, run.C, run.D, run.eval_accuracy       # (T,), (T, T), (T, T), (T,)
>>> run.params(step=500), run.predictions(snapshot_index=-1)  # one snapshot, by step or by position

Only committed snapshots are visible: a run killed mid-snapshot loads with every snapshot before it. A damaged
event log is read up to its first damaged record, with a :class:`RunFormatWarning`; every other damaged file
raises :class:`RunFormatError` from the accessor that reads it. Nothing is unpickled, and nothing is allocated
from an unchecked size: the manifest and events are validated (:mod:`dynprobe.store.validate`), array headers are
checked against the manifest and the file size, and the T×T matrices are bounded by the row files.
"""
from __future__ import annotations

import functools
import os
import socket
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynprobe._util.checks import is_int
from dynprobe._util.distances import pairwise_cosine_dissimilarity
from dynprobe._util.modules import layer_slices
from dynprobe._util.steps import lag_pairs, most_common_gap

from .disk import DiskUsage, disk_usage
from .files import (
    RunFormatError,
    RunFormatWarning,
    load_npy,
    load_npz,
    load_snapshot_state,
    read_jsonl_prefix,
    read_manifest,
)
from .ghost_records import CHAOS_METRICS, GhostInfo, chaos_maps, ghost_infos
from .layout import (
    BUFFERS,
    EVAL_INDICES,
    EVENTS,
    KERNEL,
    KERNEL_LAYERS,
    PARAMS,
    PREDS,
    ghost_array,
    layer_metric,
    lr_files,
    rows_path,
    run_array_path,
    separation_path,
    snapshot_file,
)
from .records import RecordsView
from .rows import PairLog, TriangularRows
from .sharded import has_sharded_params, load_sharded_params, load_sharded_tensors
from .validate import backed_snapshots, valid_event_prefix, validate_manifest

__all__ = ["CHAOS_METRICS", "GhostInfo", "Run", "RunFormatError", "RunFormatWarning", "load_run"]


def load_run(path: str | os.PathLike) -> Run:
    """Open the run directory at ``path`` for reading.

    Raises :class:`dynprobe.RunFormatError` (a ``ValueError``) when ``path`` is not a run, its manifest is
    truncated or damaged, or it was written by a newer dynprobe; warns (:class:`RunFormatWarning`) and keeps the
    intact prefix when its event log is damaged.
    """
    return Run(path, _stacklevel=3)


class Run(RecordsView):
    """A read-only view of a run directory; arrays are numpy, indexed by snapshot (``run.steps[i]``).

    Attributes:
        path: the run directory. manifest: ``run.json``. events: the valid events, in order.
        snapshots: the committed snapshot records. damage: what was found damaged (empty for an intact run).
    """

    def __init__(self, path: str | os.PathLike, *, _stacklevel: int = 2) -> None:
        if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a run directory (str or os.PathLike); got {type(path).__name__}")
        self.path = Path(path)
        self.manifest: dict[str, Any] = read_manifest(self.path)
        validate_manifest(self.manifest, self.path)
        events, parse_problem = read_jsonl_prefix(self.path / EVENTS)
        events, problem = valid_event_prefix(events, self.path)
        snapshots = [e for e in events if e["event"] == "snapshot"]
        snapshots, unbacked = backed_snapshots(self.path, snapshots)
        self.damage: list[str] = [p for p in (parse_problem, problem, unbacked) if p]
        if self.damage:
            warnings.warn("; ".join(self.damage) + f". Reading the intact prefix: {len(snapshots)} snapshots",
                          RunFormatWarning, stacklevel=_stacklevel)
        self.events: list[dict[str, Any]] = events
        self.snapshots: list[dict[str, Any]] = snapshots

    # ------------------------------------------------------------------------------------------ metadata

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.get("config") or {}

    @property
    def conventions(self) -> dict[str, str]:
        """How every stored number was computed (formulas, precision, modes)."""
        return self.manifest.get("conventions") or {}

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

    @property
    def disk_usage(self) -> DiskUsage:
        """Bytes the run directory holds: ``.total_bytes``, ``.snapshot_bytes``, ``.bytes_per_snapshot``."""
        return disk_usage(self.path, len(self))

    @property
    def num_parameters(self) -> int | None:
        """P, the entries of ``vec(θ)`` (None if the manifest does not say)."""
        model = self.manifest.get("model") or {}
        if isinstance(model.get("num_parameters"), int):
            return model["num_parameters"]
        specs = model.get("parameters")
        return sum(spec["numel"] for spec in specs) if specs else None

    @property
    def eval_n(self) -> int | None:
        """Examples in the fixed eval set (None if the manifest does not say)."""
        return (self.manifest.get("eval") or {}).get("n")

    # ------------------------------------------------------------------------------------------ per snapshot

    @functools.cached_property
    def steps(self) -> np.ndarray:
        """Step of each snapshot (optimizer steps taken; 0 = initialization), int64 (T,)."""
        return np.array([s["step"] for s in self.snapshots], dtype=np.int64)

    def _column(self, key: str) -> np.ndarray:
        return np.array([np.nan if s.get(key) is None else s[key] for s in self.snapshots], dtype=np.float64)

    @functools.cached_property
    def eval_loss(self) -> np.ndarray:
        """Mean loss on the eval set at each snapshot (eval mode), float64 (T,)."""
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
        """The learning rate of every optimizer step and param group, ``(steps, groups)`` float64: row t is the rate
        the update from θ_t to θ_t+1 used, up to the last committed snapshot (NaN where nothing was recorded:
        before the probe attached, or for a group added later). ``run.lr[run.steps[:-1], 0]`` gives the first
        group's rate after each snapshot; :func:`dynprobe.analysis.lr_changes` lists the step changes."""
        end = int(self.steps[-1]) if len(self) else 0
        logs = {group: PairLog(path).read(until=end) for group, path in lr_files(self.path).items()}
        out = np.full((end, max(logs, default=-1) + 1), np.nan)
        for group, (steps, values) in logs.items():
            keep = (steps >= 0) & (steps < end)
            steps, values = steps[keep], values[keep]
            if steps.size:  # each recorded value holds until the next record; the last one for its own step
                lengths = np.diff(np.append(steps, steps[-1] + 1))
                out[int(steps[0]):int(steps[-1]) + 1, group] = np.repeat(values, lengths)
        return out

    def snapshot_index_of(self, step: int) -> int:
        """Snapshot index (position in ``run.steps``) of ``step``; KeyError naming the nearest recorded steps if it
        was not recorded."""
        if not is_int(step):
            raise TypeError(f"step must be an integer optimizer step; got {type(step).__name__} {step!r}")
        matches = np.flatnonzero(self.steps == step)
        if matches.size == 0:
            below, above = self.steps[self.steps < step], self.steps[self.steps > step]
            nearest = ([int(below.max())] if below.size else []) + ([int(above.min())] if above.size else [])
            raise KeyError(f"step {step} was not recorded; nearest recorded steps: {nearest}")
        return int(matches[0])

    def _snapshot_position(self, what: str, step: int | None, snapshot_index: int | None) -> int:
        """The snapshot position an accessor call names: ``step=`` (an optimizer step) or ``snapshot_index=`` (a
        position in ``run.steps``, negative counting from the end)."""
        if (step is None) == (snapshot_index is None):
            raise TypeError(f"run.{what}() takes exactly one of step= (an optimizer step) or snapshot_index= (a "
                            "snapshot position)")
        if step is not None:
            return self.snapshot_index_of(step)
        if not is_int(snapshot_index):
            raise TypeError(f"snapshot_index must be an integer snapshot position; got "
                            f"{type(snapshot_index).__name__} {snapshot_index!r}")
        if not -len(self) <= snapshot_index < len(self):
            raise IndexError(f"snapshot index {snapshot_index} is out of range: the run has {len(self)} snapshots")
        return int(snapshot_index) % len(self)

    def _file(self, snapshot_index: int, name: str) -> Path:
        return snapshot_file(self.path, self.snapshots[snapshot_index]["step"], name)

    def _param_shape(self) -> tuple[int, ...] | None:
        return None if self.num_parameters is None else (self.num_parameters,)

    def _label_shape(self) -> tuple[Any, ...] | None:
        # One prediction per unit of the eval task: examples, scored tokens or output coordinates.
        size = (self.manifest.get("eval") or {}).get("prediction_size")
        if is_int(size):
            return (size,)
        return None if self.eval_n is None else (self.eval_n, ...)

    def params(self, *, step: int | None = None, snapshot_index: int | None = None, mmap: bool = True
               ) -> np.ndarray:
        """Flat ``vec(θ)`` of one snapshot (``step=`` or ``snapshot_index=``; memory-mapped by default)."""
        i = self._snapshot_position("params", step, snapshot_index)
        if has_sharded_params(self.path, self.snapshots[i]["step"]):  # FSDP2: the ranks' shards, gathered here
            return load_sharded_params(self.path, self.manifest, int(self.snapshots[i]["step"]))
        return load_npy(self._file(i, PARAMS), mmap=mmap, shape=self._param_shape())

    def buffers(self, *, step: int | None = None, snapshot_index: int | None = None) -> dict[str, np.ndarray]:
        """The model's buffers of one snapshot by name (BatchNorm statistics, ...)."""
        i = self._snapshot_position("buffers", step, snapshot_index)
        specs = (self.manifest.get("model") or {}).get("buffers", [])
        return load_npz(self._file(i, BUFFERS), shapes={spec["name"]: tuple(spec["shape"]) for spec in specs})

    def predictions(self, *, step: int | None = None, snapshot_index: int | None = None) -> np.ndarray:
        """Predicted labels (argmax) on the eval set at one snapshot."""
        i = self._snapshot_position("predictions", step, snapshot_index)
        return load_npy(self._file(i, PREDS), shape=self._label_shape())

    def state_dict(self, *, step: int | None = None, snapshot_index: int | None = None) -> dict[str, Any]:
        """Parameters (unflattened, by name) and buffers of one snapshot as torch tensors, ready for
        ``model.load_state_dict(..., strict=False)`` (only trainable parameters are stored)."""
        i = self._snapshot_position("state_dict", step, snapshot_index)
        if not isinstance(self.manifest.get("model"), dict):
            raise RunFormatError(f"{self.path}: the manifest has no model layout; cannot rebuild a state dict")
        step = int(self.snapshots[i]["step"])
        if has_sharded_params(self.path, step):  # FSDP2: full tensors from the ranks' shards, then the buffers
            buffers = {name: torch.from_numpy(np.array(array))
                       for name, array in self.buffers(snapshot_index=i).items()}
            return {**load_sharded_tensors(self.path, self.manifest, step), **buffers}
        return load_snapshot_state(self.path, self.manifest, step)

    @property
    def eval_indices(self) -> np.ndarray:
        """Indices into the user's eval data of the examples the run evaluates on."""
        return load_npy(run_array_path(self.path, EVAL_INDICES), shape=None if self.eval_n is None else (self.eval_n,))

    # ------------------------------------------------------------------------------------------ matrices

    def _matrix(self, name: str) -> np.ndarray:
        # len(self) never exceeds the rows of C and D (validate.backed_snapshots): bounded by the file sizes.
        return TriangularRows(rows_path(self.path, name)).read(len(self))

    @functools.cached_property
    def C(self) -> np.ndarray:  # noqa: N802 - the paper's symbol
        """Parameter cosine dissimilarity between snapshots, eq. (1); float64 (T, T), NaN where not computed."""
        return self._matrix("C")

    @functools.cached_property
    def layers(self) -> list[str]:
        """The model's layers (modules owning parameters; ``""`` is the root module), in ``vec(θ)`` order."""
        spec = (self.manifest.get("model") or {}).get("parameters") or []
        return [name for name, _ in layer_slices((p["name"], int(p["numel"])) for p in spec)]

    @functools.cached_property
    def C_layers(self) -> np.ndarray:  # noqa: N802
        """C (eq. 1) of each layer's slice of θ between snapshots; float64 (L, T, T) in ``run.layers`` order."""
        matrices = [self._matrix(layer_metric("C", i)) for i in range(len(self.layers))]
        return np.stack(matrices) if matrices else np.zeros((0, len(self), len(self)))

    @functools.cached_property
    def D(self) -> np.ndarray:  # noqa: N802
        """Disagreement rate between snapshots on the eval set, eq. (6); float64 (T, T)."""
        return self._matrix("D")

    @functools.cached_property
    def S(self) -> np.ndarray:  # noqa: N802
        """eNTK kernel distance between snapshots, eq. (4); float64 (T, T), NaN where a kernel was not measured
        (all NaN for runs without ``Probe(kernel=...)``)."""
        return self._matrix("S")

    # ------------------------------------------------------------------------------------------ kernels

    @property
    def has_kernels(self) -> bool:
        """Whether any snapshot has an eNTK (runs with ``Probe(kernel=KernelConfig(...))``)."""
        return any(s.get("kernel") for s in self.snapshots)

    @functools.cached_property
    def kernel_steps(self) -> np.ndarray:
        """Steps of the snapshots that have a kernel (int64)."""
        return np.array([s["step"] for s in self.snapshots if s.get("kernel")], dtype=np.int64)

    def kernel(self, *, step: int | None = None, snapshot_index: int | None = None) -> np.ndarray | None:
        """H(θ_t) on the probe set at one snapshot (float64), or None if not measured there."""
        i = self._snapshot_position("kernel", step, snapshot_index)
        if not self.snapshots[i].get("kernel"):
            return None
        return load_npy(self._file(i, KERNEL))

    def kernel_layers(self, *, step: int | None = None, snapshot_index: int | None = None) -> np.ndarray | None:
        """Each layer's eNTK H_l at one snapshot (``KernelConfig(per_layer=True)``): float64 (L, n, n), layers in
        ``run.layers`` order, summing to ``run.kernel(...)``; None where the snapshot has no per-layer kernel."""
        i = self._snapshot_position("kernel_layers", step, snapshot_index)
        path = self._file(i, KERNEL_LAYERS)
        if not self.snapshots[i].get("kernel") or not path.exists():
            return None
        return load_npy(path, shape=self._kernel_layers_shape())

    def _kernel_layers_shape(self) -> tuple[Any, ...] | None:
        # One kernel per layer of the manifest: a header declaring more layers is refused before it is read.
        return (len(self.layers), ...) if self.layers else None

    @functools.cached_property
    def S_layers(self) -> np.ndarray:  # noqa: N802 - the paper's symbol
        """The kernel distance S (eq. 4) of each layer's kernel H_l between snapshots: float64 (L, T, T) in
        ``run.layers`` order, NaN where a snapshot has no per-layer kernel. Computed on first use from the stored
        per-layer kernels (one memory-mapped pass; no per-layer rows are written during training)."""
        count = len(self)
        have = [i for i in range(count) if self.snapshots[i].get("kernel") and self._file(i, KERNEL_LAYERS).exists()]
        stored = [load_npy(self._file(i, KERNEL_LAYERS), mmap=True, shape=self._kernel_layers_shape()) for i in have]
        layers = stored[0].shape[0] if stored else len(self.layers)
        result = np.full((layers, count, count), np.nan)
        for layer in range(layers if stored else 0):
            result[layer][np.ix_(have, have)] = pairwise_cosine_dissimilarity(
                np.stack([kernels[layer].reshape(-1) for kernels in stored]))
        return result

    def kernel_distance_to(self, tau: int) -> tuple[np.ndarray, np.ndarray]:
        """The cone curve S(θ_t, θ_τ) of the two-phase paper's Fig. 5a: ``(steps t, values)`` over the snapshots
        with a kernel. ``tau`` is a recorded step that has a kernel."""
        j = self.snapshot_index_of(tau)
        if not self.snapshots[j].get("kernel"):
            raise KeyError(f"step {tau} has no kernel; steps with kernels: {self.kernel_steps.tolist()[:10]}...")
        have = np.array([bool(s.get("kernel")) for s in self.snapshots], dtype=bool)
        return self.steps[have], self.S[have, j]

    @property
    def kernel_lag_steps(self) -> int | None:
        """The lag Δ of the kernel velocity: ``KernelConfig(lag_steps=Δ)`` of the run, else the most common gap
        between consecutive kernel snapshots (None with fewer than two)."""
        configured = (self.config.get("kernel") or {}).get("lag_steps")
        if is_int(configured) and configured > 0:
            return configured
        return most_common_gap(self.kernel_steps)

    def kernel_velocity(self, lag_steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Kernel velocity at a fixed lag Δ: ``(t, S(θ_t, θ_{t+Δ}))`` over every pair of kernel snapshots exactly
        Δ steps apart (the two-phase paper's Fig. 5b; Fort et al. 2020). Pairs at other gaps are not used — S
        between nearby snapshots hardly depends on the gap, so no pair is rescaled by its own gap.

        Args:
            lag_steps: Δ in optimizer steps; default :attr:`kernel_lag_steps`.
        """
        lag = self.kernel_lag_steps if lag_steps is None else lag_steps
        have = np.flatnonzero([bool(s.get("kernel")) for s in self.snapshots])
        if lag is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        earlier, later = lag_pairs(self.steps[have], lag)
        return self.steps[have[earlier]], self.S[have[earlier], have[later]]

    # ------------------------------------------------------------------------------------------ ghosts

    @functools.cached_property
    def ghosts(self) -> list[GhostInfo]:
        """Every ghost spawned by the time of the last committed snapshot, in spawn order."""
        return ghost_infos(self.events, int(self.steps[-1]) if len(self) else -1)

    @functools.cached_property
    def chaos(self) -> dict[str, np.ndarray]:
        """Ghost × snapshot maps (G, T) of main-vs-ghost metrics: ``"C"`` (1 − cos), ``"L2"``, ``"D"``, ``"S"``,
        ``"B"`` (eq. 5), ``"B_linear"``, and the ghost's ``"eval_loss"`` / ``"eval_accuracy"``. Row i is
        ``run.ghosts[i]``; columns are ``run.steps``; NaN where the snapshot precedes the spawn, after the ghost
        stopped, or where the metric was not computed."""
        return chaos_maps(self.events, self.ghosts, self.steps)

    def _ghost_id(self, ghost: int) -> int:
        if not is_int(ghost):
            raise TypeError(f"ghost must be a ghost id (an integer, see run.ghosts); got {ghost!r}")
        return int(ghost)

    def ghost_predictions(self, ghost: int, *, step: int | None = None, snapshot_index: int | None = None
                          ) -> np.ndarray:
        """Eval predictions of ghost ``ghost`` at one snapshot (``step=`` or ``snapshot_index=``)."""
        i = self._snapshot_position("ghost_predictions", step, snapshot_index)
        return load_npy(self._file(i, ghost_array(self._ghost_id(ghost), PREDS)), shape=self._label_shape())

    def ghost_params(self, ghost: int, *, step: int | None = None, snapshot_index: int | None = None
                     ) -> np.ndarray:
        """Flat parameters of ghost ``ghost`` at one snapshot (runs with ``Ghosts(save_params=True)``)."""
        i = self._snapshot_position("ghost_params", step, snapshot_index)
        ghost_id, at = self._ghost_id(ghost), int(self.snapshots[i]["step"])
        if has_sharded_params(self.path, at, ghost_id):  # FSDP2: the ranks' shards of the ghost, gathered here
            return load_sharded_params(self.path, self.manifest, at, ghost_id)
        return load_npy(self._file(i, ghost_array(ghost_id, PARAMS)), mmap=True, shape=self._param_shape())

    def separation(self, ghost: int) -> tuple[np.ndarray, np.ndarray]:
        """The ghost's separation curve ``(steps int64, l2 float64)``: l2(t) = ‖θ'_t − θ_ref,t‖₂ after every
        step the ghost took (and at its spawn), up to the last committed snapshot. Empty for runs that did not
        record it."""
        ghost = self._ghost_id(ghost)
        return PairLog(separation_path(self.path, ghost)).read(until=int(self.steps[-1]) if len(self) else -1)

    def summary(self) -> dict[str, Any]:
        """Headline numbers (used by ``dynprobe show``)."""
        out: dict[str, Any] = {"snapshots": len(self), "status": self.status}
        if len(self):
            out.update(first_step=int(self.steps[0]), last_step=int(self.steps[-1]),
                       final_eval_loss=float(self.eval_loss[-1]), final_eval_accuracy=float(self.eval_accuracy[-1]))
        return out


def _pid_alive(pid: Any) -> bool:
    if not is_int(pid) or pid <= 0:
        return True  # unknown: do not claim the writer died
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True
