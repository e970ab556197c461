"""``KernelConfig``: the eNTK on a fixed probe set and the kernel distance S between snapshots (§5 of the
two-phase paper)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["KERNEL_MODES", "KernelConfig"]


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
