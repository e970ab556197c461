"""θ of an FSDP2 run's snapshot: written as each rank's shards, read back as one whole vector on one process.

Under FSDP2 each rank writes its own shards of θ (``snapshots/step_…/params.dcp/``; the recorder is
:mod:`dynprobe.distributed.sharded_snapshot`) with ``torch.distributed.checkpoint`` (DCP) in its safetensors
storage format (:func:`save_sharded_params`): one ``.safetensors`` file per rank, each shard's offset in the full
tensor kept in the file's JSON header. The reader here asks DCP to load those shards into full-size tensors —
DCP's planner maps every saved chunk onto the requested tensors, so the result does not depend on how many ranks
wrote them — and flattens them in the manifest's parameter order: the same ``vec(θ)`` an unsharded run of the
same model stores in ``params.npy``.

Nothing is unpickled: the safetensors format is a JSON header and raw bytes (DCP's default format would keep a
pickled ``.metadata`` file, which is why it is not used).
"""
from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import RunFormatError
from .layout import sharded_params_dir

try:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
except ImportError:  # a PyTorch without torch.distributed, or older than DCP's safetensors storage
    dcp = HuggingFaceStorageReader = HuggingFaceStorageWriter = None  # type: ignore[assignment]

__all__ = ["has_sharded_params", "load_sharded_params", "load_sharded_tensors", "save_sharded_params",
           "sharded_checkpoints_problem", "sharded_params_shapes"]


def sharded_checkpoints_problem() -> str | None:
    """Why this environment cannot write or read sharded snapshots (None: it can)."""
    if dcp is None:
        return ("this PyTorch has no torch.distributed.checkpoint.HuggingFaceStorageWriter (DCP's safetensors "
                "storage, which FSDP snapshots are written with): upgrade PyTorch")
    if importlib.util.find_spec("safetensors") is None:
        return ("snapshots under FSDP are written with torch.distributed.checkpoint's safetensors format: install "
                "the safetensors package (pip install safetensors)")
    return None


def save_sharded_params(root: Path, step: int, state: Mapping[str, torch.Tensor], ghost: int | None = None) -> None:
    """Write this rank's shards of the DTensors ``state`` (by parameter name) for the snapshot at ``step`` (the
    main run's θ, or ghost ``ghost``'s).

    Collective: every rank calls it with its own shards; DCP gathers every rank's write results to rank 0 before
    returning there, and raises on every rank if any rank failed to write."""
    problem = sharded_checkpoints_problem()
    if problem is not None:
        raise RuntimeError(problem)
    writer = HuggingFaceStorageWriter(str(sharded_params_dir(root, step, ghost)), save_distributed=True)
    dcp.save(dict(state), storage_writer=writer)


def has_sharded_params(root: Path, step: int, ghost: int | None = None) -> bool:
    """Whether the snapshot at ``step`` stores θ (or ghost ``ghost``'s θ) as FSDP2 shards (``params.dcp/``) rather
    than ``params.npy``."""
    return sharded_params_dir(root, step, ghost).is_dir()


def sharded_params_shapes(root: Path, manifest: Mapping[str, Any], step: int, ghost: int | None = None
                          ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The manifest's parameters (name → shape, dtype) after checking that the shards of the snapshot at ``step``
    cover every one of them whole (reads the files' headers only).

    Raises :class:`RunFormatError` when they do not: DCP would load the chunks present and leave the rest of a
    tensor as it was, so a missing rank's file must be caught here."""
    folder = sharded_params_dir(root, step, ghost)
    problem = sharded_checkpoints_problem()
    if problem is not None:
        raise RunFormatError(f"{folder}: {problem}")
    specs = (manifest.get("model") or {}).get("parameters") or []
    try:
        saved = HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata
    except Exception as error:  # noqa: BLE001 - any unreadable header is a damaged run
        raise RunFormatError(f"{folder}: the parameter shards cannot be read ({type(error).__name__}: {error})") \
            from error
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for spec in specs:
        entry = saved.get(spec["name"])
        shape = tuple(int(n) for n in spec["shape"])
        if entry is None or tuple(getattr(entry, "size", ())) != shape:
            found = None if entry is None else tuple(getattr(entry, "size", ()))
            raise RunFormatError(f"{folder}: parameter {spec['name']!r} of shape {shape} is not in the shards "
                                 f"(found {found})")
        covered = sum(math.prod(chunk.sizes) for chunk in entry.chunks)
        if covered != math.prod(shape):  # DCP would load the chunks present and leave the rest as it was
            raise RunFormatError(f"{folder}: the shards of parameter {spec['name']!r} cover {covered} of its "
                                 f"{math.prod(shape)} entries (a rank's shard file is missing or damaged)")
        shapes[spec["name"]] = (shape, getattr(torch, spec["dtype"]))
    return shapes


def load_sharded_tensors(root: Path, manifest: Mapping[str, Any], step: int, ghost: int | None = None
                         ) -> dict[str, torch.Tensor]:
    """The full parameter tensors of the snapshot at ``step`` (or of ghost ``ghost`` there), by name, in their
    recorded dtypes (CPU).

    Raises :class:`RunFormatError` when the shards do not cover the manifest's parameters with their shapes."""
    folder = sharded_params_dir(root, step, ghost)
    state = {name: torch.empty(shape, dtype=dtype)
             for name, (shape, dtype) in sharded_params_shapes(root, manifest, step, ghost).items()}
    try:
        with warnings.catch_warnings():  # DCP says it assumes a single process: that is the point here
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=True)
    except Exception as error:  # noqa: BLE001 - missing shard files, truncated data
        raise RunFormatError(f"{folder}: the parameter shards cannot be loaded ({type(error).__name__}: "
                             f"{error})") from error
    return state


def load_sharded_params(root: Path, manifest: Mapping[str, Any], step: int, ghost: int | None = None) -> np.ndarray:
    """``vec(θ)`` of the snapshot at ``step``: the full tensors flattened in manifest order, in the run's storage
    dtype (float32, or float64 for float64 models) — what an unsharded run's ``params.npy`` holds."""
    dtype = getattr(torch, (manifest.get("model") or {}).get("storage_dtype", "float32"), torch.float32)
    tensors = load_sharded_tensors(root, manifest, step, ghost)
    if not tensors:
        return np.zeros(0, dtype=np.float32)
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors.values()])
    return flat.numpy()
