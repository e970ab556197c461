"""The ghosts' per-step values, kept on the device and read in batches: no host synchronisation on a plain step.

After every training step the ghost set keeps, as device tensors (:class:`StepValues`): each ghost's separation
l2 (:mod:`.separation`), the faults only the device can see (a non-finite loss: :attr:`Fault.when
<dynprobe.ghosts.trainer.Fault>`), and the ε = 0 control's max |Δ| per tensor to its reference. They are read with
one transfer (:func:`dynprobe._util.transfers.read_together`) at the next snapshot, ghost spawn, status change or
close, and at the latest every :data:`READ_EVERY` steps, then replayed in step order (:meth:`PendingReadings.read`),
so the run records exactly what a read after every step would have recorded:

- a ghost stops at the first step one of its faults happened, with that step in its ``ghost_status`` record; its
  separation log ends at the step before (as it always did) and nothing of the steps it trained after that is
  recorded. Until the read it trains on — on non-finite values, at most ``READ_EVERY`` − 1 extra steps — and such a
  step never raises into the user's loop (its exceptions are ignored once the ghost is known to have stopped);
- the control's drift is recorded at the first step it differed, with the differences of that step.

Only where these records land in ``events.jsonl`` changes: up to ``READ_EVERY`` steps later, always before the next
snapshot's.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from dynprobe._util.transfers import read_together

from .replica import differing
from .trainer import Fault

__all__ = ["READ_EVERY", "PendingReadings", "StepReading", "StepValues"]

# Steps between two reads of the ghosts' per-step values when nothing else (a snapshot, a spawn, a status change)
# reads them: one host synchronisation per READ_EVERY plain steps, and a diverged ghost trains at most
# READ_EVERY − 1 steps too many (unrecorded).
READ_EVERY = 16


@dataclass
class StepValues:
    """What one step (or a spawn) left on the device: faults that happened if their flag is true (in precedence
    order), separations by ghost, and the control's max |Δ| per tensor (``drift``: reference, names, values)."""

    step: int
    faults: list[tuple[int, Fault]] = field(default_factory=list)
    separations: dict[int, torch.Tensor] = field(default_factory=dict)
    control: int | None = None
    drift: tuple[str, list[str], torch.Tensor] | None = None


@dataclass
class StepReading:
    """One :class:`StepValues` read on the host: the faults that happened, the separations (float64), and the
    control's differing tensors ``{name: max |Δ|}`` (empty when bitwise equal)."""

    step: int
    faults: list[tuple[int, Fault]]
    separations: dict[int, float]
    control: int | None
    reference: str | None
    drifted: dict[str, float]


class PendingReadings:
    """The :class:`StepValues` not read yet, in step order. ``prepare``: called with them just before they are
    read (the FSDP2 trainer sums every rank's values there, in one all-reduce: its values are per-rank until then).
    """

    def __init__(self, prepare: Callable[[list[StepValues]], None] | None = None) -> None:
        self.prepare = prepare
        self._values: list[StepValues] = []

    def __len__(self) -> int:
        return len(self._values)

    def add(self, values: StepValues) -> None:
        self._values.append(values)

    @property
    def due(self) -> bool:
        """Whether :data:`READ_EVERY` steps are waiting."""
        return len(self._values) >= READ_EVERY

    def read(self) -> Iterator[StepReading]:
        """Every pending step read on the host (one transfer for all of them), oldest first; empties the queue."""
        pending, self._values = self._values, []
        if self.prepare is not None:
            self.prepare(pending)
        tensors: list[torch.Tensor] = []
        for values in pending:
            tensors += [fault.when for _, fault in values.faults]
            tensors += list(values.separations.values())
            if values.drift is not None:
                tensors.append(values.drift[2])
        numbers = iter(read_together(tensors))
        readings = []
        for values in pending:
            faults = [(ghost_id, fault) for ghost_id, fault in values.faults if next(numbers)[0] != 0]
            separations = {ghost_id: float(next(numbers)[0]) for ghost_id in values.separations}
            reference, drifted = None, {}
            if values.drift is not None:
                reference, names, _ = values.drift
                drifted = differing(names, next(numbers).tolist())
            readings.append(StepReading(values.step, faults, separations, values.control, reference, drifted))
        return iter(readings)
