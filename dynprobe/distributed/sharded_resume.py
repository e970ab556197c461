"""Resuming an FSDP2 run (``resume=True`` under ``fully_shard``): every rank reloads and checks its own shards.

An unsharded resume compares the model's whole θ with the stored ``params.npy`` of the resume step
(:func:`dynprobe.probe.parts.check_resumed_parameters`) and reloads the kept snapshots' vectors for the C rows
(:meth:`dynprobe.store.history.VectorHistory.register_stored`). Under FSDP no rank holds θ whole, and none has to:

* **reading** — :func:`own_shards` asks ``torch.distributed.checkpoint`` to load a snapshot's ``params.dcp/`` into
  *templates of this rank's DTensors* (same mesh, placements and shape as the model's parameters, filled with NaN):
  DCP's planner reads from the stored files exactly the chunks that overlap this rank's shards, so each rank gets
  its own shards and nothing else. It is collective (every rank loads the same snapshot at the same time); the
  files' headers are checked first to cover every parameter whole (a missing rank's file would leave NaN), and that
  check's outcome is agreed by an all-reduce, so a rank that cannot read fails every rank alike. DCP itself agrees on
  failures inside ``load`` (it gathers every rank's exceptions and raises on all).
* **checking** — :func:`check_resumed_shards`: each rank compares its loaded shards with the model's local shards
  bit for bit (integer views: ``-0.0`` differs from ``0.0``, a NaN equals the same NaN); the mismatch flags are
  summed by one all-reduce, so every rank raises the same error (naming, as the unsharded check does, the kept
  snapshot the parameters do match, found the same way: every rank compares its shards, one all-reduce).
* **continuing** — the recorder (:class:`~dynprobe.distributed.sharded_snapshot.ShardedSnapshotRecorder`) feeds
  :func:`own_pieces` of the kept snapshots to :meth:`~dynprobe.distributed.sharded_rows.ShardedCosineRows.restore`,
  which rebuilds the history of local pieces and their global norms exactly as the uninterrupted run holds them.

The world size must be the one the run was recorded with (:func:`dynprobe.store.resume.check_same_run` refuses
another, on every rank, at ``Probe(...)``): DCP could reshard, but the C rows after the resume are sums over the
ranks' partial sums, whose values (in the last bits) follow the sharding.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dynprobe.store.layout import sharded_params_dir
from dynprobe.store.sharded import sharded_params_shapes

from .sharded import Collectives, local_piece

try:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.tensor import DTensor
except ImportError:  # no torch.distributed: no FSDP2 run to resume either
    dcp = HuggingFaceStorageReader = DTensor = None  # type: ignore[assignment,misc]

__all__ = ["ShardedResumeError", "check_resumed_shards", "own_pieces", "own_shards"]

NamedParams = Sequence[tuple[str, torch.Tensor]]
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class ShardedResumeError(RuntimeError):
    """A rank could not read its shards of a kept snapshot: raised on every rank alike."""


def _template(p: torch.Tensor) -> torch.Tensor:
    """A DTensor laid out as ``p`` (this rank's shard of it), filled with NaN: what DCP loads this rank's part into."""
    local = torch.full_like(p.to_local().detach(), float("nan"))
    return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False)


def _agree(run: Collectives, problem: str | None, device: torch.device, what: str) -> None:
    """One SUM all-reduce of a failure flag: every rank raises if any rank had a ``problem``."""
    flag = torch.tensor([0.0 if problem is None else 1.0], dtype=torch.float64, device=device)
    run.all_reduce(flag)
    failed = int(flag.item())
    if failed:
        mine = f" (here: {problem})" if problem else ""
        raise ShardedResumeError(f"{what} failed on {failed} of {run.world_size} ranks{mine}")


def own_shards(run: Collectives, root: Path, manifest: Mapping[str, Any], step: int, named_params: NamedParams,
               device: torch.device) -> list[torch.Tensor]:
    """This rank's shards (plain local tensors, in ``named_params`` order) of θ at the snapshot at ``step``.

    Collective: every rank calls it for the same ``step``. Never materializes a whole parameter."""
    problem, state = None, {}
    try:
        sharded_params_shapes(root, manifest, step)  # the shards cover every parameter (else DCP leaves NaN)
        state = {name: _template(p) for name, p in named_params}
    except Exception as failure:  # noqa: BLE001 - every rank must reach the agreement
        problem = f"{type(failure).__name__}: {failure}"
    _agree(run, problem, device, f"reading the parameter shards of the snapshot at step {step}")
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(sharded_params_dir(root, step))))
    return [state[name].to_local() for name, _ in named_params]


def own_pieces(run: Collectives, root: Path, manifest: Mapping[str, Any], steps: Sequence[int],
               named_params: NamedParams, dtype: torch.dtype, device: torch.device) -> Iterator[torch.Tensor]:
    """This rank's piece of ``vec(θ)`` (:func:`~dynprobe.distributed.sharded.local_piece`) at each of ``steps``,
    loaded one snapshot at a time (collective, in order)."""
    for step in steps:
        yield local_piece(own_shards(run, root, manifest, step, named_params, device), dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    bits = _BITS[a.element_size()]
    return torch.equal(a.detach().contiguous().view(bits), b.detach().contiguous().view(bits))


def _matches(shards: list[torch.Tensor], named_params: NamedParams) -> bool:
    return all(_same_bits(stored, p.to_local()) for stored, (_, p) in zip(shards, named_params))


def check_resumed_shards(run: Collectives, root: Path, manifest: Mapping[str, Any], named_params: NamedParams,
                         snapshots: Sequence[Mapping[str, Any]], step: int, device: torch.device) -> None:
    """A resumed FSDP run continues from ``step``: every rank's local shards must equal, bit for bit, its shards of
    the run's snapshot there (module docstring). Without a snapshot at ``step`` (a checkpoint taken between
    snapshots) there is nothing to compare with, and the run continues — decided alike on every rank, since every
    rank holds rank 0's snapshot records. Raises the same ``ValueError`` on every rank."""
    steps = [int(s["step"]) for s in snapshots]
    if step not in steps:
        return
    flag = torch.tensor([0.0 if _matches(own_shards(run, root, manifest, step, named_params, device), named_params)
                         else 1.0], dtype=torch.float64, device=device)
    run.all_reduce(flag)
    differing = int(flag.item())
    if not differing:
        return
    candidates = [s for s in reversed(steps) if s != step]
    match = None
    if candidates:  # the same list on every rank
        found = torch.tensor([float(_matches(own_shards(run, root, manifest, s, named_params, device),
                                             named_params)) for s in candidates], dtype=torch.float64, device=device)
        run.all_reduce(found)  # a snapshot matches where every rank's shards do
        match = next((s for s, count in zip(candidates, found.tolist()) if int(count) == run.world_size), None)
    hint = (f"they equal the snapshot at step {match}: pass resume_step={match}" if match is not None else
            "they match no snapshot of the run: restore the checkpoint you saved at that step")
    raise ValueError(
        f"resume=True continues {root} from step {step}, but the model's parameters differ from the run's "
        f"snapshot at step {step} (the shards of {differing} of {run.world_size} ranks differ); {hint} "
        "(resume_step= says which step your training restarts from)")
