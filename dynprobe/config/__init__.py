"""User-facing configuration objects of the probe, validated when they are built (frozen dataclasses whose
``to_config()`` the probe stores in the run manifest).

* :class:`Ghosts` and :class:`Perturbation` — the chaos experiment (§4 of the two-phase paper).
* :class:`KernelConfig` — the eNTK on a fixed probe set and the kernel distance S (§5).
* :class:`Barriers` — which loss barriers (eq. 5 and the linear reference) are measured online, within a budget.
* :class:`ClassificationTask`, :class:`TokenTask`, :class:`RegressionTask` — what the eval targets are
  (``Probe(task=...)``; chosen from the targets by default).
"""
from dynprobe._util.tasks import ClassificationTask, RegressionTask, TokenTask

from .barriers import Barriers
from .ghosts import Ghosts
from .kernel import KERNEL_MODES, KernelConfig
from .perturbation import KINDS, Perturbation

__all__ = [
    "KERNEL_MODES", "KINDS", "Barriers", "ClassificationTask", "Ghosts", "KernelConfig", "Perturbation",
    "RegressionTask", "TokenTask",
]
