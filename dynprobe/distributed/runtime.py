"""The probe under ``torch.distributed`` data parallelism (DDP): who writes, what is exchanged, and when.

Every rank runs the probe's hooks on its own shard of the batch and the same recording code. The model is
replicated (DDP keeps the parameters equal on every rank), so everything measured from the parameters is measured
alike on every rank and written once, by rank 0; the other ranks record into a :class:`~dynprobe.distributed.sink.
NullSink`. The DDP variants of the probe's parts implement the same interfaces as the single-process ones:

* attach — :meth:`DistributedRun.check_agreement`: ``all_gather_object`` of what each rank attached to (the DDP
  wrapper or a plain module) and a hash of the probe's configuration, model layout, parameter values and eval set:
  a rank that disagrees fails every rank with the same clear error; then rank 0 opens the run directory and
  broadcasts whether that worked (:func:`open_run_writer`);
* ghosts — :class:`~dynprobe.distributed.ghost_trainer.DistributedGhostTrainer`, a ``GhostTrainer`` whose replicas
  average their gradients across ranks with one collective per step;
* eNTK — :class:`~dynprobe.distributed.kernel.ShardedKernel`, each rank differentiating a share of the parameters,
  the partial kernels summed with one collective.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dynprobe.ghosts.trainer import TrainerContext
from dynprobe.store.writer import RunWriter, json_safe

from .ghost_trainer import DistributedGhostTrainer
from .kernel import ShardedKernel, partition_modules
from .sharded import fsdp1_problem, is_sharded
from .sharded_ghosts import ShardedGhostTrainer
from .sink import NullSink

__all__ = ["DistributedRun", "NullSink", "ShardedKernel", "check_supported", "is_ddp", "open_run_writer",
           "partition_modules", "unwrap_model", "warn_comm_hook"]


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def is_ddp(model: Any) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` wrapper trains (its ``.module``); any other module as is."""
    return model.module if is_ddp(model) else model


@dataclass
class DistributedRun:
    """This process's place in a data-parallel run: ``rank`` of ``world_size``, and the DDP wrapper if any."""

    rank: int
    world_size: int
    wrapper: nn.Module | None  # the DistributedDataParallel the probe was given (None: a plain module)
    sharded: bool = False  # FSDP2 (fully_shard): DTensor parameters, each rank a shard (distributed/sharded.py)

    @classmethod
    def detect(cls, model: nn.Module) -> DistributedRun | None:
        """A run when a default process group with more than one rank is initialized, or when the parameters are
        FSDP2-sharded DTensors (on any number of ranks); None otherwise. An FSDP1 model is refused here (the same
        error on every rank, before any collective: :func:`~dynprobe.distributed.sharded.fsdp1_problem`)."""
        dist = _dist()
        if not (dist.is_available() and dist.is_initialized()):
            return None
        refused = fsdp1_problem(model)
        if refused is not None:
            raise ValueError(f"dynprobe: {refused}")
        sharded = is_sharded(model)
        if dist.get_world_size() < 2 and not sharded:
            return None
        return cls(dist.get_rank(), dist.get_world_size(), model if is_ddp(model) else None, sharded)

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @property
    def syncs_buffers(self) -> bool:
        """DDP broadcasts rank 0's buffers before every forward (``broadcast_buffers=True``, the default)."""
        return self.wrapper is not None and bool(getattr(self.wrapper, "broadcast_buffers", False))

    # ------------------------------------------------------------------------------------------ attach

    def check_agreement(self, manifest: Mapping[str, Any], params: list[torch.Tensor],
                        problems: list[str] | None = None) -> None:
        """Gather every rank's attach point and configuration hash; raise the same error on every rank if they
        disagree (or if ``problems`` — errors found on one rank — are not empty on any rank)."""
        mine = {"rank": self.rank, "wrapper": self.wrapper is not None,
                "config": _config_hash(manifest),
                "params": None if self.sharded else _parameter_fingerprint(params),  # FSDP: shards differ
                "problems": list(problems or [])}
        everyone: list[Any] = [None] * self.world_size
        _dist().all_gather_object(everyone, mine)
        reported = [f"rank {info['rank']}: {p}" for info in everyone for p in info["problems"]]
        if reported:
            raise ValueError("dynprobe under torch.distributed: " + "; ".join(reported))
        wrapped = [info["rank"] for info in everyone if info["wrapper"]]
        if wrapped and len(wrapped) != self.world_size:
            plain = [info["rank"] for info in everyone if not info["wrapper"]]
            raise ValueError(
                f"the probe is attached to the DistributedDataParallel wrapper on ranks {wrapped} but to a plain "
                f"module (e.g. the wrapper's .module) on ranks {plain}. Pass the same object on every rank: the DDP "
                "wrapper, the model you call in the training loop (the probe unwraps it itself)"
            )
        configs = {info["config"] for info in everyone}
        if len(configs) > 1:
            groups = {h: [i["rank"] for i in everyone if i["config"] == h] for h in configs}
            raise ValueError(
                "ranks disagree on the probe configuration (schedule, kernel, ghosts, eval_data, model layout or "
                f"optimizer): ranks grouped by configuration hash {sorted(groups.values())}. Build the Probe with "
                "the same arguments and the same eval_data on every rank"
            )
        if len({info["params"] for info in everyone}) > 1:
            raise ValueError(
                "ranks hold different parameter values at attach time; the probe under torch.distributed assumes "
                "data parallelism (one replicated model). Attach after wrapping the model in "
                "DistributedDataParallel (which broadcasts rank 0's parameters), or seed every rank identically"
            )

    def open_writer(self, out: str | os.PathLike, manifest: dict[str, Any], *, resume: bool,
                    resume_step: int | None, durable: bool = False) -> RunWriter | NullSink:
        """Rank 0 opens the run directory; its success (or error) is broadcast, so every rank fails together."""
        manifest = {**manifest, "distributed": {"world_size": self.world_size,
                                                "backend": str(_dist().get_backend()),
                                                "attached_to": "DistributedDataParallel" if self.wrapper is not None
                                                else "fully_shard" if self.sharded else "module",
                                                "writer_rank": 0}}
        writer: RunWriter | NullSink | None = None
        outcome: list[Any] = [None]
        if self.is_writer:
            try:
                writer = RunWriter(out, manifest, resume=resume, resume_step=resume_step, durable=durable)
                outcome[0] = {"error": None, "root": str(writer.root),
                              # a resumed run (FSDP): every rank continues from rank 0's plan
                              "resume_step": writer.resume_step if writer.resumed else None,
                              "snapshots": writer.snapshots if writer.resumed else None}
            except Exception as error:  # noqa: BLE001 - re-raised below, after the other ranks learned of it
                outcome[0] = {"error": f"{type(error).__name__}: {error}", "exception": error,
                              "refused": isinstance(error, ValueError)}
        payload = [None if outcome[0] is None else {k: v for k, v in outcome[0].items() if k != "exception"}]
        _dist().broadcast_object_list(payload, src=0)
        done = payload[0]
        if done["error"] is not None:
            if self.is_writer:
                raise outcome[0]["exception"]
            message = f"dynprobe: rank 0 could not open the run directory: {done['error']}"
            raise ValueError(message) if done.get("refused") else RuntimeError(message)  # a refusal reads alike
        if writer is not None:
            return writer
        if done["resume_step"] is not None:
            return NullSink(done["root"], manifest, resume_step=done["resume_step"], snapshots=done["snapshots"])
        return NullSink(out, manifest)

    # ------------------------------------------------------------------------------------------ collectives

    def sum_partial_kernels(self, partial: torch.Tensor | None, size: int, device: torch.device,
                            error: str | None, *, layers: int | None = None) -> torch.Tensor:
        """Σ over ranks of the partial kernels (float64; ``layers`` of them stacked, (layers, size, size), when
        given), in one all_reduce that also carries failure flags."""
        shape = (size, size) if layers is None else (layers, size, size)
        flat = torch.zeros(int(np.prod(shape)) + 1, dtype=torch.float64, device=device)
        if partial is not None and error is None:
            flat[:-1].copy_(partial.reshape(-1))
        if error is not None:
            flat[-1] = 1.0
        _dist().all_reduce(flat)
        failed = int(flat[-1].item())
        if failed:
            mine = f" (here: {error})" if error else ""
            raise RuntimeError(f"the eNTK failed on {failed} of {self.world_size} ranks{mine}")
        return flat[:-1].reshape(shape)

    def rank0_values(self, buffers: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Rank 0's values of these tensors (e.g. the float buffers DDP broadcasts before the next forward): one
        all_reduce per dtype in which rank 0 contributes the values and the other ranks zeros (exact)."""
        result: dict[str, torch.Tensor] = {}
        for dtype, group in _by_dtype(buffers, key=lambda item: item[1].dtype).items():
            flat = torch.cat([b.detach().reshape(-1) for _, b in group])
            if not self.is_writer:
                flat.zero_()
            _dist().all_reduce(flat)
            offset = 0
            for name, b in group:
                result[name] = flat[offset:offset + b.numel()].view_as(b)
                offset += b.numel()
        return result

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """SUM ``tensor`` over the ranks, in place."""
        _dist().all_reduce(tensor)

    def ghost_trainer(self, context: TrainerContext, *, root: Path | None = None
                      ) -> DistributedGhostTrainer | ShardedGhostTrainer:
        """The ghosts' trainer of this run (``GhostSet(trainer_factory=run.ghost_trainer)``): replicas whose
        gradients are averaged over the ranks under DDP, sharded replicas under FSDP2 (``root``: the shared run
        directory, where ``Ghosts(save_params=True)`` writes each rank's ghost shards)."""
        if self.sharded:
            return ShardedGhostTrainer(self, context, root=root)
        return DistributedGhostTrainer(self, context)


# ---------------------------------------------------------------------------------------------- writing


def open_run_writer(run: DistributedRun | None, out: str | os.PathLike, manifest: dict[str, Any], *,
                    params: list[torch.Tensor], resume: bool, resume_step: int | None,
                    problems: list[str] | None = None, durable: bool = False) -> RunWriter | NullSink:
    """The probe's sink: a :class:`RunWriter` outside torch.distributed and on rank 0 (after the attach checks), a
    :class:`NullSink` on the other ranks."""
    if run is None:
        return RunWriter(out, manifest, resume=resume, resume_step=resume_step, durable=durable)
    problems = list(problems or [])
    if resume and not run.sharded:  # FSDP resumes (distributed/sharded_resume.py); DDP does not yet
        problems.append("resume=True is not supported under torch.distributed data parallelism "
                        "(DistributedDataParallel) yet, only under FSDP (fully_shard); start a new out= directory")
    run.check_agreement(manifest, params, problems)
    return run.open_writer(out, manifest, resume=resume, resume_step=resume_step, durable=durable)


# ---------------------------------------------------------------------------------------------- helpers


def _config_hash(manifest: Mapping[str, Any]) -> str:
    """What must agree across ranks: the configuration, model layout, optimizer and eval-set fingerprint."""
    keys = {"config": manifest.get("config"),
            "model": [(p["name"], p["shape"], p["dtype"]) for p in manifest.get("model", {}).get("parameters", [])],
            "buffers": manifest.get("model", {}).get("buffers"),
            "optimizer": manifest.get("optimizer"), "eval": manifest.get("eval")}
    return hashlib.sha1(json.dumps(json_safe(keys), sort_keys=True).encode()).hexdigest()


def _parameter_fingerprint(params: list[torch.Tensor]) -> str:
    """A cheap, deterministic digest of the parameter values (float64 sums on the device, one transfer)."""
    with torch.no_grad():
        sums = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                            for p in params])
    return hashlib.sha1(sums.cpu().numpy().tobytes()).hexdigest()


def _by_dtype(items: list[Any], key: Callable[[Any], torch.dtype]) -> dict[torch.dtype, list[Any]]:
    groups: dict[torch.dtype, list[Any]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def check_supported(ghosts: Any) -> list[str]:
    """Configuration problems specific to torch.distributed (reported through the attach check, on every rank)."""
    problems = []
    if ghosts is not None and getattr(ghosts, "scaler", None) is not None:
        problems.append("Ghosts(scaler=...) is not supported under torch.distributed yet (a GradScaler's skipped "
                        "steps would need their own collectives)")
    return problems


def warn_comm_hook(run: DistributedRun | None) -> None:
    """DDP comm hooks (compression, PowerSGD) change the main gradients in ways the ghosts do not replicate."""
    if run is not None and run.wrapper is not None and getattr(run.wrapper, "_comm_hooks", None):
        warnings.warn("dynprobe: this DistributedDataParallel has a communication hook; ghosts average their "
                      "gradients without it, so the ε=0 control ghost will drift from the main run", RuntimeWarning,
                      stacklevel=3)
