"""Empirical neural tangent kernel (eNTK) of any ``nn.Module``: eq. (3) of the two-phase paper.

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
l]``): a symmetric PSD matrix that kernel regression and eigen-solvers take as is, and the shape the DESIGN
names; neural-tangents' / the torch.func tutorial's (n, n, c, c) layout is ``H.view(n, c, n, c).permute(0, 2,
1, 3)``. Conventions differ between libraries: neural-tangents' default ``trace_axes=(-1,)`` *averages* over
logits, i.e. returns our ``trace`` divided by c. The kernel distance S (eq. 4, :func:`dynprobe.metrics.
kernel_distance`) is scale invariant and does not see the difference; absolute values (‖H‖, eigenvalues) do.

What is computed, exactly:

* θ: the model's parameters with ``requires_grad=True`` (the θ of eq. 1), or the names given as ``wrt=``;
  ``params=`` only supplies *values* (parameters and optionally buffers, by name, via
  ``torch.func.functional_call``), for instance a snapshot or a ghost replica's state.
* The model runs in eval mode (Dropout off, BatchNorm on running statistics: train-mode BatchNorm mixes the
  samples of a batch, which per-sample Jacobians cannot express). ``bn="recalibrated"`` re-estimates the running
  statistics on ``bn_batches`` first (REPAIR's ``reset_bn_stats``); note that at θ≈θ_0 eval-mode statistics are
  un-warmed (mean 0, variance 1), which distorts early kernels — the reason that option exists.
* Jacobians are computed in the parameters' dtype; the contraction multiplies them in blocks of at most
  32,768 products and **accumulates in float64**; H is float64 on the model's device. S between nearby
  checkpoints can be ~1e-4, below what a float32 accumulation over millions of terms resolves.
* Nothing about the user's model changes: parameters and buffers (bitwise), every submodule's train/eval flag,
  the CPU and CUDA RNG streams. Our forward hooks are registered for the duration of a call only; the user's
  own hooks do run during the engine's forward passes (as for any forward).

How (see :class:`NTKEngine`): a *structured* path for ``nn.Linear``, ``nn.Conv1d/2d/3d``, BatchNorm, LayerNorm,
GroupNorm and ``nn.Embedding`` (per-sample gradients from layer inputs and batched output gradients; for
Linear layers the kernel is (input Gram) ∘ (output-gradient Gram), Novak et al. 2022), the generic torch.func
path (``vmap(jacrev(functional_call))``) for every other parameter, both contracted in float64, chunked over
samples, output rows and parameters to stay under ``max_memory``. ``method="generic"`` forces the torch.func
path everywhere (the two agree to float rounding; the tests check it).

Caveat when comparing two computations of the "same" kernel: in float32 a ReLU network's activation masks can
flip at kinks between two implementations (up to ~1e-4 relative on a ResNet-20 at n=128); smooth activations
agree to ~1e-7.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from dynprobe._util.batchnorm import batch_inputs, check_running_statistics, recalibrated_statistics
from dynprobe._util.modules import device_of, eval_mode, preserved_rng, rng_devices

from ._chunking import ChunkPlan, plan_chunks
from ._execution import PlanRunner
from ._planning import discover_structure

__all__ = ["BN_MODES", "DEFAULT_MAX_MEMORY", "KERNEL_MODES", "NTKEngine", "empirical_ntk"]

KERNEL_MODES = ("trace", "logit_sum", "full", "single", "true_class")
BN_MODES = ("eval", "recalibrated")
METHODS = ("auto", "generic")
DEFAULT_MAX_MEMORY = 2**30  # 1 GiB of extra memory per call


def empirical_ntk(model: nn.Module, inputs: torch.Tensor | Mapping[str, Any], *, mode: str = "trace",
                  class_index: int | None = None, targets: torch.Tensor | Sequence[int] | None = None,
                  bn: str = "eval", bn_batches: Iterable | None = None,
                  params: Mapping[str, torch.Tensor] | None = None,
                  output_fn: Callable[[Any], torch.Tensor] | None = None, max_memory: int | None = None,
                  method: str = "auto", wrt: Iterable[str] | None = None) -> torch.Tensor:
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

    Returns:
        H, float64: (n, n), or (n·c, n·c) for ``mode="full"``.

    For repeated calls on the same inputs (a kernel per snapshot), build an :class:`NTKEngine` once.
    """
    engine = NTKEngine(model, inputs, mode=mode, class_index=class_index, targets=targets, bn=bn,
                       bn_batches=bn_batches, output_fn=output_fn, max_memory=max_memory, method=method, wrt=wrt,
                       keep_buffers=False)
    return engine(params)


def _parse_mode(mode: object, class_index: object) -> tuple[str, int | None]:
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
        if isinstance(class_index, bool) or not isinstance(class_index, int):
            raise TypeError(f"class_index must be an int; got {class_index!r}")
    elif class_index is not None:
        raise ValueError(f"class_index is only used with mode='single'; got mode={mode!r}")
    return mode, class_index


class NTKEngine:
    """A reusable eNTK computation on fixed probe inputs: ``engine(params) -> H`` (see :func:`empirical_ntk`).

    Construction validates everything, runs two small planning forwards (a few samples) and plans the
    computation once: which parameters get a structured rule and which the generic path, and how samples,
    output rows and parameters are chunked under ``max_memory``. Each call then computes H for new parameter
    values, reusing the plan and (with ``keep_buffers``, the default on CPU) a preallocated slab buffer.

    The algorithm, per call: a batched eval-mode forward over the probe samples with taps on supported layers;
    for each output row k (a logit, the logit sum, ...), one batched backward ``autograd.grad(f, taps, v_k)``
    gives every sample's output gradient δ at each tapped layer (samples are independent in eval mode); each
    layer turns (input, δ) into per-sample parameter gradients written into a slab ``(n, rows, P_group)``, or —
    Linear and Embedding layers — into small factors whose Grams give its kernel directly. A slab is contracted
    (``H += X Xᵀ``, float32 blocks accumulated in float64, symmetric blocking). Parameters without a rule are
    differentiated with ``vmap(jacrev)`` into their own slabs. Attributes after a call: ``last_timings``
    (seconds per phase, CPU wall clock; on CUDA launch times unless synchronized) and ``plan``.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor | Mapping[str, Any], *, mode: str = "trace",
                 class_index: int | None = None, targets: torch.Tensor | Sequence[int] | None = None,
                 bn: str = "eval", bn_batches: Iterable | None = None,
                 output_fn: Callable[[Any], torch.Tensor] | None = None, max_memory: int | None = None,
                 method: str = "auto", wrt: Iterable[str] | None = None, keep_buffers: bool | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        self.model = model
        self.mode, self.class_index = _parse_mode(mode, class_index)
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
        if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, int)
                                       or max_memory <= 0):
            raise ValueError(f"max_memory must be a positive number of bytes (int) or None; got {max_memory!r}")
        self.max_memory = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable (output -> logits tensor); got {type(output_fn).__name__}")
        self.output_fn = output_fn
        self.device = device_of(model)
        check_running_statistics(model)
        self._batched, self._constants, self._positional, self.n = self._prepare_inputs(inputs)
        self.wrt = self._differentiated_names(wrt)
        self._private_copies = self._parameters_modified_by_forward()
        self.dtype = self._jacobian_dtype()
        self.keep_buffers = self.device.type == "cpu" if keep_buffers is None else bool(keep_buffers)
        self._runner = PlanRunner(self)
        self.last_timings: dict[str, float] = {}
        with self._protected():
            values = self._values(None)
            self.num_outputs = self._check_output_and_independence(values)
            self.rows = self._cotangent_rows(targets)
            self.plan = self._make_plan(values)
        if not self.plan.fits:
            warnings.warn(f"max_memory={self.max_memory} bytes is below what the smallest plan needs "
                          f"(~{self.plan.estimated_bytes / 2**20:.0f} MiB); continuing with that plan", stacklevel=2)

    # ------------------------------------------------------------------ public
    @property
    def convention(self) -> dict[str, Any]:
        """The conventions of the returned kernels, to store with them (STYLE: never a number without its convention)."""
        return {"mode": self.mode, "class_index": self.class_index, "bn": self.bn, "n": self.n,
                "num_outputs": self.num_outputs, "logit_reduction": "sum" if self.mode == "trace" else self.mode,
                "layout": "(n*c, n*c) sample-major" if self.mode == "full" else "(n, n)",
                "jacobian_dtype": str(self.dtype).replace("torch.", ""), "accumulation": "float64",
                "parameters": len(self.wrt), "method": self.method}

    def __call__(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """H for the given parameter values (None: the model's current ones); float64, see :func:`empirical_ntk`."""
        values = self._values(params)
        size = self.n * (self.num_outputs if self.mode == "full" else 1)
        with self._protected():
            recalibration = 0.0
            if self.bn == "recalibrated":
                start = time.perf_counter()
                values.update(recalibrated_statistics(self.model, self.bn_batches,
                                                      lambda batch: self._call_model(values, batch_inputs(batch))))
                recalibration = time.perf_counter() - start
            kernel = torch.zeros(size, size, dtype=torch.float64, device=self.device)
            self.last_timings = dict(self._runner.run(values, kernel))
            if recalibration:
                self.last_timings["recalibration"] = recalibration
        if not self.keep_buffers:
            self._runner.release()
        return 0.5 * (kernel + kernel.T)

    def release(self) -> None:
        """Free the preallocated slab buffer (it is reallocated by the next call)."""
        self._runner.release()

    def describe(self) -> str:
        """A human-readable summary of the plan: structured layers, generic parameters, chunking."""
        structured = sorted({unit.name for unit in self.plan.units})
        generic = [name for group in self.plan.generic_groups for name in group]
        return (f"eNTK engine: mode={self.mode}, n={self.n}, c={self.num_outputs}, bn={self.bn}; structured layers: "
                f"{len(structured)}; generic parameters: {generic or 'none'}; {self.plan.describe()}")

    # ------------------------------------------------------------ inputs, params
    def _prepare_inputs(self, inputs: object) -> tuple[dict[str, torch.Tensor], dict, bool, int]:
        with torch.inference_mode(False):
            if isinstance(inputs, torch.Tensor):
                batched, constants, positional = {"0": inputs}, {}, True
            elif isinstance(inputs, Mapping):
                batched = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
                constants = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}
                positional = False
                if not batched:
                    raise ValueError("inputs mapping has no tensor values; the probe samples must be tensors")
            else:
                raise TypeError(f"inputs must be a tensor or a mapping of tensors; got {type(inputs).__name__}")
            sizes = {k: (v.shape[0] if v.dim() else None) for k, v in batched.items()}
            if len(set(sizes.values())) != 1 or None in sizes.values():
                raise ValueError(f"every input tensor needs the same first (sample) dimension n; got sizes {sizes}")
            n = next(iter(sizes.values()))
            if n < 1:
                raise ValueError("inputs have no samples (first dimension 0)")
            batched = {k: v.detach().to(self.device).clone() for k, v in batched.items()}
        return batched, constants, positional, n

    def _differentiated_names(self, wrt: Iterable[str] | None) -> list[str]:
        named = dict(self.model.named_parameters())
        if wrt is None:
            names = [name for name, p in named.items() if p.requires_grad]
        else:
            names = list(dict.fromkeys(wrt if not isinstance(wrt, str) else [wrt]))
            unknown = [name for name in names if name not in named]
            if unknown:
                raise ValueError(f"wrt names unknown parameters {unknown[:5]}; parameters are e.g. {list(named)[:5]}")
        names = [name for name in names if named[name].is_floating_point()]
        if not names:
            raise ValueError("the model has no trainable floating-point parameters to differentiate "
                             "(all have requires_grad=False); pass wrt= to choose some")
        return names

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

    # ------------------------------------------------------------ forward helpers
    @contextlib.contextmanager
    def _protected(self) -> Iterator[None]:
        """Eval mode (flags restored), RNG preserved, autograd on, autocast off, whatever the caller's context."""
        autocast = torch.autocast(self.device.type, enabled=False) if self.device.type in ("cpu", "cuda") \
            else contextlib.nullcontext()
        with preserved_rng(rng_devices(self.model)), eval_mode(self.model), torch.inference_mode(False), \
                torch.enable_grad(), autocast:
            yield

    def _chunk(self, samples: slice) -> dict[str, torch.Tensor]:
        return {k: v[samples] for k, v in self._batched.items()}

    def _call_model(self, values: Mapping[str, torch.Tensor], batch: object) -> object:
        if isinstance(batch, Mapping):
            batch = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            return functional_call(self.model, values, (), batch)
        return functional_call(self.model, values, (batch.to(self.device),))

    def _forward(self, values: Mapping[str, torch.Tensor], samples: slice) -> object:
        chunk = self._chunk(samples)
        if self._positional:
            return functional_call(self.model, values, (chunk["0"],))
        return functional_call(self.model, values, (), {**chunk, **self._constants})

    def _to_logits(self, output: object, batch: int) -> torch.Tensor:
        if self.output_fn is not None:
            output = self.output_fn(output)
        if not isinstance(output, torch.Tensor):
            hint = "" if self.output_fn is None else " (output_fn returned it)"
            raise TypeError(f"the model output is a {type(output).__name__}{hint}, not a tensor of logits; pass "
                            "output_fn= to select them, e.g. output_fn=lambda out: out.logits or lambda out: out[0]")
        if output.dim() == 0 or output.shape[0] != batch:
            raise ValueError(f"the logits must have the samples on their first dimension ({batch}); got shape "
                             f"{tuple(output.shape)} — select/reshape them with output_fn=")
        return output.reshape(batch, -1)

    def _check_output_and_independence(self, values: Mapping[str, torch.Tensor]) -> int:
        """Number of logits c; raise if the eval-mode forward mixes samples (or is random)."""
        count = min(self.n, 3)
        with torch.no_grad():
            together = self._to_logits(self._forward(values, slice(0, count)), count)
            if count > 1:
                alone = torch.cat([self._to_logits(self._forward(values, slice(i, i + 1)), 1) for i in range(count)])
                tolerance = 1e3 * torch.finfo(together.dtype).eps * (together.abs().max().item() + 1e-30)
                if alone.shape != together.shape or (alone - together).abs().max().item() > tolerance:
                    raise ValueError(
                        "the model's eval-mode output for a sample depends on the other samples of the batch (or is "
                        "random): per-sample Jacobians (eq. 3) cannot express that. Typical causes: BatchNorm-like "
                        "layers using batch statistics, attention across the batch dimension, dropout that ignores "
                        "eval mode (F.dropout without training=self.training).")
        if together.shape[1] == 0:
            raise ValueError("the model has no outputs (c = 0)")
        return together.shape[1]

    def _cotangent_rows(self, targets: object) -> torch.Tensor:
        """(rows, n, c) cotangents v_k: one-hot logits (trace/full), ones (logit_sum), e_k, e_{y_i}."""
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
        elif targets is not None:
            raise ValueError(f"targets are only used with mode='true_class'; got mode={self.mode!r}")
        if self.mode == "single" and not 0 <= self.class_index < c:
            raise ValueError(f"class_index must be in [0, {c}) for a model with {c} outputs; got {self.class_index}")
        if self.mode in ("trace", "full"):
            rows = torch.eye(c, dtype=self.dtype, device=self.device).unsqueeze(1).repeat(1, n, 1)
        elif self.mode == "logit_sum":
            rows = torch.ones(1, n, c, dtype=self.dtype, device=self.device)
        elif self.mode == "single":
            rows = torch.zeros(1, n, c, dtype=self.dtype, device=self.device)
            rows[0, :, self.class_index] = 1
        else:
            rows = torch.zeros(1, n, c, dtype=self.dtype, device=self.device)
            rows[0, torch.arange(n), labels.to(self.device)] = 1
        return rows

    # ------------------------------------------------------------------ planning
    def _make_plan(self, values: dict[str, torch.Tensor]) -> ChunkPlan:
        structure = discover_structure(self, values)
        self.tap_modules = structure.modules
        self.clone_outputs, self.clone_inputs = structure.clone_outputs, structure.clone_inputs
        itemsize = torch.finfo(self.dtype).bits // 8
        rows = self.rows.shape[0]
        size = self.n * (self.num_outputs if self.mode == "full" else 1)
        fixed = 2 * size * size * 8 + self.rows.numel() * itemsize + sum(
            v.numel() * v.element_size() for v in self._batched.values())
        fixed += max([u.contract_bytes(self.n, rows) for u in structure.units if u.gram], default=0)
        return plan_chunks(n=self.n, rows=rows, full=self.mode == "full", itemsize=itemsize, budget=self.max_memory,
                           fixed_bytes=fixed, graph_bytes=structure.graph_bytes,
                           activation_bytes=structure.activation_bytes, units=structure.units,
                           generic=structure.generic, generic_graph_bytes=structure.generic_graph_bytes)
