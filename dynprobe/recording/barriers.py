"""Loss barriers between snapshots of one trajectory: a budget online, the rest offline.

B (eq. 5) costs one evaluation of the eval set per α, so a full T×T map is out of reach online. The probe
computes, after each snapshot, the barrier to the ``k`` preceding snapshots (``Probe(trajectory_barriers=k)``);
:func:`dynprobe.fill_barriers` computes any other pairs afterwards, with a progress bar. Both append to
``metrics/B.jsonl`` (one JSON line per pair, with its conventions); ``run.B`` assembles the matrix.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynprobe._util.evaluation import EvalSet
from dynprobe.metrics.barrier import loss_barrier
from dynprobe.store.files import load_snapshot_state
from dynprobe.store.records import append_barrier

__all__ = ["TrajectoryBarriers"]


class TrajectoryBarriers:
    """The online budget: after snapshot t_i, B(t_i, t_{i−1}), …, B(t_i, t_{i−k})."""

    def __init__(self, root: Path, manifest: dict[str, Any], model: nn.Module, eval_set: EvalSet, *, per_snapshot: int,
                 alphas: int, output_fn: Callable[[Any], torch.Tensor], batch_size: int) -> None:
        self.root, self.manifest, self.model, self.eval_set = Path(root), manifest, model, eval_set
        self.per_snapshot, self.alphas = per_snapshot, alphas
        self.output_fn, self.batch_size = output_fn, batch_size

    def after_commit(self, steps: list[int], current_state: dict[str, torch.Tensor]) -> None:
        """``steps``: the committed snapshot steps, the newest last."""
        newest = steps[-1]
        for older in reversed(steps[-1 - self.per_snapshot : -1]):
            older_state = load_snapshot_state(self.root, self.manifest, older)
            result = loss_barrier(self.model, current_state, older_state, (self.eval_set.inputs, self.eval_set.targets),
                                  alphas=self.alphas, output_fn=self.output_fn, batch_size=self.batch_size)
            append_barrier(self.root, newest, older, result)
