"""Empirical neural tangent kernel (eNTK) of any ``nn.Module``: eq. (3) of the two-phase paper (Zhou, Yang,
Sugiyama & Yan, *New Evidence of the Two-Phase Learning Dynamics of Neural Networks*).

For a probe set x_1..x_n and outputs f(x; θ) ∈ ℝ^c, the eNTK is ``H_ij = Σ_p ∂f(x_i)/∂θ_p · ∂f(x_j)/∂θ_p``, over
the differentiated parameters θ. Output modes (how the c logits are reduced):

=============== ===================================================== ====================
mode            kernel                                                shape
=============== ===================================================== ====================
``trace``       ``Σ_k J_k J_kᵀ`` (J_k: Jacobian of logit k)           (n, n)   — default
``logit_sum``   ``J_s J_sᵀ`` with f_s = Σ_k f_k (Mohamadi et al. 23)  (n, n)
``full``        ``H[(i,k),(j,l)] = J_k(x_i)·J_l(x_j)``, index i·c + k  (n·c, n·c)
``single``      ``J_k J_kᵀ`` for one logit ``class_index=k``          (n, n)
``true_class``  ``J_{y_i}(x_i)·J_{y_j}(x_j)`` with ``targets=y``       (n, n)
=============== ===================================================== ====================

``full`` is returned as an (n·c)×(n·c) matrix with sample-major index ``i·c + k`` (``H.view(n, c, n, c)[i, k, j,
l]``): a symmetric PSD matrix that kernel regression and eigen-solvers take as is; neural-tangents' / the
torch.func tutorial's (n, n, c, c) layout is ``H.view(n, c, n, c).permute(0, 2, 1, 3)``. Conventions differ
between libraries: neural-tangents' default ``trace_axes=(-1,)`` *averages* over logits, i.e. returns our
``trace`` divided by c. The kernel distance S (eq. 4, :func:`dynprobe.metrics.kernel_distance`) is scale
invariant and does not see the difference; absolute values (‖H‖, eigenvalues) do.

Outputs with more than one dimension per sample (a language model's (n, T, V) token logits) are flattened per
sample, c = T·V, so ``trace`` is the trace over every output coordinate:
``H_ij = Σ_{t,v} ∂f_tv(x_i)/∂θ · ∂f_tv(x_j)/∂θ``. ``output_mask`` (n, T) leaves out the coordinates a sample
does not have — padded positions, or positions no loss scores: with m_i(t) ∈ {0, 1},
``H_ij = Σ_{t,v} m_i(t) m_j(t) ∂f_tv(x_i)/∂θ · ∂f_tv(x_j)/∂θ``, the kernel of the function-space dynamics
restricted to the scored outputs (the probe passes the positions its token task scores). Without a mask the
logits computed at padded positions count like any other.

What is computed, exactly:

* θ: the model's parameters with ``requires_grad=True`` (the θ of eq. 1), or the names given as ``wrt=``;
  ``params=`` only supplies *values* (parameters and optionally buffers, by name, via
  ``torch.func.functional_call``), for instance a snapshot or a ghost replica's state.
* The model runs in eval mode (Dropout off, BatchNorm on running statistics: train-mode BatchNorm mixes the
  samples of a batch, which per-sample Jacobians cannot express). ``bn="recalibrated"`` re-estimates the running
  statistics on ``bn_batches`` first (:func:`dynprobe._util.batchnorm.reestimate_batchnorm`); at θ≈θ_0
  eval-mode statistics are un-warmed (mean 0, variance 1), which distorts early kernels — the reason that
  option exists.
* Jacobians are computed in the parameters' dtype; the contraction multiplies them in blocks of at most
  32,768 products and **accumulates in float64**; H is float64 on the model's device. S between nearby
  checkpoints can be ~1e-4, below what a float32 accumulation over millions of terms resolves.
* Per layer: eq. (3) is a sum over parameters, so H = Σ_l H_l over layers l (the module owning each parameter
  tensor, :func:`dynprobe._util.modules.layer_slices`); :meth:`NTKEngine.per_layer` returns every H_l from
  the same passes.
* Nothing about the user's model changes: parameters and buffers (bitwise), every submodule's train/eval flag,
  the CPU and CUDA RNG streams. Our forward hooks are registered for the duration of a call only; the user's
  own hooks do run during the engine's forward passes (as for any forward).

How (see :class:`NTKEngine`): a *structured* path for ``nn.Linear``, ``nn.Conv1d/2d/3d``, BatchNorm, LayerNorm,
GroupNorm, ``nn.Embedding`` and Hugging Face's ``Conv1D`` (per-sample gradients from layer inputs and batched
output gradients — no ``vmap``, so models with data-dependent control flow work; for Linear layers the kernel
is (input Gram) ∘ (output-gradient Gram), Novak et al. 2022), the generic ``torch.func`` path for every other
parameter (``vmap(jacrev)``, or one sample at a time where ``vmap`` cannot run the model), all contracted in
float64, chunked over samples, output rows and parameters to stay under ``max_memory``. ``method="generic"``
forces the generic path everywhere (the two agree to float rounding; the tests check it).

Caveat when comparing two computations of the "same" kernel: in float32 a ReLU network's activation masks can
flip at kinks between two implementations (a relative difference up to ~1e-4 on a ResNet-20 at n=128);
smooth activations agree to ~1e-7.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dynprobe._util.batchnorm import batch_inputs, check_running_statistics, reestimate_batchnorm
from dynprobe._util.checks import check_int
from dynprobe._util.modules import device_of, eval_mode, layer_name, layer_slices, preserved_rng, rng_devices
from dynprobe._util.user_warnings import warn_user

from ._calling import ModelCall
from ._chunking import ACCUMULATION
from ._execution import PlanRunner
from ._planning import KernelPlan, cotangent_rows, make_plan

__all__ = ["BN_MODES", "DEFAULT_MAX_MEMORY", "KERNEL_MODES", "NTKEngine", "empirical_ntk", "parse_mode"]

KERNEL_MODES = ("trace", "logit_sum", "full", "single", "true_class")
BN_MODES = ("eval", "recalibrated")
METHODS = ("auto", "generic")
DEFAULT_MAX_MEMORY = 2**30  # 1 GiB of extra memory per call


def empirical_ntk(model: nn.Module, inputs: torch.Tensor | Mapping[str, Any], *, mode: str = "trace",
                  class_index: int | None = None, targets: torch.Tensor | Sequence[int] | None = None,
                  bn: str = "eval", bn_batches: Iterable | None = None,
                  params: Mapping[str, torch.Tensor] | None = None,
                  output_fn: Callable[[Any], torch.Tensor] | None = None, max_memory: int | None = None,
                  method: str = "auto", wrt: Iterable[str] | None = None,
                  output_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The empirical NTK of ``model`` on ``inputs`` (eq. 3 of the two-phase paper); float64, on the model's device.

    Args:
        model: any ``nn.Module`` whose eval-mode forward treats samples independently.
        inputs: a tensor (``model(x)``) or a mapping of tensors (``model(**inputs)``; non-tensor values are passed
            unchanged), first dimension n = the number of probe samples.
        mode: ``"trace"`` (default), ``"logit_sum"``, ``"full"``, ``"single"`` (with ``class_index``, or written
            ``"single:k"``) or ``"true_class"`` (with ``targets``); see the module docstring for each formula.
        class_index: the logit of ``mode="single"``.
        targets: (n,) integer labels for ``mode="true_class"``.
        bn: ``"eval"`` (running statistics) or ``"recalibrated"`` (statistics re-estimated on ``bn_batches``).
        bn_batches: input batches for ``bn="recalibrated"``: tensors, mappings, or ``(inputs, ...)`` tuples as a
            DataLoader yields them; iterated once per call.
        params: values by name for parameters (and optionally buffers); missing names take the model's current
            values. The differentiated parameters are the model's trainable ones (or ``wrt``), whatever is given.
        output_fn: selects the logits from a non-tensor output, e.g. ``lambda out: out.logits``; outputs are
            flattened per sample, c = ∏ shape[1:].
        max_memory: bytes of extra memory the computation may use (default 1 GiB).
        method: ``"auto"`` (structured rules where they apply, torch.func elsewhere) or ``"generic"``.
        wrt: names of the parameters to differentiate (default: those with ``requires_grad=True``).
        output_mask: boolean (n, d_1, ..., d_k): which leading output coordinates each sample has (e.g. (n, T)
            for (n, T, V) token logits: the non-padded positions), broadcast over the remaining output
            dimensions; masked coordinates contribute nothing to H.

    Returns:
        H, float64: (n, n), or (n·c, n·c) for ``mode="full"``.

    For repeated calls on the same inputs (a kernel per snapshot), build an :class:`NTKEngine` once.
    """
    engine = NTKEngine(model, inputs, mode=mode, class_index=class_index, targets=targets, bn=bn,
                       bn_batches=bn_batches, output_fn=output_fn, max_memory=max_memory, method=method, wrt=wrt,
                       keep_buffers=False, output_mask=output_mask)
    return engine(params)


def parse_mode(mode: object, class_index: object) -> tuple[str, int | None]:
    """``(mode, class_index)`` from a mode name, ``"single:k"`` included; raises naming the fix."""
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a string, one of {KERNEL_MODES} or 'single:<k>'; got {type(mode).__name__}")
    if mode.startswith("single:"):
        text = mode.split(":", 1)[1]
        if not text.strip().lstrip("-").isdigit():
            raise ValueError(f"mode 'single:<k>' needs an integer class index; got {mode!r}")
        parsed = int(text)
        if class_index is not None and class_index != parsed:
            raise ValueError(f"mode={mode!r} and class_index={class_index!r} disagree; give the index once")
        mode, class_index = "single", parsed
    if mode not in KERNEL_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, KERNEL_MODES))} or 'single:<k>'; got {mode!r}")
    if mode == "single":
        if class_index is None:
            raise ValueError("mode='single' needs class_index=k (the logit to differentiate), or write mode='single:k'")
        check_int("class_index", class_index, minimum=0)
    elif class_index is not None:
        raise ValueError(f"class_index is only used with mode='single'; got mode={mode!r}")
    return mode, class_index


class NTKEngine:
    """A reusable eNTK computation on fixed probe inputs: ``engine(params) -> H`` (see :func:`empirical_ntk`).

    Construction validates everything, runs a few small planning forwards and plans the computation once
    (:attr:`plan`, a frozen :class:`~dynprobe.kernels._planning.KernelPlan`): which parameters get a structured
    rule and which the generic path, and how samples, output rows and parameters are chunked under
    ``max_memory``. Each call then computes H for new parameter values, reusing the plan and (with
    ``keep_buffers``, the default on CPU) a preallocated slab buffer.

    The algorithm, per call: a batched eval-mode forward over the probe samples with taps on supported layers;
    for each output row k (a logit, the logit sum, ...), one batched backward ``autograd.grad(f, taps, v_k)``
    gives every sample's output gradient δ at each tapped layer (samples are independent in eval mode); each
    layer turns (input, δ) into per-sample parameter gradients written into a slab ``(n, rows, P_group)``, or —
    Linear and Embedding layers — into small factors whose Grams give its kernel directly. A slab is contracted
    (``H += X Xᵀ``, float32 blocks accumulated in float64, symmetric blocking). Parameters without a rule are
    differentiated by the generic path into their own slabs. Attribute after a call: ``last_timings`` (seconds
    per phase, CPU wall clock; on CUDA launch times unless synchronized).
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor | Mapping[str, Any], *, mode: str = "trace",
                 class_index: int | None = None, targets: torch.Tensor | Sequence[int] | None = None,
                 bn: str = "eval", bn_batches: Iterable | None = None,
                 output_fn: Callable[[Any], torch.Tensor] | None = None, max_memory: int | None = None,
                 method: str = "auto", wrt: Iterable[str] | None = None, keep_buffers: bool | None = None,
                 output_mask: torch.Tensor | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        self.model = model
        self.mode, self.class_index = parse_mode(mode, class_index)
        if bn not in BN_MODES:
            hint = (" Train-mode BatchNorm normalizes with statistics of the whole batch, so the per-sample "
                    "Jacobians of eq. (3) are not defined for it.") if bn == "train" else ""
            raise ValueError(f"bn must be one of {BN_MODES}; got {bn!r}.{hint}")
        self.bn = bn
        if bn == "recalibrated":
            if bn_batches is None:
                raise ValueError("bn='recalibrated' needs bn_batches= (an iterable of training input batches)")
            if iter(bn_batches) is bn_batches:  # a one-shot iterator: keep its items for every call
                bn_batches = list(bn_batches)
        elif bn_batches is not None:
            raise ValueError("bn_batches is only used with bn='recalibrated'")
        self.bn_batches = bn_batches
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}")
        self.method = method
        if max_memory is not None:
            check_int("max_memory", max_memory, hint="a number of bytes, or None for the default")
        self.max_memory = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable (output -> logits tensor); got {type(output_fn).__name__}")
        self.output_fn = output_fn
        self.device = device_of(model)
        check_running_statistics(model)
        self.call = ModelCall.prepare(model, inputs, output_fn, self.device)
        self.n = self.call.n
        self.wrt = self._differentiated_names(wrt)
        self._private_copies = self._parameters_modified_by_forward()
        self.dtype = self._jacobian_dtype()
        self.keep_buffers = self.device.type == "cpu" if keep_buffers is None else bool(keep_buffers)
        self.last_timings: dict[str, float] = {}
        with self._protected():
            values = self._values(None)
            shape = self.call.check_independence(values)
            self.num_outputs = math.prod(shape)
            mask = self._output_mask(output_mask, shape)
            labels = self._labels(targets)
            rows = cotangent_rows(self.mode, self.n, self.num_outputs, dtype=self.dtype, device=self.device,
                                  class_index=self.class_index, labels=labels, output_mask=mask)
            self.plan: KernelPlan = make_plan(
                self.call, values, wrt=self.wrt, method=method, full=self.mode == "full", rows=rows,
                identity_rows=self.mode in ("trace", "full") and mask is None, num_outputs=self.num_outputs,
                dtype=self.dtype, max_memory=self.max_memory, layer_of=self._layer_of())
        self._masked = mask is not None
        self._runner = PlanRunner(self.plan, self.call)
        for note in self.plan.notes:
            warn_user(f"dynprobe eNTK: {note}", UserWarning)
        if not self.plan.chunks.fits:
            warnings.warn(f"max_memory={self.max_memory} bytes is below what the smallest plan needs "
                          f"(~{self.plan.chunks.estimated_bytes / 2**20:.0f} MiB); continuing with that plan",
                          stacklevel=2)

    # ------------------------------------------------------------------ public
    @property
    def layers(self) -> tuple[str, ...]:
        """The layers of the differentiated parameters (:func:`dynprobe._util.modules.layer_slices`), in order."""
        return self.plan.layers

    @property
    def convention(self) -> dict[str, Any]:
        """The conventions of the returned kernels, to store with them (never a number without its convention)."""
        return {"mode": self.mode, "class_index": self.class_index, "bn": self.bn, "n": self.n,
                "num_outputs": self.num_outputs, "logit_reduction": "sum" if self.mode == "trace" else self.mode,
                "layout": "(n*c, n*c) sample-major" if self.mode == "full" else "(n, n)",
                "output_mask": "masked output coordinates left out" if self._masked else "none",
                "jacobian_dtype": str(self.dtype).replace("torch.", ""), "accumulation": ACCUMULATION,
                "parameters": len(self.wrt), "method": self.method}

    def __call__(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """H for the given parameter values (None: the model's current ones); float64, see :func:`empirical_ntk`."""
        return self._compute(params, per_layer=False)[0]

    def per_layer(self, params: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Each layer's kernel H_l (float64, the shape of H) by layer name, in :attr:`layers` order; H = Σ_l H_l.

        A layer's kernel is eq. (3) restricted to that layer's parameters — what :func:`empirical_ntk` returns
        with ``wrt=`` the layer's parameter names — computed here for every layer from the same passes.
        """
        return dict(zip(self.plan.layers, self._compute(params, per_layer=True)))

    def release(self) -> None:
        """Free the preallocated slab buffer (it is reallocated by the next call)."""
        self._runner.release()

    def describe(self) -> str:
        """A human-readable summary of the plan: structured layers, generic parameters, chunking."""
        chunks = self.plan.chunks
        structured = sorted({unit.name for unit in chunks.units})
        generic = self.plan.generic_names
        strategy = f" ({self.plan.generic_strategy})" if generic else ""
        return (f"eNTK engine: mode={self.mode}, n={self.n}, c={self.num_outputs}, bn={self.bn}; structured layers: "
                f"{len(structured)}; generic parameters{strategy}: {generic or 'none'}; {chunks.describe()}")

    # ------------------------------------------------------------------ computing
    def _compute(self, params: Mapping[str, torch.Tensor] | None, *, per_layer: bool) -> list[torch.Tensor]:
        values = self._values(params)
        size = self.plan.size
        count = len(self.plan.layers) if per_layer else 1
        with self._protected():
            recalibration = 0.0
            if self.bn == "recalibrated":
                start = time.perf_counter()
                values.update(reestimate_batchnorm(
                    self.model, self.bn_batches, forward=lambda batch: self.call.call(values, batch_inputs(batch))))
                recalibration = time.perf_counter() - start
            kernels = [torch.zeros(size, size, dtype=torch.float64, device=self.device) for _ in range(count)]
            self.last_timings = dict(self._runner.run(values, kernels))
            if recalibration:
                self.last_timings["recalibration"] = recalibration
        if not self.keep_buffers:
            self._runner.release()
        return [0.5 * (kernel + kernel.T) for kernel in kernels]

    # ------------------------------------------------------------ inputs, params
    def _differentiated_names(self, wrt: Iterable[str] | None) -> list[str]:
        named = dict(self.model.named_parameters())
        if wrt is None:
            names = [name for name, p in named.items() if p.requires_grad]
        else:
            names = list(dict.fromkeys(wrt if not isinstance(wrt, str) else [wrt]))
            unknown = [name for name in names if name not in named]
            if unknown:
                raise ValueError(f"wrt names unknown parameters {unknown[:5]}; parameters are e.g. {list(named)[:5]}")
            order = {name: i for i, name in enumerate(named)}
            names.sort(key=order.__getitem__)  # vec(θ) order, whatever order wrt lists them in
        names = [name for name in names if named[name].is_floating_point()]
        if not names:
            raise ValueError("the model has no trainable floating-point parameters to differentiate "
                             "(all have requires_grad=False); pass wrt= to choose some")
        return names

    def _layer_of(self) -> dict[str, str]:
        """The layer of each differentiated parameter: :func:`dynprobe._util.modules.layer_slices` over them."""
        named = dict(self.model.named_parameters())
        slices = layer_slices([(name, named[name]) for name in self.wrt])
        layer_of: dict[str, str] = {}
        position, previous = -1, None
        for name in self.wrt:  # layer_slices starts a new entry exactly where the owning module changes
            if layer_name(name) != previous:
                position, previous = position + 1, layer_name(name)
            layer_of[name] = slices[position][0]
        return layer_of

    def _jacobian_dtype(self) -> torch.dtype:
        named = dict(self.model.named_parameters())
        dtype = named[self.wrt[0]].dtype
        for name in self.wrt[1:]:
            dtype = torch.promote_types(dtype, named[name].dtype)
        return torch.promote_types(dtype, torch.float32)  # half-precision models: float32 Jacobian blocks

    def _values(self, params: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Every parameter (detached, shared storage) and buffer (a private clone) by name, overridden by ``params``."""
        own = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        params = {} if params is None else params
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a mapping name -> tensor (e.g. a state_dict) or None; got "
                            f"{type(params).__name__}")
        unknown = [name for name in params if name not in own and name not in buffers]
        if unknown:
            raise ValueError(f"params names unknown parameters/buffers {unknown[:5]}; expected names such as "
                             f"{list(own)[:3]}")
        values: dict[str, torch.Tensor] = {}
        for name, reference in {**own, **buffers}.items():
            value = params.get(name, reference)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"params[{name!r}] must be a tensor; got {type(value).__name__}")
            if value.shape != reference.shape:
                raise ValueError(f"params[{name!r}] has shape {tuple(value.shape)}; the model's is "
                                 f"{tuple(reference.shape)}")
            value = value.detach().to(self.device)
            values[name] = value.clone() if name in buffers or name in self._private_copies else value
        return values

    def _parameters_modified_by_forward(self) -> set[str]:
        # Embedding(max_norm=...) renormalizes its table in place during the forward: give it a private copy.
        names = set()
        for prefix, module in self.model.named_modules():
            if isinstance(module, nn.Embedding) and module.max_norm is not None:
                names.add(f"{prefix}.weight" if prefix else "weight")
        return names

    def _output_mask(self, mask: object, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The (n, c) mask of output coordinates from a user mask over the leading output dimensions."""
        if mask is None:
            return None
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool:
            if mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("output_mask must be boolean (or 0/1 integers): True where a sample has that output")
            mask = mask.bool()
        k = mask.dim() - 1
        if k < 0 or mask.shape[0] != self.n or tuple(mask.shape[1:]) != shape[:k]:
            raise ValueError(f"output_mask must have shape (n, d_1, ..., d_k) = ({self.n}, ...) matching the leading "
                             f"dimensions of the per-sample output shape {shape}; got {tuple(mask.shape)}")
        mask = mask.reshape(*mask.shape, *([1] * (len(shape) - k))).expand(self.n, *shape)
        return mask.reshape(self.n, -1).to(self.device)

    def _labels(self, targets: object) -> torch.Tensor | None:
        n, c = self.n, self.num_outputs
        if self.mode == "true_class":
            if targets is None:
                raise ValueError("mode='true_class' needs targets= (the n integer labels of the probe samples)")
            labels = torch.as_tensor(targets)
            if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.shape != (n,):
                raise ValueError(f"targets must be {n} integer labels (shape ({n},)); got dtype {labels.dtype}, "
                                 f"shape {tuple(labels.shape)}")
            if labels.min() < 0 or labels.max() >= c:
                raise ValueError(f"targets must be class indices in [0, {c}); got range [{int(labels.min())}, "
                                 f"{int(labels.max())}]")
            return labels
        if targets is not None:
            raise ValueError(f"targets are only used with mode='true_class'; got mode={self.mode!r}")
        if self.mode == "single" and not 0 <= self.class_index < c:
            raise ValueError(f"class_index must be in [0, {c}) for a model with {c} outputs; got {self.class_index}")
        return None

    # ------------------------------------------------------------ forward helpers
    @contextlib.contextmanager
    def _protected(self) -> Iterator[None]:
        """Eval mode (flags restored), RNG preserved, autograd on, autocast off, whatever the caller's context."""
        autocast = torch.autocast(self.device.type, enabled=False) if self.device.type in ("cpu", "cuda") \
            else contextlib.nullcontext()
        with preserved_rng(rng_devices(self.model)), eval_mode(self.model), torch.inference_mode(False), \
                torch.enable_grad(), autocast:
            yield
