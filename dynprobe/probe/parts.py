"""The checks and single parts :func:`dynprobe.probe.assembly.assemble` uses: the model's output, the run sink
and its manifest, the resumed parameters, the projected disk use, parameters added after attach."""
from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from dynprobe._util.command import redacted_command
from dynprobe._util.evaluation import EvalSet, check_model_outputs
from dynprobe._util.user_warnings import warn_user
from dynprobe.distributed.runtime import DistributedRun, check_supported, open_run_writer
from dynprobe.distributed.sharded import layout_problems, unsupported_under_fsdp
from dynprobe.recording.cadence import planned_snapshots
from dynprobe.store.disk import free_space_warning, projected_run_bytes
from dynprobe.store.manifest import build_manifest
from dynprobe.store.sink import RunSink
from dynprobe.store.writer import json_safe

from .options import ProbeOptions

__all__ = [
    "BACKGROUND_WRITE_BYTES",
    "background_writes",
    "check_model_output",
    "check_resumed_parameters",
    "open_run",
    "output_loss",
    "warn_about_new_parameters",
    "warn_if_the_disk_is_too_small",
]

# Snapshots of a θ at least this large are written by a background thread (recording.background): below it the
# files take less time than the evaluation, and a synchronous writer keeps the run readable right after each step.
BACKGROUND_WRITE_BYTES = 16 * 2**20


def background_writes(params: list[torch.Tensor], storage_dtype: torch.dtype) -> bool:
    """Whether a probe writes its snapshots off the training thread (θ of at least 16 MiB in storage)."""
    itemsize = torch.empty(0, dtype=storage_dtype).element_size()
    return sum(p.numel() for p in params) * itemsize >= BACKGROUND_WRITE_BYTES


def output_loss(output: Any) -> torch.Tensor:
    """``loss_from_output=True``: the loss a Hugging Face-style model returns (``output.loss`` / ``["loss"]``)."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_from_output=True needs outputs with a .loss tensor; got {type(output).__name__}")
    return loss


def check_model_output(model: nn.Module, eval_set: EvalSet, output_fn: Callable[[Any], torch.Tensor] | None,
                       device: torch.device, cuda_devices: list[int]) -> int:
    """Call the model on two eval examples and check its outputs against the eval set's task (shape, label range,
    finite values); returns the task's output size (classes, vocabulary, output coordinates). A model that cannot
    take the eval inputs fails here, at ``Probe(...)``."""
    return check_model_outputs(model, eval_set, output_fn=output_fn, device=device, cuda_devices=cuda_devices)


def open_run(dist: DistributedRun | None, out: str | os.PathLike, options: ProbeOptions, *, model: nn.Module,
             named_params: list[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer, eval_set: EvalSet,
             num_classes: int, storage_dtype: torch.dtype, device: torch.device,
             kernel_convention: dict[str, Any] | None) -> RunSink:
    """The run directory's writer (a null sink on DDP ranks other than 0), with the manifest of this probe."""
    manifest = build_manifest(
        model=model, named_params=named_params, optimizer=optimizer, eval_set=eval_set, num_classes=num_classes,
        storage_dtype=storage_dtype, device=device, config=options.to_config(),
        conventions={**options.conventions(json_safe(kernel_convention) if kernel_convention is not None else None),
                     **eval_set.task.conventions()},
        command=redacted_command(sys.argv) if options.record_command else None,
    )
    problems = check_supported(options.ghosts)
    if dist is not None and dist.sharded:  # FSDP2: what this slice does not run yet, the same error on every rank
        problems += unsupported_under_fsdp()
        problems += layout_problems(named_params, dist.world_size)
    return open_run_writer(dist, out, manifest, params=[p for _, p in named_params], resume=options.resume,
                           resume_step=options.resume_step, problems=problems, durable=options.durable)


def warn_if_the_disk_is_too_small(writer: RunSink, options: ProbeOptions, params: list[torch.Tensor],
                                  storage_dtype: torch.dtype, model: nn.Module, eval_n: int,
                                  kernel_n: int | None) -> None:
    """With ``total_steps`` known, project the run directory's size from the schedule and warn at attach when it
    exceeds the free space where the run is written."""
    if options.total_steps is None or not writer.writes:
        return
    plan = planned_snapshots(options.schedule, options.total_steps, options.kernel,
                             snapshot_on_close=options.snapshot_on_close)
    snapshots = len(plan)
    kernel_snapshots = sum(p.kernel_role is not None for p in plan)
    projected = projected_run_bytes(
        num_parameters=sum(p.numel() for p in params), snapshots=snapshots,
        param_itemsize=torch.empty(0, dtype=storage_dtype).element_size(),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()), eval_n=eval_n,
        kernel_snapshots=kernel_snapshots, kernel_entries=(kernel_n or 0) ** 2)
    message = free_space_warning(writer.root, projected)
    if message:
        warn_user(message, RuntimeWarning)


def check_resumed_parameters(writer: Any, params: list[torch.Tensor], step: int) -> None:
    """A resumed run continues from ``step``: the model must hold the parameters the run recorded there.

    When the run has a snapshot at ``step`` its stored θ is compared bit for bit with the model's (after the user
    restored their checkpoint). A mismatch is refused with the step whose snapshot the model does match, if any —
    the usual cause is restoring an older checkpoint without ``resume_step=``. Without a snapshot at ``step`` (a
    checkpoint taken between snapshots) there is nothing to compare with, and the run continues.
    """
    if step not in {int(s["step"]) for s in writer.snapshots}:
        return
    # float64 holds float32, bfloat16 and float64 values exactly: equal there means bit-equal in their own dtype.
    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in params]).numpy()
    stored = np.asarray(writer.snapshot_params(step), dtype=np.float64)
    if stored.shape == flat.shape and np.array_equal(stored, flat):
        return
    match = writer.find_matching_snapshot(flat)
    hint = (f"they equal the snapshot at step {match}: pass resume_step={match}" if match is not None else
            "they match no snapshot of the run: restore the checkpoint you saved at that step")
    raise ValueError(
        f"resume=True continues {writer.root} from step {step}, but the model's parameters differ from the run's "
        f"snapshot at step {step}; {hint} (resume_step= says which step your training restarts from)")


def warn_about_new_parameters(model: nn.Module, attached: list[tuple[str, torch.Tensor]],
                              warned: set[str]) -> None:
    """Trainable parameters added to the model after the probe attached are not part of θ: say so once."""
    known = {id(p) for _, p in attached}
    added = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in known]
    if added and "new-parameters" not in warned:
        warned.add("new-parameters")
        warnings.warn(
            f"dynprobe: {len(added)} trainable parameters were added to the model after the probe attached (e.g. "
            f"{added[0]!r}); θ, C and the ghosts keep the {len(attached)} tensors the probe attached to. Attach the "
            "probe after the model is complete to include them", RuntimeWarning, stacklevel=2)
