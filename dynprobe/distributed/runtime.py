"""The probe under ``torch.distributed`` data parallelism (DDP): who writes, what is exchanged, and when.

Every rank runs the probe's hooks on its own shard of the batch. The model is replicated (DDP keeps the
parameters equal on every rank), so everything measured from the parameters is measured once, on rank 0, which
alone writes the run directory; the other ranks get a :class:`NullWriter` that keeps the few records the
schedule needs in memory and touches no file. Three things are exchanged, each a single flat collective:

* **attach** — ``all_gather_object`` of what each rank attached to (the DDP wrapper or a plain module) and a hash
  of the probe's configuration, model layout, parameter values and eval set: a rank that disagrees fails every
  rank with the same clear error; then rank 0 opens the run directory and broadcasts whether that worked.
* **ghost gradients** — one ``all_reduce`` per training step for all live ghosts together (one per dtype): each
  rank replays the captured micro-batches of its shard (with the replayed RNG) on each ghost, and the flat
  buffer holds every ghost's gradients pre-multiplied by ``1/world_size`` exactly as DDP's reducer does without
  a comm hook (``bucket = grad · (1/W)``, then a SUM all-reduce), the ghosts' float buffers (rank 0's values,
  zeros elsewhere: DDP's ``broadcast_buffers``) and two failure counters per ghost (an exception, a non-finite
  loss). A ghost that fails on one rank is marked failed on every rank; no rank ever skips the collective, so
  none waits forever. With 2 ranks the sum of two values is order independent and ·½ is exact, so the ε = 0
  control ghost stays bitwise equal to the main model; with more ranks the ring order of the sum can differ from
  DDP's buckets in the last bit.
* **eNTK** — H = Σ_p J_p J_pᵀ is a sum over parameters, so each rank computes the kernel restricted to its share
  of the parameters (whole modules, balanced by size, each rank under the full ``max_memory``) and one SUM
  ``all_reduce`` of the n×n partial kernels (plus a failure flag) assembles H on every rank. The costly part —
  per-sample gradients and their float64 contraction, O(n²·P) — is divided among the ranks; the forward and
  the backward passes through the network are not.

Everything else (evaluations, ghost comparisons, barriers) is replicated arithmetic on replicated state: rank 0
records it; ranks that take part in eNTK or ghost collectives run the same snapshot code to stay in lock-step,
and other ranks skip snapshots entirely.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from dynprobe.capture.step import MicroBatch, replay_micro_batch
from dynprobe.store.writer import RunWriter, json_safe

if TYPE_CHECKING:
    from dynprobe.ghosts.ghost_set import GhostSet
    from dynprobe.kernels.engine import NTKEngine
    from dynprobe.probe import Probe

__all__ = ["DistributedRun", "NullWriter", "ShardedKernel", "open_run_writer", "partition_modules", "unwrap_model"]

SEQUENTIAL_REASON = ("torch.distributed (DDP): sequential ghosts, whose local gradients are averaged across ranks "
                     "with one collective per step")


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

    @classmethod
    def detect(cls, model: nn.Module) -> DistributedRun | None:
        """A run when a default process group with more than one rank is initialized; None otherwise."""
        dist = _dist()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return cls(dist.get_rank(), dist.get_world_size(), model if is_ddp(model) else None)

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
                "config": _config_hash(manifest), "params": _parameter_fingerprint(params),
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
                    resume_step: int | None) -> RunWriter | NullWriter:
        """Rank 0 opens the run directory; its success (or error) is broadcast, so every rank fails together."""
        manifest = {**manifest, "distributed": {"world_size": self.world_size,
                                                "backend": str(_dist().get_backend()),
                                                "attached_to": "DistributedDataParallel" if self.wrapper is not None
                                                else "module", "writer_rank": 0}}
        writer: RunWriter | NullWriter | None = None
        outcome: list[Any] = [None]
        if self.is_writer:
            try:
                writer = RunWriter(out, manifest, resume=resume, resume_step=resume_step)
                outcome[0] = {"error": None, "root": str(writer.root)}
            except Exception as error:  # noqa: BLE001 - re-raised below, after the other ranks learned of it
                outcome[0] = {"error": f"{type(error).__name__}: {error}", "exception": error}
        payload = [None if outcome[0] is None else {k: v for k, v in outcome[0].items() if k != "exception"}]
        _dist().broadcast_object_list(payload, src=0)
        if payload[0]["error"] is not None:
            if self.is_writer:
                raise outcome[0]["exception"]
            raise RuntimeError(f"dynprobe: rank 0 could not open the run directory: {payload[0]['error']}")
        return writer if writer is not None else NullWriter(out, manifest)

    # ------------------------------------------------------------------------------------------ collectives

    def sum_partial_kernels(self, partial: torch.Tensor | None, size: int, device: torch.device,
                            error: str | None) -> torch.Tensor:
        """Σ over ranks of the partial kernels (float64), in one all_reduce that also carries failure flags."""
        flat = torch.zeros(size * size + 1, dtype=torch.float64, device=device)
        if partial is not None and error is None:
            flat[:-1].copy_(partial.reshape(-1))
        if error is not None:
            flat[-1] = 1.0
        _dist().all_reduce(flat)
        failed = int(flat[-1].item())
        if failed:
            mine = f" (here: {error})" if error else ""
            raise RuntimeError(f"the eNTK failed on {failed} of {self.world_size} ranks{mine}")
        return flat[:-1].reshape(size, size)

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

    # ------------------------------------------------------------------------------------------ ghosts

    def train_ghosts(self, owner: GhostSet, live: list[Any], micro_batches: list[MicroBatch], step: int) -> None:
        """One lock-step update of every live ghost: local gradients on this rank's shard, one collective, step.

        Mirrors :meth:`GhostSet.train_step`'s sequential path; the averaging replicates DDP's reducer (see the
        module docstring). Failures are agreed on in the same collective: every rank sets the same status.
        """
        errors: list[str | None] = []
        nonfinite: list[bool] = []
        raised: BaseException | None = None
        for ghost in live:
            try:
                owner._sync_hyperparameters(ghost)
                ghost.optimizer.zero_grad(set_to_none=True)
                losses = [float(replay_micro_batch(ghost.model, micro, loss_fn=owner.loss_fn,
                                                   loss_from_output=owner.loss_from_output).float())
                          for micro in micro_batches]
                owner._match_grad_presence(ghost)
                errors.append(None)
                nonfinite.append(not all(math.isfinite(v) for v in losses))
            except Exception as error:  # noqa: BLE001 - agreed on below, never left one rank behind
                errors.append(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
                nonfinite.append(False)
                raised = raised or error
        exceptions, nonfinite_counts = self._all_reduce_ghosts(owner, live, errors, nonfinite)
        for k, ghost in enumerate(live):
            if exceptions[k]:
                local = errors[k]
                reason = (local.split("\n", 1)[0] if local else "an exception on another rank") + \
                    f" (on {exceptions[k]} of {self.world_size} ranks)"
                owner._set_status(ghost, "failed", step, reason,
                                  **({"traceback": local.split("\n", 1)[1]} if local else {}))
            elif nonfinite_counts[k]:
                owner._set_status(ghost, "diverged", step,
                                  f"non-finite loss (on {nonfinite_counts[k]} of {self.world_size} ranks)")
            else:
                owner._step_optimizer(ghost)
                lifetime = owner.config.lifetime
                if lifetime is not None and step - ghost.spawn_step >= lifetime:
                    owner._set_status(ghost, "finished", step, f"lifetime of {lifetime} steps reached")
        if self.is_writer:  # other ranks' buffers wait for DDP's next broadcast: only rank 0 can be compared
            owner._check_control(step)
        if raised is not None and owner.raise_errors:
            raise raised

    def _all_reduce_ghosts(self, owner: GhostSet, live: list[Any], errors: list[str | None],
                           nonfinite: list[bool]) -> tuple[list[int], list[int]]:
        """The one collective (one per dtype): gradients ·1/W, rank 0's float buffers, failure counters."""
        main_params = [p for p in owner.model.parameters() if p.requires_grad]
        segments: list[tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
        for k, ghost in enumerate(live):
            failed = errors[k] is not None
            for main_p, ghost_p in zip(main_params, ghost.params):
                segments.append(("grad", ghost_p, None if failed else ghost_p.grad, main_p))
            if self.syncs_buffers:  # the layout never depends on failures: every rank builds the same buffer
                for buffer in ghost.model.buffers():
                    if buffer is not None and buffer.is_floating_point():
                        segments.append(("buffer", buffer, None if failed else buffer, None))
        device = main_params[0].device
        flags_dtype = segments[0][1].dtype if segments else torch.float32
        groups = _by_dtype(segments, key=lambda s: s[1].dtype)
        if flags_dtype not in groups:
            groups[flags_dtype] = []
        flags = torch.tensor([float(e is not None) for e in errors] + [float(f) for f in nonfinite],
                             dtype=flags_dtype, device=device)
        reduced_flags = flags
        scale = 1.0 / self.world_size
        for dtype, group in groups.items():
            total = sum(s[1].numel() for s in group)
            tail = flags.numel() if dtype == flags_dtype else 0
            flat = torch.empty(total + tail, dtype=dtype, device=device)
            offset = 0
            for kind, target, value, _ in group:
                view = flat[offset:offset + target.numel()]
                if value is None or (kind == "buffer" and not self.is_writer):
                    view.zero_()
                elif kind == "grad":
                    torch.mul(value.detach().reshape(-1), scale, out=view)  # DDP: bucket = grad · (1/W)
                else:
                    view.copy_(value.detach().reshape(-1))
                offset += target.numel()
            if tail:
                flat[offset:].copy_(flags)
            _dist().all_reduce(flat)
            offset = 0
            for kind, target, value, main_p in group:
                view = flat[offset:offset + target.numel()].view_as(target)
                offset += target.numel()
                if kind == "buffer":
                    if value is not None:
                        target.data.copy_(view)
                elif value is not None:
                    if main_p is not None and main_p.grad is None:
                        target.grad = None  # mirror the main model: no gradient where it has none
                    elif target.grad is not None:
                        target.grad.copy_(view)
            if tail:
                reduced_flags = flat[offset:].clone()
        counts = [int(round(float(v))) for v in reduced_flags.tolist()]
        return counts[:len(live)], counts[len(live):]

    # ------------------------------------------------------------------------------------------ snapshots

    def follow_snapshot(self, probe: Probe) -> None:
        """A non-writing rank's part of a snapshot: the same measuring and ghost comparisons as rank 0 when they
        contain collectives (eNTK partial sums) or decide ghost statuses; nothing is written."""
        probe._recent_losses.clear()
        step = probe.step_count
        kernel = None
        if probe._kernel is not None or probe._ghosts is not None:
            data = probe._recorder.measure(step)
            kernel = data.kernel
            if probe._ghosts is not None:
                main_state = {name: t.detach() for name, t in
                              list(probe.model.named_parameters()) + list(probe.model.named_buffers())
                              if t is not None}
                kernel_of = probe._kernel.measure if probe._kernel is not None else None
                probe._ghosts.compare(data, kernel_of, main_state, len(probe.writer.snapshots))
        probe.writer.commit_snapshot({"step": step, "kernel": kernel is not None})


# ---------------------------------------------------------------------------------------------- eNTK


def partition_modules(named_params: list[tuple[str, torch.Tensor]], parts: int) -> list[list[str]]:
    """Split parameter names into ``parts`` shares of whole modules, balanced by parameter count (largest module
    first to the least-loaded share; ties to the lowest index). Deterministic: every rank computes the same."""
    modules: dict[str, list[tuple[str, int]]] = {}
    for name, p in named_params:
        modules.setdefault(name.rpartition(".")[0], []).append((name, p.numel()))
    order = sorted(modules.items(), key=lambda item: -sum(n for _, n in item[1]))
    shares: list[list[str]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for _, members in order:
        target = loads.index(min(loads))
        shares[target] += [name for name, _ in members]
        loads[target] += sum(n for _, n in members)
    position = {name: i for i, (name, _) in enumerate(named_params)}
    return [sorted(share, key=position.__getitem__) for share in shares]


class ShardedKernel:
    """An eNTK engine whose parameters are shared out among the ranks: ``kernel(params) -> H`` on every rank.

    Rank r builds an :class:`NTKEngine` differentiating only its share of the trainable parameters
    (``wrt=``); H = Σ_r H_r (eq. 3 is a sum over parameters), assembled by :meth:`DistributedRun.
    sum_partial_kernels`. Each engine plans for the full ``max_memory``: the per-rank budget equals a single
    process's. A rank with no share (fewer modules than ranks) contributes zeros.
    """

    def __init__(self, run: DistributedRun, model: nn.Module, make_engine: Callable[[list[str] | None], NTKEngine]
                 ) -> None:
        self.run, self.model = run, model
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
        self.shares = partition_modules(trainable, run.world_size)
        share = self.shares[run.rank]
        self._engine = make_engine(share) if share else None
        self._reference = self._engine if self._engine is not None else make_engine(None)  # shapes only
        self.n = self._reference.n
        full = self._reference.mode == "full"
        self.size = self.n * (self._reference.num_outputs if full else 1)
        self.total_parameters = len(trainable)

    @property
    def convention(self) -> dict[str, Any]:
        return {**self._reference.convention, "parameters": self.total_parameters,
                "distributed": f"parameters shared out over {self.run.world_size} ranks by whole modules; the "
                               "partial kernels summed with one all_reduce (float64)"}

    def __call__(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        if self.run.syncs_buffers:
            # Rank 0's buffers, as DDP broadcasts them before the next forward: another rank's main model (and a
            # ghost on the step it was cloned) still holds its own running statistics.
            names = [name for name, b in self.model.named_buffers() if b is not None and b.is_floating_point()]
            state = dict(self.model.named_buffers()) if params is None else params
            buffers = [(name, state[name]) for name in names if name in state]
            params = {**(params or {}), **self.run.rank0_values(buffers)}
        partial, error = None, None
        try:
            if self._engine is not None:
                partial = self._engine(params)
        except Exception as failure:  # noqa: BLE001 - every rank must reach the all_reduce
            error = f"{type(failure).__name__}: {failure}"
        return self.run.sum_partial_kernels(partial, self.size, self._reference.device, error)


# ---------------------------------------------------------------------------------------------- writing


def open_run_writer(run: DistributedRun | None, out: str | os.PathLike, manifest: dict[str, Any], *,
                    params: list[torch.Tensor], resume: bool, resume_step: int | None,
                    problems: list[str] | None = None) -> RunWriter | NullWriter:
    """The probe's writer: a :class:`RunWriter` outside torch.distributed and on rank 0 (after the attach checks),
    a :class:`NullWriter` on the other ranks."""
    if run is None:
        return RunWriter(out, manifest, resume=resume, resume_step=resume_step)
    problems = list(problems or [])
    if resume:
        problems.append("resume=True is not supported under torch.distributed yet; start a new out= directory")
    run.check_agreement(manifest, params, problems)
    return run.open_writer(out, manifest, resume=resume, resume_step=resume_step)


class NullWriter:
    """The writer of a rank other than 0: the same interface as :class:`RunWriter`, no file ever touched.

    It keeps the snapshot records (step, whether a kernel was measured) in memory, because the schedule and the
    eNTK cadence are decided from them, identically on every rank.
    """

    resumed = False

    def __init__(self, root: str | os.PathLike, manifest: dict[str, Any]) -> None:
        self.root = Path(root)
        self.manifest = dict(manifest)
        self.snapshots: list[dict[str, Any]] = []

    def resume_from_step(self, resume_step: int | None) -> int:
        return 0 if resume_step is None else int(resume_step)

    def event(self, event: str, /, **fields: Any) -> None:
        pass

    def snapshot_path(self, step: int) -> Path:
        raise RuntimeError("only rank 0 writes the run directory")

    def save_array(self, step: int, name: str, array: np.ndarray) -> None:
        pass

    def save_arrays(self, step: int, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        pass

    def save_run_array(self, name: str, array: np.ndarray) -> None:
        pass

    def commit_snapshot(self, record: dict[str, Any]) -> None:
        self.snapshots.append(json_safe({"index": len(self.snapshots), **record}))

    def update_manifest(self, **fields: Any) -> None:
        self.manifest.update(json_safe(fields))

    def metrics_path(self, name: str) -> Path:
        return self.root / "metrics" / name  # a name only: SnapshotRecorder never commits on this rank

    def load_params(self, index: int) -> np.ndarray:
        raise RuntimeError("only rank 0 keeps the run directory")


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
