"""Loss barrier along the straight line between two networks: eq. (5) of the two-phase paper, and the
linear-reference barrier of linear mode connectivity.

With ``L(α) = L(α θ_a + (1 − α) θ_b)`` on a fixed labelled set, one set of evaluations gives both

* ``B_mean = max_α L(α) − ½ (L(θ_a) + L(θ_b))`` — eq. (5) of Zhou, Yang, Sugiyama & Yan, *New Evidence of the
  Two-Phase Learning Dynamics of Neural Networks* (the two-phase paper); the default. Since the maximum includes
  the endpoints, ``B_mean ≥ ½ |L(θ_a) − L(θ_b)|``: a gap between the endpoint losses reads as a barrier even on a
  path that is linear in α.
* ``B_linear = max_α [L(α) − (α L(θ_a) + (1 − α) L(θ_b))]`` — the height above the chord between the endpoints
  (Frankle et al. 2020, linear mode connectivity): 0 on a path that never rises above the chord, whatever the
  endpoint gap. This is the value to read as "a barrier between the two networks".

``L`` is the task's loss (:mod:`dynprobe._util.tasks`: mean cross-entropy for classification, token
cross-entropy over non-ignored tokens, MSE for regression; ``metric="loss"``; the paper uses the test set) or
the error rate ``1 − accuracy`` (``metric="error"``: Frankle et al.'s error barrier). ``α = 1`` is ``params_a``
and ``α = 0`` is ``params_b``; the maximum runs over a grid of α (default 30 evenly spaced points on [0, 1],
endpoints included).

Conventions, all recorded in :attr:`BarrierResult.conventions`:

* **What is interpolated.** Every floating-point (or complex) parameter *and* floating-point buffer, so BatchNorm
  running statistics move along the path with the weights. Integer buffers (``num_batches_tracked``) cannot be
  interpolated and are copied from ``params_a``. Interpolation is ``torch.lerp(θ_b, θ_a, α)`` in each tensor's
  own dtype: it returns θ_a at α = 1 and θ_b at α = 0 exactly and, unlike ``α θ_a + (1 − α) θ_b``, returns θ
  exactly when θ_a = θ_b, so identical endpoints give a flat curve and B = 0 exactly (evaluated once).
* **How the model is run.** In eval mode (every submodule), under ``no_grad`` with autocast off, through
  ``torch.func.functional_call`` with the interpolated tensors: the user's module is never loaded with them.
* **BatchNorm.** By default the interpolated running statistics are used as they are (the paper author's code).
  With ``reset_bn=batches`` they are re-estimated at every α as REPAIR's ``reset_bn_stats`` does (Jordan et al.
  2022): the cumulative average (``momentum=None``) over the batches of each batch's mean and unbiased variance,
  no grad. Unlike REPAIR, dropout and every other layer stay in eval mode, so the estimate is deterministic.
  This matters for independently trained BN nets (variance collapse) and little for twins.

Implementation: the α points are evaluated one after the other, each over the data in batches of
``batch_size`` examples; the data are moved to the model's device once, and the per-α sums stay on the device
until the end of the call (one synchronization). Evaluating several α at once with ``torch.func.vmap`` over
stacked interpolated states was measured (``tests/benchmarks/bench_barrier.py``) and not adopted: slower than
this loop on convolutional networks, faster only on calls that take milliseconds anyway.
The user's forward hooks fire during these forwards, as for any call of the model (eval mode, ``no_grad``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dynprobe._util.checks import check_int
from dynprobe._util.inputs import default_output_fn, input_batches, inputs_to, labelled_batches, no_autocast
from dynprobe._util.inputs import num_examples as count_examples
from dynprobe._util.modules import device_of, eval_mode, preserved_rng, rng_devices
from dynprobe._util.tasks import Task, as_task, infer_task

from ._path import Path, StateLike, norm_layer_keys, path_sums

__all__ = ["METRICS", "REFERENCES", "BarrierResult", "loss_barrier", "loss_barrier_in_place"]

METRICS = ("loss", "error")
REFERENCES = ("mean", "linear")


@dataclass(frozen=True, eq=False)
class BarrierResult:
    """A loss barrier and the path it was read from.

    ``mean`` is B_mean (eq. (5)), ``linear`` is B_linear (height above the chord); ``value`` is the one named by
    ``reference`` and ``float(result)`` is ``value``. ``alphas`` (A,) and ``curve`` (A,) are the grid and the
    metric along it (float64 numpy arrays, read-only), so either barrier can be recomputed from them;
    ``endpoint_a = L(θ_a)`` (α = 1) and ``endpoint_b = L(θ_b)`` (α = 0); ``argmax_alpha_mean`` /
    ``argmax_alpha_linear`` are the α where each maximum is reached (``argmax_alpha``: the one of ``reference``).
    ``conventions`` says how the number was produced. A non-finite loss anywhere on the path makes the values NaN
    or inf (it is not hidden).
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
    reference: str = "mean"
    mean: float = math.nan
    linear: float = math.nan
    argmax_alpha_mean: float = math.nan
    argmax_alpha_linear: float = math.nan

    def __float__(self) -> float:
        return self.value

    @classmethod
    def from_curve(cls, alphas: np.ndarray, curve: np.ndarray, endpoint_a: float, endpoint_b: float, *,
                   reference: str = "mean", metric: str = "loss", num_examples: int = 0,
                   conventions: dict[str, Any] | None = None) -> BarrierResult:
        """Both barriers of one path: ``curve[k] = L(alphas[k])``, ``endpoint_a = L(1)``, ``endpoint_b = L(0)``."""
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES!r}; got {reference!r}")
        alphas = np.array(alphas, dtype=np.float64)
        curve = np.array(curve, dtype=np.float64)
        above_mean = curve - 0.5 * (endpoint_a + endpoint_b)
        above_chord = curve - (alphas * endpoint_a + (1.0 - alphas) * endpoint_b)
        peak_mean, peak_linear = int(np.argmax(above_mean)), int(np.argmax(above_chord))
        for array in (alphas, curve):
            array.setflags(write=False)
        mean, linear = float(above_mean[peak_mean]), float(above_chord[peak_linear])
        argmax_mean, argmax_linear = float(alphas[peak_mean]), float(alphas[peak_linear])
        chosen = reference == "mean"
        return cls(value=mean if chosen else linear, alphas=alphas, curve=curve, endpoint_a=float(endpoint_a),
                   endpoint_b=float(endpoint_b), argmax_alpha=argmax_mean if chosen else argmax_linear,
                   metric=metric, num_examples=num_examples, conventions=dict(conventions or {}), reference=reference,
                   mean=mean, linear=linear, argmax_alpha_mean=argmax_mean, argmax_alpha_linear=argmax_linear)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serializable fields (arrays as lists) for a run directory."""
        return {
            "value": self.value,
            "reference": self.reference,
            "mean": self.mean,
            "linear": self.linear,
            "alphas": self.alphas.tolist(),
            "curve": self.curve.tolist(),
            "endpoint_a": self.endpoint_a,
            "endpoint_b": self.endpoint_b,
            "argmax_alpha": self.argmax_alpha,
            "argmax_alpha_mean": self.argmax_alpha_mean,
            "argmax_alpha_linear": self.argmax_alpha_linear,
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
    reference: str = "mean",
    metric: str = "loss",
    task: Any = None,
    reset_bn: Any = None,
    reset_bn_batches: int | None = None,
    alpha_range: tuple[float, float] | None = None,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    batch_size: int = 1024,
) -> BarrierResult:
    """Loss (or error) barrier between two networks of ``model``'s architecture.

    ``reference="mean"`` (default): ``B = max_α L(α θ_a + (1 − α) θ_b) − ½ (L(θ_a) + L(θ_b))``, eq. (5) of the
    two-phase paper; ``reference="linear"``: ``B = max_α [L(α) − (α L(θ_a) + (1 − α) L(θ_b))]`` (Frankle et al.
    2020). Both come from the same evaluations: ``result.mean`` and ``result.linear``. See the module docstring
    for the conventions.

    Args:
        model: the architecture. Only its structure and, for entries the endpoints do not give, its tensors are
            used; its parameters, buffers, train/eval flags and the global RNG streams are left as they were.
        params_a: the endpoint θ_a (α = 1): a mapping name → tensor, as
            ``model.state_dict()`` (parameters and/or buffers; entries it lacks are taken from ``model``; values
            are cast to the model's dtype and device as ``load_state_dict`` would), or a module of the same
            architecture.
        params_b: the endpoint θ_b (α = 0), in the same forms.
        data: the labelled set ``D'``: ``(inputs, targets)`` — inputs a tensor (``model(x)``) or a mapping of
            tensors (``model(**x)``), targets one row per example — or an iterable/DataLoader of such pairs. An
            iterable is read once (under a forked RNG, so a shuffling loader leaves the user's stream alone) and
            held on the model's device, so every α sees exactly the same examples.
        alphas: the number of evenly spaced α on ``alpha_range``, endpoints included (≥ 2), or an explicit 1-D
            sequence of α (sorted, duplicates dropped). L(θ_a) and L(θ_b) are always evaluated, on the grid
            or in addition to it.
        reference: which barrier ``value`` (and ``float(result)``) is: ``"mean"`` or ``"linear"``.
        metric: ``"loss"`` (the task's loss) or ``"error"`` (1 − accuracy; not for regression).
        task: ``"classification"``, ``"tokens"``, ``"regression"`` or a task object (``dynprobe.config.TokenTask``,
            ...); default: chosen from the targets (integer (N,) labels, integer (N, T) token labels, real values).
        reset_bn: input batches for re-estimating BatchNorm statistics at every α (REPAIR): a tensor or mapping
            of inputs, an ``(inputs, targets)`` pair, or an iterable/DataLoader of input batches or of
            ``(inputs, targets, ...)`` batches (targets ignored). Read once, like ``data``.
        reset_bn_batches: use only the first this many batches of ``reset_bn``.
        alpha_range: ``(low, high)`` of an integer grid (default ``(0, 1)``; the author's other repo uses
            ``(-0.2, 1.2)``). Not allowed with an explicit sequence of alphas.
        output_fn: maps the model's output to the logits (or predictions). Default: the output itself when it is
            a tensor, else its ``.logits`` attribute or ``["logits"]`` entry (Hugging Face outputs).
        batch_size: examples per forward pass (a tensor ``data`` or ``reset_bn`` is split into such batches;
            the batches of an iterable are kept as they come).

    Returns:
        A :class:`BarrierResult`; ``float(result)`` is B of ``reference``.
    """
    alpha_grid, grid_description = _alpha_grid(alphas, alpha_range)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS!r}; got {metric!r}")
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES!r}; got {reference!r}")
    check_int("batch_size", batch_size)
    if reset_bn_batches is not None:
        check_int("reset_bn_batches", reset_bn_batches, hint="or None")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    task = as_task(task)
    output_fn = output_fn or default_output_fn
    device = device_of(model)

    path = Path.between(model, params_a, params_b)
    norm_keys = norm_layer_keys(model, path.canonical_name) if reset_bn is not None else {}
    if reset_bn is not None and not norm_keys:
        raise ValueError(
            "reset_bn was given but the model has no normalization layer with running statistics "
            "(BatchNorm with track_running_stats=True); drop reset_bn"
        )

    with preserved_rng(rng_devices(model, path.a, path.b)):
        batches, task = _checked_batches(data, batch_size, device, task)
        if metric == "error" and not task.has_accuracy:
            raise ValueError(f"metric='error' needs a task with an accuracy; the {task.name} task has none")
        reset_batches = ([inputs_to(b, device) for b in input_batches(reset_bn, batch_size, reset_bn_batches,
                                                                        "reset_bn")] if reset_bn is not None else [])
        evaluated = np.unique(np.concatenate([alpha_grid, [0.0, 1.0]]))
        flat = path.identical()  # lerp(θ, θ, α) = θ exactly: one evaluation gives the whole (flat) curve
        with torch.no_grad(), eval_mode(model), no_autocast(device):
            sums, units = path_sums(model, path, [1.0] if flat else evaluated.tolist(), batches, task=task,
                                    metric=metric, output_fn=output_fn, norm_keys=norm_keys,
                                    reset_batches=reset_batches)
        values = sums.cpu().numpy() / units
        if flat:
            values = np.full(evaluated.shape, values[0])

    num_examples = sum(int(targets.shape[0]) for _, targets in batches)
    conventions = _conventions(metric, task, grid_description, reset_batches if reset_bn is not None else None,
                               num_examples, reference)
    return _result(alpha_grid, evaluated, values, reference=reference, metric=metric, num_examples=num_examples,
                   conventions=conventions)


def loss_barrier_in_place(
    model: nn.Module,
    load: Callable[[float], None],
    data: Any,
    *,
    alphas: int | Sequence[float] = 30,
    reference: str = "mean",
    task: Any = None,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    batch_size: int = 1024,
    interpolated: str,
) -> BarrierResult:
    """:func:`loss_barrier` (loss metric, both references) along a path the caller loads into ``model`` itself.

    ``load(α)`` makes ``model`` hold ``θ(α) = torch.lerp(θ_b, θ_a, α)`` (θ_a at α = 1, θ_b at α = 0); the model is
    then called as it is, on every batch of ``data``, in eval mode under ``no_grad`` with autocast off and the
    RNG streams preserved. The loss at each α and both barriers are computed exactly as :func:`loss_barrier`
    computes them (the same loss sums, :meth:`BarrierResult.from_curve`); every α is
    evaluated, also when the endpoints are equal (``lerp(θ, θ, α) = θ`` then gives B = 0 exactly anyway).

    For models whose θ cannot be handed to ``functional_call`` whole — under FSDP2 each process writes its own
    shards (:mod:`dynprobe.distributed.sharded_path`). Putting the model's own values back is the caller's: after
    the call the model holds θ(1) (α is evaluated in increasing order). ``interpolated`` says what ``load``
    interpolates and how (stored in the result's conventions, with the mode: "in place").
    """
    alpha_grid, grid_description = _alpha_grid(alphas, None)
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES!r}; got {reference!r}")
    check_int("batch_size", batch_size)
    task = as_task(task)
    output_fn = output_fn or default_output_fn
    device = device_of(model)
    with preserved_rng(rng_devices(model)):
        batches, task = _checked_batches(data, batch_size, device, task)
        evaluated = np.unique(np.concatenate([alpha_grid, [0.0, 1.0]]))
        with torch.no_grad(), eval_mode(model), no_autocast(device):
            sums, units = path_sums(model, _LoadedPath(load), evaluated.tolist(), batches, task=task,
                                    metric="loss", output_fn=output_fn)
        values = sums.cpu().numpy() / units
    num_examples = sum(int(targets.shape[0]) for _, targets in batches)
    conventions = {**_conventions("loss", task, grid_description, None, num_examples, reference),
                   "interpolated": interpolated,
                   "mode": "eval mode, no_grad, autocast off, the model called with theta(alpha) loaded in place"}
    return _result(alpha_grid, evaluated, values, reference=reference, metric="loss", num_examples=num_examples,
                   conventions=conventions)


@dataclass(frozen=True)
class _LoadedPath:
    """A path whose points the caller loads into the model (``path_sums`` then calls the model as it is)."""

    load: Callable[[float], None]

    def at(self, alpha: float) -> None:
        self.load(alpha)


def _result(alpha_grid: np.ndarray, evaluated: np.ndarray, values: np.ndarray, *, reference: str, metric: str,
            num_examples: int, conventions: dict[str, Any]) -> BarrierResult:
    """Both barriers from the metric at the ``evaluated`` α (the grid and both endpoints)."""
    by_alpha = dict(zip(evaluated.tolist(), values.tolist()))
    curve = np.array([by_alpha[a] for a in alpha_grid.tolist()], dtype=np.float64)
    return BarrierResult.from_curve(alpha_grid, curve, by_alpha[1.0], by_alpha[0.0], reference=reference,
                                    metric=metric, num_examples=num_examples, conventions=conventions)


def _checked_batches(data: Any, batch_size: int, device: torch.device, task: Task | None
                     ) -> tuple[list[tuple[Any, torch.Tensor]], Task]:
    """The one data parser (:func:`dynprobe._util.inputs.labelled_batches`), targets checked against the task."""
    pairs = labelled_batches(data, batch_size, "data")
    if not pairs:
        raise ValueError("data is empty: the barrier needs at least one labelled example")
    task = task or infer_task(pairs[0][1])
    checked = [(inputs_to(inputs, device), task.check_targets(targets, f"data batch {index}").to(device))
               for index, (inputs, targets) in enumerate(pairs)]
    return checked, task


def _conventions(metric: str, task: Task, grid_description: str, reset_batches: list[Any] | None,
                 num_examples: int, reference: str) -> dict[str, Any]:
    """What produced the number, in plain JSON-serializable strings (stored with every barrier)."""
    if reset_batches is None:
        batchnorm = "interpolated running stats, no re-estimation"
    else:
        batchnorm = (
            f"running stats re-estimated at every alpha on {sum(count_examples(b) for b in reset_batches)} examples "
            f"in {len(reset_batches)} batches (cumulative average of batch means and unbiased variances, "
            "momentum=None, dropout off, no_grad)"
        )
    task_conventions = task.conventions()
    return {
        "formula": "B_mean = max_alpha L(alpha) - (L(theta_a) + L(theta_b))/2 (eq. 5 of the two-phase paper); "
        "B_linear = max_alpha [L(alpha) - (alpha L(theta_a) + (1-alpha) L(theta_b))] (Frankle et al. 2020); "
        "L(alpha) = L(alpha*theta_a + (1-alpha)*theta_b); alpha=1 is params_a, alpha=0 is params_b",
        "reference": f"value is B_{reference}",
        "task": task_conventions["task"],
        "metric": task_conventions["eval_loss"] if metric == "loss" else "error = 1 - accuracy (top-1)",
        "alphas": grid_description,
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
