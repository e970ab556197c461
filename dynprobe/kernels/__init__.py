"""The empirical NTK engine (eq. 3 of the two-phase paper): :func:`empirical_ntk` and the reusable
:class:`NTKEngine`. Private modules: planning (which layers get structured rules), chunking (memory budget),
structured per-layer rules, the generic ``torch.func`` path, and the execution of a plan."""
from .engine import BN_MODES, DEFAULT_MAX_MEMORY, KERNEL_MODES, NTKEngine, empirical_ntk

__all__ = ["BN_MODES", "DEFAULT_MAX_MEMORY", "KERNEL_MODES", "NTKEngine", "empirical_ntk"]
