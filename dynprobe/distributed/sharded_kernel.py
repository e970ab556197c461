"""The eNTK of an FSDP2 (``fully_shard``) model: :class:`GatheredKernel`, with θ gathered for the measurement.

H = Σ_p J_p J_pᵀ is a sum over parameters (eq. 3 of the two-phase paper), so under FSDP as under DDP each rank
differentiates a share of the parameters — whole modules, balanced by size
(:func:`~dynprobe.distributed.kernel.partition_modules`) — and one float64 SUM ``all_reduce`` of the n×n partial
kernels assembles H on every rank (:class:`~dynprobe.distributed.kernel.ShardedKernel`, reused as is).

What FSDP adds: a rank's forward needs *every* parameter, but it holds only its shards, and the FSDP forward is
collective (each fully_shard-ed module all-gathers its parameters in a pre-forward hook, reshards in a post-forward
hook, and hooks the backward to reduce-scatter gradients). The engine's passes differ between ranks (each rank
differentiates its own share, chunked under its own plan), so they cannot run through those hooks: every rank
would wait in a different collective. :func:`whole_parameters` therefore makes the model a plain module for the
duration of one measurement:

1. every sharded parameter is gathered whole, ``DTensor.full_tensor()`` — one all-gather per parameter tensor, in
   ``model.modules()`` order, identical on every rank — in its own dtype (the full-precision θ that the snapshots
   store, not a ``MixedPrecisionPolicy``'s ``param_dtype``), and registered in place of the DTensor;
2. the forward pre- and post-hooks of every fully_shard state of the model are taken out of the modules' hook
   dictionaries (other hooks, the user's, stay and run), so the forward and backward passes run no FSDP code and
   no collective;
3. afterwards (also on an exception) the very same DTensor parameter objects (those the optimizer holds) and the
   hook dictionaries, in their order, are put back: FSDP's state — sharded or not, its settings, its streams — is
   never touched, and the user's training continues bit for bit as without the probe (the tests check it).

The engine then runs on a plain module with whole parameters, exactly as in one process
(:class:`~dynprobe.kernels.engine.NTKEngine`, ``torch.func.functional_call`` with explicit values, structured rules
and ``vmap(jacrev)`` alike), so the kernel equals the single-process kernel of the same θ to float rounding.

Memory per rank, honestly: **the whole θ, in the parameters' dtype, during the measurement** (gathered, then
freed when it ends), next to the rank's shards, plus the engine's own ``max_memory`` — what one process computing
the kernel holds; the per-sample Jacobians of a rank cover only its share. A model whose θ does not fit on one
device cannot have its eNTK measured this way (that would need layer-wise gathering in lock-step).

Faults: building the engines and every kernel end with an all-reduce that carries a failure flag (the engine's
errors are caught), so every rank raises alike. A failure inside the gathers themselves on one rank (out of
memory while gathering θ) cannot be caught this way: the other ranks wait in the next all-gather.

Buffers: FSDP does not synchronize them (each rank's BatchNorm statistics come from its own batches); the kernel
is computed with rank 0's floating-point buffers on every rank — the buffers the run stores — fetched with one
all-reduce per dtype.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .kernel import EngineFactory, ShardedKernel
from .sharded import ShardedRunFailure, _is_dtensor

__all__ = ["GatheredKernel", "fsdp_kernel", "whole_parameters"]


def _fsdp_states(model: nn.Module) -> dict[int, tuple[str, Any]]:
    """The fully_shard states of the model's modules, by id: ``{id(state): (module name, state)}``."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:  # no FSDP2: nothing to take out
        return {}
    states: dict[int, tuple[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):  # (fully_shard.state on another module would add an attribute to it)
            state = fully_shard.state(module)
            if state is not None:
                states.setdefault(id(state), (name, state))
    return states


def _owners(hook: Callable[..., Any]) -> list[Any]:
    """The objects a hook, or a function it wraps (``functools.wraps``, followed down to the original), is a bound
    method of: FSDP's hooks are its state's methods, some of them wrapped (the grouped ``fully_shard([a, b])``)."""
    owners, seen = [], set()
    while hook is not None and id(hook) not in seen:
        seen.add(id(hook))
        if getattr(hook, "__self__", None) is not None:
            owners.append(hook.__self__)
        hook = getattr(hook, "__wrapped__", None)
    return owners


def _fsdp_owner(hook: Callable[..., Any], states: dict[int, tuple[str, Any]]) -> int | None:
    """The id of the fully_shard state a hook belongs to (None: not FSDP's)."""
    return next((id(owner) for owner in _owners(hook) if id(owner) in states), None)


@contextlib.contextmanager
def _without_fsdp_hooks(model: nn.Module) -> Iterator[None]:
    """The model's forward without FSDP: every fully_shard state's forward pre/post-hooks taken out of the
    modules' hook dictionaries (mutated in place: the hooks' handles keep pointing at them), then restored in
    their order. Raises when a fully_shard-ed module's hooks are not found (a PyTorch whose FSDP registers its
    hooks differently: running its collective forward here could hang)."""
    states = _fsdp_states(model)
    saved: list[tuple[dict[int, Any], dict[int, Any]]] = []
    found: dict[int, set[str]] = {key: set() for key in states}
    try:
        for module in model.modules():
            for kind, hooks in (("pre", module._forward_pre_hooks), ("post", module._forward_hooks)):
                ours = {key: owner for key, hook in hooks.items()
                        if (owner := _fsdp_owner(hook, states)) is not None}
                if not ours:
                    continue
                saved.append((hooks, dict(hooks)))
                for key, owner in ours.items():
                    found[owner].add(kind)
                    del hooks[key]
        missing = [states[key][0] or "<root>" for key, kinds in found.items() if kinds != {"pre", "post"}]
        if missing:
            raise RuntimeError(f"kernel= under FSDP: the fully_shard forward hooks of modules {missing[:3]} were not "
                               f"found (PyTorch {torch.__version__} registers them differently than dynprobe "
                               "expects); build the Probe without kernel=")
        yield
    finally:
        for hooks, original in reversed(saved):
            hooks.clear()
            hooks.update(original)


@contextlib.contextmanager
def whole_parameters(model: nn.Module, sharded: Mapping[str, torch.Tensor] | None = None) -> Iterator[None]:
    """The model as a plain module for the duration: every parameter replaced by its whole value (one all-gather
    of its DTensor each, the same on every rank: collective) and FSDP's forward hooks taken out; everything
    restored afterwards, the same parameter objects included (module docstring).

    ``sharded``: the DTensor parameters by name as the probe attached to them (the θ it stores). A module whose
    FSDP group is unsharded right now (the root after an eval forward, which reshards only after a backward)
    has its whole parameters registered, in the ``MixedPrecisionPolicy``'s dtype if there is one; the value is
    then gathered from the DTensor of that name instead. A parameter shared by several modules stays shared.
    """
    sharded = dict(sharded or {})
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    try:
        whole: dict[int, nn.Parameter] = {}
        with torch.no_grad():
            for prefix, module in model.named_modules():
                for name, p in list(module._parameters.items()):
                    source = p if p is None or _is_dtensor(p) else sharded.get(f"{prefix}.{name}" if prefix else name)
                    if source is None or not _is_dtensor(source):
                        continue  # a plain whole tensor: used as it is
                    if id(p) not in whole:
                        whole[id(p)] = nn.Parameter(source.full_tensor().detach(), requires_grad=p.requires_grad)
                    module._parameters[name] = whole[id(p)]
                    swapped.append((module, name, p))
        del whole
        with _without_fsdp_hooks(model):
            yield
    finally:
        for module, name, p in reversed(swapped):
            module._parameters[name] = p


class GatheredKernel:
    """The eNTK of a fully_shard-ed model, ``kernel(params) -> H`` on every rank (module docstring).

    A :class:`~dynprobe.distributed.kernel.ShardedKernel` (each rank a share of whole modules, one all-reduce of
    the partial kernels) whose construction and every call run inside :func:`whole_parameters` (``named_params``:
    the DTensor parameters as the probe attached to them). Construction (the engines' planning forwards) ends with
    one all-reduce of a failure flag, so a rank whose engine cannot be built makes every rank raise alike.
    Collective: every rank must construct and call it together.
    """

    def __init__(self, run: Any, model: nn.Module, make_engine: EngineFactory,
                 named_params: list[tuple[str, torch.Tensor]] | None = None) -> None:
        self.run, self.model, self.sharded = run, model, dict(named_params or [])
        error: Exception | None = None
        try:
            with whole_parameters(model, self.sharded):
                self._kernel = ShardedKernel(run, model, make_engine, rank0_buffers=True)
        except Exception as failure:  # noqa: BLE001 - re-raised below, after every rank learned of it
            error = failure
        flag = torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64, device=_device(model))
        run.all_reduce(flag)
        if error is not None:
            raise error
        if flag.item():
            raise ShardedRunFailure(f"the eNTK engine could not be built on {int(flag.item())} of {run.world_size} "
                                    "ranks (see that rank's error)")
        self.n, self.size = self._kernel.n, self._kernel.size

    @property
    def convention(self) -> dict[str, Any]:
        return {**self._kernel.convention,
                "fsdp": "whole θ gathered on every rank for the measurement (DTensor.full_tensor, the parameters' "
                        "dtype), FSDP's forward hooks bypassed; rank 0's buffers"}

    def __call__(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        with whole_parameters(self.model, self.sharded):
            return self._kernel(params)

    def per_layer(self, params: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Each layer's kernel H_l (:meth:`ShardedKernel.per_layer <dynprobe.distributed.kernel.ShardedKernel.
        per_layer>`), θ gathered for the measurement."""
        with whole_parameters(self.model, self.sharded):
            return self._kernel.per_layer(params)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def fsdp_kernel(run: Any, model: nn.Module, named_params: list[tuple[str, torch.Tensor]] | None = None
                ) -> Callable[[EngineFactory], GatheredKernel]:
    """The kernel factory of ``KernelMeasure(kernel_factory=...)`` for a fully_shard-ed model on ``run``'s ranks
    (``named_params``: its DTensor parameters as the probe attached to them)."""
    return lambda make_engine: GatheredKernel(run, model, make_engine, named_params)
