"""The run directory's format: every file and folder name, in one place.

Format version 1 (docs/reference/run-directory.md describes it for users)::

    runs/NAME/
      run.json                  manifest: format version, versions, full config, model summary, status
      events.jsonl              append-only event log; a "snapshot" line is the commit point of a snapshot
      eval_indices.npy          which examples of the user's eval data form the fixed eval set
      kernel_probe_indices.npy  which eval-set examples form the eNTK probe set
      snapshots/step_00000100/  params.npy (flat θ), buffers.npz, preds.npy (eval argmax), kernel.npy,
                                ghost_001.preds.npy, ghost_001.params.npy
      snapshots/step_00000100/params.dcp/  under FSDP2 instead of params.npy: each rank's shards of θ, a
                                torch.distributed.checkpoint in its safetensors format (one file per rank)
      metrics/C.rows, D.rows …  append-only lower-triangular float64 rows: row k holds M[k, 0..k]
      metrics/C.layer_003.rows  the same rows of C restricted to one layer's slice of θ (layers in manifest order)
      metrics/C.npy, D.npy …    full T×T matrices, materialized when the probe closes (for other tools)
      metrics/B.jsonl           loss barriers between snapshots, one JSON line per pair
      switching/results.jsonl   switching-experiment results, one JSON line per switch step
      train_loss.f8             the watched training loss of every call: little-endian float64 (step, loss) pairs
      lr/group_000.f8           a param group's learning rate: float64 (step, lr) pairs where it changed, and at
                                the last step before each snapshot
      ghosts/ghost_001.separation  a ghost's separation curve: little-endian float64 (step, ‖θ' − θ_ref‖₂) pairs
      writer.lock               the writer's exclusive lock (flock; pid and host of the writer inside)
      set-aside-20260101T120000/  what a resumed run dropped (later snapshots, cut log tails, damaged files),
                                moved here under its path in the run instead of being deleted

A temporary file of an atomic write is named ``.NAME.XXXXXXXX.tmp`` in the folder of ``NAME``.

Every other module builds paths through these names and functions; none spells a file name itself.
"""
from __future__ import annotations

from pathlib import Path

__all__ = [
    "BARRIERS",
    "BUFFERS",
    "EVAL_INDICES",
    "EVENTS",
    "GHOSTS",
    "LOCK",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KERNEL",
    "KERNEL_LAYERS",
    "KERNEL_PROBE_INDICES",
    "MANIFEST",
    "METRICS",
    "PARAMS",
    "PREDS",
    "SEPARATION",
    "SET_ASIDE_PREFIX",
    "SHARDED_PARAMS",
    "set_aside_dir",
    "SNAPSHOTS",
    "SWITCHING",
    "SWITCHING_RESULTS",
    "barriers_path",
    "is_temporary",
    "layer_metric",
    "matrix_files",
    "ghost_array",
    "matrix_path",
    "rows_path",
    "rows_files",
    "run_array_path",
    "separation_files",
    "separation_path",
    "snapshot_dir",
    "snapshot_dirname",
    "snapshot_archive",
    "snapshot_file",
    "sharded_params_dir",
    "switching_results_path",
    "train_loss_path",
    "lr_path",
    "lr_files",
]

FORMAT_VERSION = 1
FORMAT_NAME = "dynprobe-run"

MANIFEST = "run.json"
EVENTS = "events.jsonl"
EVAL_INDICES = "eval_indices.npy"
KERNEL_PROBE_INDICES = "kernel_probe_indices.npy"
SNAPSHOTS = "snapshots"
METRICS = "metrics"
SWITCHING = "switching"
BARRIERS = "B.jsonl"
SWITCHING_RESULTS = "results.jsonl"
TRAIN_LOSS = "train_loss.f8"
LR = "lr"
LR_SUFFIX = ".f8"
GHOSTS = "ghosts"
SEPARATION = "separation"
LOCK = "writer.lock"
TEMPORARY_SUFFIX = ".tmp"
SET_ASIDE_PREFIX = "set-aside-"
ROWS_SUFFIX = ".rows"
MATRIX_SUFFIX = ".npy"

# Array names inside a snapshot folder (``NAME.npy``; buffers are ``buffers.npz``).
PARAMS = "params"
BUFFERS = "buffers"
PREDS = "preds"
KERNEL = "kernel"
KERNEL_LAYERS = "kernel_layers"  # (L, n, n) float64: each layer's H_l, run.layers order (per_layer=True)
SHARDED_PARAMS = "params.dcp"  # FSDP2: the folder of θ's shards, one safetensors file per rank (store/sharded.py)


def snapshot_dirname(step: int) -> str:
    """``step_00000100``: zero-padded so that a directory listing sorts by step."""
    return f"step_{int(step):08d}"


def snapshot_dir(root: Path, step: int) -> Path:
    """``root/snapshots/step_00000100``."""
    return Path(root) / SNAPSHOTS / snapshot_dirname(step)


def snapshot_file(root: Path, step: int, name: str) -> Path:
    """The ``.npy`` array ``name`` of the snapshot at ``step`` (``buffers`` is the one ``.npz``)."""
    suffix = ".npz" if name == BUFFERS else ".npy"
    return snapshot_dir(root, step) / f"{name}{suffix}"


def sharded_params_dir(root: Path, step: int, ghost: int | None = None) -> Path:
    """``snapshots/step_00000100/params.dcp``: θ of an FSDP2 run's snapshot, as the ranks' shards; with ``ghost``,
    that ghost's θ (``ghost_001.params.dcp``, ``Ghosts(save_params=True)``)."""
    return snapshot_dir(root, step) / (SHARDED_PARAMS if ghost is None else f"{ghost_array(ghost, PARAMS)}.dcp")


def snapshot_archive(root: Path, step: int, name: str) -> Path:
    """The ``.npz`` archive ``name`` of the snapshot at ``step`` (``buffers.npz``)."""
    return snapshot_dir(root, step) / f"{name}.npz"


def ghost_array(ghost: int, what: str) -> str:
    """Name of a ghost's array in a snapshot folder: ``ghost_001.preds`` or ``ghost_001.params``."""
    return f"ghost_{int(ghost):03d}.{what}"


def rows_path(root: Path, metric: str) -> Path:
    """``metrics/C.rows``: the append-only lower-triangular rows of an interval matrix."""
    return Path(root) / METRICS / f"{metric}{ROWS_SUFFIX}"


def layer_metric(metric: str, layer: int) -> str:
    """The name of a metric's per-layer matrix, layer ``layer`` in :func:`dynprobe._util.modules.layer_slices`
    order: ``C.layer_003`` (so ``metrics/C.layer_003.rows``)."""
    return f"{metric}.layer_{int(layer):03d}"


def matrix_path(root: Path, metric: str) -> Path:
    """``metrics/C.npy``: the full matrix, materialized at close."""
    return Path(root) / METRICS / f"{metric}{MATRIX_SUFFIX}"


def barriers_path(root: Path) -> Path:
    """``metrics/B.jsonl``: loss barriers between snapshots."""
    return Path(root) / METRICS / BARRIERS


def switching_results_path(root: Path) -> Path:
    """``switching/results.jsonl``: switching-experiment results."""
    return Path(root) / SWITCHING / SWITCHING_RESULTS


def train_loss_path(root: Path) -> Path:
    """``train_loss.f8``: (step, loss) float64 pairs, one per watched training-loss call."""
    return Path(root) / TRAIN_LOSS


def lr_path(root: Path, group: int) -> Path:
    """``lr/group_000.f8``: (step, lr) float64 pairs of one param group (row t: the update from θ_t to θ_t+1)."""
    return Path(root) / LR / f"group_{int(group):03d}{LR_SUFFIX}"


def lr_files(root: Path) -> dict[int, Path]:
    """Every param group's learning-rate log of the run, by group number."""
    out = {}
    for p in sorted((Path(root) / LR).glob(f"group_*{LR_SUFFIX}")):
        number = p.name.removeprefix("group_").removesuffix(LR_SUFFIX)
        if number.isdigit():
            out[int(number)] = p
    return out


def run_array_path(root: Path, name: str) -> Path:
    """A run-level array: ``root/eval_indices.npy`` for ``EVAL_INDICES`` (``name`` with or without ``.npy``)."""
    return Path(root) / f"{name.removesuffix('.npy')}.npy"


def separation_path(root: Path, ghost: int) -> Path:
    """``ghosts/ghost_001.separation``: the ghost's (step, l2) float64 pairs, appended after every step it takes."""
    return Path(root) / GHOSTS / ghost_array(ghost, SEPARATION)


def is_temporary(name: str) -> bool:
    """Whether a file name is the temporary file of an atomic write (``.NAME.XXXXXXXX.tmp``)."""
    return name.startswith(".") and name.endswith(TEMPORARY_SUFFIX)


def rows_files(root: Path) -> dict[str, Path]:
    """Every interval matrix's row file of the run, by metric name (``{"C": metrics/C.rows, ...}``)."""
    folder = Path(root) / METRICS
    return {p.name.removesuffix(ROWS_SUFFIX): p for p in sorted(folder.glob(f"*{ROWS_SUFFIX}"))}


def matrix_files(root: Path) -> dict[str, Path]:
    """Every materialized matrix of the run, by metric name (``{"C": metrics/C.npy, ...}``)."""
    folder = Path(root) / METRICS
    return {p.name.removesuffix(MATRIX_SUFFIX): p for p in sorted(folder.glob(f"*{MATRIX_SUFFIX}"))
            if not is_temporary(p.name)}


def separation_files(root: Path) -> dict[int, Path]:
    """Every ghost's separation log, by ghost id."""
    found = {}
    for path in sorted((Path(root) / GHOSTS).glob(f"ghost_*.{SEPARATION}")):
        number = path.name[len("ghost_"): -len(f".{SEPARATION}")]
        if number.isdigit():
            found[int(number)] = path
    return found


def set_aside_dir(root: Path, stamp: str) -> Path:
    """``root/set-aside-STAMP``: where a resume at time ``STAMP`` (``YYYYmmddTHHMMSS``, UTC) moves what it drops;
    each entry keeps its path relative to the run (``set-aside-STAMP/snapshots/step_00000100``)."""
    return Path(root) / f"{SET_ASIDE_PREFIX}{stamp}"
