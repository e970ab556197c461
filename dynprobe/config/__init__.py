"""User-facing configuration objects of the probe, validated when they are built (frozen dataclasses whose
``to_config()`` the probe stores in the run manifest).

* :class:`Ghosts` and :class:`Perturbation` — the chaos experiment (§4 of the two-phase paper).
* :class:`KernelConfig` — the eNTK on a fixed probe set and the kernel distance S (§5).
"""
from .ghosts import Ghosts
from .kernel import KERNEL_MODES, KernelConfig
from .perturbation import KINDS, Perturbation

__all__ = ["KERNEL_MODES", "KINDS", "Ghosts", "KernelConfig", "Perturbation"]
