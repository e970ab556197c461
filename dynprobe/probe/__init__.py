"""The probe: what attaches to a training loop (:class:`Probe`), how it is assembled, and its fault barrier.

* :mod:`.core` — :class:`Probe`: the hooks, the clock, the snapshot sequence, the lifecycle.
* :mod:`.options` — its options (:class:`~.options.ProbeOptions`: each declared once), validated at construction.
* :mod:`.assembly` — :func:`~.assembly.assemble`: the parts built from the options, in data-flow order.
* :mod:`.parts` — the checks and single parts the assembly uses (model output, run sink, resume, disk).
* :mod:`.sequence`, :mod:`.transition` — what happens at a snapshot; the online transition estimate.
* :mod:`.guard` — the fault barrier between the probe's work and the user's loop.
"""
from .core import Probe

__all__ = ["Probe"]
