"""``estimate_cost``: the price of a probe configuration before attaching it (:mod:`dynprobe.recording.cost`),
configured exactly as ``Probe`` is.

It takes every ``Probe`` option (:class:`~dynprobe.probe.options.ProbeOptions`, the one declaration), validated by
the same code, so a configuration ``Probe`` accepts is one ``estimate_cost`` accepts and a mistake fails the same
way. The options that change what a snapshot costs reach the measurement: ``schedule``, ``ghosts``, ``kernel``,
``barriers``, ``eval_max``, ``eval_batch_size``, ``output_fn``, ``task``, ``seed`` (and ``progress``, the line shown
while a slow part is timed). The others do not change the projected cost and are only validated:
``loss_from_output`` (ghost training is not timed), ``resume``/``resume_step`` (the projection is of the whole
schedule), ``durable`` (fsync is not timed), ``record_command``, ``history_memory`` (C rows are not included),
``snapshot_on_close``, ``on_transition``, ``on_snapshot`` and ``errors``.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from rich.console import Console
from torch import nn

from dynprobe.recording.cost import CostEstimate, measure_cost

from .options import ProbeOptions, probe_signature

__all__ = ["estimate_cost"]


def estimate_cost(model: nn.Module, optimizer: torch.optim.Optimizer, eval_data: Any, *, total_steps: int,
                  console: Console | None | bool = None, **options: Any) -> CostEstimate:
    """Time one snapshot of ``model`` and print the projected time and disk per snapshot and for the schedule.

    Takes the arguments ``dynprobe.Probe`` would get (every option, same meanings and defaults; those that do not
    change the cost are validated and ignored: module docstring) plus ``total_steps``, the number of optimizer
    steps you plan. ``console``: where to print (default: stderr; ``False``: do not print). Returns the
    :class:`~dynprobe.recording.cost.CostEstimate`. A measurement that runs longer than two seconds shows a
    progress line (what is being timed, the elapsed time) on that console unless ``progress=False``.
    """
    checked = ProbeOptions.from_keywords({**options, "total_steps": total_steps}, caller="estimate_cost")
    return measure_cost(model, optimizer, eval_data, total_steps=total_steps, schedule=checked.schedule,
                        ghosts=checked.ghosts, kernel=checked.kernel, barriers=checked.barriers,
                        eval_max=checked.eval_max, eval_batch_size=checked.eval_batch_size,
                        output_fn=checked.output_fn, task=checked.task, seed=checked.seed,
                        progress=checked.progress, console=console)


# help() and inspect.signature show every option (the Probe's, generated from ProbeOptions), total_steps required.
_own = inspect.signature(estimate_cost).parameters
estimate_cost.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    *[_own[name] for name in ("model", "optimizer", "eval_data", "total_steps")],
    *[p for p in probe_signature([]).parameters.values() if p.name != "total_steps"], _own["console"]])
