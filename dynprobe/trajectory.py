"""Loss barriers between snapshots of one trajectory: a budget online, the rest offline.

B (eq. 5) costs one evaluation of the eval set per α, so a full T×T map is out of reach online. The probe
computes, after each snapshot, the barrier to the ``k`` preceding snapshots (``Probe(trajectory_barriers=k)``);
:func:`fill_barriers` computes any other pairs afterwards, with a progress bar. Both append to
``metrics/B.jsonl`` (one JSON line per pair, with its conventions); ``run.B`` assembles the matrix.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .barrier import loss_barrier
from .evaluation import EvalSet, default_output_fn
from .store import METRICS, append_jsonl, load_snapshot_state, read_jsonl

__all__ = ["TrajectoryBarriers", "fill_barriers", "read_barrier_pairs"]

BARRIERS_FILE = "B.jsonl"


def read_barrier_pairs(root: Path) -> list[dict[str, Any]]:
    """Every barrier record of a run (``{"i": step_i, "j": step_j, "value": B, ...}``)."""
    return read_jsonl(Path(root) / METRICS / BARRIERS_FILE)


def _barrier_record(step_i: int, step_j: int, result: Any) -> dict[str, Any]:
    return {"i": int(step_i), "j": int(step_j), "value": float(result), "argmax_alpha": float(result.argmax_alpha),
            "alphas": len(result.alphas), "metric": result.metric}


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
            append_jsonl(self.root / METRICS / BARRIERS_FILE, _barrier_record(newest, older, result))


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
    from .run import Run, load_run

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
            raise ValueError(f"pairs must be 'all', 'consecutive', 'to_init' or a list of (step_i, step_j); got {pairs!r}")
    else:
        wanted = [(int(a), int(b)) for a, b in pairs]
        unknown = sorted({s for pair in wanted for s in pair} - set(steps))
        if unknown:
            raise ValueError(f"pairs refer to steps that are not snapshots of this run: {unknown[:5]}")
    done = {(r["i"], r["j"]) for r in read_barrier_pairs(run.path)} | {(r["j"], r["i"]) for r in
                                                                       read_barrier_pairs(run.path)}
    todo = [p for p in wanted if p not in done and p[0] != p[1]]
    if max_pairs is not None:
        todo = todo[:max_pairs]
    eval_set = _run_eval_set(run, eval_data)
    output_fn = output_fn or default_output_fn
    states: dict[int, dict[str, torch.Tensor]] = {}

    def state(step: int) -> dict[str, torch.Tensor]:
        if step not in states:
            if len(states) > 16:  # bounded memory: keep a handful of snapshots' states
                states.pop(next(iter(states)))
            states[step] = load_snapshot_state(run.path, run.manifest, step)
        return states[step]

    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"loss barriers ({alphas} α)", total=len(todo))
        for step_i, step_j in todo:
            result = loss_barrier(model, state(step_i), state(step_j), (eval_set.inputs, eval_set.targets),
                                  alphas=alphas, output_fn=output_fn, batch_size=batch_size)
            append_jsonl(run.path / METRICS / BARRIERS_FILE, _barrier_record(step_i, step_j, result))
            bar.advance(task)
    return len(todo)


def _run_eval_set(run: Any, eval_data: Any) -> EvalSet:
    from .manifest import eval_fingerprint

    full = EvalSet.from_user(eval_data, max_examples=10**12, seed=0)
    indices = torch.as_tensor(run.eval_indices)
    if int(indices.max()) >= full.n:
        raise ValueError(f"eval_data has {full.n} examples but the run evaluated example {int(indices.max())}; pass the "
                         "eval data the probe was given")
    from .evaluation import index_inputs

    subset = EvalSet(index_inputs(full.inputs, indices), full.targets[indices], indices)
    if eval_fingerprint(subset) != run.manifest.get("eval", {}).get("fingerprint"):
        raise ValueError("eval_data differs from the run's eval set (fingerprint mismatch); pass the eval data the "
                         "probe was given")
    return subset
