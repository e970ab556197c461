"""How a probe is assembled: :func:`assemble` builds every part from the validated options, in data-flow order.

eval set → kernel probe set → run sink (a :class:`~dynprobe.store.writer.RunWriter`, or a null sink on DDP ranks
other than 0: the one place where ranks differ) → training-loss log → snapshot recorder → barrier scheduler (rank 0
only under DDP; every rank under FSDP2, after each snapshot's agreement) →
transition watch → snapshot sequence → ghosts and the hooks that feed them. Each part is given what it uses —
plain values, other parts, and the probe's :class:`ProbeClock` — never the half-built probe. Nothing here runs
during training.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dynprobe._util.checks import check_model, check_optimizer
from dynprobe._util.evaluation import EvalSet, default_output_fn
from dynprobe._util.modules import device_of, is_compiled, rng_devices, trainable_parameters, uncompiled
from dynprobe.capture.hooks import CaptureHooks, GradEditDetector
from dynprobe.capture.step import StepCapture
from dynprobe.distributed.kernel import sharded_kernel
from dynprobe.distributed.runtime import DistributedRun, is_ddp, unwrap_model, warn_comm_hook
from dynprobe.distributed.sharded import AgreedSnapshots, reshard, shared_run_root
from dynprobe.distributed.sharded_barriers import ShardedBarriers
from dynprobe.distributed.sharded_inert import rows_sharded, sharded_mean_squares
from dynprobe.distributed.sharded_kernel import fsdp_kernel
from dynprobe.distributed.sharded_resume import check_resumed_shards
from dynprobe.distributed.sharded_snapshot import ShardedSnapshotRecorder
from dynprobe.ghosts.ghost_set import GhostSet
from dynprobe.recording.background import BackgroundWriter
from dynprobe.recording.barriers import BarrierScheduler
from dynprobe.recording.inert import InertWatch
from dynprobe.recording.kernel_probe import KernelMeasure, kernel_at_snapshot
from dynprobe.recording.learning_rate import LearningRateLog
from dynprobe.recording.progress import SnapshotProgress
from dynprobe.recording.snapshot import SnapshotRecorder
from dynprobe.recording.train_loss import TrainLoss
from dynprobe.store.files import read_jsonl
from dynprobe.store.layout import EVAL_INDICES, EVENTS, KERNEL_PROBE_INDICES, train_loss_path
from dynprobe.store.run import load_run
from dynprobe.store.sink import RunSink
from dynprobe.store.writer import json_safe

from .guard import attempt
from .options import ProbeOptions
from .parts import (
    background_writes,
    check_model_output,
    check_resumed_parameters,
    open_run,
    output_loss,
    warn_if_the_disk_is_too_small,
)
from .sequence import SnapshotSequence
from .transition import TransitionWatch

__all__ = ["ProbeClock", "ProbeParts", "assemble"]


@dataclass
class ProbeClock:
    """The probe's clock, shared by the parts that need it: ``step`` (optimizer steps taken: the step number of
    the model's current state) and ``busy`` (the probe is doing its own work: the hooks ignore what they see)."""

    step: int = 0
    busy: bool = True


@dataclass
class ProbeParts:
    """A probe's parts, in data-flow order (see the module docstring)."""

    dist: DistributedRun | None
    model: nn.Module  # the module measured (inside a DDP wrapper)
    hooked_model: nn.Module  # what the training loop calls (the DDP or torch.compile wrapper itself)
    named_params: list[tuple[str, torch.Tensor]]
    device: torch.device
    cuda_devices: list[int]
    storage_dtype: torch.dtype
    output_fn: Callable[[Any], torch.Tensor]
    eval_set: EvalSet
    num_classes: int
    kernel: KernelMeasure | None
    sink: RunSink
    train_loss: TrainLoss
    learning_rates: LearningRateLog
    recorder: SnapshotRecorder | ShardedSnapshotRecorder
    barriers: BarrierScheduler | None
    transition: TransitionWatch
    sequence: SnapshotSequence | AgreedSnapshots
    ghosts: GhostSet | None = None
    capture: StepCapture | None = None
    handles: list[Any] = field(default_factory=list)  # hooks the ghosts need, removed at close

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for _, p in self.named_params]


def assemble(options: ProbeOptions, model: nn.Module, optimizer: torch.optim.Optimizer, *, eval_data: Any,
             out: str | os.PathLike, clock: ProbeClock, owner: object) -> ProbeParts:
    """Build a probe's parts from its validated options (module docstring). ``model`` is what the loop calls (a
    DDP wrapper is unwrapped here); ``clock.step`` is set to the step the run starts from; ``owner`` (the probe) is
    shared, never copied, when the model is deep-copied into a ghost. A failure after the run sink was opened
    closes it again, leaving no hook behind and the run directory free for the next writer."""
    dist = DistributedRun.detect(model)  # torch.distributed (DDP): hooks on the wrapper, the rest on the module
    # The probe computes on the plain module: never through a torch.compile wrapper (which would recompile) or DDP.
    inner = check_model(uncompiled(unwrap_model(uncompiled(model))))
    check_optimizer(optimizer, inner)
    named_params = trainable_parameters(inner)
    params = [p for _, p in named_params]
    device, cuda_devices = device_of(inner), rng_devices(inner)
    storage_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    output_fn = options.output_fn or default_output_fn
    eval_set = EvalSet.from_user(eval_data, max_examples=options.eval_max, seed=options.seed, task=options.task)
    options = options.with_kernel_defaults(eval_set.task.name)  # the task's kernel mode, the lag from the schedule
    num_classes = check_model_output(inner, eval_set, output_fn, device, cuda_devices)
    sharded = dist is not None and dist.sharded  # FSDP2: refused options are reported by open_run on every rank
    if sharded:
        reshard(inner)  # the check's forward left the root's parameters all-gathered
    kernel = None
    if options.kernel is not None and not sharded:  # under FSDP built once the ranks agree (collective: below)
        kernel = KernelMeasure(options.kernel, inner, eval_set, output_fn=output_fn, device=device,
                               kernel_factory=sharded_kernel(dist, inner))
    sink: RunSink = open_run(dist, out, options, model=inner, named_params=named_params, optimizer=optimizer,
                             eval_set=eval_set, num_classes=num_classes, storage_dtype=storage_dtype, device=device,
                             kernel_convention=kernel.convention() if kernel is not None else None)
    handles: list[Any] = []
    try:
        if sharded and options.kernel is not None:
            assert dist is not None
            kernel = _sharded_kernel(options, dist, inner, named_params, eval_set, output_fn, device, sink)
        if sink.writes and not sharded and background_writes(params, storage_dtype):
            sink = BackgroundWriter(sink)  # large θ: snapshot files written off the training thread
        root = shared_run_root(dist, sink.root) if sharded else sink.root  # FSDP: every rank writes its shards there
        check = (functools.partial(_check_shards, dist, root, named_params, device) if sharded
                 else functools.partial(check_resumed_parameters, params=params))
        clock.step = _start(sink, options, kernel, eval_set, params, storage_dtype, inner, check)
        resumed_at = clock.step if sink.resumed else None
        last = int(sink.snapshots[-1]["step"]) if sink.resumed and sink.snapshots else None
        train_loss = TrainLoss(train_loss_path(sink.root) if sink.writes else None, resumed_at=resumed_at,
                               since=last)
        learning_rates = LearningRateLog(sink.root if sink.writes else None)
        recorder: SnapshotRecorder | ShardedSnapshotRecorder
        if sharded:  # FSDP2: each rank its shards; C from all-reduced partial sums (distributed/sharded_snapshot.py)
            assert dist is not None
            recorder = ShardedSnapshotRecorder(
                dist, sink, inner, named_params, eval_set, root=root, device=device,
                storage_dtype=storage_dtype, output_fn=output_fn, eval_batch_size=options.eval_batch_size,
                kernel_fn=functools.partial(kernel_at_snapshot, kernel, options.schedule) if kernel is not None
                else None, history_memory=options.history_memory)
        else:
            recorder = SnapshotRecorder(
                sink, inner, params, eval_set, device=device, storage_dtype=storage_dtype, output_fn=output_fn,
                eval_batch_size=options.eval_batch_size, history_memory=options.history_memory,
                kernel_fn=functools.partial(kernel_at_snapshot, kernel, options.schedule) if kernel is not None
                else None)
        progress = SnapshotProgress(enabled=options.progress)
        barriers: BarrierScheduler | None = None
        if sharded and options.barriers.active(options.ghosts is not None):  # FSDP2: every rank computes them
            assert dist is not None and isinstance(recorder, ShardedSnapshotRecorder)
            barriers = ShardedBarriers(
                options.barriers, run=dist, sink=sink, model=inner, params=params, pieces=recorder.cosine,
                eval_set=eval_set, output_fn=output_fn, batch_size=options.eval_batch_size, device=device,
                progress=progress)
        elif options.barriers.active(options.ghosts is not None) and sink.writes:
            barriers = BarrierScheduler(
                options.barriers, sink=sink, model=inner, eval_set=eval_set, output_fn=output_fn,
                batch_size=options.eval_batch_size, final_step=options.total_steps, progress=progress)
        transition = TransitionWatch(sink.event, options.on_transition,
                                     lag_steps=options.kernel.lag_steps or None if options.kernel is not None else None)
        if sink.resumed and sink.writes:  # the detector runs where the rows are written
            transition.replay(load_run(sink.root))
        sequence = SnapshotSequence(recorder=recorder, kernel=kernel, train_loss=train_loss,
                                    learning_rates=learning_rates, barriers=None if sharded else barriers,
                                    transition=transition, progress=progress, model=inner,
                                    sink=sink, on_snapshot=options.on_snapshot,
                                    inert=_inert_watch(inner, named_params, optimizer, sink, dist))
        if sharded:  # every rank agrees on each snapshot's outcome before training goes on (and the barriers)
            assert dist is not None
            sequence = AgreedSnapshots(sequence, dist, device, after=barriers.after_agreed_snapshot
                                       if isinstance(barriers, ShardedBarriers) else None)
        parts = ProbeParts(dist=dist, model=inner, hooked_model=model, named_params=named_params, device=device,
                           cuda_devices=cuda_devices, storage_dtype=storage_dtype, output_fn=output_fn,
                           eval_set=eval_set, num_classes=num_classes, kernel=kernel, sink=sink,
                           train_loss=train_loss, learning_rates=learning_rates, recorder=recorder,
                           barriers=barriers, transition=transition, sequence=sequence, handles=handles)
        if options.ghosts is not None:
            parts.ghosts, parts.capture = _ghosts(options, parts, optimizer, clock, owner, handles)
        return parts
    except BaseException:
        for handle in handles:
            attempt(handle.remove, [])
        attempt(sink.close, [])
        raise


def _sharded_kernel(options: ProbeOptions, dist: DistributedRun, model: nn.Module,
                    named_params: list[tuple[str, torch.Tensor]], eval_set: EvalSet,
                    output_fn: Callable[[Any], torch.Tensor], device: torch.device, sink: RunSink) -> KernelMeasure:
    """The eNTK of an FSDP2 model (:mod:`dynprobe.distributed.sharded_kernel`: θ gathered for each measurement).
    Built after the attach check, since building it is collective (every rank must have ``kernel=``); its
    convention joins the manifest then."""
    assert options.kernel is not None
    kernel = KernelMeasure(options.kernel, model, eval_set, output_fn=output_fn, device=device,
                           kernel_factory=fsdp_kernel(dist, model, named_params))
    conventions = sink.manifest.get("conventions") or {}
    sink.update_manifest(conventions={**conventions, **options.conventions(json_safe(kernel.convention()))})
    return kernel


def _inert_watch(model: nn.Module, named_params: list[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
                 sink: RunSink, dist: DistributedRun | None) -> InertWatch | None:
    """The inert-tensor check (:mod:`dynprobe.recording.inert`); under FSDP2 from the ranks' shards, all-reduced
    (:mod:`dynprobe.distributed.sharded_inert`: dim-0 shards only, FSDP2's default; none otherwise)."""
    if dist is None or not dist.sharded:
        return InertWatch(model, named_params, optimizer, sink)
    params = [p for _, p in named_params]
    if not rows_sharded(params):
        return None
    return InertWatch(model, named_params, optimizer, sink, squares_of=sharded_mean_squares(dist, device_of(model)))


def _start(sink: RunSink, options: ProbeOptions, kernel: KernelMeasure | None, eval_set: EvalSet,
           params: list[torch.Tensor], storage_dtype: torch.dtype, model: nn.Module,
           check: Callable[..., None]) -> int:
    """The step the run starts from: 0 for a new run (whose run-level arrays are stored now), else the resume step
    (``check(sink, step=)``: the model must hold the parameters recorded there; the kernel cadence continues)."""
    if sink.resumed:
        step = sink.resume_from_step(options.resume_step)
        check(sink, step=step)
        if kernel is not None:  # the kernel cadence (every_snapshots, lag companions) continues
            kernel.resume(sink.snapshots)
        return step
    sink.save_run_array(EVAL_INDICES, eval_set.indices.numpy())
    if kernel is not None:
        sink.save_run_array(KERNEL_PROBE_INDICES, kernel.indices.numpy())
    warn_if_the_disk_is_too_small(sink, options, params, storage_dtype, model, eval_set.n,
                                  options.kernel.n if options.kernel is not None else None)
    return 0


def _check_shards(dist: DistributedRun | None, root: Any, named_params: list[tuple[str, torch.Tensor]],
                  device: torch.device, sink: RunSink, *, step: int) -> None:
    """FSDP: each rank checks its own shards against the snapshot at ``step`` (distributed/sharded_resume.py)."""
    assert dist is not None
    check_resumed_shards(dist, root, sink.manifest, named_params, sink.snapshots, step, device)


def _ghosts(options: ProbeOptions, parts: ProbeParts, optimizer: torch.optim.Optimizer, clock: ProbeClock,
            owner: object, handles: list[Any]) -> tuple[GhostSet, StepCapture]:
    """The ghost set and the hooks that feed it (appended to ``handles``): what each training step consumed
    (``CaptureHooks``) and gradient edits between ``backward()`` and ``step()`` (``GradEditDetector``)."""
    config = options.ghosts
    assert config is not None
    from_output = output_loss if options.loss_from_output is True else options.loss_from_output
    ghosts = GhostSet(
        config, parts.model, optimizer, parts.sink, main_params=parts.params, eval_set=parts.eval_set,
        output_fn=parts.output_fn, eval_batch_size=options.eval_batch_size, device=parts.device,
        storage_dtype=parts.storage_dtype, cuda_devices=parts.cuda_devices, no_copy=[owner],
        raise_errors=options.errors == "raise", final_step=options.total_steps, loss_from_output=from_output,
        trainer_factory=functools.partial(parts.dist.ghost_trainer, root=parts.recorder.root
                                          if isinstance(parts.recorder, ShardedSnapshotRecorder) else None)
        if parts.dist is not None else None,
        compiled=is_compiled(parts.hooked_model),
    )
    capture = StepCapture(parts.cuda_devices,
                          scale_fn=config.scaler.get_scale if config.scaler is not None else None)
    handles.append(CaptureHooks(parts.hooked_model, capture, lambda: clock.busy, loss_from_output=from_output))
    if parts.dist is None and not is_ddp(parts.hooked_model):  # DDP (even with one rank) writes the averaged
        # gradients back after backward: every step would look edited
        handles.append(GradEditDetector(parts.params, optimizer, lambda: ghosts.note_grad_edit(clock.step)))
    warn_comm_hook(parts.dist)
    if parts.sink.resumed:  # warns (at the user's line) when ghosts were interrupted
        ghosts.resume(read_jsonl(parts.sink.root / EVENTS), clock.step)
    return ghosts, capture
