"""The empirical NTK engine (eq. 3 of the two-phase paper): :func:`empirical_ntk` and the reusable
:class:`NTKEngine`. Private modules, in the order a computation uses them: the model call on the probe inputs
(``_calling``), planning — a frozen plan: which layers get structured rules, how the memory budget cuts the work
(``_planning``, ``_chunking``) — and its execution (``_execution``) with the structured per-layer rules
(``_structured``) and the generic path (``_generic``)."""
from .engine import BN_MODES, DEFAULT_MAX_MEMORY, KERNEL_MODES, NTKEngine, empirical_ntk

__all__ = ["BN_MODES", "DEFAULT_MAX_MEMORY", "KERNEL_MODES", "NTKEngine", "empirical_ntk"]
