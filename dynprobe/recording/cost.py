"""The price of a probe configuration before attaching it — time and disk per snapshot and for the whole schedule,
measured on the user's own model and eval data: :func:`measure_cost`, the options that change the cost. The public
:func:`dynprobe.estimate_cost` (:mod:`dynprobe.probe.cost`) takes every ``Probe`` option, validates them as
``Probe`` does and passes these on.

It times what one snapshot does (one evaluation of the eval set, writing θ, the eNTK when configured — and, for
the per-output ``"trace"`` or ``"full"`` modes, the one-backward-pass ``"logit_sum"`` eNTK too, printed beside
it) on the model as it is, showing a progress line while a slow measurement runs, then projects the schedule:
snapshots up to ``total_steps``, the ghosts alive at each (each is evaluated, compared and, when due, gets a
barrier under the :class:`dynprobe.Barriers` budget), and the bytes each snapshot writes. Nothing is written
outside a temporary directory; the model, optimizer and RNG streams are left as they were. The projection
assumes every evaluation costs what the measured one did; ghost training is not timed (it needs your training
step): each live ghost repeats every step, which the estimate states as
a multiple of your training time.
"""
from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from dynprobe._util.checks import check_int, check_model, check_optimizer
from dynprobe._util.evaluation import EvalSet, evaluate
from dynprobe._util.inputs import default_output_fn
from dynprobe._util.modules import device_of, trainable_parameters
from dynprobe.config import Barriers, Ghosts, KernelConfig

from .barriers import BarrierBudget
from .cadence import PlannedSnapshot, planned_snapshots, snapshot_schedule
from .kernel_probe import KernelMeasure
from .progress import SnapshotProgress

__all__ = ["CHEAPER_MODE", "CostEstimate", "measure_cost"]

# Modes with one backward pass per output coordinate, and the one-pass mode whose cost is printed beside theirs.
PER_OUTPUT_MODES = ("trace", "full")
CHEAPER_MODE = "logit_sum"


@dataclass(frozen=True)
class CostEstimate:
    """Measured unit costs and the projected cost of a schedule (seconds, bytes). ``str(estimate)`` is the table
    :func:`measure_cost` prints."""

    seconds_per_evaluation: float
    seconds_params_write: float
    seconds_per_kernel: float | None
    snapshots: int
    steps: list[int]
    live_ghosts: list[int]
    seconds_per_snapshot: list[float]
    seconds_barriers: float
    barriers: dict[str, int]
    bytes_per_snapshot: list[int]
    ghost_memory_bytes: int
    ghost_training_factor: float
    notes: list[str] = field(default_factory=list)
    kernel_mode: str | None = None
    kernels: int = 0
    seconds_per_cheaper_kernel: float | None = None
    cheaper_mode: str | None = None

    @property
    def seconds_total(self) -> float:
        """Projected time of all snapshots, barriers included (ghost training not included)."""
        return float(sum(self.seconds_per_snapshot) + self.seconds_barriers)

    @property
    def bytes_total(self) -> int:
        return int(sum(self.bytes_per_snapshot))

    def table(self) -> Table:
        table = Table(title="dynprobe: projected cost", show_header=True, title_justify="left")
        table.add_column("what")
        table.add_column("per snapshot", justify="right")
        table.add_column(f"schedule ({self.snapshots} snapshots)", justify="right")
        mean_seconds = self.seconds_total / max(1, self.snapshots)
        table.add_row("time (snapshots + barriers)", _seconds(mean_seconds), _seconds(self.seconds_total))
        table.add_row("  of which barriers", _seconds(self.seconds_barriers / max(1, self.snapshots)),
                      _seconds(self.seconds_barriers))
        table.add_row("disk", _bytes(self.bytes_total / max(1, self.snapshots)), _bytes(self.bytes_total))
        table.add_row("one evaluation of the eval set", _seconds(self.seconds_per_evaluation), "")
        if self.seconds_per_kernel is not None:
            table.add_row(f"one eNTK (mode {self.kernel_mode!r}; {self.kernels} in the schedule)",
                          _seconds(self.seconds_per_kernel), _seconds(self.kernels * self.seconds_per_kernel))
        if self.seconds_per_cheaper_kernel is not None:
            table.add_row(f"  with KernelConfig(mode={self.cheaper_mode!r}) instead",
                          _seconds(self.seconds_per_cheaper_kernel),
                          _seconds(self.kernels * self.seconds_per_cheaper_kernel))
        if max(self.live_ghosts, default=0):
            table.add_row("ghosts alive", f"up to {max(self.live_ghosts)}", f"memory {_bytes(self.ghost_memory_bytes)}")
            table.add_row("training time (ghosts repeat each step)", "", f"×{self.ghost_training_factor:.2f}")
        done = ", ".join(f"{n} {kind}" for kind, n in self.barriers.items())
        table.add_row("barriers computed online", "", done or "none")
        return table

    def __str__(self) -> str:
        console = Console(width=110, record=True, file=_Discard())
        console.print(self.table())
        for note in self.notes:
            console.print(f"· {note}", markup=False, highlight=False)
        return console.export_text()


def _measure(progress: SnapshotProgress, model: nn.Module, eval_set: EvalSet, kernel: KernelConfig | None,
             output_fn: Callable[[Any], torch.Tensor], eval_batch_size: int, device: torch.device
             ) -> tuple[float, Any, float, float | None, int, float | None]:
    """Time one snapshot's parts: ``(seconds per evaluation, the evaluation, seconds to write θ, seconds per eNTK,
    bytes of one eNTK, seconds per eNTK in :data:`CHEAPER_MODE` when the chosen mode costs one backward pass per
    output coordinate)``; each part is a phase of ``progress``."""
    timings = []  # the faster of two evaluations: the first also warms caches up, and a shared machine only slows
    for attempt in range(2):
        progress.phase("evaluating", f"the eval set ({eval_set.n} examples), {attempt + 1} of 2")
        started = time.perf_counter()
        evaluation = evaluate(model, eval_set, output_fn=output_fn, batch_size=eval_batch_size, device=device)
        timings.append(time.perf_counter() - started)
    progress.phase("writing", "θ to a temporary file")
    params = [p for _, p in trainable_parameters(model)]
    storage_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    seconds_write = _time_parameter_write(params, storage_dtype)
    seconds_kernel, kernel_bytes, seconds_cheaper = None, 0, None
    if kernel is not None:
        progress.phase("kernel", f"one eNTK on {kernel.n} examples, mode {kernel.mode!r}")
        measure = KernelMeasure(kernel, model, eval_set, output_fn=output_fn, device=device)
        started = time.perf_counter()
        kernel_bytes = int(measure.measure().numel()) * 8
        seconds_kernel = time.perf_counter() - started
        if kernel.mode in PER_OUTPUT_MODES:
            progress.phase("kernel", f"one eNTK on {kernel.n} examples, mode {CHEAPER_MODE!r} for comparison")
            cheaper = KernelMeasure(replace(kernel, mode=CHEAPER_MODE), model, eval_set, output_fn=output_fn,
                                    device=device)
            started = time.perf_counter()
            cheaper.measure()
            seconds_cheaper = time.perf_counter() - started
    return min(timings), evaluation, seconds_write, seconds_kernel, kernel_bytes, seconds_cheaper


class _Discard:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        return None


def measure_cost(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    eval_data: Any,
    *,
    total_steps: int,
    schedule: Any = None,
    ghosts: Ghosts | None = None,
    kernel: KernelConfig | None = None,
    barriers: Barriers | None = None,
    eval_max: int = 2000,
    eval_batch_size: int = 256,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    task: Any = None,
    seed: int = 0,
    progress: bool = True,
    console: Console | None | bool = None,
) -> CostEstimate:
    """Time one snapshot of ``model`` and print the projected time and disk per snapshot and for the schedule.

    The arguments are the ``dynprobe.Probe`` options that change the cost (same meanings and defaults) plus
    ``total_steps``, the number of optimizer steps you plan. ``console``: where to print (default: stderr;
    ``False``: do not print). Returns the :class:`CostEstimate`. A measurement that runs longer than two seconds
    shows a progress line (what is being timed, the elapsed time) on that console, unless ``progress`` is False.
    """
    model = check_model(model)
    optimizer = check_optimizer(optimizer, model)
    check_int("total_steps", total_steps, hint="the optimizer steps you plan")
    barriers = barriers if barriers is not None else Barriers()
    output_fn = output_fn or default_output_fn
    device = device_of(model)
    eval_set = EvalSet.from_user(eval_data, max_examples=eval_max, seed=seed, task=task)

    schedule = snapshot_schedule(schedule, ghosts)
    if kernel is not None:  # the mode and lag the probe would choose (KernelConfig's defaults)
        kernel = kernel.for_task(eval_set.task.name).with_default_lag(schedule, total_steps)
    out = console if isinstance(console, Console) else Console(stderr=True)
    progress_line = SnapshotProgress(enabled=console is not False and progress, console=out)
    with progress_line.snapshot(0, what="estimate_cost, timing one snapshot"):
        measured = _measure(progress_line, model, eval_set, kernel, output_fn, eval_batch_size, device)
    seconds_eval, evaluation, seconds_write, seconds_kernel, kernel_bytes, seconds_cheaper = measured
    params = [p for _, p in trainable_parameters(model)]
    storage = 8 if any(p.dtype == torch.float64 for p in params) else 4
    numel = sum(p.numel() for p in params)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    preds = evaluation.preds.numel()
    preds_bytes = preds * np.dtype(eval_set.task.storage_dtype(evaluation.num_classes)).itemsize

    plan = _Plan(planned_snapshots(schedule, total_steps, kernel), ghosts, total_steps)
    kernel_roles = {p.step: p.kernel_role for p in plan.snapshots}
    budget = BarrierBudget(barriers.time_budget)
    budget.seconds_per_alpha = seconds_eval
    barrier_seconds, counts = 0.0, {"ghost": 0, "trajectory": 0}
    per_snapshot, per_bytes, kernels = [], [], 0
    ghost_seen: dict[int, int] = {}  # snapshots of each ghost that considered a barrier
    compared: dict[int, int] = {}  # comparisons of each ghost so far (GhostSet counts them the same way)
    for snapshot_index, step in enumerate(plan.steps):
        live = plan.live(step)
        kernel_due = kernel_roles[step] is not None
        seconds = seconds_eval * (1 + len(live)) + seconds_write
        if kernel_due and seconds_kernel is not None:  # the ghosts' S: every kernel_every_snapshots-th comparison
            every = ghosts.kernel_every_snapshots if ghosts is not None else 1
            ghost_kernels = sum(compared.get(ghost, 0) % every == 0 or step == total_steps for ghost, _ in live)
            seconds += seconds_kernel * (1 + ghost_kernels)
            kernels += 1 + ghost_kernels
        for ghost, _ in live:
            compared[ghost] = compared.get(ghost, 0) + 1
        size = numel * storage + buffer_bytes + preds_bytes + (kernel_bytes if kernel_due else 0)
        size += len(live) * (preds * 4 + (numel * storage if ghosts is not None and ghosts.save_params else 0))
        per_snapshot.append(seconds)
        per_bytes.append(size)
        budget.grant(seconds, 1 + len(live))
        final = step == plan.steps[-1]
        jobs = []
        reserve = 0 if final else barriers.alphas * sum(not control for _, control in live)
        if barriers.ghosts:
            for ghost, control in live:
                seen = ghost_seen.get(ghost, 0)
                ghost_seen[ghost] = seen + 1
                if final or seen % barriers.every_snapshots == 0:
                    jobs.append(("ghost", final, 0 if control else barriers.alphas))
        if barriers.previous_snapshots and snapshot_index % barriers.every_snapshots == 0:
            jobs += [("trajectory", False, barriers.alphas)] * min(snapshot_index, barriers.previous_snapshots)
        for kind, forced, evaluations in jobs:
            if forced or budget.fits(evaluations, reserve if barriers.ghosts else 0):
                cost = evaluations * seconds_eval
                budget.spend(cost, evaluations)
                budget.seconds_per_alpha = seconds_eval
                barrier_seconds += cost
                counts[kind] += 1
    notes = [f"measured on {eval_set.n} eval examples ({eval_set.task.name}), eval_batch_size={eval_batch_size}, "
             f"{numel:,} parameters; C, D rows and ghost comparisons beyond their evaluation are not included"]
    if barriers.time_budget is None and barriers.active(ghosts is not None):
        notes.append("barriers: automatic budget (half the snapshot time, carried over); final ghost barriers always")
    estimate = CostEstimate(
        seconds_per_evaluation=seconds_eval, seconds_params_write=seconds_write, seconds_per_kernel=seconds_kernel,
        snapshots=len(plan.steps), steps=plan.steps, live_ghosts=[len(plan.live(s)) for s in plan.steps],
        seconds_per_snapshot=per_snapshot, seconds_barriers=barrier_seconds, barriers=counts,
        bytes_per_snapshot=per_bytes, ghost_memory_bytes=plan.max_live() * _replica_bytes(model, optimizer),
        ghost_training_factor=plan.training_factor(), notes=notes,
        kernel_mode=kernel.mode if kernel is not None else None, kernels=kernels,
        seconds_per_cheaper_kernel=seconds_cheaper, cheaper_mode=CHEAPER_MODE if seconds_cheaper is not None else None,
    )
    if console is not False:
        out.print(estimate.table())
        for note in notes:
            out.print(f"· {note}", markup=False, highlight=False)
    return estimate


class _Plan:
    """Snapshots (:func:`~dynprobe.recording.cadence.planned_snapshots`) and ghost lifetimes of a configuration,
    up to ``total_steps``."""

    def __init__(self, snapshots: list[PlannedSnapshot], ghosts: Ghosts | None, total_steps: int) -> None:
        spawns = ghosts.at.steps(total_steps) if ghosts is not None else []
        self.snapshots = snapshots
        self.steps = [p.step for p in snapshots]
        self.total_steps = total_steps
        self.lifetime = ghosts.lifetime_steps if ghosts is not None else None
        self.ghosts: list[tuple[int, int, bool]] = []  # (ghost_id, spawn step, control)
        if spawns and ghosts is not None and ghosts.control:
            self.ghosts.append((0, spawns[0], True))
        for spawn in spawns:
            for _ in range(ghosts.directions if ghosts is not None else 1):
                self.ghosts.append((len(self.ghosts), spawn, False))

    def live(self, step: int) -> list[tuple[int, bool]]:
        return [(ghost_id, control) for ghost_id, spawn, control in self.ghosts
                if spawn <= step and (self.lifetime is None or step - spawn <= self.lifetime)]

    def max_live(self) -> int:
        return max((len(self.live(s)) for s in self.steps), default=0)

    def training_factor(self) -> float:
        """1 + the mean number of live ghosts over the training steps (each repeats the step)."""
        if not self.ghosts:
            return 1.0
        total = 0
        for _, spawn, _ in self.ghosts:
            end = self.total_steps if self.lifetime is None else min(self.total_steps, spawn + self.lifetime)
            total += max(0, end - spawn)
        return 1.0 + total / self.total_steps


def _time_parameter_write(params: list[torch.Tensor], dtype: torch.dtype) -> float:
    with tempfile.TemporaryDirectory(prefix="dynprobe-cost-") as directory:
        started = time.perf_counter()
        flat = torch.cat([p.detach().reshape(-1).to(dtype) for p in params]).cpu().numpy()
        np.save(Path(directory) / "params.npy", flat)
        return time.perf_counter() - started


def _replica_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """A ghost's memory: a copy of the model and of the optimizer state (Adam-like state assumed 2× the parameters
    when the optimizer has not stepped yet, momentum SGD 1×)."""
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    if state:
        return model_bytes + sum(t.numel() * t.element_size() for t in state)
    param_bytes = sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"])
    name = type(optimizer).__name__.lower()
    factor = 2 if "adam" in name else (1 if any(g.get("momentum", 0) for g in optimizer.param_groups) else 0)
    return model_bytes + factor * param_bytes


def _seconds(value: float) -> str:
    if not math.isfinite(value):
        return "?"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


def _bytes(value: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"
