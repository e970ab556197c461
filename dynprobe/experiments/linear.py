"""Linearized training: the network replaced by its first-order Taylor expansion around a base point θ₀.

``f_lin(x; θ) = f(x; θ₀) + J(θ₀) (θ − θ₀)``, with ``J(θ₀) = ∂f(x; θ)/∂θ`` at θ₀,

the "completely lazy regime" of §5 of the two-phase paper: its switching experiment (Fig. 6) trains normally to
step t, then continues with the model linearized at θ_t. Gradient descent on a loss of ``f_lin`` moves the
outputs with the *fixed* eNTK ``H(θ₀) = J(θ₀) J(θ₀)ᵀ`` of eq. (3): for the loss ½‖u − y‖² and step η,
``u_{k+1} − y = (I − ηH)(u_k − y)`` on the training set, whatever η.

Implementation (the ``LinearizedModel`` pattern of Ortiz-Jiménez et al., paper-methods §1): every forward is
*one* ``torch.func.jvp`` of ``θ ↦ functional_call(base, θ, x)`` at θ₀ with tangent θ − θ₀, where ``base`` is a
private, frozen deep copy of the model taken when :func:`linearize` is called. The jvp's primal is f(x; θ₀)
and its tangent is J(θ₀)(θ − θ₀), both in one pass; no Jacobian is ever materialized, and backpropagation
through the tangent gives ∂f_lin/∂θ = J(θ₀) at every θ. Each layer computes its primal and its tangent (two to
three forward costs) and backward runs through the tangent only: a training step measured 1.95–2.2× a standard
one on the demo's Conv1dNet at batch 128 with SGD momentum (2 CPU cores, torch 2.14.1, quiet machine;
``tests/benchmarks/bench_linear.py``). At θ = θ₀ the tangent is exactly zero and
``f_lin(x; θ₀)`` is bitwise equal to the model's eval-mode output (``torch.func.jvp`` computes the primal with
the ordinary kernels on CPU; plain ``torch.autograd.forward_ad`` dual tensors were measured not to be bitwise
on Conv1dNet).

Conventions:

* **Parameters.** The linearized module's parameters have the *same names and shapes* as the model's trainable
  parameters (``requires_grad=True``), in the same order, so an optimizer built on it takes the same param
  groups and ``optimizer.load_state_dict`` / ``load_state_dict`` of the model's parameters carry over (tied
  parameters appear once, under their first name, as in ``model.named_parameters()``). Non-trainable
  parameters and all buffers are constants of the base point.
* **Weight decay placement** (paper-methods §4, "Switching"): with ``weight_decay_on="theta"`` (default) the
  parameters hold θ, so an optimizer's weight decay pulls θ toward 0, as in the standard phase. With
  ``"delta"`` they hold δ = θ − θ₀ (initialized at 0), so the same optimizer's weight decay pulls θ toward θ₀
  (ridge regularization of the kernel regression around the base point). Gradients are the same in both
  (∂/∂δ = ∂/∂θ). :meth:`LinearizedModel.theta` reads θ back in either case.
* **BatchNorm and dropout** (paper-methods §7, pitfall 7): the base copy is always in eval mode, so BatchNorm
  uses θ₀'s running statistics (frozen: f_lin of an example does not depend on the rest of its batch, and no
  buffer ever changes) and dropout is off. ``.train()`` / ``.eval()`` on the linearized module only set its
  ``training`` flags; they change nothing it computes.
* **Inputs.** Called like the model: ``lin(*args, **kwargs)`` runs ``model(*args, **kwargs)``; a single
  mapping argument ``lin(batch)`` is unpacked as ``model(**batch)`` (the library's convention for inputs;
  a model whose forward takes one dict positionally needs a wrapper module).
  The output must be a floating-point tensor, or ``output_fn`` must map it to one (e.g. ``lambda out:
  out.logits``); that tensor is what is linearized.
* **The copy.** ``copy.deepcopy(model)``: hooks registered on the model come along and fire on the copy (in
  eval mode, inside the jvp) at every forward. ``.to()`` / ``.double()`` / ``.cuda()`` on the linearized
  module move the copy too. The user's model is never modified.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call, jvp

__all__ = ["WEIGHT_DECAY_PLACEMENTS", "LinearizedModel", "linearize"]

WEIGHT_DECAY_PLACEMENTS = ("theta", "delta")

OutputFn = Callable[[Any], torch.Tensor]


def linearize(
    model: nn.Module,
    params: Mapping[str, torch.Tensor] | None = None,
    *,
    weight_decay_on: str = "theta",
    output_fn: OutputFn | None = None,
) -> LinearizedModel:
    """The model linearized at θ₀: ``f_lin(x; θ) = f(x; θ₀) + J(θ₀)(θ − θ₀)`` (§5 of the two-phase paper).

    Args:
        model: the network; it is deep-copied (parameters, buffers, hooks) and never modified.
        params: the base point θ₀ as a mapping name → tensor, like ``model.state_dict()`` (parameters and/or
            buffers — include the BatchNorm running statistics of the snapshot; entries it lacks are taken from
            ``model``; values are cast to the model's dtype and device, as ``load_state_dict`` does). Default:
            the model's current parameters and buffers.
        weight_decay_on: ``"theta"`` — the module's parameters hold θ and an optimizer's weight decay acts on θ
            (default) — or ``"delta"`` — they hold δ = θ − θ₀ and weight decay acts on θ − θ₀.
        output_fn: maps the model's output to the tensor to linearize; needed when the output is not a tensor.

    Returns:
        A :class:`LinearizedModel` with parameters at θ₀ (or δ = 0), named and shaped like the model's
        trainable parameters; train it with any PyTorch optimizer.
    """
    return LinearizedModel(model, params, weight_decay_on=weight_decay_on, output_fn=output_fn)


class LinearizedModel(nn.Module):
    """A module computing ``f(x; θ₀) + J(θ₀)(θ − θ₀)`` with one ``torch.func.jvp`` per forward.

    Build it with :func:`linearize` (same arguments). See the module docstring for the conventions.
    Its parameters hold θ (``weight_decay_on="theta"``) or δ = θ − θ₀ (``"delta"``); :meth:`theta`,
    :meth:`delta` and :meth:`load_theta` work in both parametrizations, :meth:`base_state` returns θ₀.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, torch.Tensor] | None = None,
        *,
        weight_decay_on: str = "theta",
        output_fn: OutputFn | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if weight_decay_on not in WEIGHT_DECAY_PLACEMENTS:
            raise ValueError(f"weight_decay_on must be one of {WEIGHT_DECAY_PLACEMENTS!r}; got {weight_decay_on!r}")
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be a callable mapping the model's output to a tensor; got {output_fn!r}")
        if params is not None and not isinstance(params, Mapping):
            hint = " (pass other_model.state_dict())" if isinstance(params, nn.Module) else ""
            raise TypeError(f"params must be a mapping name -> tensor, like model.state_dict(), or None; got "
                            f"{type(params).__name__}{hint}")
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        if not names:
            raise ValueError("model has no trainable parameters (none with requires_grad=True): nothing to linearize")
        super().__init__()
        # The frozen copy is deliberately *not* a registered submodule: its tensors must stay out of
        # parameters(), state_dict() and train()/eval(). _apply below keeps it on the module's device and dtype.
        object.__setattr__(self, "_base_model", _frozen_copy(model, params))
        self._weight_decay_on = weight_decay_on
        object.__setattr__(self, "_output_fn", output_fn)  # a callable module must not become a submodule
        self._cache_base_parameters(names)
        for name in names:
            start = self._base_parameters[name].detach()
            value = start.clone() if weight_decay_on == "theta" else torch.zeros_like(start)
            _register_nested_parameter(self, name, nn.Parameter(value))
        _load_forward_ad_decompositions()

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``f(x; θ₀) + J(θ₀)(θ − θ₀)``: one jvp, primal and tangent in one pass (module docstring)."""
        if len(args) == 1 and not kwargs and isinstance(args[0], Mapping):
            args, kwargs = (), dict(args[0])
        base_point = self._base_parameters
        displacement = self._displacement()

        def base_output(point: dict[str, torch.Tensor]) -> torch.Tensor:
            return self._checked_output(functional_call(self._base_model, point, args, kwargs))

        output, tangent = jvp(base_output, (base_point,), (displacement,))
        return output + tangent

    def _displacement(self) -> dict[str, torch.Tensor]:
        """θ − θ₀ per trainable tensor, differentiable with respect to the module's parameters."""
        if self._weight_decay_on == "delta":
            return dict(self.named_parameters())
        return {name: p - self._base_parameters[name] for name, p in self.named_parameters()}

    def _checked_output(self, output: Any) -> torch.Tensor:
        if self._output_fn is not None:
            output = self._output_fn(output)
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"output_fn must return a tensor; it returned a {type(output).__name__}")
        elif not isinstance(output, torch.Tensor):
            raise TypeError(
                f"the model returned a {type(output).__name__}, not a tensor; pass output_fn= to linearize(...) to "
                "select the tensor to linearize, e.g. output_fn=lambda out: out.logits or lambda out: out[0]"
            )
        if not (output.is_floating_point() or output.is_complex()):
            raise TypeError(f"only a floating-point output can be linearized; got dtype {output.dtype} "
                            "(pass output_fn= to select a floating-point tensor)")
        return output

    # ------------------------------------------------------------------------------------------ reading θ

    @property
    def weight_decay_on(self) -> str:
        """``"theta"`` (parameters hold θ) or ``"delta"`` (parameters hold θ − θ₀)."""
        return self._weight_decay_on

    @torch.no_grad()
    def theta(self) -> dict[str, torch.Tensor]:
        """θ as a new mapping name → tensor (detached copies), names as in ``model.named_parameters()``.

        With ``weight_decay_on="delta"`` it is θ₀ + δ rounded to the parameters' dtype; the forward uses δ itself.
        """
        if self._weight_decay_on == "delta":
            return {name: self._base_parameters[name] + p for name, p in self.named_parameters()}
        return {name: p.detach().clone() for name, p in self.named_parameters()}

    @torch.no_grad()
    def delta(self) -> dict[str, torch.Tensor]:
        """θ − θ₀ as a new mapping name → tensor, exactly the tangent the forward uses."""
        return {name: t.detach().clone() for name, t in self._displacement().items()}

    @torch.no_grad()
    def base_state(self) -> dict[str, torch.Tensor]:
        """The base point: ``state_dict()`` of the frozen copy (θ₀, non-trainable parameters, buffers), copied."""
        return {name: t.detach().clone() for name, t in self._base_model.state_dict().items()}

    @torch.no_grad()
    def load_theta(self, theta: Mapping[str, torch.Tensor]) -> None:
        """Set θ (in either parametrization) from a mapping with exactly the names of :meth:`theta`.

        Values are cast to the parameters' dtype and device. Like ``load_state_dict``, this leaves any
        optimizer's state (momentum, Adam moments) as it is.
        """
        if not isinstance(theta, Mapping):
            raise TypeError(f"theta must be a mapping name -> tensor, like lin.theta(); got {type(theta).__name__}")
        own = dict(self.named_parameters())
        missing, unexpected = sorted(own.keys() - theta.keys()), sorted(theta.keys() - own.keys())
        if missing or unexpected:
            raise ValueError(f"theta must have exactly the trainable parameter names of the model; missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
        for name, value in theta.items():
            _check_tensor_like(f"theta[{name!r}]", value, own[name].shape)
        for name, p in own.items():
            value = theta[name].to(device=p.device, dtype=p.dtype)
            p.copy_(value - self._base_parameters[name] if self._weight_decay_on == "delta" else value)

    # ------------------------------------------------------------------------------------------ plumbing

    def _cache_base_parameters(self, names: list[str] | None = None) -> None:
        names = names if names is not None else list(self._base_parameters)
        all_parameters = dict(self._base_model.named_parameters())
        self._base_parameters = {name: all_parameters[name] for name in names}

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> LinearizedModel:
        # .to() / .double() / .cuda() reach the registered tensors only; the frozen copy must follow them so
        # that primals (θ₀) and tangents (θ − θ₀) keep one device and dtype.
        super()._apply(fn, *args, **kwargs)
        self._base_model._apply(fn, *args, **kwargs)
        self._cache_base_parameters()
        return self

    def extra_repr(self) -> str:
        holds = "θ" if self._weight_decay_on == "theta" else "δ = θ − θ₀"
        return (f"base={type(self._base_model).__name__} (frozen, eval mode), weight_decay_on="
                f"{self._weight_decay_on!r}, parameters hold {holds}")


def _load_forward_ad_decompositions() -> None:
    """Make PyTorch load its forward-AD decompositions now, silencing the FutureWarning that loading raises.

    The first dual tensor of a process makes PyTorch script its jvp decompositions with ``torch.jit.script``,
    which recent versions flag as deprecated: an internal warning the user can do nothing about and would
    otherwise see at the first forward. Later calls are no-ops.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
        with forward_ad.dual_level():
            forward_ad.make_dual(torch.zeros(()), torch.zeros(()))


def _frozen_copy(model: nn.Module, params: Mapping[str, torch.Tensor] | None) -> nn.Module:
    """A deep copy of ``model`` at the base point, in eval mode, with no parameter requiring grad."""
    try:
        with torch.no_grad():
            base = copy.deepcopy(model)
    except Exception as error:  # e.g. non-leaf tensors cached as attributes
        raise TypeError(f"linearize needs a deep copy of the model, and copy.deepcopy failed: {error}") from error
    if params is not None:
        _load_base_point(base, params)
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
        p.grad = None
    return base


def _load_base_point(base: nn.Module, params: Mapping[str, torch.Tensor]) -> None:
    state = base.state_dict()
    unknown = sorted(set(params) - set(state))
    if unknown:
        raise ValueError(f"params has entries that are not parameters or buffers of the model: {unknown[:5]} "
                         f"(expected names from model.state_dict(), e.g. {list(state)[:3]})")
    for name, value in params.items():
        _check_tensor_like(f"params[{name!r}]", value, state[name].shape)
    with torch.no_grad():
        base.load_state_dict(dict(params), strict=False)


def _check_tensor_like(label: str, value: Any, shape: torch.Size) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{label} must be a tensor; got {type(value).__name__}")
    if value.shape != shape:
        raise ValueError(f"{label} has shape {tuple(value.shape)}; the model's tensor has shape {tuple(shape)}")


def _register_nested_parameter(root: nn.Module, name: str, parameter: nn.Parameter) -> None:
    """Register ``parameter`` under the dotted ``name``, creating empty container modules along the path.

    Mirroring the model's module tree is what makes ``named_parameters()`` and ``state_dict()`` use the model's
    own names ("features.0.weight"), which a flat registration cannot (parameter names may not contain dots).
    """
    *path, leaf = name.split(".")
    node = root
    try:
        for part in path:
            child = node._modules.get(part)
            if child is None:
                child = nn.Module()
                node.add_module(part, child)
            node = child
        node.register_parameter(leaf, parameter)
    except KeyError as error:  # the name is already an attribute of LinearizedModel (theta, forward, ...)
        clash = path[0] if path else leaf
        raise ValueError(f"the model's parameter {name!r} cannot be mirrored: its top-level name {clash!r} is "
                         f"an attribute of LinearizedModel ({error}); rename that submodule or parameter") from None
