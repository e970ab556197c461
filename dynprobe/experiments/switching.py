"""The std→lin switching experiment: train normally to step t, then linearized to T (the paper's Fig. 6).

For each switch step t, ``θ_std→lin(T; t)`` is the network trained with the standard method for t steps (the
run's snapshot θ_t), then trained for T − t more steps as its linearization at θ_t,

``f_lin(x; θ) = f(x; θ_t) + J(θ_t)(θ − θ_t)``   (§5 of the two-phase paper; :func:`dynprobe.linearize`),

on the *same* data stream and with the same optimizer and learning-rate schedule as the standard run. Its test
loss and accuracy against t form Fig. 6: t = 0 is the completely lazy regime (kernel regression with the eNTK
at initialization), t = T the standard network itself; the paper finds performance rising with t, "especially
when t > 2000" (T = 10⁴), evidence that the cone phase is *not* lazy.

Conventions (stored with every result, see :data:`SWITCHING_CONVENTIONS`):

* **Steps.** Step s means s optimizer steps taken (the run's clock). The linearized phase takes steps
  t+1, …, T; step s+1 trains on batch s of the stream with learning rate ``lr_at(s)``.
* **t = T** (the standard anchor): nothing is linearized and nothing trained; the result is the run's
  snapshot at T evaluated as it is (f_lin at θ_T equals f(θ_T) exactly). Training standard to a T that has
  no snapshot is not offered: it would need the run's optimizer state and RNG, which the run does not store.
* **BatchNorm and dropout** (paper-methods §7, pitfall 7): the linearized model uses the snapshot's running
  statistics (eval mode, frozen for the whole phase) and no dropout. At t = 0 those statistics are the
  initial ones (mean 0, variance 1), so for a BatchNorm network the lazy anchor linearizes the network
  *without* effective normalization, which lowers it: on the MNIST-1D example (Conv1dNet, T = 600) the t = 0
  test accuracy was 0.386 with them and 0.652 with statistics re-estimated on 20 batches.
  ``reset_bn_batches=k`` re-estimates them at θ_t on k stream batches before linearizing.
* **Optimizer state at the switch**: fresh (momentum, Adam moments zero) unless ``optimizer_state_at`` gives
  the standard run's ``optimizer.state_dict()`` at t (the run directory does not store optimizer state).
* **Weight decay** on θ (default) or on θ − θ_t (``weight_decay_on="delta"``).
* **Evaluation**: mean cross-entropy and accuracy of f_lin on the run's eval set, as ``run.eval_loss``.

Results are appended to ``RUN/switching/results.jsonl`` (one JSON line per switch step, with the
configuration and its hash ``config_id``); nothing else of the run directory is touched. A second call with the
same configuration computes only the switch steps it does not have yet.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynprobe._util.batchnorm import reestimate_batchnorm, running_stat_layers
from dynprobe._util.checks import check_int
from dynprobe._util.evaluation import EvalSet, default_output_fn, evaluate, forward, inputs_to
from dynprobe._util.modules import preserved_rng
from dynprobe._version import __version__
from dynprobe.store.records import append_switching_result, read_switching_results
from dynprobe.store.run import Run, load_run
from dynprobe.store.writer import json_safe

from ._eval_set import run_eval_set
from ._stream import Batch, BatchStream
from ._switching_setup import (
    checked_optimizer,
    checked_switch_steps,
    config_id,
    configuration,
    fresh_model,
    learning_rates,
    load_optimizer_state,
    rng_devices_to_preserve,
    warn_on_lr_mismatch,
)
from .linear import WEIGHT_DECAY_PLACEMENTS, linearize

__all__ = ["SWITCHING_CONVENTIONS", "switching_experiment"]

SWITCHING_CONVENTIONS: dict[str, str] = {
    "model": "f_lin(x; θ) = f(x; θ_t) + J(θ_t)(θ − θ_t), one torch.func.jvp per forward (dynprobe.linearize)",
    "steps": "the linearized phase takes optimizer steps t+1..T; step s+1 trains on batch s of the stream, "
             "with lr_at(s)",
    "standard_anchor": "t = T: the run's snapshot at T evaluated as it is; nothing linearized or trained",
    "batchnorm": "eval mode, frozen during the whole linearized phase at the snapshot θ_t's running statistics "
                 "(or at statistics re-estimated at θ_t, see config.bn)",
    "dropout": "off",
    "eval": "mean cross-entropy and accuracy of f_lin on the run's eval set (eval mode, no grad)",
    "train_loss": "mean training loss over the last min(100, T − t) linearized steps",
}

_TRAIN_LOSS_WINDOW = 100



def switching_experiment(
    run: Any,
    make_model: Callable[[], nn.Module],
    train_loader: Callable[[int], Batch] | Sequence[Batch] | Iterable[Batch],
    eval_data: Any,
    *,
    switch_steps: Iterable[int],
    total_steps: int,
    optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    lr_at: Callable[[int], float | Sequence[float]] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    weight_decay_on: str = "theta",
    optimizer_state_at: Callable[[int], Mapping[str, Any]] | None = None,
    reset_bn_batches: int = 0,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    eval_batch_size: int = 512,
    progress: bool = True,
) -> dict[str, Any]:
    """Switch from standard to linearized training at each of ``switch_steps`` and train to ``total_steps``.

    For each switch step t: a fresh ``make_model()`` is loaded with the run's snapshot at t (trainable
    parameters **and** buffers), linearized there (``f_lin(x; θ) = f(x; θ_t) + J(θ_t)(θ − θ_t)``, §5 of the
    two-phase paper), trained with ``optimizer_factory`` on batches t, …, T−1 of the stream, and evaluated on
    the run's eval set. The curve against t is the paper's Fig. 6. Conventions: the module docstring.

    Args:
        run: a :class:`dynprobe.Run` or a run directory.
        make_model: builds a model of the run's architecture (same trainable parameter names and shapes);
            its own initial values are replaced by the snapshot. Called under a preserved RNG.
        train_loader: the standard run's data stream, so that every switch point sees the same batches:
            a callable ``step -> (inputs, targets)`` returning the batch that optimizer step ``step + 1``
            trained on (random access, the recommended form; any augmentation must be seeded by ``step``);
            a sequence of such batches (``stream[step]``); or a re-iterable (a list, an object whose
            ``__iter__`` restarts the stream) whose every iteration yields the whole stream from batch 0 —
            it is fast-forwarded by t batches. Inputs are a tensor (``model(x)``) or a dict (``model(**x)``).
            A shuffling ``DataLoader`` is *not* such a stream (each pass reshuffles): every batch's hash is
            checked across switch points and a difference raises ``ValueError``.
        eval_data: the eval data the run's probe was given (checked against the run's fingerprint).
        switch_steps: snapshot steps of the run, each ≤ ``total_steps``. Include 0 (the lazy anchor) and, when
            ``total_steps`` is a snapshot, ``total_steps`` (the standard anchor).
        total_steps: T, the step every switch point trains to.
        optimizer_factory: ``params -> optimizer``, called with the linearized model's parameters (a list in the
            model's trainable ``named_parameters()`` order), e.g. ``lambda p: torch.optim.SGD(p, lr=0.1,
            momentum=0.9, weight_decay=1e-4)``. Every parameter must be in exactly one param group.
        lr_at: the learning-rate schedule: ``lr_at(s)`` is the lr of optimizer step s + 1 (the one training on
            batch s), a float for every param group or one per group; set on the groups before each step, so
            the schedule continues at t. ``None``: the factory's lr throughout (warned when the run's
            recorded lr changed). Compared with the lr the run recorded at its snapshots (a warning if neither
            ``lr_at(s − 1)`` nor ``lr_at(s)`` matches).
        loss_fn: ``loss_fn(output, targets) -> scalar`` minimized in the linearized phase.
        weight_decay_on: ``"theta"`` (default) or ``"delta"`` (θ − θ_t); see :func:`dynprobe.linearize`.
        optimizer_state_at: ``t -> optimizer.state_dict()`` of the standard run at step t (from your own
            checkpoints), loaded at the switch so momentum continues; default: a fresh optimizer state.
        reset_bn_batches: 0 (default, the paper-methods convention): BatchNorm keeps the snapshot's running
            statistics. k > 0: before linearizing at t < T, they are re-estimated at θ_t as the plain average
            over the k stream batches from step t (the last k when fewer remain; BatchNorm layers in train mode,
            everything else in eval mode, REPAIR's ``reset_bn_stats``), then frozen. Mostly matters at small t,
            where the running statistics have not warmed up (at t = 0 they are mean 0, variance 1).
        output_fn: selects the logits tensor from the model's output (what is linearized).
        device: where to train (default: where ``make_model()`` puts the model).
        eval_batch_size: batch size of the evaluations.
        progress: show a rich progress bar (switch points and steps).

    Returns:
        ``{"switch_step", "total_steps", "eval_loss", "eval_accuracy", "train_loss", "linearized_steps",
        "diverged"}`` — numpy arrays over the requested switch steps, sorted (``run.switching``'s format,
        extended) — plus ``"config_id"`` (str), ``"config"`` (dict) and ``"computed"`` (the switch steps this
        call trained; the others were read back from earlier calls with the same configuration).
    """
    run = run if isinstance(run, Run) else load_run(os.fspath(run))
    if isinstance(make_model, nn.Module) or not callable(make_model):
        raise TypeError("make_model must be a callable returning a fresh model of the run's architecture, e.g. "
                        f"lambda: MyNet(); got {'an instance of ' if isinstance(make_model, nn.Module) else ''}"
                        f"{type(make_model).__name__}")
    check_int("total_steps", total_steps, minimum=0)
    steps = checked_switch_steps(run, switch_steps, total_steps)
    if not callable(optimizer_factory):
        raise TypeError("optimizer_factory must be a callable params -> torch.optim.Optimizer, e.g. "
                        f"lambda p: torch.optim.SGD(p, lr=0.1); got {type(optimizer_factory).__name__}")
    for name, value in (("lr_at", lr_at), ("optimizer_state_at", optimizer_state_at), ("output_fn", output_fn)):
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be callable or None; got {type(value).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable (output, targets) -> loss; got {type(loss_fn).__name__}")
    if weight_decay_on not in WEIGHT_DECAY_PLACEMENTS:
        raise ValueError(f"weight_decay_on must be one of {WEIGHT_DECAY_PLACEMENTS!r}; got {weight_decay_on!r}")
    check_int("eval_batch_size", eval_batch_size, minimum=1)
    check_int("reset_bn_batches", reset_bn_batches, minimum=0)
    if reset_bn_batches > total_steps:
        raise ValueError(f"reset_bn_batches={reset_bn_batches} exceeds the stream's total_steps={total_steps} batches")
    stream = BatchStream(train_loader, total_steps)
    eval_set = run_eval_set(run, eval_data)
    target = torch.device(device) if device is not None else None

    # make_model() initializes at random and a stream may augment: the caller's RNG streams are restored.
    with preserved_rng(rng_devices_to_preserve(target)), torch.enable_grad():
        template = fresh_model(run, make_model, target)
        optimizer = checked_optimizer(optimizer_factory, template)
        schedule = learning_rates(lr_at, total_steps, len(optimizer.param_groups))
        warn_on_lr_mismatch(run, schedule, total_steps)
        if reset_bn_batches and not running_stat_layers(template):
            raise ValueError("reset_bn_batches was given but the model has no BatchNorm layer with running "
                             "statistics; drop reset_bn_batches")
        config = configuration(run, template, optimizer, schedule, total_steps, weight_decay_on,
                                optimizer_state_at, loss_fn, stream.first_digest(), reset_bn_batches)
        del template, optimizer
        experiment = _Experiment(run, make_model, target, stream, total_steps, schedule, optimizer_factory,
                                 optimizer_state_at, loss_fn, weight_decay_on, reset_bn_batches, output_fn, eval_set,
                                 eval_batch_size, config, config_id(config))
        done = {r["switch_step"] for r in read_switching_results(run.path, config_id=experiment.config_id)}
        todo = [t for t in steps if t not in done]
        _run_switch_points(experiment, todo, progress)
    records = {r["switch_step"]: r for r in read_switching_results(run.path, config_id=experiment.config_id)}
    rows = [records[t] for t in steps]
    return {
        "switch_step": np.array(steps, dtype=np.int64),
        "total_steps": np.full(len(steps), total_steps, dtype=np.int64),
        "eval_loss": np.array([r["eval_loss"] for r in rows], dtype=np.float64),
        "eval_accuracy": np.array([r["eval_accuracy"] for r in rows], dtype=np.float64),
        "train_loss": np.array([np.nan if r["train_loss"] is None else r["train_loss"] for r in rows]),
        "linearized_steps": np.array([r["linearized_steps"] for r in rows], dtype=np.int64),
        "diverged": np.array([r["status"] == "diverged" for r in rows]),
        "config_id": experiment.config_id,
        "config": config,
        "computed": todo,
    }


# --------------------------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class _Experiment:
    """The validated inputs shared by every switch point."""

    run: Any
    make_model: Callable[[], nn.Module]
    device: torch.device | None
    stream: BatchStream
    total_steps: int
    schedule: list[list[float]] | None  # lr per step and param group, or None (the factory's lr)
    optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    optimizer_state_at: Callable[[int], Mapping[str, Any]] | None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    weight_decay_on: str
    reset_bn_batches: int
    output_fn: Callable[[Any], torch.Tensor] | None
    eval_set: EvalSet
    eval_batch_size: int
    config: dict[str, Any]
    config_id: str


@dataclass(frozen=True)
class _Outcome:
    status: str  # "finished" or "diverged"
    diverged_at: int | None
    train_loss: float | None


def _run_switch_points(experiment: _Experiment, todo: list[int], progress: bool) -> None:
    """Train and evaluate each switch point of ``todo``, appending its record as soon as it is done."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[loss]}"), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        points = bar.add_task("switch points", total=len(todo), loss="")
        for t in todo:
            bar.update(points, description=f"switch points (t={t})")
            steps = bar.add_task(f"  linearized from t={t}", total=experiment.total_steps - t, loss="")
            record = _switch_point(experiment, t,
                                   lambda loss: bar.update(steps, advance=1, loss=f"loss {loss:.4f}"))
            bar.remove_task(steps)
            append_switching_result(experiment.run.path, json_safe(record))
            bar.advance(points)


def _switch_point(experiment: _Experiment, t: int, on_step: Callable[[float], None]) -> dict[str, Any]:
    """θ_std→lin(T; t): the snapshot at t, linearized and trained to T (nothing at t = T), then evaluated."""
    started = time.perf_counter()
    model = fresh_model(experiment.run, experiment.make_model, experiment.device, step=t)
    if t == experiment.total_steps:  # the standard anchor: f_lin at θ_T is f(θ_T) itself
        measured = evaluate(model, experiment.eval_set, output_fn=experiment.output_fn or default_output_fn,
                            batch_size=experiment.eval_batch_size)
        outcome = _Outcome(status="finished", diverged_at=None, train_loss=None)
    else:
        if experiment.reset_bn_batches:
            first = max(0, min(t, experiment.total_steps - experiment.reset_bn_batches))
            device = next(model.parameters()).device
            batches = experiment.stream.batches(first, first + experiment.reset_bn_batches)
            reestimate_batchnorm(model, (inputs for _, (inputs, _) in batches), in_place=True,
                                 forward=lambda inputs: forward(model, inputs_to(inputs, device)))
        lin = linearize(model, weight_decay_on=experiment.weight_decay_on, output_fn=experiment.output_fn)
        del model  # linearize keeps its own frozen copy
        optimizer = checked_optimizer(experiment.optimizer_factory, lin)
        if experiment.optimizer_state_at is not None:
            load_optimizer_state(optimizer, experiment.optimizer_state_at, t)
        outcome = _train_linearized(lin, optimizer, experiment, t, on_step)
        measured = evaluate(lin, experiment.eval_set, batch_size=experiment.eval_batch_size)
    schedule, total = experiment.schedule, experiment.total_steps
    return {
        "switch_step": t, "total_steps": total, "eval_loss": measured.loss, "eval_accuracy": measured.accuracy,
        "linearized_steps": total - t, "anchor": "lazy" if t == 0 else "standard" if t == total else None,
        "status": outcome.status, "diverged_at": outcome.diverged_at, "train_loss": outcome.train_loss,
        "lr_at_switch": schedule[t] if schedule is not None and t < total else None,
        "eval_n": experiment.eval_set.n, "wall_time_s": round(time.perf_counter() - started, 3),
        "config_id": experiment.config_id, "config": experiment.config, "conventions": SWITCHING_CONVENTIONS,
        "dynprobe_version": __version__, "torch_version": torch.__version__,
    }


def _train_linearized(lin: nn.Module, optimizer: torch.optim.Optimizer, experiment: _Experiment, start: int,
                      on_step: Callable[[float], None]) -> _Outcome:
    """Steps start+1..T on batches start..T−1 of the stream; stops at the first non-finite loss."""
    device = next(lin.parameters()).device
    recent: deque[float] = deque(maxlen=_TRAIN_LOSS_WINDOW)
    lin.train()  # changes nothing f_lin computes (BatchNorm frozen, dropout off); the conventional flag
    for step, (inputs, targets) in experiment.stream.batches(start, experiment.total_steps):
        if experiment.schedule is not None:
            for group, lr in zip(optimizer.param_groups, experiment.schedule[step]):
                group["lr"] = lr
        loss = experiment.loss_fn(lin(inputs_to(inputs, device)), targets.to(device, non_blocking=True))
        if step == start and not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad):
            raise TypeError("loss_fn(output, targets) must return a scalar tensor that depends on the output; got "
                            f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        value = loss.detach().item()
        if not math.isfinite(value):
            warnings.warn(f"dynprobe: linearized training from t={start} diverged at step {step + 1} (loss "
                          f"{value}); its result is recorded with status 'diverged' (lower the learning rate?)",
                          RuntimeWarning, stacklevel=5)
            return _Outcome(status="diverged", diverged_at=step + 1, train_loss=None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent.append(value)
        on_step(value)
    return _Outcome(status="finished", diverged_at=None, train_loss=float(np.mean(recent)) if recent else None)
