"""Loss barrier along the straight line between two networks: eq. (5) of the two-phase paper.

``B(θ_a, θ_b) = max_α L(α θ_a + (1 − α) θ_b) − ½ (L(θ_a) + L(θ_b))``

with ``L`` the mean cross-entropy on a fixed labelled set (``metric="loss"``; the paper uses the test set) or
the error rate ``1 − accuracy`` (``metric="error"``: Frankle et al.'s error barrier). ``α = 1`` is
``params_a`` and ``α = 0`` is ``params_b``; the maximum runs over a grid of α (default: 30 evenly spaced points
on [0, 1], endpoints included, the paper author's LLFC grid).

Conventions (paper-methods §3, "B"), all recorded in :attr:`BarrierResult.conventions`:

* **What is interpolated.** Every floating-point (or complex) parameter *and* floating-point buffer, so BatchNorm
  running statistics move along the path with the weights. Integer buffers (``num_batches_tracked``) cannot be
  interpolated and are copied from ``params_a``. Interpolation is ``torch.lerp(θ_b, θ_a, α)`` in each tensor's
  own dtype: it returns θ_a at α = 1 and θ_b at α = 0 exactly and, unlike ``α θ_a + (1 − α) θ_b``, returns θ
  exactly when θ_a = θ_b, so identical endpoints give a flat curve and B = 0 exactly.
* **How the model is run.** In eval mode (every submodule), under ``no_grad`` with autocast off, through
  ``torch.func.functional_call`` with the interpolated tensors: the user's module is never loaded with them.
* **BatchNorm.** By default the interpolated running statistics are used as they are (the paper author's code).
  With ``reset_bn=batches`` they are re-estimated at every α, as in REPAIR's ``reset_bn_stats`` (Jordan et al.
  2022): statistics reset (mean 0, var 1, count 0), cumulative average over the batches (``momentum=None``), no
  grad. Unlike REPAIR, only the layers with running statistics run in train mode; dropout and every other layer
  stay in eval mode, so the estimate is deterministic. This matters for independently trained BN nets (variance
  collapse) and little for twins.

Implementation: the α points are evaluated one after the other, each over the data in batches of
``batch_size`` examples; the data are moved to the model's device once, and the per-α sums stay on the device
until the end of the call (no synchronization per α). Evaluating several α at once with ``torch.func.vmap``
over stacked interpolated states was measured and not adopted (``tests/benchmarks/bench_barrier.py``, 2 CPU
cores, torch 2.14.1, 30 α in chunks of 10): 3.9× and 5.7× slower (two runs) than this loop on the demo's
Conv1dNet (2,000 examples), equal on a 100-wide MLP, and faster only where the whole call takes ~6 ms (a
32-wide MLP on 500 examples, 0.64×).
The user's forward hooks fire during these forwards, as for any call of the model (eval mode, ``no_grad``).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynprobe._util.evaluation import default_output_fn, forward, index_inputs, inputs_to, no_autocast
from dynprobe._util.evaluation import num_examples as count_examples
from dynprobe._util.modules import device_of, eval_mode, preserved_rng, rng_devices

__all__ = ["BarrierResult", "loss_barrier"]

METRICS = ("loss", "error")

Inputs = Union[torch.Tensor, Mapping[str, Any]]
StateLike = Union[Mapping[str, torch.Tensor], nn.Module]


@dataclass(frozen=True, eq=False)
class BarrierResult:
    """A loss barrier and the path it was read from.

    ``value`` is B (eq. (5)); ``alphas`` (A,) and ``curve`` (A,) are the grid and the metric evaluated along it
    (float64 numpy arrays, read-only); ``endpoint_a = L(θ_a)`` (α = 1) and ``endpoint_b = L(θ_b)`` (α = 0);
    ``argmax_alpha`` is the α where the curve peaks. ``conventions`` says how the number was produced (formula,
    metric, grid, BatchNorm handling, what was interpolated, examples); ``float(result)`` is ``value``. A
    non-finite loss anywhere on the path makes ``value`` NaN or inf (it is not hidden).
    """

    value: float
    alphas: np.ndarray
    curve: np.ndarray
    endpoint_a: float
    endpoint_b: float
    argmax_alpha: float
    metric: str
    num_examples: int
    conventions: dict[str, Any]

    def __float__(self) -> float:
        return self.value

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serializable fields (arrays as lists) for a run directory."""
        return {
            "value": self.value,
            "alphas": self.alphas.tolist(),
            "curve": self.curve.tolist(),
            "endpoint_a": self.endpoint_a,
            "endpoint_b": self.endpoint_b,
            "argmax_alpha": self.argmax_alpha,
            "metric": self.metric,
            "num_examples": self.num_examples,
            "conventions": dict(self.conventions),
        }


def loss_barrier(
    model: nn.Module,
    params_a: StateLike,
    params_b: StateLike,
    data: Any,
    *,
    alphas: int | Sequence[float] = 30,
    metric: str = "loss",
    reset_bn: Any = None,
    reset_bn_batches: int | None = None,
    alpha_range: tuple[float, float] | None = None,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    batch_size: int = 1024,
) -> BarrierResult:
    """Loss (or error) barrier between two networks of ``model``'s architecture, eq. (5) of the two-phase paper.

    ``B = max_α L(α θ_a + (1 − α) θ_b) − ½ (L(θ_a) + L(θ_b))``; see the module docstring for the conventions.

    Args:
        model: the architecture. Only its structure and, for entries the endpoints do not give, its tensors are
            used; its parameters, buffers, train/eval flags and the global RNG streams are left as they were.
        params_a, params_b: the endpoints θ_a (α = 1) and θ_b (α = 0): a mapping name → tensor, as
            ``model.state_dict()`` (parameters and/or buffers; entries it lacks are taken from ``model``; values
            are cast to the model's dtype and device as ``load_state_dict`` would), or a module of the same
            architecture.
        data: the labelled set ``D'``: ``(inputs, targets)`` — inputs a tensor (``model(x)``) or a mapping of
            tensors (``model(**x)``), targets (N,) integer class labels — or an iterable/DataLoader of such
            pairs. An iterable is read once (under a forked RNG, so a shuffling loader leaves the user's stream
            alone) and held on the model's device, so every α sees exactly the same examples.
        alphas: the number of evenly spaced α on ``alpha_range``, endpoints included (≥ 2), or an explicit 1-D
            sequence of α (sorted, duplicates dropped). L(θ_a) and L(θ_b) are always evaluated, on the grid
            or in addition to it.
        metric: ``"loss"`` (mean cross-entropy of the logits) or ``"error"`` (1 − accuracy of their argmax).
        reset_bn: input batches for re-estimating BatchNorm statistics at every α (REPAIR): a tensor or mapping
            of inputs, an ``(inputs, targets)`` pair, or an iterable/DataLoader of input batches or of
            ``(inputs, targets, ...)`` batches (targets ignored). Read once, like ``data``.
        reset_bn_batches: use only the first this many batches of ``reset_bn``.
        alpha_range: ``(low, high)`` of an integer grid (default ``(0, 1)``; the author's other repo uses
            ``(-0.2, 1.2)``). Not allowed with an explicit sequence of alphas.
        output_fn: maps the model's output to (N, num_classes) logits. Default: the output itself when it is a
            tensor, else its ``.logits`` attribute or ``["logits"]`` entry (Hugging Face outputs).
        batch_size: examples per forward pass (a tensor ``data`` or ``reset_bn`` is split into such batches;
            the batches of an iterable are kept as they come).

    Returns:
        A :class:`BarrierResult`; ``float(result)`` is B.
    """
    alpha_grid, grid_description = _alpha_grid(alphas, alpha_range)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS!r}; got {metric!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    if reset_bn_batches is not None and (
        isinstance(reset_bn_batches, bool) or not isinstance(reset_bn_batches, int) or reset_bn_batches < 1
    ):
        raise ValueError(f"reset_bn_batches must be a positive integer or None; got {reset_bn_batches!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    output_fn = output_fn or default_output_fn
    device = device_of(model)

    path = _Path.between(model, params_a, params_b)
    norm_layers = _running_stat_layers(model, path.canonical_name) if reset_bn is not None else []
    if reset_bn is not None and not norm_layers:
        raise ValueError(
            "reset_bn was given but the model has no normalization layer with running statistics "
            "(BatchNorm with track_running_stats=True); drop reset_bn"
        )

    with preserved_rng(rng_devices(model, path.a, path.b)):
        batches, targets_range = _labelled_batches(data, batch_size, device)
        reset_batches = _input_batches(reset_bn, batch_size, device, reset_bn_batches) if reset_bn is not None else []
        num_examples = sum(int(targets.shape[0]) for _, targets in batches)
        evaluated = np.unique(np.concatenate([alpha_grid, [0.0, 1.0]]))
        sums = []
        with torch.no_grad(), eval_mode(model), no_autocast(device):
            for alpha in evaluated.tolist():
                state = path.at(alpha)
                if norm_layers:
                    _reestimate_running_stats(model, state, norm_layers, reset_batches)
                sums.append(_metric_sum(model, state, batches, metric, output_fn, targets_range))
        values = torch.stack(sums).cpu().numpy() / num_examples

    by_alpha = dict(zip(evaluated.tolist(), values.tolist()))
    curve = np.array([by_alpha[a] for a in alpha_grid.tolist()], dtype=np.float64)
    endpoint_a, endpoint_b = by_alpha[1.0], by_alpha[0.0]
    peak = int(np.argmax(curve))
    for array in (alpha_grid, curve):
        array.setflags(write=False)
    conventions = _conventions(metric, grid_description, reset_batches if norm_layers else None, num_examples)
    return BarrierResult(
        value=float(curve[peak] - 0.5 * (endpoint_a + endpoint_b)),
        alphas=alpha_grid,
        curve=curve,
        endpoint_a=float(endpoint_a),
        endpoint_b=float(endpoint_b),
        argmax_alpha=float(alpha_grid[peak]),
        metric=metric,
        num_examples=num_examples,
        conventions=conventions,
    )



def _conventions(
    metric: str, grid_description: str, reset_batches: list[Inputs] | None, num_examples: int
) -> dict[str, Any]:
    """What produced the number, in plain JSON-serializable strings (stored with every barrier)."""
    if reset_batches is None:
        batchnorm = "interpolated running stats, no re-estimation"
    else:
        batchnorm = (
            f"running stats re-estimated at every alpha on {sum(count_examples(b) for b in reset_batches)} examples in "
            f"{len(reset_batches)} batches (reset, cumulative average momentum=None, only norm layers in train "
            "mode, no_grad)"
        )
    return {
        "formula": "B = max_alpha L(alpha*theta_a + (1-alpha)*theta_b) - (L(theta_a) + L(theta_b))/2; "
        "alpha=1 is params_a, alpha=0 is params_b (eq. 5 of the two-phase paper)",
        "metric": "mean cross-entropy of the logits" if metric == "loss" else "error = 1 - accuracy (argmax)",
        "alphas": grid_description,
        "endpoint_reference": "mean of L(theta_a) and L(theta_b)",
        "interpolated": "floating-point parameters and floating-point buffers (BatchNorm running stats), "
        "torch.lerp in each tensor's dtype; integer buffers copied from params_a",
        "batchnorm": batchnorm,
        "mode": "eval mode, no_grad, autocast off, torch.func.functional_call",
        "num_examples": num_examples,
    }


# --------------------------------------------------------------------------------------------- the α grid


def _alpha_grid(alphas: Any, alpha_range: Any) -> tuple[np.ndarray, str]:
    if isinstance(alphas, bool):
        raise TypeError(f"alphas must be an integer number of points or a 1-D sequence of floats; got {alphas!r}")
    if isinstance(alphas, (int, np.integer)):
        low, high = (0.0, 1.0) if alpha_range is None else _check_range(alpha_range)
        if alphas < 2:
            raise ValueError(f"alphas must be at least 2 (the grid includes both ends of alpha_range); got {alphas}")
        grid = np.linspace(low, high, int(alphas), dtype=np.float64)
        return grid, f"{int(alphas)} evenly spaced points on [{low}, {high}], endpoints included"
    if alpha_range is not None:
        raise ValueError("alpha_range applies to an integer number of alphas; with an explicit sequence, drop it")
    try:
        grid = np.asarray(alphas.detach().cpu() if isinstance(alphas, torch.Tensor) else alphas, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"alphas must be an integer or a 1-D sequence of floats; got {alphas!r}") from error
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError(f"alphas as a sequence must be 1-D and non-empty; got shape {grid.shape}")
    if not np.isfinite(grid).all():
        raise ValueError(f"alphas must be finite; got {grid.tolist()}")
    grid = np.unique(grid)  # sorted, without duplicates
    return grid, f"explicit: {grid.size} points from {grid[0]} to {grid[-1]}"


def _check_range(alpha_range: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in alpha_range)
    except (TypeError, ValueError) as error:
        raise ValueError(f"alpha_range must be a pair (low, high) of floats; got {alpha_range!r}") from error
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"alpha_range must be finite with low < high; got {alpha_range!r}")
    return low, high


# ------------------------------------------------------------------------------ endpoints and interpolation


@dataclass
class _Path:
    """The straight line between two full states (canonical name → tensor) of ``model``."""

    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    interpolated: list[str]  # floating entries that differ (as objects) between a and b
    canonical_name: dict[str, str]  # any parameter/buffer name (tied aliases included) → its canonical name

    @classmethod
    def between(cls, model: nn.Module, params_a: StateLike, params_b: StateLike) -> _Path:
        own, canonical_name = _model_entries(model)
        a = _endpoint(params_a, "params_a", own, canonical_name)
        b = _endpoint(params_b, "params_b", own, canonical_name)
        buffers = {canonical_name[name] for name, _ in model.named_buffers(remove_duplicate=False)}
        interpolated = []
        for name, tensor in own.items():
            floating = tensor.is_floating_point() or tensor.is_complex()
            if floating and a[name] is not b[name]:
                interpolated.append(name)
            if name in buffers:
                # Buffers are tiny: private copies guarantee that nothing a forward does reaches the caller's.
                a[name] = a[name].clone()
            if name not in interpolated:
                b[name] = a[name]  # integer buffers (num_batches_tracked) are copied from params_a
            elif name in buffers:
                b[name] = b[name].clone()
        return cls(a, b, interpolated, canonical_name)

    def at(self, alpha: float) -> dict[str, torch.Tensor]:
        """The state ``torch.lerp(θ_b, θ_a, α)``: θ_a itself at α = 1, θ_b at α = 0."""
        if alpha == 1.0:
            return dict(self.a)
        if alpha == 0.0:
            return dict(self.b)
        state = dict(self.a)
        for name in self.interpolated:
            state[name] = torch.lerp(self.b[name], self.a[name], alpha)
        return state


def _model_entries(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    own: dict[str, torch.Tensor] = {}
    canonical_name: dict[str, str] = {}
    first_name_of: dict[int, str] = {}
    named = itertools.chain(
        model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
    )
    for name, tensor in named:
        # Tied weights appear under several names; functional_call wants one value per tensor.
        first = first_name_of.setdefault(id(tensor), name)
        canonical_name[name] = first
        if first == name:
            own[name] = tensor
    return own, canonical_name


def _endpoint(
    params: StateLike, argument: str, own: dict[str, torch.Tensor], canonical_name: dict[str, str]
) -> dict[str, torch.Tensor]:
    if isinstance(params, nn.Module):
        source = dict(
            itertools.chain(
                params.named_parameters(remove_duplicate=False), params.named_buffers(remove_duplicate=False)
            )
        )
        missing = sorted(set(canonical_name) - set(source))
        if missing:
            raise ValueError(
                f"{argument} is a module without the model's entries {_some(missing)}; pass a module of the same "
                "architecture, or a state_dict"
            )
    elif isinstance(params, Mapping):
        source = params
    else:
        raise TypeError(
            f"{argument} must be a mapping name -> tensor (e.g. model.state_dict()) or an nn.Module; "
            f"got {type(params).__name__}"
        )
    unknown = sorted(str(k) for k in source if k not in canonical_name)
    if unknown:
        raise ValueError(
            f"{argument} has entries the model does not have: {_some(unknown)}; pass a state_dict of the same "
            "architecture (the model's names look like " + _some(sorted(own)) + ")"
        )
    given: dict[str, Any] = {}
    for name, value in source.items():
        given.setdefault(canonical_name[name], value)
    state = {}
    for name, tensor in own.items():
        value = given.get(name, tensor)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{argument}[{name!r}] must be a tensor; got {type(value).__name__}")
        if value.shape != tensor.shape:
            raise ValueError(
                f"{argument}[{name!r}] has shape {tuple(value.shape)} but the model's has {tuple(tensor.shape)}"
            )
        state[name] = value.detach().to(device=tensor.device, dtype=tensor.dtype)
    return state


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# ------------------------------------------------------------------------------------- BatchNorm re-estimation


def _running_stat_layers(model: nn.Module, canonical_name: dict[str, str]) -> list[tuple[nn.Module, list[str]]]:
    """Normalization layers with running statistics, each with the state keys that a reset re-initializes."""
    layers = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            if module.running_mean is None:
                continue
            dot = f"{prefix}." if prefix else ""
            keys = [canonical_name[dot + "running_mean"], canonical_name[dot + "running_var"]]
            if module.num_batches_tracked is not None:
                keys.append(canonical_name[dot + "num_batches_tracked"])
            layers.append((module, keys))
    return layers


def _reestimate_running_stats(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    layers: list[tuple[nn.Module, list[str]]],
    batches: list[Inputs],
) -> None:
    """Replace the running statistics in ``state`` by their cumulative average over ``batches`` (REPAIR)."""
    for _, keys in layers:
        # reset_running_stats() on fresh tensors: functional_call writes the updates into them, not into the model.
        state[keys[0]] = torch.zeros_like(state[keys[0]])
        state[keys[1]] = torch.ones_like(state[keys[1]])
        if len(keys) == 3:
            state[keys[2]] = torch.zeros_like(state[keys[2]])
    saved = [(module, module.momentum, module.training) for module, _ in layers]
    try:
        for module, _, _ in saved:
            module.momentum = None  # cumulative average: every batch weighs the same
            module.training = True
        for inputs in batches:
            forward(model, inputs, state)
    finally:
        for module, momentum, training in saved:
            module.momentum = momentum
            module.training = training


# ------------------------------------------------------------------------------------------- data and metric


def _metric_sum(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    batches: list[tuple[Inputs, torch.Tensor]],
    metric: str,
    output_fn: Callable[[Any], torch.Tensor],
    targets_range: tuple[int, int],
) -> torch.Tensor:
    """Σ over examples of the cross-entropy (or of the 0/1 error), float64, left on the device (no sync)."""
    total = None
    for inputs, targets in batches:
        logits = output_fn(forward(model, inputs, state))
        _check_logits(logits, targets, targets_range)
        if metric == "loss":
            compute_dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16/fp16 logits: CE in float32
            part = F.cross_entropy(logits.to(compute_dtype), targets, reduction="sum").to(torch.float64)
        else:
            part = (logits.argmax(dim=1) != targets).sum().to(torch.float64)
        total = part if total is None else total + part
    assert total is not None  # _labelled_batches rejects empty data
    return total


def _check_logits(logits: Any, targets: torch.Tensor, targets_range: tuple[int, int]) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"output_fn must return a tensor of logits; got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[1] < 2 or logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"the barrier needs (N, num_classes >= 2) logits, one row per example; got shape "
            f"{tuple(logits.shape)} for a batch of {targets.shape[0]} examples (pass output_fn= to select them)"
        )
    low, high = targets_range
    if low < 0 or high >= logits.shape[1]:
        raise ValueError(f"data targets must be class indices in [0, {logits.shape[1] - 1}]; got [{low}, {high}]")


def _is_labelled_pair(obj: Any) -> bool:
    return (
        isinstance(obj, (tuple, list))
        and len(obj) == 2
        and isinstance(obj[0], (torch.Tensor, Mapping))
        and isinstance(obj[1], torch.Tensor)
    )


def _labelled_batches(
    data: Any, batch_size: int, device: torch.device
) -> tuple[list[tuple[Inputs, torch.Tensor]], tuple[int, int]]:
    if _is_labelled_pair(data):
        inputs, targets = data
        _check_targets(targets, count_examples(inputs), "data")
        starts = range(0, targets.shape[0], batch_size)
        pairs = [(index_inputs(inputs, slice(s, s + batch_size)), targets[s : s + batch_size]) for s in starts]
    elif isinstance(data, (torch.Tensor, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(
            "data must be (inputs, targets) — inputs a tensor or a mapping of tensors, targets (N,) class labels — "
            f"or an iterable/DataLoader of such pairs; got {type(data).__name__}"
        )
    else:
        pairs = []
        for index, batch in enumerate(data):
            is_pair = isinstance(batch, (tuple, list)) and len(batch) >= 2
            if not (is_pair and isinstance(batch[0], (torch.Tensor, Mapping))):
                raise TypeError(
                    f"each batch of data must be (inputs, targets, ...); batch {index} is a {type(batch).__name__}"
                )
            targets = torch.as_tensor(batch[1])
            _check_targets(targets, count_examples(batch[0]), f"data batch {index}")
            pairs.append((batch[0], targets))
    pairs = [(inputs, targets) for inputs, targets in pairs if targets.shape[0] > 0]
    if not pairs:
        raise ValueError("data is empty: the barrier needs at least one labelled example")
    all_targets = torch.cat([targets.reshape(-1).cpu() for _, targets in pairs])
    targets_range = (int(all_targets.min()), int(all_targets.max()))
    return [(inputs_to(inputs, device), targets.to(device).long()) for inputs, targets in pairs], targets_range


def _input_batches(reset_bn: Any, batch_size: int, device: torch.device, limit: int | None) -> list[Inputs]:
    if _is_labelled_pair(reset_bn) and reset_bn[1].dim() == 1 and reset_bn[1].shape[0] == count_examples(reset_bn[0]):
        reset_bn = reset_bn[0]  # an (inputs, targets) pair: the targets play no part
    if isinstance(reset_bn, (torch.Tensor, Mapping)):
        starts = range(0, count_examples(reset_bn), batch_size)
        batches: Iterable = (index_inputs(reset_bn, slice(s, s + batch_size)) for s in starts)
    elif isinstance(reset_bn, Iterable):
        batches = reset_bn
    else:
        raise TypeError(
            "reset_bn must be input batches: a tensor or mapping of inputs, an (inputs, targets) pair, or an "
            f"iterable/DataLoader of batches; got {type(reset_bn).__name__}"
        )
    chosen = []
    for index, batch in enumerate(itertools.islice(batches, limit)):
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (torch.Tensor, Mapping)):
            batch = batch[0]
        if not isinstance(batch, (torch.Tensor, Mapping)):
            raise TypeError(
                f"each reset_bn batch must be inputs or (inputs, targets, ...); batch {index} is a "
                f"{type(batch).__name__}"
            )
        if count_examples(batch) > 0:
            chosen.append(inputs_to(batch, device))
    if not chosen:
        raise ValueError("reset_bn holds no examples: give at least one batch of inputs")
    return chosen


def _check_targets(targets: Any, num_inputs: int, where: str) -> None:
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1:
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"{where}: targets must be a 1-D tensor of class labels; got {shape}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"{where}: targets must be integer class labels; got dtype {targets.dtype}")
    if targets.shape[0] != num_inputs:
        raise ValueError(f"{where}: {num_inputs} inputs but {targets.shape[0]} targets; they must match")
