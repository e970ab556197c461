"""The :class:`GhostTrainer` interface: how ghost replicas are held, trained in lock-step and compared.

:class:`dynprobe.ghosts.ghost_set.GhostSet` owns the ghosts' identities, spawn schedule, statuses and records; a
trainer owns their replicas. Implementations: :class:`dynprobe.ghosts.sequential.SequentialTrainer` (deep copies,
compared with the main model itself), :class:`dynprobe.ghosts.vectorized.VectorizedTrainer` (one ``vmap`` stack
with an ε = 0 shadow, for ``Ghosts(vectorize=True | "auto")``), and the DDP trainer in :mod:`dynprobe.distributed`
(deep copies whose gradients are averaged across ranks). The set picks between the first two in one place
(:func:`dynprobe.ghosts.ghost_set.choose_trainer`); the DDP trainer is handed to the set by whoever wires the probe.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from dynprobe.capture.step import MicroBatch
from dynprobe.config import Ghosts

from .loss_replay import LossReplay
from .perturbation import Perturbation, PerturbationReport
from .replica import Replica

__all__ = ["Fault", "Ghost", "GhostTrainer", "MainSnapshot", "Reference", "TrainerContext"]


@dataclass
class Ghost:
    """One ghost: its identity and status. ``replica`` holds its model and optimizer while a trainer keeps it as a
    deep copy (None for a row of a vectorized stack, and once it stopped)."""

    ghost_id: int
    spawn_step: int
    control: bool
    report: PerturbationReport
    status: str = "alive"
    comparisons: int = 0
    replica: Replica | None = None

    @property
    def alive(self) -> bool:
        return self.status == "alive"


@dataclass(frozen=True)
class Fault:
    """A ghost that must stop after a training step: ``status`` is ``"failed"`` or ``"diverged"``.

    ``when`` is None for a fault known on the host now (an exception); otherwise a 0-d bool device tensor: the
    fault happened at this step if it is true. Such flags (non-finite losses) are read later, in one batch with the
    other per-step values (:mod:`dynprobe.ghosts.readings`), and the ghost stops at the step they name.
    """

    status: str
    reason: str
    traceback: str | None = None
    error: BaseException | None = None  # re-raised after the status is recorded, under errors="raise"
    when: torch.Tensor | None = None


@dataclass
class MainSnapshot:
    """The main run at a snapshot, as plain values: flat θ (storage dtype), eval predictions, H(θ) when measured,
    parameters and buffers by name, and the whole evaluation (loss and accuracy too) when known."""

    step: int
    params: torch.Tensor
    preds: torch.Tensor
    kernel: torch.Tensor | None
    state: Mapping[str, torch.Tensor]
    evaluation: Any = None  # dynprobe._util.evaluation.EvalResult


@dataclass
class Reference:
    """What the ghosts are compared with at a snapshot: the main run itself (``name="main"``) or the ε = 0 shadow of a
    vectorized stack (``"shadow"``, with ``drift``: how far it is from the main run)."""

    name: str
    params: torch.Tensor
    preds: torch.Tensor
    kernel: torch.Tensor | None
    state: Mapping[str, torch.Tensor]
    drift: dict[str, Any] | None = None
    evaluation: Any = None  # its EvalResult: reused for a ghost whose parameters and buffers equal it bit for bit


@dataclass
class TrainerContext:
    """What every trainer needs from the main run (shared, read at each use: the probe sets ``replay`` late)."""

    config: Ghosts
    model: nn.Module
    optimizer: torch.optim.Optimizer
    main_params: list[torch.Tensor]
    no_copy: dict[int, Any]
    replay: LossReplay
    device: torch.device
    storage_dtype: torch.dtype
    raise_errors: bool
    evaluate: Callable[[nn.Module], Any]  # model -> EvalResult on the probe's eval set
    sample_inputs: Callable[[], Any]  # a few eval inputs (vmap check)
    output_fn: Callable[[Any], torch.Tensor]
    on_mode: Callable[..., None]  # (mode, step, reason, *, warn=False, **fields): record a mode decision
    disagreement: Callable[[Any, Any], float]  # the eval task's D between two prediction vectors
    grad_edit_detected: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class GhostTrainer(Protocol):
    """Holds the replicas of the live ghosts and advances them; never writes to the run (the set does).

    ``comparer`` compares one ghost with its reference at a snapshot, with the arguments of
    :func:`dynprobe.ghosts.comparison.compare_ghost` (that function, or the sharded form under FSDP2). A trainer
    whose per-step values are per-rank until read (FSDP2) also has ``prepare_readings(pending)``, which the ghost
    set's :class:`~dynprobe.ghosts.readings.PendingReadings` calls before each read."""

    comparer: Callable[..., Any]

    @property
    def mode(self) -> str | None:
        """``"sequential"`` or ``"vectorized"``; None while ``vectorize="auto"`` has not decided."""

    def spawn(self, ghost: Ghost, perturbation: Perturbation) -> PerturbationReport:
        """Create ``ghost``'s replica from the reference now (the main run, or the shadow) and perturb it."""

    def train_step(self, ghosts: list[Ghost], micro_batches: list[MicroBatch], step: int
                   ) -> list[tuple[int, Fault]]:
        """One main optimizer step of every ghost in ``ghosts``, without a host synchronisation; the faults
        ``(ghost id, fault)`` that may stop them, in precedence order (a ghost stops at its first fault that
        happened: an exception now, or a device flag read later)."""

    def release(self, ghost: Ghost) -> None:
        """``ghost`` stopped: free its replica."""

    def separations(self, ghosts: list[Ghost]) -> dict[int, torch.Tensor]:
        """‖θ' − θ_ref‖₂ of each ghost to its reference, now: 0-d float64 device tensors (no synchronisation)."""

    def control_drift(self, control: Ghost) -> tuple[str, list[str], torch.Tensor] | None:
        """The control's reference (``"main"`` or ``"shadow"``), the names of the parameters and buffers, and
        max |Δ| per tensor between the ε = 0 control and its reference now (a float64 device vector, 0 where
        bitwise equal: :func:`dynprobe._util.modules.max_abs_differences`; no synchronisation). None: not
        comparable in this process."""

    def reference(self, main: MainSnapshot, *, kernel_of: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None
                  ) -> Reference:
        """The reference of the comparisons at this snapshot (``kernel_of`` given: its kernel is needed)."""

    def module_of(self, ghost: Ghost) -> tuple[nn.Module, list[torch.Tensor]]:
        """A module holding ``ghost``'s parameters and buffers, and its trainable parameters (valid until the next
        call of any trainer method)."""

    def state_of(self, ghost: Ghost) -> dict[str, torch.Tensor]:
        """``ghost``'s parameters and buffers by name (tensors that stay valid until its next training step)."""

    def reference_state(self) -> dict[str, torch.Tensor]:
        """The reference's parameters and buffers by name, now (the main model's, or the shadow's)."""
