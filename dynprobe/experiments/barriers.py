"""Loss barriers between stored snapshots of a run, computed offline (the pairs the probe did not measure)."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from rich.progress import Progress
from torch import nn

from dynprobe._util.evaluation import default_output_fn
from dynprobe.metrics.barrier import loss_barrier
from dynprobe.store.files import load_snapshot_state
from dynprobe.store.records import append_barrier, read_barriers
from dynprobe.store.run import Run, load_run

from ._eval_set import run_eval_set

__all__ = ["fill_barriers"]


def fill_barriers(
    run: Any,
    model: nn.Module,
    eval_data: Any,
    *,
    pairs: str | Iterable[tuple[int, int]] = "all",
    alphas: int = 30,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    batch_size: int = 512,
    max_pairs: int | None = None,
    progress: bool = True,
) -> int:
    """Compute loss barriers between snapshots of a run that do not have one yet; returns how many it added.

    Args:
        run: a :class:`dynprobe.Run` or a run directory.
        model: a model of the run's architecture (its own parameters are not used).
        eval_data: the run's eval data, as given to the probe (``(inputs, targets)`` or a DataLoader): the
            examples the run evaluated on (``run.eval_indices``) are taken from it.
        pairs: ``"all"`` (every pair of snapshots), ``"consecutive"``, ``"to_init"`` (each snapshot with step 0's),
            or an explicit list of ``(step_i, step_j)``.
        alphas: α grid size on [0, 1] (the paper's author used 30).
        max_pairs: stop after this many new pairs (a budget).
        progress: show a rich progress bar.
    """
    run = run if isinstance(run, Run) else load_run(os.fspath(run))
    steps = [int(s) for s in run.steps]
    if isinstance(pairs, str):
        if pairs == "all":
            wanted = [(steps[i], steps[j]) for i in range(len(steps)) for j in range(i)]
        elif pairs == "consecutive":
            wanted = [(steps[i], steps[i - 1]) for i in range(1, len(steps))]
        elif pairs == "to_init":
            wanted = [(s, steps[0]) for s in steps[1:]]
        else:
            raise ValueError("pairs must be 'all', 'consecutive', 'to_init' or a list of (step_i, step_j); "
                             f"got {pairs!r}")
    else:
        wanted = [(int(a), int(b)) for a, b in pairs]
        unknown = sorted({s for pair in wanted for s in pair} - set(steps))
        if unknown:
            raise ValueError(f"pairs refer to steps that are not snapshots of this run: {unknown[:5]}")
    done = {(r["i"], r["j"]) for r in read_barriers(run.path)} | {(r["j"], r["i"]) for r in
                                                                       read_barriers(run.path)}
    todo = [p for p in wanted if p not in done and p[0] != p[1]]
    if max_pairs is not None:
        todo = todo[:max_pairs]
    eval_set = run_eval_set(run, eval_data)
    output_fn = output_fn or default_output_fn
    states: dict[int, dict[str, torch.Tensor]] = {}

    def state(step: int) -> dict[str, torch.Tensor]:
        if step not in states:
            if len(states) > 16:  # bounded memory: keep a handful of snapshots' states
                states.pop(next(iter(states)))
            states[step] = load_snapshot_state(run.path, run.manifest, step)
        return states[step]

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"loss barriers ({alphas} α)", total=len(todo))
        for step_i, step_j in todo:
            result = loss_barrier(model, state(step_i), state(step_j), (eval_set.inputs, eval_set.targets),
                                  alphas=alphas, task=eval_set.task, output_fn=output_fn, batch_size=batch_size)
            append_barrier(run.path, step_i, step_j, result)
            bar.advance(task)
    return len(todo)
