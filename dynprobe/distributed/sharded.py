"""The probe under FSDP2 (``torch.distributed.fsdp.fully_shard``): detection, what is supported, and agreement.

Under FSDP2 every parameter is a ``DTensor`` sharded over the ranks: rank r holds a piece of ``vec(θ)`` and no
rank holds the whole. The probe attaches with the same two lines on every rank (the model and optimizer the loop
uses); what differs from DDP:

* **attach** — :func:`is_sharded` (parameters are DTensors) selects the sharded parts in
  :func:`dynprobe.probe.assembly.assemble`; :func:`unsupported_under_fsdp` (the environment) and
  :func:`layout_problems` (HSDP, tensor parallelism, plain parameters) name what cannot run, reported through the
  DDP attach check (:meth:`DistributedRun.check_agreement`) so every rank fails with the same error and none waits
  in a collective; the parameter-value fingerprint is not compared (the shards differ by design).
  :func:`shared_run_root` gives every rank rank 0's run directory and checks that every rank sees it (each writes
  its own shards there).
* **snapshots** — :class:`~dynprobe.distributed.sharded_snapshot.ShardedSnapshotRecorder`: every rank evaluates
  the same eval batches (the FSDP forward is collective; :func:`reshard` afterwards), computes its partial sums of
  the C row (:mod:`dynprobe.distributed.sharded_rows`, its history within ``history_memory``) and writes its own
  shards with ``torch.distributed.checkpoint``; rank 0 writes the rest and the commit line.
* **ghosts** — :class:`~dynprobe.distributed.sharded_ghosts.ShardedGhostTrainer`: sharded replicas trained
  through the main model (:class:`~dynprobe.distributed.sharded_slot.MainModelSlot`), compared from all-reduced
  partial sums (:mod:`dynprobe.distributed.sharded_compare`); the inert check from gradient shards
  (:mod:`dynprobe.distributed.sharded_inert`).
* **barriers** — :class:`~dynprobe.distributed.sharded_barriers.ShardedBarriers`: trajectory and ghost barriers on
  every rank, after the snapshot's agreement, each rank interpolating its own shards in place, the budget agreed.
* **eNTK** — :class:`~dynprobe.distributed.sharded_kernel.GatheredKernel`: θ gathered whole on every rank for the
  measurement, FSDP's forward hooks bypassed, each rank differentiating a share of the modules, the partial
  kernels summed with one all-reduce (as under DDP).
* **resume** — ``resume=True`` with the recorded world size (another is refused at attach, on every rank):
  each rank checks and reloads its own shards of the kept snapshots
  (:mod:`dynprobe.distributed.sharded_resume`); the null sinks get rank 0's resume plan.
* **faults** — :class:`AgreedSnapshots`: every collective of a snapshot carries a failure flag, and the snapshot
  ends with one more all-reduce of a flag, so a probe failure on any rank (a disk error while rank 0 commits) makes
  the probe detach on every rank at the same step — never one rank back in training while another waits in a
  probe collective.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from dynprobe.store.layout import MANIFEST
from dynprobe.store.sharded import sharded_checkpoints_problem

try:
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # a PyTorch without torch.distributed or without public DTensors: no FSDP2 either
    DTensor = Shard = distribute_tensor = None  # type: ignore[assignment,misc]
try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:
    FSDPModule = None  # type: ignore[assignment,misc]

__all__ = ["AgreedSnapshots", "ShardedRunFailure", "fsdp1_problem", "is_sharded", "layout_problems",
           "local_piece", "local_tensor", "reshard", "same_local_tensors", "shared_run_root", "unsupported_under_fsdp",
           "whole_to_local"]

class ShardedRunFailure(RuntimeError):
    """Probe work failed on some rank of an FSDP run: raised on every rank alike."""


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are sharded DTensors (FSDP2 ``fully_shard``)."""
    return DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters())


def fsdp1_problem(model: nn.Module) -> str | None:
    """Why the probe refuses a model trained by FSDP1 (``FullyShardedDataParallel``), or None.

    FSDP1 flattens each wrapped module's parameters into one 1-D ``FlatParameter`` and keeps only this rank's
    slice of it (with ``use_orig_params=True`` the original names are views of that slice, often empty on a rank):
    neither the names, the shapes nor the rank's piece of ``vec(θ)`` say which entries of θ a rank holds, so
    neither the DDP probe (which assumes replicated parameters) nor the FSDP2 probe (which reads each DTensor's
    placement) can measure it. FSDP1 marks every parameter it flattened (``_fsdp_flattened``), the flat ones and
    the views alike; the wrapper class is the second sign. The model structure is the same on every rank, so every
    rank refuses alike, before any probe collective.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a PyTorch without torch.distributed: no FSDP1 either
        return None
    flattened = any(getattr(p, "_fsdp_flattened", False) for p in model.parameters())
    if not flattened and not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return None
    return ("the model is wrapped in FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel: flat parameters, "
            "each rank a slice with no layout the probe can read). dynprobe supports FSDP2: shard with "
            "torch.distributed.fsdp.fully_shard instead (Lightning: strategy=ModelParallelStrategy() with "
            "fully_shard in configure_model, not FSDPStrategy; Accelerate: "
            "FullyShardedDataParallelPlugin(fsdp_version=2); Hugging Face Trainer: fsdp_config={'version': 2})")


def local_piece(params: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """This rank's piece of ``vec(θ)``: each parameter's local shard, flattened and concatenated in order."""
    pieces = [(p.to_local() if _is_dtensor(p) else p).detach().reshape(-1).to(dtype) for p in params]
    if not pieces:
        return torch.zeros(0, dtype=dtype)
    return torch.cat(pieces)


def reshard(model: nn.Module) -> None:
    """Register every FSDP2 module's sharded parameters again after the probe's own forwards.

    FSDP2 leaves the root module's parameters unsharded after a forward (it expects the backward next, which
    reshards). The probe's forwards (an evaluation, a ghost or an interpolated θ in the model) have no backward:
    without this the user's model would hold its root's full parameters — plain tensors in place of its DTensors,
    in memory, in ``state_dict()`` — until its next forward, and after a ghost's forward they would hold the
    ghost's values, which the next all-gather would not refresh. ``FSDPModule.reshard`` is local (no collective):
    it frees the unsharded parameters and registers the sharded ones."""
    if FSDPModule is None:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def same_local_tensors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Whether two states (tensors by name) hold the same names and, on this rank, bit-identical shards and buffers
    (DTensors compared by their local shards: no collective; agree on the answer over the ranks)."""
    if a.keys() != b.keys():
        return False
    return all(torch.equal(local_tensor(a[n]), local_tensor(b[n])) for n in a if a[n] is not b[n])


def local_numel(p: torch.Tensor) -> int:
    """Entries of this rank's shard of ``p`` (all of ``p`` for a plain tensor)."""
    return local_tensor(p).numel()


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``p`` (``p`` itself for a plain tensor): writing into it under ``no_grad`` changes
    ``p`` as an optimizer step does."""
    return p.to_local() if _is_dtensor(p) else p


def whole_to_local(p: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``whole``, a tensor of ``p``'s full shape, sharded as ``p`` is (``whole`` itself for a
    plain ``p``). No communication: DTensor's own split (``distribute_tensor(..., src_data_rank=None)``)."""
    if not _is_dtensor(p):
        return whole
    return distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local()


def _is_dtensor(p: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(p, DTensor)


def unsupported_under_fsdp() -> list[str]:
    """What this environment cannot run on a sharded model (reported on every rank)."""
    problems = []
    checkpoints = sharded_checkpoints_problem()
    if checkpoints is not None:
        problems.append(checkpoints)
    return problems


def layout_problems(named_params: Sequence[tuple[str, torch.Tensor]], world_size: int) -> list[str]:
    """Parameters the sharded C cannot sum correctly: every one must be a DTensor sharded (``Shard`` placements
    only, so each entry lives on exactly one rank) over a 1-D mesh of all ``world_size`` ranks."""
    problems = []
    for name, p in named_params:
        if not _is_dtensor(p):
            problems.append(f"parameter {name!r} is not sharded (a plain tensor next to DTensors); apply "
                            "fully_shard to the root module too, so that every parameter is sharded")
        elif p.device_mesh.ndim != 1 or p.device_mesh.size() != world_size or \
                not all(isinstance(placement, Shard) for placement in p.placements):
            problems.append(f"parameter {name!r} is a DTensor on a mesh of shape {tuple(p.device_mesh.shape)} with "
                            f"placements {tuple(p.placements)}: only a 1-D mesh over all {world_size} ranks with "
                            "Shard placements (plain fully_shard) is supported yet (not HSDP or tensor parallelism)")
        if len(problems) >= 3:
            break
    return problems


class Collectives(Protocol):
    """What the sharded parts need of a :class:`~dynprobe.distributed.runtime.DistributedRun`."""

    rank: int
    world_size: int

    def all_reduce(self, tensor: torch.Tensor) -> None: ...


def shared_run_root(run: Collectives, root: Path) -> Path:
    """Rank 0's run directory, on every rank; raises the same error on every rank when some rank cannot see it
    (under FSDP every rank writes its shards into it: the ranks must share its filesystem)."""
    names: list[Any] = [str(root) if run.rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    shared = Path(names[0])
    seen: list[Any] = [None] * run.world_size
    dist.all_gather_object(seen, (shared / MANIFEST).is_file())
    blind = [rank for rank, visible in enumerate(seen) if not visible]
    if blind:
        raise ValueError(f"under FSDP every rank writes its parameter shards into rank 0's run directory {shared}, "
                         f"but ranks {blind} cannot see it: put out= on a filesystem all ranks share")
    return shared


class SnapshotTaker(Protocol):
    def take(self, step: int, *, ghosts: Any) -> None: ...


class AgreedSnapshots:
    """A snapshot sequence whose outcome every rank agrees on: after the snapshot (all its collectives and rank 0's
    files), one SUM all-reduce of a failure flag; if any rank failed, every rank raises (and its fault barrier
    detaches the probe there), so no rank goes back to training while another is still inside the probe.

    Args:
        sequence: the snapshot sequence (``take(step, ghosts=...)``).
        run: the collectives (``all_reduce``, ``world_size``).
        device: where the flag lives (the parameters' device: CPU for gloo, CUDA for NCCL).
        after: called on every rank once every rank committed the snapshot, with the step, how long this rank's
            snapshot took and the ghosts
            (:meth:`~dynprobe.distributed.sharded_barriers.ShardedBarriers.after_agreed_snapshot`).
    """

    def __init__(self, sequence: SnapshotTaker, run: Collectives, device: torch.device,
                 after: Callable[[int, float, Any], None] | None = None) -> None:
        self.sequence, self.run, self.device, self.after = sequence, run, device, after

    def take(self, step: int, *, ghosts: Any) -> None:
        started = time.perf_counter()
        error: Exception | None = None
        try:
            self.sequence.take(step, ghosts=ghosts)
        except Exception as failure:  # noqa: BLE001 - re-raised below, after every rank learned of it
            error = failure
        flag = torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64, device=self.device)
        self.run.all_reduce(flag)
        failed = int(flag.item())
        if error is not None:
            raise error
        if failed:
            raise ShardedRunFailure(f"the snapshot at step {step} failed on {failed} of {self.run.world_size} ranks "
                                    "(see that rank's warning); the probe detaches on every rank")
        if self.after is not None:  # collective work that needs the snapshot committed on every rank (barriers)
            self.after(step, time.perf_counter() - started, ghosts)
