"""``KernelConfig``: the eNTK on a fixed probe set and the kernel distance S between snapshots (§5 of the
two-phase paper)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from dynprobe._util.checks import check_int
from dynprobe.schedule import Schedule

__all__ = ["DEFAULT_MODES", "KERNEL_MODES", "PROBE_SETS", "KernelConfig", "default_lag_steps"]


KERNEL_MODES = ("trace", "logit_sum", "full", "single", "true_class")
PROBE_SETS = ("eval", "train")
# mode=None: the task's default. "trace" costs one backward pass per output coordinate (C for labels, but T·V for
# tokens and every output coordinate for regression: 8.3 s per kernel against 0.01 s for "logit_sum" on a small
# LM), so outputs with many coordinates default to "logit_sum", one backward pass per example.
DEFAULT_MODES = {"classification": "trace", "tokens": "logit_sum", "regression": "logit_sum"}
# Without total_steps the lag is read off the schedule's spacing over the first LAG_HORIZON steps.
LAG_HORIZON = 10_000


def default_lag_steps(schedule: Schedule, total_steps: int | None) -> int:
    """The kernel-velocity lag Δ of ``KernelConfig(lag_steps=None)``: the schedule's coarsest spacing, at most an
    eighth of the run, at least 2 steps.

    The coarsest spacing (the largest gap between consecutive scheduled steps up to ``total_steps``, or up to
    ``LAG_HORIZON`` when the length is unknown) is the linear tail of a log-then-linear schedule: there every
    companion at t + Δ falls on a scheduled snapshot and costs nothing extra. At most ``total_steps // 8`` keeps
    the lag short against the run, so the velocity S(t, t + Δ) has pairs across its whole length. Never 1: a
    log-spaced start has many 1-step gaps, and a lag read off those exists only at its first few steps.
    """
    horizon = total_steps if total_steps is not None else LAG_HORIZON
    steps = schedule.steps(horizon)
    spacing = max(later - earlier for earlier, later in zip(steps, steps[1:])) if len(steps) >= 2 else horizon
    if total_steps is not None:
        spacing = min(spacing, total_steps // 8)
    return max(spacing, 2)


def _positive_int(name: str, value: Any, minimum: int, fix: str) -> None:
    check_int(f"KernelConfig({name}=)", value, minimum=minimum, hint=fix)


@dataclass(frozen=True)
class KernelConfig:
    """The empirical NTK H(θ_t) on a fixed probe set, and the kernel distance S (eq. 4) between snapshots.

    Args:
        n: probe-set size, drawn once (seeded; class-balanced for class labels, uniform otherwise); the same
            inputs at every snapshot, which is what makes S between two snapshots a change of the kernel only.
        mode: output reduction (``"trace"``: Σ_k J_k J_kᵀ; ``"logit_sum"``: J_Σ J_Σᵀ of the summed outputs;
            ``"full"``; ``"single"`` with ``class_index``, also written ``"single:k"``; ``"true_class"``). See
            :func:`dynprobe.empirical_ntk`. None (default): the task's :data:`DEFAULT_MODES` entry — ``"trace"``
            for class labels, ``"logit_sum"`` for tokens and regression, whose ``"trace"`` costs one backward
            pass per output coordinate (T·V per example for tokens). The run records the mode used.
        seed: seeds the probe-set draw.
        every_snapshots: measure H at every ``every_snapshots``-th scheduled snapshot (S is NaN in between).
        bn: ``"eval"`` (running statistics; per-sample Jacobians need it) or ``"recalibrated"``.
        max_memory: bytes of extra memory the eNTK computation may use (None: the engine's default, 1 GiB).
        class_index: the logit for ``mode="single"``.
        per_layer: also store each layer's share H_l of H = Σ_l H_l (a layer: the module owning a parameter
            tensor), read back as ``run.kernel_layers(step=...)`` and ``run.S_layers``.
        lag_steps: Δ > 0: after every kernel snapshot at step t the probe takes a companion kernel snapshot at
            t + Δ unless one is there anyway, so that the kernel velocity S(θ_t, θ_{t+Δ}) exists at a fixed lag.
            Companions get no companions of their own. None (default): the probe chooses Δ from its schedule
            and ``total_steps`` (:func:`default_lag_steps`) and records it. 0: no companions (the velocity is
            then read at the most common gap between kernel snapshots, where pairs exist).
        probe_set: ``"eval"`` (default): the probe set is drawn from the eval set; ``"train"``: from
            ``train_data``. The two-phase paper's H is over training examples; on held-out examples H
            describes how learning moves the function where it is evaluated.
        train_data: ``(inputs, targets)`` training examples (or a DataLoader of them) for ``probe_set="train"``;
            only the n drawn examples are kept.
        chosen: the settings the probe filled in (``"mode"``, ``"lag_steps"``) by :meth:`for_task` and
            :meth:`with_default_lag`; recorded so that ``dynprobe show`` can say which values were defaults.
    """

    n: int = 128
    mode: str | None = None
    seed: int = 0
    every_snapshots: int = 1
    bn: str = "eval"
    max_memory: int | None = None
    class_index: int | None = None
    per_layer: bool = False
    lag_steps: int | None = None
    probe_set: str = "eval"
    train_data: Any = field(default=None, repr=False, compare=False)
    chosen: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        _positive_int("n", self.n, 2, "The probe set needs at least 2 examples for a kernel between them.")
        self._parse_mode()
        _positive_int("every_snapshots", self.every_snapshots, 1, "1 measures H at every snapshot.")
        if self.bn not in ("eval", "recalibrated"):
            hint = " (train-mode BatchNorm mixes the samples of a batch)" if self.bn == "train" else ""
            raise ValueError(f"KernelConfig(bn=) must be 'eval' or 'recalibrated'; got {self.bn!r}{hint}")
        if self.max_memory is not None:
            _positive_int("max_memory", self.max_memory, 1, "Give a number of bytes, or None for 1 GiB.")
        if not isinstance(self.per_layer, bool):
            raise TypeError(f"KernelConfig(per_layer=) must be True or False; got {self.per_layer!r}")
        if self.lag_steps is not None:
            _positive_int("lag_steps", self.lag_steps, 0, "Give the lag Δ in optimizer steps, None to let the "
                          "probe choose it, or 0 for no companion snapshots.")
        self._check_probe_set()

    def for_task(self, task: str) -> KernelConfig:
        """This configuration with ``mode=None`` replaced by the default of ``task`` (a :data:`DEFAULT_MODES`
        name); unchanged when the mode is given."""
        if self.mode is not None:
            return self
        return replace(self, mode=DEFAULT_MODES[task], chosen=(*self.chosen, "mode"))

    def with_default_lag(self, schedule: Schedule, total_steps: int | None) -> KernelConfig:
        """This configuration with ``lag_steps=None`` replaced by :func:`default_lag_steps`; unchanged when the lag
        is given."""
        if self.lag_steps is not None:
            return self
        return replace(self, lag_steps=default_lag_steps(schedule, total_steps), chosen=(*self.chosen, "lag_steps"))

    def _parse_mode(self) -> None:
        mode = self.mode
        if mode is None:  # the task's default, never "single"
            if self.class_index is not None:
                raise ValueError("KernelConfig(class_index=) is only used with mode='single'; got mode=None (the "
                                 "task's default). Drop class_index or write mode='single:k'")
            return
        if not isinstance(mode, str):
            raise TypeError(f"KernelConfig(mode=) must be a string, one of {KERNEL_MODES} or 'single:k'; got "
                            f"{type(mode).__name__}")
        if mode.startswith("single:"):
            text = mode.split(":", 1)[1].strip()
            if not text.lstrip("-").isdigit():
                raise ValueError(f"KernelConfig(mode={mode!r}): 'single:k' needs an integer logit index k, "
                                 "e.g. mode='single:3'")
            if self.class_index is not None and self.class_index != int(text):
                raise ValueError(f"KernelConfig(mode={mode!r}, class_index={self.class_index!r}) disagree; give the "
                                 "index once")
            object.__setattr__(self, "mode", "single")
            object.__setattr__(self, "class_index", int(text))
        elif mode not in KERNEL_MODES:
            raise ValueError(f"KernelConfig(mode=) must be one of {KERNEL_MODES} or 'single:k'; got {mode!r}")
        if self.mode == "single":
            if self.class_index is None:
                raise ValueError("KernelConfig(mode='single') needs the logit to differentiate: class_index=k, or "
                                 "write mode='single:k'")
            check_int("KernelConfig(class_index=)", self.class_index, minimum=0)
        elif self.class_index is not None:
            raise ValueError(f"KernelConfig(class_index=) is only used with mode='single'; got mode={self.mode!r}. "
                             "Drop class_index or write mode='single:k'")

    def _check_probe_set(self) -> None:
        if self.probe_set not in PROBE_SETS:
            raise ValueError(f"KernelConfig(probe_set=) must be 'eval' or 'train'; got {self.probe_set!r}")
        if self.probe_set == "eval":
            if self.train_data is not None:
                raise ValueError("KernelConfig(train_data=) is only used with probe_set='train'; drop it or add "
                                 "probe_set='train'")
            return
        data = self.train_data
        if data is None:
            raise ValueError("KernelConfig(probe_set='train') needs train_data=(inputs, targets): the training "
                             "examples to draw the probe set from (the probe keeps only the n it draws)")
        if isinstance(data, torch.utils.data.DataLoader):
            return
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise TypeError("KernelConfig(train_data=) must be (inputs, targets) — inputs a tensor or a dict of "
                            f"tensors — or a DataLoader of such pairs; got {type(data).__name__}")
        inputs, targets = data
        if isinstance(inputs, Mapping):
            sizes = {int(v.shape[0]) for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim()}
        elif isinstance(inputs, torch.Tensor) and inputs.dim():
            sizes = {int(inputs.shape[0])}
        else:
            raise TypeError("KernelConfig(train_data=) inputs must be a tensor or a dict of tensors; got "
                            f"{type(inputs).__name__}")
        count = int(torch.as_tensor(targets).shape[0]) if torch.as_tensor(targets).dim() else 0
        if len(sizes) != 1 or count not in sizes:
            raise ValueError(f"KernelConfig(train_data=) inputs and targets must have the same first dimension; got "
                             f"inputs {sorted(sizes)} and {count} targets")
        if count < self.n:
            raise ValueError(f"KernelConfig(n={self.n}) asks for more probe examples than train_data holds ({count}); "
                             "lower n or give more training examples")

    def to_config(self) -> dict[str, Any]:
        """The JSON-able settings (the manifest's record; ``train_data`` is described, not stored)."""
        return {"n": self.n, "mode": self.mode, "seed": self.seed, "every_snapshots": self.every_snapshots,
                "bn": self.bn, "max_memory": self.max_memory, "class_index": self.class_index,
                "per_layer": self.per_layer, "lag_steps": self.lag_steps, "probe_set": self.probe_set,
                "chosen": list(self.chosen)}
