"""Every param group's learning rate at every optimizer step, stored where it changes (``run.lr`` expands it).

The probe's optimizer post-step hook calls :meth:`LearningRateLog.note` with the step the update started from
(t, for the update θ_t → θ_t+1) while the param groups still hold the rate that update used (schedulers step after
the optimizer). Rates are Python numbers or CPU tensors, so reading them never waits for an accelerator; a rate
held as an accelerator tensor (capturable optimizers) is not read per step and is left unrecorded. Pairs are
appended to ``lr/group_NNN.f8`` at each snapshot and at close: one at every change, and one at the last step so
the reader knows how far a constant rate lasted.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynprobe.store.layout import lr_path
from dynprobe.store.rows import PairLog

__all__ = ["LearningRateLog"]


def _rate(value: Any) -> float:
    """A param group's ``lr`` as a float, NaN when it cannot be read without waiting for a device."""
    if isinstance(value, torch.Tensor):
        return float(value) if value.device.type == "cpu" and value.numel() == 1 else float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


class LearningRateLog:
    """The rates of each param group at every step, buffered until :meth:`flush`.

    Args:
        root: the run directory, or None where nothing is written (DDP ranks other than 0).
    """

    def __init__(self, root: Path | None) -> None:
        self.root = None if root is None else Path(root)
        self._last: list[float] = []
        self._last_step: int | None = None
        self._pending: dict[int, list[tuple[int, float]]] = {}

    def note(self, step: int, param_groups: Sequence[dict[str, Any]]) -> None:
        """The update from θ_step used these groups' rates."""
        rates = [_rate(group.get("lr")) for group in param_groups]
        for group, rate in enumerate(rates):
            previous = self._last[group] if group < len(self._last) else None
            if previous is None or not (rate == previous or (rate != rate and previous != previous)):
                self._pending.setdefault(group, []).append((step, rate))
        self._last, self._last_step = rates, step

    def flush(self) -> None:
        """Append the changes since the last flush, and the current rate at the last step, to the logs."""
        if self._last_step is None:
            return
        for group, rate in enumerate(self._last):
            pairs = self._pending.setdefault(group, [])
            if not pairs or pairs[-1][0] != self._last_step:
                pairs.append((self._last_step, rate))
        pending, self._pending = self._pending, {}
        if self.root is None:
            return
        for group, pairs in pending.items():
            steps, rates = np.array(pairs, dtype=np.float64).reshape(-1, 2).T
            path = lr_path(self.root, group)
            path.parent.mkdir(exist_ok=True)
            PairLog(path).append(steps, rates)
