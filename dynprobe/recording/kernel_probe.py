"""The eNTK measured at snapshots: a fixed probe set, one reusable kernel, and when to measure it.

The probe set is drawn once — seeded, class-balanced for class labels (a seeded uniform draw for token or
regression targets), never augmented — so that H(θ_t) is computed on identical inputs at every snapshot (and
for every ghost), which is what makes the kernel distance S (eq. 4 of the two-phase paper) between two snapshots
a change of the kernel alone. It comes from the eval set by default (``KernelConfig(probe_set="eval")``): H then
describes how a gradient step moves the function on held-out examples. The two-phase paper's H is over
training examples (``probe_set="train"`` with ``train_data=``); the two differ by how far the network treats
the examples it was trained on differently from held-out ones.

When: H is measured at every ``every_snapshots``-th scheduled snapshot (a *primary* kernel snapshot). With
``lag_steps=Δ`` every primary kernel snapshot at step t gets a *companion* at t + Δ: the probe takes a kernel
there (an extra snapshot when the schedule has none), so the kernel velocity S(θ_t, θ_{t+Δ}) exists at one
fixed lag — S between snapshots at uneven gaps mostly measures the gap. Companions get no companions of their
own. The rule is :class:`dynprobe.recording.cadence.KernelCadence`.

Token outputs: for a token task ((n, T, V) logits), H is the trace over the positions the task scores in both
samples and the vocabulary (:func:`dynprobe.kernels.empirical_ntk`, ``output_mask``): padded or ignored
positions (label ``ignore_index``, and the last position when the labels are shifted) count nowhere.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from dynprobe._util.evaluation import EvalSet, balanced_subset
from dynprobe._util.inputs import device_of_inputs, index_inputs, inputs_to
from dynprobe._util.tasks import ClassificationTask, TokenTask
from dynprobe.config import KernelConfig
from dynprobe.kernels.engine import NTKEngine
from dynprobe.schedule import Schedule
from dynprobe.store.layout import KERNEL_LAYERS

from .cadence import KernelCadence

__all__ = ["KernelMeasure", "kernel_at_snapshot"]

EngineFactory = Callable[[list[str] | None], NTKEngine]


def kernel_at_snapshot(kernel: KernelMeasure, schedule: Schedule, step: int) -> torch.Tensor | None:
    """H(θ_step) at the snapshot at ``step`` when the kernel cadence asks for one there, else None. A snapshot
    the ``schedule`` did not ask for is a companion-only one, taken for the fixed-lag kernel velocity."""
    due = kernel.snapshot_due(step)
    return kernel.at_snapshot(step, scheduled=step in schedule or not due)


def _scored_positions(task: Any, targets: torch.Tensor) -> torch.Tensor | None:
    """(n, T) mask of the token positions the task scores (None for tasks with one output row per example)."""
    if not isinstance(task, TokenTask):
        return None
    labels = targets != task.ignore_index
    if not task.shift:
        return labels
    mask = torch.zeros_like(labels)
    mask[:, :-1] = labels[:, 1:]  # the logits at t are scored against the label at t + 1
    return mask


class KernelMeasure:
    """H on the run's probe set at snapshots (and for ghosts), with the primary/companion cadence.

    Args:
        config: the :class:`~dynprobe.KernelConfig`.
        model: the user's model (never modified).
        eval_set: the run's eval set (the probe set's source for ``probe_set="eval"``, BatchNorm batches for
            ``bn="recalibrated"``, and the task).
        output_fn: selects the logits from the model's output.
        device: the model's device.
        kernel_factory: builds the kernel function from an engine factory ``make_engine(wrt) -> NTKEngine``; the
            probe passes the sharded kernel of ``dynprobe.distributed`` under torch.distributed. Default: one
            engine over every trainable parameter. The result must be callable ``(params) -> H`` with a
            ``convention`` (and ``per_layer(params)`` for ``KernelConfig(per_layer=True)``).
    """

    def __init__(self, config: KernelConfig, model: nn.Module, eval_set: EvalSet, *,
                 output_fn: Callable[[Any], torch.Tensor], device: torch.device,
                 kernel_factory: Callable[[EngineFactory], Any] | None = None) -> None:
        task = eval_set.task
        config = self.config = config.for_task(task.name)  # mode=None: the task's default mode
        if config.mode == "true_class" and not isinstance(task, ClassificationTask):
            raise ValueError("KernelConfig(mode='true_class') needs class labels (one per example); these targets are "
                             f"{task.name}. Use mode='trace' or 'logit_sum'")
        if config.probe_set == "train":
            probe, self.indices = self._train_examples(config, task)
            inputs, targets = inputs_to(probe.inputs, device), probe.targets
        else:
            if config.n > eval_set.n:
                raise ValueError(
                    f"KernelConfig(n={config.n}) asks for more probe examples than the eval set holds ({eval_set.n}); "
                    f"lower n or give more eval_data (eval_max={eval_set.n} examples were kept)")
            self.indices = balanced_subset(eval_set.targets, config.n, seed=config.seed)
            inputs = inputs_to(index_inputs(eval_set.inputs, self.indices), device)
            targets = eval_set.targets[self.indices]
        mask = _scored_positions(task, targets)
        bn_batches = None
        if config.bn == "recalibrated":
            # Held-out, un-augmented eval inputs: deterministic, and the same at every snapshot.
            bn_batches = [inputs_to(index_inputs(eval_set.inputs, slice(s, s + 256)), device)
                          for s in range(0, eval_set.n, 256)]

        def make_engine(wrt: list[str] | None = None) -> NTKEngine:
            return NTKEngine(
                model, inputs, mode=config.mode, class_index=config.class_index,
                targets=targets.to(device) if config.mode == "true_class" else None, bn=config.bn,
                bn_batches=bn_batches, output_fn=output_fn, max_memory=config.max_memory, wrt=wrt,
                output_mask=None if mask is None else mask.to(device),
            )

        self.engine = make_engine() if kernel_factory is None else kernel_factory(make_engine)
        if config.per_layer and not callable(getattr(self.engine, "per_layer", None)):
            raise ValueError("KernelConfig(per_layer=True) is not available with this kernel engine (it has no "
                             "per_layer()); use per_layer=False")
        self._masked, self._task = mask is not None, task
        self.cadence = KernelCadence.of(config)
        self._record: dict[str, Any] = {}
        self._arrays: dict[str, np.ndarray] = {}

    @staticmethod
    def _train_examples(config: KernelConfig, task: Any) -> tuple[EvalSet, torch.Tensor]:
        """The n drawn training examples (checked by the run's task) and their indices into ``train_data``."""
        data = config.train_data
        if isinstance(data, torch.utils.data.DataLoader):
            source = EvalSet.from_user(data, max_examples=max(16 * config.n, 4096), seed=config.seed, task=task)
            if config.n > source.n:
                raise ValueError(f"KernelConfig(n={config.n}) asks for more probe examples than train_data yielded "
                                 f"({source.n})")
            chosen = balanced_subset(source.targets, config.n, seed=config.seed)
            return (EvalSet(index_inputs(source.inputs, chosen), source.targets[chosen], source.indices[chosen],
                            source.task), source.indices[chosen])
        inputs, targets = data
        targets = torch.as_tensor(targets)
        chosen = balanced_subset(task.check_targets(targets, "KernelConfig(train_data=)").cpu(), config.n,
                                 seed=config.seed)
        subset = (index_inputs(inputs, chosen.to(device_of_inputs(inputs))), targets[chosen.to(targets.device)])
        return EvalSet.from_user(subset, max_examples=config.n, seed=config.seed, task=task), chosen

    # ------------------------------------------------------------------------------------------- cadence
    def snapshot_due(self, step: int) -> bool:
        """Whether a companion-only snapshot is due at ``step`` (one the schedule did not ask for)."""
        return self.cadence.companion_due(step)

    def at_snapshot(self, step: int, *, scheduled: bool = True) -> torch.Tensor | None:
        """H(θ_t) of the model at the snapshot at ``step`` when the cadence (:class:`KernelCadence`) asks for one
        there, else None.

        ``scheduled``: the schedule asked for this snapshot (False for a companion-only snapshot). Keeps the
        per-layer kernels and the snapshot's ``kernel_role`` for :meth:`snapshot_arrays` / :meth:`snapshot_record`.
        """
        role = self.cadence.role(step, scheduled=scheduled)
        self._record = {} if scheduled else {"companion_only": True}
        self._arrays = {}
        if role is None:
            return None
        if self.config.per_layer:
            layers = self.engine.per_layer(None)
            stacked = torch.stack(list(layers.values()))
            kernel = stacked.sum(dim=0)
            self._arrays = {KERNEL_LAYERS: stacked.cpu().numpy()}
        else:
            kernel = self.engine(None)
        self._record["kernel_role"] = role
        return kernel

    def snapshot_record(self) -> dict[str, Any]:
        """Fields for the latest snapshot's record: ``kernel_role`` ("primary"/"companion"), ``companion_only``."""
        return dict(self._record)

    def snapshot_arrays(self) -> dict[str, np.ndarray]:
        """Arrays to store with the latest snapshot: the per-layer kernels ``kernel_layers`` (L, n, n) when
        ``per_layer`` — layers in ``run.layers`` order, summing to the snapshot's kernel."""
        arrays, self._arrays = self._arrays, {}
        return arrays

    def resume(self, snapshots: Iterable[Mapping[str, Any]]) -> None:
        """Continue the cadence of a resumed run from its committed snapshot records."""
        self.cadence.resume(snapshots)

    # ------------------------------------------------------------------------------------------- measuring
    def measure(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """H(θ) on the probe set (float64); ``params``: values by name (a ghost's), None: the model's own."""
        return self.engine(params)

    def convention(self) -> dict[str, Any]:
        config = self.config
        if config.probe_set == "train":
            drawn = ("seeded draw from the training examples given as KernelConfig(train_data=) — the two-phase "
                     "paper's probe set (kernel_probe_indices.npy indexes train_data)")
        else:
            drawn = ("seeded draw from the eval set — held-out examples, unlike the two-phase paper's training "
                     "examples (kernel_probe_indices.npy indexes the eval set)")
        kind = "class-balanced" if isinstance(self._task, ClassificationTask) else "uniform"
        convention = {**self.engine.convention, "every_snapshots": config.every_snapshots, "seed": config.seed,
                      "probe_set": config.probe_set, "probe_set_draw": f"{kind} {drawn}"}
        if config.lag_steps:
            convention["lag_steps"] = config.lag_steps
            convention["companions"] = (f"each primary kernel snapshot at t has a kernel snapshot at t + "
                                        f"{config.lag_steps} (kernel_role 'companion' when added for that)")
        if config.per_layer:
            convention["per_layer"] = ("kernel_layers.npy (L, n, n) per kernel snapshot: H_l of each layer of "
                                       "run.layers (the module owning each parameter), H = Σ_l H_l")
        if self._masked:
            convention["tokens"] = ("trace over the vocabulary and the positions the token task scores in both "
                                    "samples; unscored (ignore_index, padded) positions left out")
        return convention
