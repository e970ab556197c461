"""The probe's options: one declaration each — field, default, validation, meaning and manifest record.

``Probe(model, optimizer, eval_data=..., out=..., **options)`` takes these fields as keyword arguments (its
signature is generated from them) and the framework callbacks check their keyword arguments against them; the
option table of docs/reference/probe.md is tested against the fields and defaults (tests/test_docs.py). Every
mistake fails at ``Probe(...)``, naming the argument and the fix.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from dynprobe._util.checks import check_int
from dynprobe._util.tasks import as_task
from dynprobe.config import Ghosts, KernelConfig
from dynprobe.config.barriers import Barriers
from dynprobe.recording.cadence import snapshot_schedule
from dynprobe.schedule import Schedule
from dynprobe.store.manifest import CONVENTIONS, GHOST_CONVENTIONS

__all__ = ["ERROR_POLICIES", "ProbeOptions", "option_names", "probe_signature"]

ERROR_POLICIES = ("warn", "raise")


@dataclass(frozen=True)
class ProbeOptions:
    """Everything a :class:`dynprobe.Probe` is configured with besides the model, the optimizer, ``eval_data`` and
    ``out``; validated and normalized when built (``schedule`` becomes a Schedule that includes the ghosts' spawn
    steps, ``barriers`` a :class:`dynprobe.Barriers`, ``task`` a task object).

    Args:
        schedule: when to snapshot: a :class:`dynprobe.schedule.Schedule`, an int k (every k steps) or a list
            of steps. Default (None): ``log_spaced(until=1000) | every(250)``.
        kernel: a :class:`dynprobe.KernelConfig` to measure the eNTK H(θ_t) on a fixed probe set at snapshots
            and the kernel distance S (eq. 4) between them (off by default).
        ghosts: a :class:`dynprobe.Ghosts` to run the chaos experiment (off by default).
        loss_from_output: for models that compute their own loss (Hugging Face style), instead of ``watch``:
            ``True`` (``output.loss``) or a function output → loss tensor. Needed by ghosts only.
        total_steps: the number of optimizer steps you plan (optional): ghost spawn steps beyond it are an
            error at construction instead of ghosts that silently never spawn.
        resume: continue the run in ``out`` after restoring your own checkpoint. When the run has a snapshot at
            the step training restarts from, the model's parameters must equal it (else a clear error).
        resume_step: with ``resume``, the step your training restarts from (default: the run's last snapshot);
            later snapshots are discarded.
        eval_max: at most this many eval examples.
        eval_batch_size: batch size of snapshot evaluations.
        output_fn: selects the ``(N, num_classes)`` logits from the model's output (default: the output itself,
            ``output.logits`` or ``output["logits"]``).
        seed: seeds the eval subsample; never the global RNG.
        barriers: the loss barriers (eq. 5 and the linear reference) computed online and their time budget, a
            :class:`dynprobe.Barriers` (default ``Barriers()``).
        task: ``"classification"``, ``"tokens"``, ``"regression"`` or a task object (default: from the eval targets).
        progress: a progress line on stderr while a snapshot takes more than ~2 s.
        durable: ``fsync`` every file and its directory at each commit point, so a power loss cannot lose a
            committed snapshot (a kill of the process never can); it costs far more than a snapshot's own writes
            on most filesystems, hence off by default.
        record_command: record the process's command line (``sys.argv``) in ``run.json``, with the values of
            options named like ``*key*``, ``*token*``, ``*secret*``, ``*password*`` replaced by ``***``. Off by
            default: a run directory is shared, and command lines carry credentials.
        history_memory: bytes of earlier parameter vectors kept on the model's device to compute C rows in
            O(T) per snapshot; older vectors are streamed back from ``out`` (default: a quarter of the free memory).
        snapshot_on_close: also snapshot the final step at ``close()`` if the schedule did not.
        on_transition: called once, with a :class:`dynprobe.analysis.TransitionEstimate`, when the online
            estimate of the chaotic-to-stable transition becomes confident (see
            :class:`dynprobe.analysis.TransitionDetector`) — e.g. to start weight averaging. The estimate is
            recorded in the run's events either way. The callback runs after the optimizer step, outside the
            probe's fault guard: its exceptions are yours.
        on_snapshot: called after each committed snapshot (step 0 included) with a dict: the snapshot's record
            (``step``, ``eval_loss``, ``eval_accuracy``, ``train_loss``, ``C_prev``, ``D_prev``, ``S_prev``, ...;
            the learning rates are ``run.lr``, read from ``out``), ``rows`` (the new row M[k, 0..k] of each interval
            matrix, numpy), ``steps`` (every snapshot's step), ``transition`` (the online estimate or None),
            ``kernel_lag_steps`` and ``out``. For scalar exporters (:mod:`dynprobe.exporters`); it runs inside the
            probe's fault guard.
        errors: ``"warn"``: an internal error during training — including the run directory's disk filling up or
            turning read-only — is recorded in the run where possible, reported once, and the probe detaches
            itself so the user's training goes on; ``"raise"``: re-raise it.
    """

    schedule: Schedule | int | Iterable[int] | None = None
    kernel: KernelConfig | None = None
    ghosts: Ghosts | None = None
    loss_from_output: bool | Callable[[Any], torch.Tensor] | None = None
    total_steps: int | None = None
    resume: bool = False
    resume_step: int | None = None
    eval_max: int = 2000
    eval_batch_size: int = 256
    output_fn: Callable[[Any], torch.Tensor] | None = None
    seed: int = 0
    barriers: Barriers | None = None
    task: Any = None
    progress: bool = True
    durable: bool = False
    record_command: bool = False
    history_memory: int | None = None
    snapshot_on_close: bool = True
    on_transition: Callable[..., None] | None = None
    on_snapshot: Callable[[dict[str, Any]], None] | None = None
    errors: str = "warn"

    @classmethod
    def from_keywords(cls, options: dict[str, Any], *, caller: str = "Probe") -> ProbeOptions:
        """The options from ``caller``'s keyword arguments; an unknown name is a ``TypeError`` listing the
        accepted ones (a typo fails at construction, not after a long setup)."""
        unknown = sorted(set(options) - set(option_names()))
        if unknown:
            raise TypeError(f"{caller}() got unknown option(s) {unknown}; the options are: "
                            f"{', '.join(option_names())}")
        return cls(**options)

    def __post_init__(self) -> None:
        if self.kernel is not None and not isinstance(self.kernel, KernelConfig):
            raise TypeError(f"kernel must be a dynprobe.KernelConfig(...); got {type(self.kernel).__name__}")
        if self.ghosts is not None and not isinstance(self.ghosts, Ghosts):
            raise TypeError(f"ghosts must be a dynprobe.Ghosts(...) configuration; got {type(self.ghosts).__name__}")
        object.__setattr__(self, "schedule", snapshot_schedule(self.schedule, self.ghosts))
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
        if not isinstance(self.record_command, bool):
            raise TypeError(f"record_command must be True or False; got {self.record_command!r}")
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

    def with_kernel_defaults(self, task: str) -> ProbeOptions:
        """These options with the kernel's defaults filled in for the run: the ``task``'s mode and the lag chosen
        from the schedule and ``total_steps`` (:meth:`dynprobe.KernelConfig.for_task`, ``with_default_lag``).
        The schedule already holds the ghosts' spawn steps, so it is carried over as it is."""
        if self.kernel is None:
            return self
        kernel = self.kernel.for_task(task).with_default_lag(self.schedule, self.total_steps)
        resolved = copy.copy(self)
        object.__setattr__(resolved, "kernel", kernel)
        return resolved

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


def option_names() -> tuple[str, ...]:
    """The names of the probe's options (the fields of :class:`ProbeOptions`), in declaration order."""
    return tuple(f.name for f in dataclasses.fields(ProbeOptions))


def probe_signature(required: Iterable[inspect.Parameter]) -> inspect.Signature:
    """``Probe``'s signature: the ``required`` parameters, then every option as a keyword argument with its
    default (what ``help(dynprobe.Probe)`` and ``inspect.signature`` show)."""
    options = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in dataclasses.fields(ProbeOptions)]
    return inspect.Signature([*required, *options])
