"""User-facing configuration objects of the probe, validated when they are built.

* :class:`Ghosts` — perturbed replicas trained in lock-step (the chaos experiment, the paper's §4).
* :class:`KernelConfig` — the eNTK on a fixed probe set and the kernel distance S (the paper's §5).

Both are frozen dataclasses: the probe stores their ``to_config()`` in the run manifest.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dynprobe.schedule import Schedule, as_schedule

__all__ = ["KINDS", "Ghosts", "KernelConfig", "Perturbation"]

KINDS = ("l2", "per_coord", "relative", "ulp", "single_coord")


@dataclass(frozen=True)
class Perturbation:
    """How to perturb a ghost at its spawn step: θ' = θ + ε over all perturbed tensors.

    ``norm`` means, per ``kind``:

    * ``"l2"`` (default; the paper's reading, used for reproductions): ε = norm · z / ‖z‖₂ with z standard
      Gaussian over all perturbed coordinates, so ‖ε‖₂ = norm.
    * ``"per_coord"``: ε_i = norm · z_i, i.e. the per-coordinate standard deviation (‖ε‖₂ ≈ norm · √P).
    * ``"relative"``: a Gaussian direction scaled to ‖ε‖₂ = norm · ‖θ‖₂ (θ over all perturbed tensors).
    * ``"ulp"``: every coordinate moves by exactly ``norm`` units in the last place of its own dtype, each with
      a random sign (``torch.nextafter`` applied ``norm`` times; zeros move to ±``norm`` smallest subnormals).
      ``norm`` must be a whole number. This is the smallest dense perturbation that survives float rounding
      everywhere, and its size is known exactly (in float32, 1 ulp per coordinate of a ResNet-20 is ‖δ‖ ≈ 4e-6).
    * ``"single_coord"``: ``norm`` is added to one coordinate chosen uniformly at random among all perturbed
      coordinates (cf. Summers & Dinneen 2021, one-bit changes to one weight).

    ``norm=0`` is the ε = 0 control for every kind: the tensors are left bitwise unchanged. ``seed`` seeds the
    private generator that draws the direction, signs or coordinate.
    """

    norm: float = 1e-7
    kind: str = "l2"
    seed: int = 0

    def __post_init__(self) -> None:
        norm, kind, seed = self.norm, self.kind, self.seed
        if kind not in KINDS:
            raise ValueError(f"Perturbation kind must be one of {KINDS!r}; got {kind!r}")
        if isinstance(norm, bool) or not isinstance(norm, numbers.Real):
            raise TypeError(f"Perturbation norm must be a real number; got {norm!r}")
        if math.isnan(norm) or math.isinf(norm) or norm < 0:
            raise ValueError(f"Perturbation norm must be finite and >= 0 (0 is the control ghost); got {norm!r}")
        if kind == "ulp" and not float(norm).is_integer():
            raise ValueError(
                f"Perturbation kind='ulp' takes norm as a whole number of units in the last place (1, 2, ...); "
                f"got {norm!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
            raise ValueError(f"Perturbation seed must be an integer in [0, 2**64); got {seed!r}")
        object.__setattr__(self, "norm", float(norm))
        object.__setattr__(self, "seed", int(seed))



@dataclass(frozen=True)
class Ghosts:
    """Ghost replicas: at each spawn step t0, a copy of the model and optimizer perturbed by ε (θ' = θ + ε),
    then trained on exactly the main run's batches, randomness, autocast state and hyper-parameters.

    Args:
        at: spawn steps: a list, or a :class:`dynprobe.schedule.Schedule`. One perturbed ghost per step.
        perturbation: ε; ghost *i* (in spawn order) uses ``seed = perturbation.seed + i``.
        control: also spawn an ε = 0 ghost at the first spawn step. It must stay bit-identical to the main run;
            the probe checks it against the main model after every step and records any drift (a canary for
            training logic the ghosts cannot see).
        clip_grad_norm, clip_grad_value: gradient clipping your loop applies between ``backward()`` and
            ``step()``; the ghosts apply the same. Undeclared gradient edits are detected and warned about.
        scaler: the ``torch.amp.GradScaler`` your loop uses; each ghost gets its own copy of its state.
        loss_fn: the loss for ghosts when the probe cannot see it through ``probe.watch`` (explicit
            ``probe.step`` calls without a watched loss).
        barrier: compute the loss barrier B (eq. 5) between main and ghost, on the probe's eval set with
            ``barrier_alphas`` points on [0, 1].
        costly_every: the costly comparisons — B, and S when the probe measures kernels — are made at every
            ``costly_every``-th snapshot of a ghost (its first included) and at the probe's ``total_steps`` when
            given (so the chaos maps' last column is complete); C, L2 and D at every snapshot.
        lifetime: a ghost stops (status ``finished``) this many steps after its spawn; None: until the end.
        save_params: also store each ghost's flat parameters at every snapshot.
        divergence_ratio: a ghost whose ‖θ'‖ exceeds this multiple of the main ‖θ‖ (or whose loss or
            parameters become non-finite) is marked ``diverged`` and stops.
        vectorize: ``False``: sequential deep copies, compared with the main model itself (bit-exact
            reference). ``True``: the ghosts train as one ``torch.func.vmap`` stack that also holds an ε = 0
            shadow of the main run, and are compared with that shadow (vmapped kernels can differ from plain ones
            in the last bits); a model that cannot run under vmap, or a ``scaler``, is an error here.
            ``"auto"`` (default): sequential unless a timed trial step of both paths shows the stack clearly
            faster (measured at the first step with ghosts, and again whenever twice as many are live); GradScaler,
            undeclared gradient edits and non-elementwise optimizers stay sequential. The choice is recorded
            (``ghost_mode`` events and manifest entry).
    """

    at: Any = (0, 100, 1000)
    perturbation: Perturbation = field(default_factory=Perturbation)
    control: bool = True
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    scaler: Any = None
    loss_fn: Callable[..., Any] | None = None
    barrier: bool = True
    barrier_alphas: int = 30
    costly_every: int = 1
    lifetime: int | None = None
    save_params: bool = False
    divergence_ratio: float = 1e3
    vectorize: bool | str = "auto"

    def __post_init__(self) -> None:
        at = self.at
        if isinstance(at, (int, float)) and not isinstance(at, bool):
            at = [int(at)]
        if not isinstance(at, Schedule):
            if isinstance(at, (str, bytes)) or not isinstance(at, Iterable):
                raise TypeError(f"Ghosts(at=) must be a list of spawn steps or a Schedule; got {at!r}")
            at = as_schedule(list(at), argument="Ghosts(at=)")
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
        if isinstance(self.barrier_alphas, bool) or not isinstance(self.barrier_alphas, int) or self.barrier_alphas < 2:
            raise ValueError(f"Ghosts(barrier_alphas=) must be an int >= 2; got {self.barrier_alphas!r}")
        if isinstance(self.costly_every, bool) or not isinstance(self.costly_every, int) or self.costly_every < 1:
            raise ValueError(f"Ghosts(costly_every=) must be an int >= 1; got {self.costly_every!r}")
        if self.lifetime is not None and (not isinstance(self.lifetime, int) or self.lifetime < 1):
            raise ValueError(f"Ghosts(lifetime=) must be a positive int or None; got {self.lifetime!r}")
        if not self.divergence_ratio > 1:
            raise ValueError(f"Ghosts(divergence_ratio=) must be > 1; got {self.divergence_ratio!r}")
        if self.vectorize not in (True, False, "auto"):
            raise ValueError(f"Ghosts(vectorize=) must be True, False or 'auto'; got {self.vectorize!r}")

    def spawn_steps(self, until: int) -> list[int]:
        return self.at.steps(until)

    def to_config(self) -> dict[str, Any]:
        return {
            "at": self.at.to_config(),
            "perturbation": {"norm": self.perturbation.norm, "kind": self.perturbation.kind,
                             "seed": self.perturbation.seed},
            "control": self.control,
            "clip_grad_norm": self.clip_grad_norm,
            "clip_grad_value": self.clip_grad_value,
            "scaler": self.scaler is not None,
            "barrier": self.barrier,
            "barrier_alphas": self.barrier_alphas,
            "costly_every": self.costly_every,
            "lifetime": self.lifetime,
            "save_params": self.save_params,
            "divergence_ratio": self.divergence_ratio,
            "vectorize": self.vectorize,
        }


KERNEL_MODES = ("trace", "logit_sum", "full", "single", "true_class")


@dataclass(frozen=True)
class KernelConfig:
    """The empirical NTK H(θ_t) on a fixed probe set, and the kernel distance S (eq. 4) between snapshots.

    Args:
        n: probe-set size, drawn (seeded, class-balanced) from the eval set; identical at every snapshot.
        mode: output reduction (``"trace"``: Σ_k J_k J_kᵀ, the default; ``"logit_sum"``; ``"full"``;
            ``"single"`` with ``class_index``; ``"true_class"``). See :func:`dynprobe.empirical_ntk`.
        seed: seeds the probe-set draw.
        every: measure H at every ``every``-th snapshot (S is NaN in between).
        bn: ``"eval"`` (running statistics; per-sample Jacobians need it) or ``"recalibrated"``.
        max_memory: bytes of extra memory the eNTK computation may use (None: the engine's default, ~1 GB).
        class_index: the logit for ``mode="single"``.
    """

    n: int = 128
    mode: str = "trace"
    seed: int = 0
    every: int = 1
    bn: str = "eval"
    max_memory: int | None = None
    class_index: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 2:
            raise ValueError(f"KernelConfig(n=) must be an int >= 2; got {self.n!r}")
        if self.mode not in KERNEL_MODES:
            raise ValueError(f"KernelConfig(mode=) must be one of {KERNEL_MODES}; got {self.mode!r}")
        if self.mode == "single" and self.class_index is None:
            raise ValueError("KernelConfig(mode='single') needs class_index= (the logit to differentiate)")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"KernelConfig(every=) must be an int >= 1; got {self.every!r}")
        if self.bn not in ("eval", "recalibrated"):
            raise ValueError(f"KernelConfig(bn=) must be 'eval' or 'recalibrated'; got {self.bn!r}")
        if self.max_memory is not None and (not isinstance(self.max_memory, int) or self.max_memory <= 0):
            raise ValueError(f"KernelConfig(max_memory=) must be a positive number of bytes; got {self.max_memory!r}")

    def to_config(self) -> dict[str, Any]:
        return {"n": self.n, "mode": self.mode, "seed": self.seed, "every": self.every, "bn": self.bn,
                "max_memory": self.max_memory, "class_index": self.class_index}
