"""Running a :class:`~dynprobe._kernel_chunking.ChunkPlan`: forwards with taps, row backwards, slabs (private).

Three passes add into the float64 kernel H, each over disjoint parameters:

* direct (sum modes, every sample's forward graph in memory): per output row, one batched backward gives the
  output gradients δ at every tapped layer; each layer's per-sample gradient blocks are contracted at once
  (narrow ones gathered by :class:`Staging`), never written to a slab;
* slabs: per parameter group and row chunk, per-sample gradients of all n samples (filled sample chunk by
  sample chunk, re-running the forward when the graph of all samples does not fit) are contracted
  ``H += X Xᵀ``; Linear/Embedding layers contribute through their factor Grams;
* generic: ``vmap(jacrev)`` Jacobians of the parameters without a structured rule, into their own slabs.
"""
from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from ._chunking import STAGING_COLUMNS, accumulate_gram
from ._generic import write_generic_jacobian
from ._structured import Record, Tapper

__all__ = ["PlanRunner", "Staging"]


class PlanRunner:
    """Executes an engine's plan; owns the preallocated slab buffer and the per-phase timings of a call."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._buffer: torch.Tensor | None = None
        self.timings: dict[str, float] = {}

    def release(self) -> None:
        self._buffer = None

    def run(self, values: dict[str, torch.Tensor], kernel: torch.Tensor) -> dict[str, float]:
        """Add every pass of the plan into ``kernel``; returns seconds per phase (CPU wall clock)."""
        self.timings = {key: 0.0 for key in ("forward", "backward", "formation", "generic", "contraction")}
        self.run_structured(values, kernel)
        self.run_generic(values, kernel)
        return self.timings

    def slab(self, samples: int, rows: int, columns: int) -> torch.Tensor:
        engine = self.engine
        needed = samples * rows * columns
        if self._buffer is None or self._buffer.numel() < needed:
            self._buffer = None
            largest = max([needed] + [engine.n * len(chunk) * sum(engine.plan.units[i].cost.columns for i in group)
                                      for group in engine.plan.structured_groups for chunk in engine.plan.row_chunks])
            self._buffer = torch.empty(largest, dtype=engine.dtype, device=engine.device)
        return self._buffer[:needed].view(samples, rows, columns)

    def contract(self, slab: torch.Tensor, kernel: torch.Tensor) -> None:
        engine = self.engine
        start = time.perf_counter()
        samples, rows, columns = slab.shape
        flat = slab.view(samples * rows, columns) if engine.mode == "full" else slab.view(samples, rows * columns)
        accumulate_gram(kernel, flat)
        self.timings["contraction"] += time.perf_counter() - start

    def tapped_forward(self, tapper: Tapper, values: Mapping[str, torch.Tensor], samples: slice,
                        ) -> tuple[torch.Tensor, list[Record]]:
        engine = self.engine
        tapper.clear()
        tapper.active = True
        try:
            output = engine._forward(values, samples)
        finally:
            tapper.active = False
        count = samples.stop - samples.start
        logits = engine._to_logits(output, count)
        records = []
        for index, module_records in enumerate(tapper.records):
            if len(module_records) != 1:
                raise RuntimeError(
                    f"layer {engine.tap_modules[index][0]!r} ran {len(module_records)} times in this forward but once "
                    "when the engine was planned (data-dependent control flow?); use method='generic'")
            record = module_records[0]
            if index not in engine.clone_inputs and record.inputs._version != record.input_version:
                raise RuntimeError(f"the input of layer {engine.tap_modules[index][0]!r} was modified in place after "
                                   "the layer ran, unlike when the engine was planned; use method='generic'")
            if index not in engine.clone_outputs and record.output._version != record.output_version:
                raise RuntimeError(f"the output of layer {engine.tap_modules[index][0]!r} was modified in place, unlike "
                                   "when the engine was planned; use method='generic'")
            records.append(record)
        return logits, records

    def run_structured(self, values: dict[str, torch.Tensor], kernel: torch.Tensor) -> None:
        plan = self.engine.plan
        if not plan.structured_groups:
            return
        with self._tapper() as tapper:
            if plan.direct:
                self._run_direct(tapper, values, kernel)
            else:
                self._run_slabs(tapper, values, kernel)

    def _tapper(self) -> Tapper:
        engine = self.engine
        return Tapper([module for _, module in engine.tap_modules], clone_outputs=engine.clone_outputs,
                      clone_inputs=engine.clone_inputs)

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

    def _run_direct(self, tapper: Tapper, values: dict[str, torch.Tensor], kernel: torch.Tensor) -> None:
        """Sum modes with every sample's forward graph in memory: contract each layer's gradients as formed."""
        engine = self.engine
        units = engine.plan.units
        taps = sorted({unit.module_id for unit in units})
        everything = slice(0, engine.n)
        staging = Staging(kernel, engine.n, engine.dtype, engine.device, self.timings)
        logits, records = self._forward(tapper, values, everything)
        factors = {id(u): u.new_factors(engine.n, 1, engine.dtype, engine.device) for u in units if u.gram}
        for row in range(engine.rows.shape[0]):
            deltas = self._row_deltas(logits, records, taps, engine.rows[row])
            for unit in units:
                tick = time.perf_counter()
                record = records[unit.module_id]
                if unit.gram:
                    unit.store(factors[id(unit)], deltas[unit.module_id], record, everything, 0)
                    blocks = []
                else:
                    blocks = unit.blocks(deltas[unit.module_id], record)
                self.timings["formation"] += time.perf_counter() - tick
                if unit.gram:
                    tick = time.perf_counter()
                    unit.contract(factors[id(unit)], kernel, False)
                    self.timings["contraction"] += time.perf_counter() - tick
                for block in blocks:
                    staging.add(block)
            del deltas
        staging.flush()

    def _run_slabs(self, tapper: Tapper, values: dict[str, torch.Tensor], kernel: torch.Tensor) -> None:
        """Per group and row chunk: fill a slab for all samples (chunk by chunk), contract it and the factor Grams."""
        engine = self.engine
        plan = engine.plan
        retained = None  # the forward of all samples, when the plan keeps it for every group and row chunk
        for group in plan.structured_groups:
            units = [plan.units[i] for i in group]
            offsets = [sum(u.cost.columns for u in units[:k]) for k in range(len(units))]
            taps = sorted({unit.module_id for unit in units})
            for rows in plan.row_chunks:
                slab = self.slab(engine.n, len(rows), sum(u.cost.columns for u in units))
                factors = {id(u): u.new_factors(engine.n, len(rows), engine.dtype, engine.device)
                           for u in units if u.gram}
                for start in range(0, engine.n, plan.sample_chunk):
                    samples = slice(start, min(start + plan.sample_chunk, engine.n))
                    if plan.retained:
                        retained = retained or self._forward(tapper, values, samples)
                        logits, records = retained
                    else:
                        logits, records = self._forward(tapper, values, samples)
                    for j, row in enumerate(rows):
                        deltas = self._row_deltas(logits, records, taps, engine.rows[row, samples])
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
                self.contract(slab, kernel)
                tick = time.perf_counter()
                for unit in units:
                    if unit.gram:
                        unit.contract(factors[id(unit)], kernel, engine.mode == "full")
                self.timings["contraction"] += time.perf_counter() - tick

    def run_generic(self, values: dict[str, torch.Tensor], kernel: torch.Tensor) -> None:
        engine = self.engine
        plan = engine.plan
        sizes = {name: values[name].numel() for group in plan.generic_groups for name in group}
        rows_all = None if engine.mode in ("trace", "full") else engine.rows.transpose(0, 1)  # (n, rows, c)
        row_count = engine.rows.shape[0]
        for group in plan.generic_groups:
            slab = self.slab(engine.n, row_count, sum(sizes[name] for name in group))
            for start in range(0, engine.n, plan.generic_chunk):
                samples = slice(start, min(start + plan.generic_chunk, engine.n))
                tick = time.perf_counter()
                write_generic_jacobian(engine.model, values, group, engine._chunk(samples), engine._constants,
                                       engine._positional, None if rows_all is None else rows_all[samples],
                                       engine._to_logits, slab[samples])
                self.timings["generic"] += time.perf_counter() - tick
            self.contract(slab, kernel)


class Staging:
    """Contracts (m, k) gradient blocks into H: wide ones at once, narrow ones gathered first (fewer tiny GEMMs)."""

    def __init__(self, kernel: torch.Tensor, samples: int, dtype: torch.dtype, device: torch.device,
                 timings: dict[str, float]) -> None:
        self.kernel, self.timings = kernel, timings
        self.buffer = torch.empty(samples, STAGING_COLUMNS, dtype=dtype, device=device)
        self.used = 0

    def add(self, block: torch.Tensor) -> None:
        width = block.shape[1]
        if width >= STAGING_COLUMNS // 4:
            self._contract(block)
            return
        if self.used + width > STAGING_COLUMNS:
            self.flush()
        self.buffer[:, self.used : self.used + width].copy_(block)
        self.used += width

    def flush(self) -> None:
        if self.used:
            self._contract(self.buffer[:, : self.used])
            self.used = 0

    def _contract(self, block: torch.Tensor) -> None:
        tick = time.perf_counter()
        accumulate_gram(self.kernel, block)
        self.timings["contraction"] += time.perf_counter() - tick
