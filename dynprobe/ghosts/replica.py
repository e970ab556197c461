"""One ghost replica and every step that all ghost trainers share (sequential, vectorized, distributed).

A replica is a deep copy of the model and of the optimizer (``deepcopy(optimizer, memo={id(p_main): p_ghost})``:
the user's optimizer class, its hyper-parameters and a copy of its state — rebuilding it from
``type(opt)(groups, **defaults)`` fails for AdamW). One lock-step update of a replica, whoever drives it:

1. :func:`sync_hyperparameters` — copy the main optimizer's *current* per-group hyper-parameters (learning rate,
   momentum, betas: whatever a scheduler changed);
2. :func:`replay_gradients` — replay the captured micro-batches (:mod:`dynprobe.capture`) with their RNG and
   autocast states, accumulating the gradients the main run accumulated;
3. :func:`match_grad_presence` — a zero gradient where the main parameter has one and the replica none;
4. :func:`step_optimizer` — the declared clipping, then the optimizer (or GradScaler) step.

The status rules (:func:`losses_finite`, :func:`lifetime_reached`), the control-drift comparison
(:func:`tensor_differences`, :func:`likely_drift_causes`) and the separation l2 (:func:`separation`) live here too,
so that no trainer restates them. The per-step ones (:func:`losses_finite`, :func:`separation`) return device
tensors and never synchronize: the ghost set reads them in batches (:mod:`dynprobe.ghosts.readings`).
"""
from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dynprobe._util.modules import max_abs_differences
from dynprobe.capture.loss_state import module_memo
from dynprobe.capture.step import MicroBatch, replay_micro_batch

from .loss_replay import LossReplay

__all__ = [
    "Replica",
    "NONDETERMINISTIC_CAUSE",
    "check_optimizer_for_ghosts",
    "deterministic_replay_possible",
    "differing",
    "group_by_scale",
    "lifetime_reached",
    "likely_drift_causes",
    "losses_finite",
    "match_grad_presence",
    "named_tensors",
    "replay_gradients",
    "separation",
    "step_optimizer",
    "sync_hyperparameters",
    "tensor_differences",
    "train_replica",
]


@dataclass
class Replica:
    """A deep copy of the model and its optimizer; ``params`` are its trainable parameters in ``vec(θ)`` order.
    ``loss_fn`` is the replica's own copy of the watched loss (:mod:`dynprobe.ghosts.loss_replay`), ``memo`` maps the
    main model's modules, parameters and buffers to the replica's (for a loss copied later)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]
    scaler: Any = None
    loss_fn: Any = None
    memo: dict[int, Any] = field(default_factory=dict)

    @classmethod
    def clone(cls, model: nn.Module, optimizer: torch.optim.Optimizer, no_copy: Mapping[int, Any],
              scaler: Any = None, loss: LossReplay | None = None) -> Replica:
        """Deep copies of ``model`` (parameters, buffers, submodule flags) and ``optimizer`` bound to the copy.

        ``no_copy`` maps ids of objects that must be shared, not copied (the probe and its hooks' owners), to
        themselves. ``Optimizer.__getstate__`` drops the optimizer's hooks, so the copy never fires the probe's
        hooks. ``scaler`` (a GradScaler) is deep-copied as well: each replica makes its own skip decisions.
        ``loss``: the run's loss replay; the replica gets its own copy of the loss in its state now (references to
        the model in the loss point to the replica's model in the copy).
        """
        memo = dict(no_copy)
        ghost_model = copy.deepcopy(model, memo)
        mapping = {id(p): g for p, g in zip(model.parameters(), ghost_model.parameters())}
        outside = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in mapping]
        if outside:
            raise ValueError(
                f"ghosts need an optimizer over the model's parameters only; this optimizer also holds "
                f"{len(outside)} tensors that are not parameters of the model (e.g. a learnable loss parameter)"
            )
        ghost_optimizer = copy.deepcopy(optimizer, {**no_copy, **mapping})
        params = [p for p in ghost_model.parameters() if p.requires_grad]
        memo = module_memo(model, ghost_model)
        return cls(ghost_model, ghost_optimizer, params, copy.deepcopy(scaler) if scaler is not None else None,
                   loss.copy_now(memo) if loss is not None else None, memo)

    def loss_for(self, replay: LossReplay) -> Any:
        """The replica's copy of the loss; a replica spawned before the loss was known copies it as it was before
        any call (the step-0 spawn precedes ``probe.watch``)."""
        if self.loss_fn is None and replay.loss_fn is not None:
            self.loss_fn = replay.copy_initial(self.memo)
        return self.loss_fn


def check_optimizer_for_ghosts(optimizer: torch.optim.Optimizer) -> None:
    """Refuse optimizers whose ``step`` needs a closure (L-BFGS): their step re-evaluates the loss several times
    through user code the probe never sees, so a ghost cannot replay it."""
    parameter = inspect.signature(type(optimizer).step).parameters.get("closure")
    needs_closure = parameter is not None and parameter.default is inspect.Parameter.empty
    if needs_closure or isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError(
            f"ghosts cannot follow {type(optimizer).__name__}: its step(closure) re-evaluates the loss through your "
            "closure, which the probe cannot capture or replay on a replica. Use ghosts=None with this optimizer "
            "(the probe still records the trajectory), or an optimizer whose step() takes no closure"
        )


def sync_hyperparameters(main: torch.optim.Optimizer, replica: torch.optim.Optimizer) -> None:
    """Copy every non-parameter entry of each main param group (lr, momentum, betas: whatever a scheduler set).

    Schedulers (StepLR, cosine, OneCycleLR's momentum cycling, ...) edit the main param groups; copying every
    entry makes a replica follow any of them without knowing which.
    """
    for main_group, group in zip(main.param_groups, replica.param_groups):
        for key, value in main_group.items():
            if key != "params":
                group[key] = value


def match_grad_presence(main_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> None:
    """Give ``params[k]`` a zero gradient where ``main_params[k]`` has a gradient and it has none.

    ``zero_grad(set_to_none=False)`` leaves zero gradients on parameters the loss does not reach; optimizers treat a
    zero gradient (weight decay, momentum) differently from None, so the replica mirrors the main run. Works for
    stacked ``[R, *shape]`` tensors too (every row gets the zero gradient).
    """
    for main_p, p in zip(main_params, params):
        if main_p.grad is not None and p.grad is None:
            p.grad = torch.zeros_like(p)


def replay_gradients(replica: Replica, micro_batches: Iterable[MicroBatch], replay: LossReplay) -> list[torch.Tensor]:
    """Zero the replica's gradients and replay ``micro_batches`` on it (forward and backward, each with its recorded
    RNG and autocast states); returns the detached losses. The caller restores the main RNG stream afterwards."""
    replica.optimizer.zero_grad(set_to_none=True)
    scale_loss = replica.scaler.scale if replica.scaler is not None else None
    loss_fn = replica.loss_for(replay)
    return [replay_micro_batch(replica.model, micro, loss_fn=loss_fn, loss_from_output=replay.loss_from_output,
                               scale_loss=scale_loss) for micro in micro_batches]


def step_optimizer(replica: Replica, *, clip_grad_norm: float | None, clip_grad_value: float | None) -> None:
    """The declared clipping (after unscaling, with a GradScaler), then the optimizer step (through the scaler)."""
    if replica.scaler is not None and (clip_grad_norm or clip_grad_value):
        replica.scaler.unscale_(replica.optimizer)
    if clip_grad_norm:
        torch.nn.utils.clip_grad_norm_(replica.params, clip_grad_norm)
    if clip_grad_value:
        torch.nn.utils.clip_grad_value_(replica.params, clip_grad_value)
    if replica.scaler is not None:
        replica.scaler.step(replica.optimizer)
        replica.scaler.update()
    else:
        replica.optimizer.step()


def train_replica(replica: Replica, groups: list[list[MicroBatch]], main_optimizer: torch.optim.Optimizer,
                  main_params: Sequence[torch.Tensor], replay: LossReplay, *, clip_grad_norm: float | None,
                  clip_grad_value: float | None) -> list[torch.Tensor]:
    """One main optimizer step of a replica in a single process (each group is one main iteration: several only
    when GradScaler skipped steps, see :func:`group_by_scale`); returns the detached losses."""
    sync_hyperparameters(main_optimizer, replica.optimizer)
    losses: list[torch.Tensor] = []
    for group in groups:
        losses += replay_gradients(replica, group, replay)
        match_grad_presence(main_params, replica.params)
        step_optimizer(replica, clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value)
    return losses


# ---------------------------------------------------------------------------------------------- status rules


def losses_finite(losses: Sequence[torch.Tensor]) -> torch.Tensor:
    """Whether every replayed loss is finite: a 0-d bool tensor on the losses' device (no synchronisation)."""
    if not losses:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.cat([loss.detach().reshape(-1).float() for loss in losses])).all()


def lifetime_reached(spawn_step: int, step: int, lifetime_steps: int | None) -> bool:
    """A ghost stops (``finished``) once it has trained ``lifetime_steps`` steps since its spawn."""
    return lifetime_steps is not None and step - spawn_step >= lifetime_steps


# ---------------------------------------------------------------------------------------------- comparisons


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, detached (what ``state_dict()`` holds, without its hooks and overhead)."""
    return {name: t.detach() for name, t in list(model.named_parameters()) + list(model.named_buffers())
            if t is not None}


def tensor_differences(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]
                       ) -> tuple[list[str], torch.Tensor]:
    """The names of ``reference`` and :func:`dynprobe._util.modules.max_abs_differences` of each tensor to the one of
    the same name in ``other`` (float64, on the device; 0 where bitwise equal). No synchronisation.

    Raises ``KeyError`` naming the tensors that only one side has (a model whose layout changed)."""
    missing = sorted(set(reference) ^ set(other))
    if missing:
        raise KeyError(f"tensors present on one side only: {missing[:5]}")
    names = list(reference)
    return names, max_abs_differences([reference[n] for n in names], [other[n] for n in names])


def differing(names: Sequence[str], differences: Sequence[float]) -> dict[str, float]:
    """``{name: max |Δ|}`` of the tensors that are not bitwise equal (a difference that is not 0, NaN included),
    from values read on the host."""
    return {name: float(value) for name, value in zip(names, differences) if not value == 0}


def separation(params: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖θ' − θ_ref‖₂ over all tensors, a 0-d float64 tensor on the device (no synchronisation): differences in the
    parameters' dtype (exact while θ' and θ_ref are within a factor 2 of each other, by Sterbenz's lemma; one
    rounding otherwise), squares summed in float64."""
    if not params:
        return torch.zeros((), dtype=torch.float64)
    differences = torch._foreach_sub([p.detach() for p in params], [r.detach() for r in reference])
    norms = torch._foreach_norm(differences, 2, dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


NONDETERMINISTIC_CAUSE = ("nondeterministic GPU kernels: cuDNN and cuBLAS choose algorithms by timing and some "
                          "backward kernels reduce with atomics, so a replay of your step differs in the last bits. "
                          "Call torch.use_deterministic_algorithms(True), set CUBLAS_WORKSPACE_CONFIG=:4096:8 before "
                          "CUDA starts and torch.backends.cudnn.benchmark = False")


def deterministic_replay_possible(device: torch.device) -> bool:
    """Whether a replay on ``device`` can be bitwise exact: always on the CPU; on CUDA only under
    ``torch.use_deterministic_algorithms(True)`` (read when asked: the user may set it after attaching)."""
    return device.type != "cuda" or torch.are_deterministic_algorithms_enabled()


def likely_drift_causes(*, grad_edit_detected: bool, compiled: bool, nondeterministic: bool = False) -> list[str]:
    """Why an ε = 0 control ghost may drift from the main run, most likely first."""
    causes = [NONDETERMINISTIC_CAUSE] if nondeterministic else []
    if compiled:
        causes.append("the model is compiled (torch.compile): fused kernels round differently from the eager "
                      "replay, and compiled dropout draws its own random numbers")
    if grad_edit_detected:
        causes.append("gradients edited between backward() and step() (declare Ghosts(clip_grad_norm=...))")
    causes += ["a loss term outside the watched loss", "randomness the probe cannot replay (a global "
               "torch.Generator, numpy/python RNG in forward)", "parameter edits outside the optimizer",
               "several models or optimizers"]
    if not compiled:
        causes.append("a compiled submodule or function (torch.compile) inside the forward")
    return causes


def group_by_scale(micro_batches: list[MicroBatch]) -> list[list[MicroBatch]]:
    """Split a step's micro-batches into main iterations by GradScaler scale.

    A skipped iteration (inf/NaN gradients) fires no optimizer hook, so its micro-batches arrive together with the
    next step's; GradScaler backs its scale off after every skip, so consecutive groups of equal scale are the
    iterations. The ghosts replay each with their own scaler, which decides for itself.
    """
    groups: list[list[MicroBatch]] = []
    for micro in micro_batches:
        if groups and groups[-1][0].scale == micro.scale:
            groups[-1].append(micro)
        else:
            groups.append([micro])
    return groups
