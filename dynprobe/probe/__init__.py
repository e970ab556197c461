"""The probe: what attaches to a training loop (:class:`Probe`), how it is assembled, and its fault barrier.

* :mod:`.core` — :class:`Probe`: the hooks, the clock, the snapshot sequence, the lifecycle.
* :mod:`.options` — its options, validated at construction.
* :mod:`.parts` — how the eval set, the run directory and the recorders are built.
* :mod:`.guard` — the fault barrier between the probe's work and the user's loop.
"""
from .core import Probe

__all__ = ["Probe"]
