"""The probe's options, validated at ``Probe(...)``: every mistake fails there, naming the argument and the fix."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dynprobe._util.checks import check_int
from dynprobe._util.tasks import as_task
from dynprobe.config import Ghosts, KernelConfig
from dynprobe.config.barriers import Barriers
from dynprobe.schedule import Schedule, as_schedule
from dynprobe.store.manifest import CONVENTIONS, GHOST_CONVENTIONS

__all__ = ["ProbeOptions"]

ERROR_POLICIES = ("warn", "raise")


@dataclass(frozen=True)
class ProbeOptions:
    """Everything ``Probe`` is configured with besides the model, optimizer, eval data and run directory.

    Built by ``Probe.__init__`` from its keyword arguments (see :class:`dynprobe.Probe` for their meaning); the
    constructor validates them, and :meth:`to_config` is what the run's manifest records.
    """

    schedule: Schedule
    kernel: KernelConfig | None
    ghosts: Ghosts | None
    loss_from_output: bool | Callable[[Any], torch.Tensor] | None
    total_steps: int | None
    resume: bool
    resume_step: int | None
    eval_max: int
    eval_batch_size: int
    output_fn: Callable[[Any], torch.Tensor] | None
    seed: int
    history_memory: int | None
    snapshot_on_close: bool
    on_transition: Callable[..., None] | None
    on_snapshot: Callable[[dict[str, Any]], None] | None
    errors: str
    barriers: Barriers | None = None  # None: Barriers()
    task: Any = None  # a Task, or None (chosen from the eval targets)
    progress: bool = True
    durable: bool = False

    def __post_init__(self) -> None:
        if self.kernel is not None and not isinstance(self.kernel, KernelConfig):
            raise TypeError(f"kernel must be a dynprobe.KernelConfig(...); got {type(self.kernel).__name__}")
        if self.ghosts is not None and not isinstance(self.ghosts, Ghosts):
            raise TypeError(f"ghosts must be a dynprobe.Ghosts(...) configuration; got {type(self.ghosts).__name__}")
        schedule = as_schedule(self.schedule)
        if self.ghosts is not None:  # a ghost is compared with the main run from its spawn on
            schedule = schedule | self.ghosts.at
        object.__setattr__(self, "schedule", schedule)
        check_int("eval_max", self.eval_max)
        check_int("eval_batch_size", self.eval_batch_size)
        check_int("seed", self.seed, minimum=0)
        if self.history_memory is not None:
            check_int("history_memory", self.history_memory, minimum=0)
        if self.barriers is None:
            object.__setattr__(self, "barriers", Barriers())
        elif not isinstance(self.barriers, Barriers):
            raise TypeError(f"barriers must be a dynprobe.Barriers(...) configuration; got "
                            f"{type(self.barriers).__name__}")
        object.__setattr__(self, "task", as_task(self.task))
        object.__setattr__(self, "progress", bool(self.progress))
        if not isinstance(self.durable, bool):
            raise TypeError(f"durable must be True or False; got {self.durable!r}")
        if self.errors not in ERROR_POLICIES:
            raise ValueError(f"errors must be 'warn' or 'raise'; got {self.errors!r}")
        if not isinstance(self.resume, bool):
            raise TypeError(f"resume must be True or False; got {self.resume!r} (the step goes in resume_step=)")
        if self.resume_step is not None:
            check_int("resume_step", self.resume_step, minimum=0)
            if not self.resume:
                raise ValueError("resume_step= is only meaningful with resume=True")
        if self.total_steps is not None:
            check_int("total_steps", self.total_steps)
            late = [t for t in getattr(getattr(self.ghosts, "at", None), "values", ()) if t > self.total_steps]
            if late:
                raise ValueError(f"Ghosts(at=...) has spawn steps beyond total_steps={self.total_steps}: {late}; "
                                 "they would never spawn. Remove them or raise total_steps")
        for name, what in (("output_fn", "output -> logits"), ("on_transition", "estimate -> None"),
                           ("on_snapshot", "dict -> None")):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be callable ({what}); got {type(value).__name__}")
        loss_from_output = self.loss_from_output
        if loss_from_output is not None and loss_from_output is not True and not callable(loss_from_output):
            raise TypeError("loss_from_output must be True (use output.loss) or a function output -> loss tensor")
        object.__setattr__(self, "snapshot_on_close", bool(self.snapshot_on_close))

    def to_config(self) -> dict[str, Any]:
        """The manifest's ``config``: what a reader needs to interpret the run (callbacks are not recorded)."""
        return {
            "schedule": self.schedule.to_config(),
            "eval_max": self.eval_max,
            "eval_batch_size": self.eval_batch_size,
            "total_steps": self.total_steps,
            "barriers": self.barriers.to_config() if self.barriers is not None else None,
            "seed": self.seed,
            "snapshot_on_close": self.snapshot_on_close,
            "kernel": self.kernel.to_config() if self.kernel is not None else None,
            "ghosts": self.ghosts.to_config() if self.ghosts is not None else None,
        }

    def conventions(self, kernel_convention: dict[str, Any] | None) -> dict[str, Any]:
        """The manifest's ``conventions``: how every stored number is computed."""
        conventions: dict[str, Any] = {**CONVENTIONS, **(GHOST_CONVENTIONS if self.ghosts is not None else {})}
        if kernel_convention is not None:
            conventions["S"] = "eq. (4): 1 - <H_i, H_j>_F / (‖H_i‖_F ‖H_j‖_F), float64"
            conventions["kernel"] = kernel_convention
        return conventions
