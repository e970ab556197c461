"""Validation and configuration of a switching experiment: switch steps, the fresh model, the optimizer, the
learning-rate schedule, and the configuration id that keys its results."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from dynprobe._util.checks import check_int
from dynprobe._util.modules import trainable_parameters
from dynprobe.store.writer import json_safe

__all__ = [
    "abbreviated",
    "checked_optimizer",
    "checked_switch_steps",
    "config_id",
    "configuration",
    "fresh_model",
    "learning_rates",
    "load_optimizer_state",
    "rng_devices_to_preserve",
    "warn_on_lr_mismatch",
]



def rng_devices_to_preserve(target: torch.device | None) -> list[int]:
    """CUDA devices whose RNG state the experiment may draw from: the target's, and the current one if CUDA is
    already in use (querying other devices would create CUDA contexts on them)."""
    devices: set[int] = set()
    if target is not None and target.type == "cuda":
        devices.add(target.index if target.index is not None else torch.cuda.current_device())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices.add(torch.cuda.current_device())
    return sorted(devices)


def checked_switch_steps(run: Any, switch_steps: Any, total_steps: int) -> list[int]:
    if isinstance(switch_steps, (str, bytes)) or not isinstance(switch_steps, Iterable):
        raise TypeError(f"switch_steps must be a list of snapshot steps; got {type(switch_steps).__name__}")
    steps = list(switch_steps)
    for t in steps:
        check_int("every switch step", t, minimum=0)
    steps = sorted({int(t) for t in steps})
    if not steps:
        raise ValueError("switch_steps is empty; give snapshot steps of the run, e.g. 0, a few middle ones and T")
    recorded = {int(s) for s in run.steps}
    unknown = [t for t in steps if t not in recorded]
    if unknown:
        raise ValueError(f"switch_steps {unknown[:5]} are not snapshot steps of the run (θ_t must be stored); "
                         f"its snapshot steps are {abbreviated(sorted(recorded))}")
    late = [t for t in steps if t > total_steps]
    if late:
        raise ValueError(f"total_steps={total_steps} is smaller than switch steps {late[:5]}: every switch point "
                         "trains from t to total_steps; raise total_steps or drop those steps")
    return steps


def abbreviated(values: list[int]) -> str:
    if len(values) <= 12:
        return str(values)
    return f"[{', '.join(map(str, values[:6]))}, …, {', '.join(map(str, values[-3:]))}] ({len(values)} steps)"


def fresh_model(run: Any, make_model: Callable[[], nn.Module], device: torch.device | None,
                 step: int | None = None) -> nn.Module:
    """``make_model()`` checked against the run's parameters, loaded with the snapshot at ``step`` if given."""
    model = make_model()
    if not isinstance(model, nn.Module):
        raise TypeError(f"make_model() must return an nn.Module; it returned a {type(model).__name__}")
    expected = [(spec["name"], tuple(spec["shape"])) for spec in run.manifest["model"]["parameters"]]
    actual = [(name, tuple(p.shape)) for name, p in trainable_parameters(model)]
    if actual != expected:
        differ = [f"{a} vs run {e}" for a, e in zip(actual, expected) if a != e][:3]
        raise ValueError(f"make_model() builds a model whose trainable parameters differ from the run's "
                         f"({len(actual)} vs {len(expected)} tensors; {differ or 'extra or missing tensors'}): pass a "
                         f"builder of the run's architecture ({run.manifest['model'].get('class')})")
    if device is not None:
        model = model.to(device)
    if step is not None:
        state = run.state_dict(step=step)
        with torch.no_grad():
            missing = model.load_state_dict(state, strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"the run's snapshot has entries make_model()'s model lacks: "
                             f"{missing.unexpected_keys[:5]}")
    return model


def checked_optimizer(optimizer_factory: Callable, module: nn.Module) -> torch.optim.Optimizer:
    params = [p for _, p in trainable_parameters(module)]
    optimizer = optimizer_factory(params)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer_factory must return a torch.optim.Optimizer; it returned a "
                        f"{type(optimizer).__name__}")
    given = [p for group in optimizer.param_groups for p in group["params"]]
    if len(given) != len(params) or {id(p) for p in given} != {id(p) for p in params}:
        raise ValueError(f"optimizer_factory must put every parameter it is given in exactly one param group "
                         f"(given {len(params)} tensors, the optimizer holds {len(given)})")
    return optimizer


def load_optimizer_state(optimizer: torch.optim.Optimizer, optimizer_state_at: Callable, t: int) -> None:
    state = optimizer_state_at(t)
    if not isinstance(state, Mapping) or "state" not in state or "param_groups" not in state:
        raise TypeError(f"optimizer_state_at({t}) must return an optimizer.state_dict() (a dict with 'state' and "
                        f"'param_groups'); got {type(state).__name__}")
    try:
        # load_state_dict keeps the given tensors when dtype and device already match, and the optimizer then
        # updates them in place: without a copy, training would overwrite the caller's checkpoint.
        optimizer.load_state_dict(copy.deepcopy(dict(state)))
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"optimizer_state_at({t}) does not fit the optimizer from optimizer_factory ({error}); it "
                         "must be the state_dict of the same optimizer class built on model.parameters()") from error


def learning_rates(lr_at: Callable | None, total_steps: int, groups: int) -> list[list[float]] | None:
    """``lr_at(s)`` for s in 0..T−1 as one float per param group, validated."""
    if lr_at is None:
        return None

    def is_rate(value: Any) -> bool:
        return (isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)
                and value >= 0)

    schedule = []
    for step in range(total_steps):
        value = lr_at(step)
        values = list(value) if isinstance(value, (list, tuple)) else [value] * groups
        if len(values) != groups or not all(is_rate(v) for v in values):
            raise ValueError(f"lr_at({step}) must be a finite learning rate >= 0 or a list of {groups} (one per "
                             f"param group); got {value!r}")
        schedule.append([float(v) for v in values])
    return schedule


def warn_on_lr_mismatch(run: Any, schedule: list[list[float]] | None, total_steps: int) -> None:
    """Compare ``lr_at`` with the learning rate the run recorded for every optimizer step (``run.lr``, first group)."""
    rates = run.lr[:total_steps, 0] if run.lr.shape[1] else np.zeros(0)
    recorded = [(s, float(v)) for s, v in enumerate(rates) if np.isfinite(v)]
    if not recorded:
        return
    if schedule is None:
        if len({v for _, v in recorded}) > 1:
            warnings.warn("dynprobe: the run's learning rate changed during training, but lr_at is None: the "
                          "linearized phase trains at the optimizer_factory's constant lr; pass lr_at=step -> lr to "
                          "continue the run's schedule", RuntimeWarning, stacklevel=3)
        return
    off = [(s, v) for s, v in recorded
           if not math.isclose(v, schedule[min(s, total_steps - 1)][0], rel_tol=1e-6, abs_tol=1e-12)]
    if off:
        warnings.warn(f"dynprobe: lr_at disagrees with the learning rate the run recorded at steps "
                      f"{[s for s, _ in off[:5]]} (recorded {[v for _, v in off[:3]]}, lr_at gives "
                      f"{[schedule[min(s, total_steps - 1)][0] for s, _ in off[:3]]}); lr_at(s) must be the lr of "
                      "the step training on batch s", RuntimeWarning, stacklevel=3)


def configuration(run: Any, template: nn.Module, optimizer: torch.optim.Optimizer,
                   schedule: list[list[float]] | None, total_steps: int, weight_decay_on: str,
                   optimizer_state_at: Callable | None, loss_fn: Callable, stream_digest: str | None,
                   reset_bn_batches: int) -> dict[str, Any]:
    """What makes two switching results comparable; its hash decides what a resumed call recomputes."""
    groups = [{**{key: value for key, value in group.items() if key != "params"}, "num_tensors": len(group["params"])}
              for group in optimizer.param_groups]
    lrs = None if schedule is None else hashlib.sha1(json.dumps(schedule).encode()).hexdigest()[:16]
    return json_safe({
        "total_steps": total_steps,
        "weight_decay_on": weight_decay_on,
        "optimizer": {"class": type(optimizer).__name__, "param_groups": groups},
        "lr_schedule": "optimizer_factory's lr, constant" if lrs is None else f"lr_at, sha1 {lrs}",
        "optimizer_state": "fresh at the switch" if optimizer_state_at is None else "restored (optimizer_state_at)",
        "loss_fn": getattr(loss_fn, "__qualname__", type(loss_fn).__name__),
        "model_class": type(template).__name__,
        "eval_fingerprint": run.manifest.get("eval", {}).get("fingerprint"),
        "stream_batch_0": stream_digest,
        "bn": "frozen at θ_t's running statistics (eval mode)" if not reset_bn_batches else
              f"re-estimated at θ_t on {reset_bn_batches} stream batches from step t (cumulative average), then "
              "frozen (eval mode)",
        "dropout": "off",
    })


def config_id(config: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
