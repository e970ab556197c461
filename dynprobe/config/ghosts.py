"""``Ghosts``: perturbed replicas trained in lock-step with the main run (the chaos experiment, §4 of the two-phase
paper)."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dynprobe._util.checks import check_int
from dynprobe.schedule import Schedule, Steps, as_schedule

from .perturbation import Perturbation

__all__ = ["Ghosts"]


@dataclass(frozen=True)
class Ghosts:
    """Ghost replicas: at each spawn step t0, a copy of the model and optimizer perturbed by ε (θ' = θ + ε),
    then trained on exactly the main run's batches, randomness, autocast state and hyper-parameters.

    Args:
        at: spawn steps: a list, or a :class:`dynprobe.schedule.Schedule`.
        directions: perturbed ghosts per spawn step, each with its own direction of ε (default 1). With k ≥ 2 the
            chaos estimate reads the spread of where they end up: a spawn whose directions straddle its threshold
            widens the transition's bracket. Each direction costs one ghost (``estimate_cost`` counts them).
        perturbation: ε; perturbed ghost *i* (in spawn order, directions of one step consecutive) uses
            ``seed = perturbation.seed + i``.
        control: also spawn an ε = 0 ghost at the first spawn step. It must stay bit-identical to the main run;
            the probe checks it against the main model after every step and records any drift (a canary for
            training logic the ghosts cannot see).
        clip_grad_norm: the gradient-norm clipping your loop applies between ``backward()`` and ``step()``; the
            ghosts apply the same. Undeclared gradient edits are detected and warned about.
        clip_grad_value: the same for clipping by value.
        scaler: the ``torch.amp.GradScaler`` your loop uses; each ghost gets its own copy of its state.
        loss_fn: the loss for ghosts when the probe cannot see it through ``probe.watch`` (explicit
            ``probe.step`` calls without a watched loss).
        lifetime_steps: a ghost stops (status ``finished``) this many optimizer steps after its spawn; None: until
            the end.
        kernel_every_snapshots: when the probe measures kernels, S between a ghost and its reference is measured at
            every ``kernel_every_snapshots``-th snapshot of that ghost (its first included) and at the probe's
            ``total_steps`` when given; C, L2, D at every snapshot. Loss barriers between ghosts and the main run
            are configured with :class:`dynprobe.Barriers` (``ghosts=``, ``alphas=``, ``every_snapshots=``).
        save_params: also store each ghost's flat parameters at every snapshot.
        divergence_ratio: a ghost whose ‖θ'‖ exceeds this multiple of the main ‖θ‖ (or whose loss or
            parameters become non-finite) is marked ``diverged`` and stops.
        vectorize: ``False`` (default): sequential deep copies, compared with the main model itself (bit-exact
            reference: the ε = 0 control checks your training step). ``True``: the ghosts train as one
            ``torch.func.vmap`` stack that also holds an ε = 0 shadow of the main run, and are compared with that
            shadow (vmapped kernels differ from plain ones in the last bits, so the shadow drifts from your run; the
            drift is recorded next to the ghost signal, with a warning when it exceeds the smallest ghost
            separation); faster on a GPU with several ghosts. A model that cannot run under vmap, or a ``scaler``,
            is an error here. ``"auto"``: the stack only when a timed trial step shows it clearly faster.
    """

    at: Any = (0, 100, 1000)
    perturbation: Perturbation = field(default_factory=Perturbation)
    directions: int = 1
    control: bool = True
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    scaler: Any = None
    loss_fn: Callable[..., Any] | None = None
    save_params: bool = False
    divergence_ratio: float = 1e3
    vectorize: bool | str = False
    lifetime_steps: int | None = None
    kernel_every_snapshots: int = 1

    def __post_init__(self) -> None:
        at = self.at
        if isinstance(at, (int, float)) and not isinstance(at, bool):
            at = [int(at)]
        if not isinstance(at, Schedule):
            if isinstance(at, (str, bytes)) or not isinstance(at, Iterable):
                raise TypeError(f"Ghosts(at=) must be a list of spawn steps or a Schedule; got {at!r}")
            at = as_schedule(list(at), argument="Ghosts(at=)")
        if isinstance(at, Steps) and not at.values:
            raise ValueError("Ghosts(at=[]) spawns no ghost: give the spawn steps (e.g. at=[0, 100, 1000]), or pass "
                             "ghosts=None to run without ghosts")
        object.__setattr__(self, "at", at)
        if not isinstance(self.perturbation, Perturbation):
            raise TypeError("Ghosts(perturbation=) must be a dynprobe.Perturbation, e.g. "
                            "Perturbation(norm=1e-7, kind='l2')")
        for name in ("clip_grad_norm", "clip_grad_value"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not value > 0 or math.isinf(value)):
                raise ValueError(f"Ghosts({name}=) must be a positive number or None; got {value!r}")
        if self.scaler is not None and not all(hasattr(self.scaler, a) for a in ("get_scale", "state_dict")):
            raise TypeError("Ghosts(scaler=) must be the torch.amp.GradScaler your loop uses")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError("Ghosts(loss_fn=) must be callable")
        check_int("Ghosts(directions=)", self.directions)
        if self.lifetime_steps is not None:
            check_int("Ghosts(lifetime_steps=)", self.lifetime_steps)
        check_int("Ghosts(kernel_every_snapshots=)", self.kernel_every_snapshots)
        if not self.divergence_ratio > 1:
            raise ValueError(f"Ghosts(divergence_ratio=) must be > 1; got {self.divergence_ratio!r}")
        if self.vectorize not in (True, False, "auto"):
            raise ValueError(f"Ghosts(vectorize=) must be True, False or 'auto'; got {self.vectorize!r}")

    def to_config(self) -> dict[str, Any]:
        return {
            "at": self.at.to_config(),
            "perturbation": {"norm": self.perturbation.norm, "kind": self.perturbation.kind,
                             "seed": self.perturbation.seed},
            "directions": self.directions,
            "control": self.control,
            "clip_grad_norm": self.clip_grad_norm,
            "clip_grad_value": self.clip_grad_value,
            "scaler": self.scaler is not None,
            "lifetime_steps": self.lifetime_steps,
            "kernel_every_snapshots": self.kernel_every_snapshots,
            "save_params": self.save_params,
            "divergence_ratio": self.divergence_ratio,
            "vectorize": self.vectorize,
        }
