"""Running a :class:`~._planning.KernelPlan`: forwards with taps, row backwards, slabs (private).

Three passes add into the float64 kernel H, each over disjoint parameters:

* direct (sum modes, every sample's forward graph in memory): per output row, one batched backward gives the
  output gradients δ at every tapped layer; each layer's per-sample gradient blocks are contracted at once
  (narrow ones gathered by :class:`Staging`), never written to a slab;
* slabs: per parameter group and row chunk, per-sample gradients of all n samples (filled sample chunk by
  sample chunk, re-running the forward when the graph of all samples does not fit) are contracted
  ``H += X Xᵀ``; Linear/Embedding layers contribute through their factor Grams;
* generic: Jacobians of the parameters without a structured rule (:mod:`._generic`), into their own slabs.

Per-layer kernels: H = Σ_l H_l, since eq. (3) of the two-phase paper is a sum over parameters. The runner adds
each contribution into the kernel of the layer it comes from when given one output per layer (the plan's
``unit_layers`` / ``generic_layers``), into a single H otherwise — the same passes either way.
"""
from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from ._calling import ModelCall
from ._chunking import STAGING_COLUMNS, accumulate_gram
from ._generic import write_generic_jacobian
from ._planning import KernelPlan
from ._structured import Record, Tapper

__all__ = ["PlanRunner", "Staging"]


class PlanRunner:
    """Executes a plan on a model call; owns the preallocated slab buffer and the per-phase timings of a call."""

    def __init__(self, plan: KernelPlan, call: ModelCall) -> None:
        self.plan, self.call = plan, call
        self._buffer: torch.Tensor | None = None
        self.timings: dict[str, float] = {}

    def release(self) -> None:
        self._buffer = None

    def run(self, values: dict[str, torch.Tensor], kernels: list[torch.Tensor]) -> dict[str, float]:
        """Add every pass of the plan into ``kernels`` — one per layer of ``plan.layers``, or a single H.

        Returns seconds per phase (CPU wall clock).
        """
        if len(kernels) not in (1, len(self.plan.layers)):
            raise ValueError(f"expected 1 or {len(self.plan.layers)} output kernels; got {len(kernels)}")
        self.timings = {key: 0.0 for key in ("forward", "backward", "formation", "generic", "contraction")}
        self._kernels = kernels
        try:
            self._run_structured(values)
            self._run_generic(values)
        finally:
            self._kernels = []
        return self.timings

    def _unit_kernel(self, index: int) -> torch.Tensor:
        return self._kernels[self.plan.unit_layers[index]] if len(self._kernels) > 1 else self._kernels[0]

    def _segments(self, layers: list[int], widths: list[int]) -> list[tuple[torch.Tensor, int, int]]:
        """(kernel, first column, end column) for each run of consecutive columns that go to one kernel."""
        if len(self._kernels) == 1:
            return [(self._kernels[0], 0, sum(widths))]
        segments: list[tuple[torch.Tensor, int, int]] = []
        start = 0
        for layer, width in zip(layers, widths):
            kernel = self._kernels[layer]
            if segments and segments[-1][0] is kernel and segments[-1][2] == start:
                segments[-1] = (kernel, segments[-1][1], start + width)
            else:
                segments.append((kernel, start, start + width))
            start += width
        return segments

    def slab(self, samples: int, rows: int, columns: int) -> torch.Tensor:
        plan = self.plan
        needed = samples * rows * columns
        if self._buffer is None or self._buffer.numel() < needed:
            self._buffer = None
            largest = max([needed] + [plan.n * len(chunk) * sum(plan.chunks.units[i].cost.columns for i in group)
                                      for group in plan.chunks.structured_groups for chunk in plan.chunks.row_chunks])
            self._buffer = torch.empty(largest, dtype=plan.dtype, device=plan.device)
        return self._buffer[:needed].view(samples, rows, columns)

    def contract(self, slab: torch.Tensor, segments: list[tuple[torch.Tensor, int, int]]) -> None:
        start = time.perf_counter()
        samples, rows, columns = slab.shape
        for kernel, first, end in segments:
            if first == 0 and end == columns:
                flat = slab.view(samples * rows, columns) if self.plan.full else slab.view(samples, rows * columns)
                accumulate_gram(kernel, flat)
            elif self.plan.full:
                accumulate_gram(kernel, slab.view(samples * rows, columns)[:, first:end])
            else:  # Σ_rows of each row's Gram: no copy of the column range
                for row in range(rows):
                    accumulate_gram(kernel, slab[:, row, first:end])
        self.timings["contraction"] += time.perf_counter() - start

    def tapped_forward(self, tapper: Tapper, values: Mapping[str, torch.Tensor], samples: slice,
                       ) -> tuple[torch.Tensor, list[Record]]:
        plan = self.plan
        count = samples.stop - samples.start
        tapper.clear()
        tapper.batch = count
        tapper.active = True
        try:
            output = self.call.forward(values, samples)
        finally:
            tapper.active = False
        logits = self.call.to_logits(output, count)
        records = []
        for index, module_records in enumerate(tapper.records):
            if len(module_records) != 1:
                raise RuntimeError(
                    f"layer {plan.taps[index][0]!r} ran {len(module_records)} times in this forward but once "
                    "when the engine was planned (data-dependent control flow?); use method='generic'")
            record = module_records[0]
            if index not in plan.clone_inputs and record.inputs._version != record.input_version:
                raise RuntimeError(f"the input of layer {plan.taps[index][0]!r} was modified in place after "
                                   "the layer ran, unlike when the engine was planned; use method='generic'")
            if index not in plan.clone_outputs and record.output._version != record.output_version:
                raise RuntimeError(f"the output of layer {plan.taps[index][0]!r} was modified in place, unlike "
                                   "when the engine was planned; use method='generic'")
            records.append(record)
        return logits, records

    def _run_structured(self, values: dict[str, torch.Tensor]) -> None:
        plan = self.plan
        if not plan.chunks.structured_groups:
            return
        with Tapper([module for _, module in plan.taps], clone_outputs=plan.clone_outputs,
                    clone_inputs=plan.clone_inputs, broadcast=plan.broadcast) as tapper:
            if plan.chunks.direct:
                self._run_direct(tapper, values)
            else:
                self._run_slabs(tapper, values)

    def _forward(self, tapper: Tapper, values: Mapping[str, torch.Tensor], samples: slice,
                 ) -> tuple[torch.Tensor, list[Record]]:
        tick = time.perf_counter()
        result = self.tapped_forward(tapper, values, samples)
        self.timings["forward"] += time.perf_counter() - tick
        return result

    def _row_deltas(self, logits: torch.Tensor, records: list[Record], taps: list[int], cotangent: torch.Tensor,
                    ) -> dict[int, torch.Tensor]:
        """Output gradients δ of one cotangent row at the given taps (zeros where a layer does not reach f)."""
        tick = time.perf_counter()
        outputs = [records[t].output for t in taps]
        if logits.requires_grad:
            grads = torch.autograd.grad(logits, outputs, cotangent, retain_graph=True, allow_unused=True)
        else:  # no tapped layer reaches the output
            grads = [None] * len(outputs)
        deltas = {t: torch.zeros_like(o) if g is None else g for t, g, o in zip(taps, grads, outputs)}
        self.timings["backward"] += time.perf_counter() - tick
        return deltas

    def _run_direct(self, tapper: Tapper, values: dict[str, torch.Tensor]) -> None:
        """Sum modes with every sample's forward graph in memory: contract each layer's gradients as formed."""
        plan = self.plan
        units = plan.chunks.units
        n = plan.n
        taps = sorted({unit.module_id for unit in units})
        everything = slice(0, n)
        staging = Staging(n, plan.dtype, plan.device, self.timings)
        logits, records = self._forward(tapper, values, everything)
        factors = {id(u): u.new_factors(n, 1, plan.dtype, plan.device) for u in units if u.gram}
        for row in range(plan.rows.shape[0]):
            deltas = self._row_deltas(logits, records, taps, plan.rows[row])
            for index, unit in enumerate(units):
                tick = time.perf_counter()
                record = records[unit.module_id]
                if unit.gram:
                    unit.store(factors[id(unit)], deltas[unit.module_id], record, everything, 0)
                    blocks = []
                else:
                    blocks = unit.blocks(deltas[unit.module_id], record)
                self.timings["formation"] += time.perf_counter() - tick
                kernel = self._unit_kernel(index)
                if unit.gram:
                    tick = time.perf_counter()
                    unit.contract(factors[id(unit)], kernel, False)
                    self.timings["contraction"] += time.perf_counter() - tick
                for block in blocks:
                    staging.add(block, kernel)
            del deltas
        staging.flush()

    def _run_slabs(self, tapper: Tapper, values: dict[str, torch.Tensor]) -> None:
        """Per group and row chunk: fill a slab for all samples (chunk by chunk), contract it and the factor Grams."""
        plan = self.plan
        chunks, n = plan.chunks, plan.n
        retained = None  # the forward of all samples, when the plan keeps it for every group and row chunk
        for group in chunks.structured_groups:
            units = [chunks.units[i] for i in group]
            widths = [u.cost.columns for u in units]
            offsets = [sum(widths[:k]) for k in range(len(units))]
            segments = self._segments([plan.unit_layers[i] for i in group], widths)
            taps = sorted({unit.module_id for unit in units})
            for rows in chunks.row_chunks:
                slab = self.slab(n, len(rows), sum(widths))
                factors = {id(u): u.new_factors(n, len(rows), plan.dtype, plan.device) for u in units if u.gram}
                for start in range(0, n, chunks.sample_chunk):
                    samples = slice(start, min(start + chunks.sample_chunk, n))
                    if chunks.retained:
                        retained = retained or self._forward(tapper, values, samples)
                        logits, records = retained
                    else:
                        logits, records = self._forward(tapper, values, samples)
                    for j, row in enumerate(rows):
                        deltas = self._row_deltas(logits, records, taps, plan.rows[row, samples])
                        tick = time.perf_counter()
                        for unit, offset in zip(units, offsets):
                            record, delta = records[unit.module_id], deltas[unit.module_id]
                            if unit.gram:
                                unit.store(factors[id(unit)], delta, record, samples, j)
                            else:
                                unit.form(delta, record, slab[samples, j, offset : offset + unit.cost.columns])
                        self.timings["formation"] += time.perf_counter() - tick
                        del deltas
                    del logits, records
                self.contract(slab, segments)
                tick = time.perf_counter()
                for index, unit in zip(group, units):
                    if unit.gram:
                        unit.contract(factors[id(unit)], self._unit_kernel(index), plan.full)
                self.timings["contraction"] += time.perf_counter() - tick

    def _run_generic(self, values: dict[str, torch.Tensor]) -> None:
        plan = self.plan
        chunks, n = plan.chunks, plan.n
        rows_all = None if plan.identity_rows else plan.rows.transpose(0, 1)  # (n, rows, c)
        row_count = plan.rows.shape[0]
        for group in chunks.generic_groups:
            widths = [values[name].numel() for name in group]
            segments = self._segments([plan.generic_layers[name] for name in group], widths)
            slab = self.slab(n, row_count, sum(widths))
            for start in range(0, n, chunks.generic_chunk):
                samples = slice(start, min(start + chunks.generic_chunk, n))
                tick = time.perf_counter()
                write_generic_jacobian(plan.generic_strategy, self.call, values, group, samples,
                                       None if rows_all is None else rows_all[samples], slab[samples])
                self.timings["generic"] += time.perf_counter() - tick
            self.contract(slab, segments)


class Staging:
    """Contracts (m, k) gradient blocks into H: wide ones at once, narrow ones gathered first (fewer tiny GEMMs).

    Blocks are gathered per target kernel: a block for another kernel (another layer's H_l) flushes first.
    """

    def __init__(self, samples: int, dtype: torch.dtype, device: torch.device, timings: dict[str, float]) -> None:
        self.timings = timings
        self.buffer = torch.empty(samples, STAGING_COLUMNS, dtype=dtype, device=device)
        self.used = 0
        self.kernel: torch.Tensor | None = None

    def add(self, block: torch.Tensor, kernel: torch.Tensor) -> None:
        width = block.shape[1]
        if width >= STAGING_COLUMNS // 4:
            self._contract(block, kernel)
            return
        if self.used + width > STAGING_COLUMNS or (self.kernel is not None and kernel is not self.kernel):
            self.flush()
        self.kernel = kernel
        self.buffer[:, self.used : self.used + width].copy_(block)
        self.used += width

    def flush(self) -> None:
        if self.used:
            self._contract(self.buffer[:, : self.used], self.kernel)
            self.used = 0

    def _contract(self, block: torch.Tensor, kernel: torch.Tensor) -> None:
        tick = time.perf_counter()
        accumulate_gram(kernel, block)
        self.timings["contraction"] += time.perf_counter() - tick
