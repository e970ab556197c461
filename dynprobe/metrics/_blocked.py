"""Blocked float64 dot products of one vector against a stack: the kernel behind every C and S row.

A row of C, eq. (1) of the two-phase paper, needs ``⟨x, y_j⟩``, ``‖x‖`` and ``‖y_j‖`` for each earlier snapshot
``y_j``: one matrix-vector product over the stacked history, accumulated in float64 over vectors kept in their
own dtype (float32 products are exact in float64: 24 + 24 significant bits < 53). The columns are cut into
blocks of at most ``BLOCK`` entries that never straddle a layer, so the same pass also gives every layer's dot
products and norms (per-layer C), and each block's partial sum is combined with the others in a balanced tree.

**Error of the dot-product form.** With the products exact, the only rounding is in the sums: a block of ``w``
terms summed in any order, then partial sums combined pairwise over ``M`` blocks (and ``L`` layers), is a
summation tree of height ``n ≤ w + ⌈log₂ M⌉ + ⌈log₂ L⌉ + 3``, so (Higham, *Accuracy and Stability of Numerical
Algorithms*, §3.1) the computed ``s = ⟨x, y⟩`` satisfies ``|ŝ − s| ≤ γ_n Σ|x_i y_i| ≤ γ_n ‖x‖‖y‖`` with
``γ_n = nu/(1 − nu)``, ``u = 2⁻⁵³``; the squared norms carry relative errors ``≤ γ_n``, the square root, the
division and ``1 − cos`` a few ``u`` more. Hence, relative to 1 (the scale of cos), ::

    |Ĉ − C| ≤ ε = 2γ_n + 6u            (≈ 6e-14 for w = 256: switch below C ≈ 6e-5)

and the relative error of ``Ĉ = 1 − ŝ/(‖x‖‖y‖)`` is at most ``ε / C``: harmless for C of order 1, all lost for
``C ≲ ε`` (identical vectors give ±ε instead of 0). The dot-product value is therefore kept only where
``Ĉ ≥ (1/ρ + 1)·ε`` with ``ρ = 1e-9`` (which implies ``C ≥ ε/ρ``, so a relative error ≤ ρ); every other entry
is recomputed in the cancellation-free form ``½‖x/‖x‖ − y/‖y‖‖²``, whose relative error is about
``γ_n + 4u/√(2C)`` (≤ 1e-9 down to C ≈ 1e-22) and which is exactly 0 for identical vectors (equal inputs give
bit-equal norms here, hence equal unit vectors). Per layer, the same rule holds with the layer's ``n``.

**Many rows at once.** :meth:`dynprobe.metrics._spans.ColumnPass.products` gives the same block sums for a
whole group of new vectors against many earlier ones: ``_SUB_BLOCKS`` blocks at a time are converted to float64
and multiplied as a batch of small matrices (BLAS), so the history is converted and read once per group instead
of once per row. The bound above holds for any order of the ``w`` terms of a block, so it holds here too; the last
bits differ from the one-row kernel's (measured: ≤ 4e-12 relative on C, entries of order 1e-4).

Everything is deterministic: results depend on the values, the block structure and, for group products, the
group's shape — never on where the vectors sit in memory or on thread scheduling; a resumed run completes its
pending rows in the groups the uninterrupted one would, and so reproduces it.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["BLOCK", "RELATIVE_ERROR", "Blocks", "cosine_rows", "cosine_values", "dot_products",
           "exact_chunks", "half_square_sums", "half_squared_distances", "inaccurate", "squared_norms"]

U = 2.0**-53  # unit roundoff of float64
BLOCK = 256  # dot-phase block width: bounds the summation error (above)
EXACT_BLOCK = 2**15  # column chunk of the cancellation-free form (its error is relative, so wide chunks are fine)
_SPAN = 2**17  # columns per task of the dot products (one per-thread float64 buffer)
RELATIVE_ERROR = 1e-9  # target relative error of every stored C (and S) value
_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)


class Blocks:
    """The column blocks of a ``size``-vector, and the layers (contiguous slices tiling it) they never straddle.

    ``channels`` is 1 + the number of layers when ``slices`` is given (channel 0 is the whole vector, channel
    ``l + 1`` layer ``l``), else 1.
    """

    def __init__(self, size: int, slices: Sequence[slice] | None = None, *, width: int = BLOCK) -> None:
        self.size, self.width = int(size), int(width)
        self.per_layer = bool(slices)
        bounds = [(s.start, s.stop) for s in slices] if slices else [(0, self.size)]
        if bounds[0][0] != 0 or bounds[-1][1] != self.size or any(b[1] != c[0] for b, c in zip(bounds, bounds[1:])):
            raise ValueError(f"layer slices must tile the {self.size}-vector in order; got {bounds[:4]}...")
        self.layers: list[tuple[int, int]] = bounds
        self.layer_blocks = [max(1, math.ceil((b - a) / self.width)) for a, b in bounds]
        self.blocks = sum(self.layer_blocks)

    @property
    def channels(self) -> int:
        return 1 + len(self.layers) if self.per_layer else 1

    def channel_range(self, channel: int) -> tuple[int, int]:
        """The columns of a channel: the whole vector (channel 0), or a layer's slice."""
        return (0, self.size) if channel == 0 else self.layers[channel - 1]

    def dot_error(self) -> np.ndarray:
        """ε per channel: the bound on ``|Ĉ − C|`` of the dot-product form (module docstring)."""
        tree = math.ceil(math.log2(max(2, len(self.layers)))) + 3
        heights = [min(self.width, self.size) + math.ceil(math.log2(max(1, self.blocks))) + tree]
        if self.per_layer:
            heights += [min(self.width, b - a) + math.ceil(math.log2(m)) + 3
                        for (a, b), m in zip(self.layers, self.layer_blocks)]
        n = np.asarray(heights, dtype=np.float64)
        return 2 * n * U / (1 - n * U) + 6 * U

    def exact_below(self) -> np.ndarray:
        """Per channel: dot-product values below this are recomputed in the cancellation-free form."""
        return self.dot_error() * (1 / RELATIVE_ERROR + 1)


# --------------------------------------------------------------------------------------------- dot products


def _pairwise(a):
    """Sum the last axis in a balanced tree (each term takes part in at most ⌈log₂ m⌉ additions)."""
    cat = np.concatenate if isinstance(a, np.ndarray) else torch.cat
    while a.shape[-1] > 1:
        m = a.shape[-1]
        half = a[..., : m // 2] + a[..., m // 2 : 2 * (m // 2)]
        a = half if m % 2 == 0 else cat([half, a[..., 2 * (m // 2) :]], -1)
    return a[..., 0]


_THREAD = threading.local()


def _scratch() -> tuple[np.ndarray, np.ndarray]:
    """Two float64 buffers of ``_SPAN`` columns per thread, reused: no mid-size temporaries, which the C allocator
    would keep in its pools (the probe's memory would creep up by a few hundred MB over a run)."""
    if not hasattr(_THREAD, "buffers"):
        _THREAD.buffers = (np.empty(_SPAN), np.empty(_SPAN))
    return _THREAD.buffers


_POOL: dict[int, ThreadPoolExecutor] = {}  # by worker count
_POOL_LOCK = threading.Lock()


def _map(function, tasks: list) -> list:
    """``[function(t) for t in tasks]``, on worker threads when torch may use several (numpy releases the GIL).

    Results come back in task order, so sums over them do not depend on scheduling."""
    workers = min(4, torch.get_num_threads())
    if workers < 2 or len(tasks) < 2:
        return [function(t) for t in tasks]
    with _POOL_LOCK:
        if workers not in _POOL:
            _POOL[workers] = ThreadPoolExecutor(workers, thread_name_prefix="dynprobe-dots")
        pool = _POOL[workers]
    return list(pool.map(function, tasks))


def _chunks(blocks: Blocks, rows: int, chunk_bytes: int | None) -> list[tuple[int, int, int]]:
    """Tasks ``(layer, first column, columns)``: runs of whole blocks within a layer, at most ``_SPAN`` columns and
    (unless ``chunk_bytes`` is None: kernels whose only temporaries are per column) ``chunk_bytes`` of float64
    numbers over ``rows`` rows."""
    span = max(1, _SPAN // blocks.width) * blocks.width  # the per-thread buffer's columns
    if chunk_bytes is not None:
        span = min(span, max(1, chunk_bytes // (max(1, rows) * blocks.width * 8)) * blocks.width)
    tasks = []
    for layer, (a, b) in enumerate(blocks.layers):
        for start in range(a, max(b, a + 1), span):
            tasks.append((layer, start, min(span, b - start)))
    return tasks


def _chunk_sum_numpy(v: torch.Tensor, stack: torch.Tensor, blocks: Blocks, start: int, columns: int,
                     with_self: bool) -> np.ndarray:
    """Σ over the task's blocks (pairwise) of each stack row's block dot product with ``v`` (and, last, of
    ``v`` with itself when ``with_self``); float64 (n [+ 1],)."""
    w = blocks.width
    full, rest = divmod(columns, w)
    parts = []
    # v's columns go to float64 in a reused per-thread buffer; the stack is cast inside einsum (small buffers)
    x64 = _scratch()[0][: max(columns, 1)]
    np.copyto(x64[:columns], _as_numpy(v[start : start + columns]))
    head, tail = x64[: full * w].reshape(full, w), x64[full * w : columns]
    if full:
        s = _as_numpy(stack[:, start : start + full * w]).reshape(stack.shape[0], full, w)
        parts.append(np.einsum("nmb,mb->nm", s, head, dtype=np.float64))
    if rest or not columns:
        s = _as_numpy(stack[:, start + full * w : start + columns])
        parts.append(np.einsum("nb,b->n", s, tail, dtype=np.float64)[:, None])
    sums = _pairwise(np.concatenate(parts, 1) if len(parts) > 1 else parts[0])
    if not with_self:
        return sums
    own = ([np.einsum("mb,mb->m", head, head)] if full else []) + (
        [np.einsum("b,b->", tail, tail)[None]] if rest or not columns else [])
    return np.concatenate([sums, _pairwise(np.concatenate(own))[None]])


def _chunk_sum_torch(v: torch.Tensor, stack: torch.Tensor, blocks: Blocks, start: int, columns: int) -> torch.Tensor:
    w = blocks.width
    full, rest = divmod(columns, w)
    parts = []
    if full:
        s = stack[:, start : start + full * w].unflatten(1, (full, w)).to(torch.float64)
        x = v[start : start + full * w].reshape(full, w).to(torch.float64)
        parts.append((s * x).sum(-1))
    if rest or not columns:
        a = start + full * w
        s = stack[:, a : a + rest].to(torch.float64)
        parts.append((s * v[a : a + rest].to(torch.float64)).sum(-1, keepdim=True))
    return _pairwise(torch.cat(parts, 1) if len(parts) > 1 else parts[0])


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.numpy() if t.dtype in _NUMPY_DTYPES else t.to(torch.float64).numpy()


def _combine(per_task, tasks: list[tuple[int, int, int]], blocks: Blocks, numpy_path: bool) -> np.ndarray:
    """Task sums (rows × tasks) → per channel (channels × rows): pairwise within each layer, then over layers."""
    layer_of = np.array([t[0] for t in tasks])
    layers = [_pairwise(per_task[:, np.flatnonzero(layer_of == layer)]) for layer in range(len(blocks.layers))]
    stacked = np.stack(layers, 0) if numpy_path else torch.stack(layers, 0).cpu().numpy()
    total = _pairwise(stacked.T)  # (rows,)
    return np.concatenate([total[None], stacked], 0) if blocks.per_layer else total[None]


def dot_products(v: torch.Tensor, stack: torch.Tensor, blocks: Blocks, *,
                 with_norms: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """``⟨v, s_k⟩`` for every row of ``stack`` (n × size), per channel: float64 (channels, n); and, with
    ``with_norms``, :func:`squared_norms` of ``v`` from the same pass where possible (else ``None``).

    Both are 1-D/2-D tensors on the same device, in any floating dtype (converted to float64 block by block).
    """
    n = stack.shape[0]
    numpy_path = stack.device.type == "cpu" and v.device.type == "cpu"
    # numpy casts the stack through small internal buffers: its temporaries are per column (small, and never
    # left behind in the allocator's pools); torch converts whole chunks, bounded here
    fixed = numpy_path and stack.dtype in _NUMPY_DTYPES and v.dtype in _NUMPY_DTYPES
    chunk_bytes = None if fixed else 16 * 2**20 if numpy_path else 256 * 2**20
    tasks = _chunks(blocks, n, chunk_bytes)
    fused = with_norms and fixed  # the task structure is then the one of squared_norms: the same numbers
    if numpy_path:
        sums = _map(lambda t: _chunk_sum_numpy(v, stack, blocks, t[1], t[2], fused), tasks)
        per_task = np.stack(sums, 1) if sums else np.zeros((n + fused, 0))
    else:
        per_task = torch.stack([_chunk_sum_torch(v, stack, blocks, t[1], t[2]) for t in tasks], 1)
    values = _combine(per_task, tasks, blocks, numpy_path)
    return (values[:, :n], values[:, n]) if fused else (values, None)


def squared_norms(v: torch.Tensor, blocks: Blocks) -> np.ndarray:
    """``‖v‖²`` per channel (whole vector, then each layer), float64; a function of the values only (the same
    numbers whatever the dtype holding them or where they sit), so that identical vectors give identical norms."""
    v = v.reshape(-1)
    if v.device.type == "cpu":
        v = v if v.dtype in _NUMPY_DTYPES else v.to(torch.float32)  # exact for bfloat16
        return dot_products(v, v[None][:0], blocks, with_norms=True)[1]
    return dot_products(v, v[None], blocks)[0][:, 0]


# --------------------------------------------------------------------------------------------- the exact form


def exact_chunks(blocks: Blocks, channel: int) -> list[tuple[int, int]]:
    """The column chunks ``(start, stop)`` the cancellation-free form sums separately over a channel: at most
    ``EXACT_BLOCK`` columns, never across a task of :func:`dot_products` (so each lies within one column span of
    :class:`~dynprobe.metrics._spans.ColumnPass`, and a vector read back in slices gives the same sums)."""
    start, stop = blocks.channel_range(channel)
    chunks = []
    for _, first, columns in _chunks(blocks, 1, None):
        if start <= first and first + columns <= stop:
            chunks += [(a, min(first + columns, a + EXACT_BLOCK)) for a in range(first, first + max(columns, 1),
                                                                                 EXACT_BLOCK)]
    return chunks


def _reciprocal_norms(v_norm2: float, rows_norm2: np.ndarray) -> tuple[float, np.ndarray]:
    with np.errstate(divide="ignore"):
        return float(1 / np.sqrt(np.float64(v_norm2))), 1 / np.sqrt(np.asarray(rows_norm2, dtype=np.float64))


def half_square_sums(v: torch.Tensor, v_norm2: float, stack: torch.Tensor, rows: np.ndarray, rows_norm2: np.ndarray,
                     chunks: Sequence[tuple[int, int]], offset: int = 0) -> np.ndarray:
    """``‖v/‖v‖ − s_r/‖s_r‖‖²`` over each chunk of columns, for the stack rows ``rows``: float64 (rows, chunks).

    ``v`` and ``stack`` hold the columns from ``offset`` on (a slice of the vectors, or all of them); the norms
    are over the whole channel."""
    rows = np.asarray(rows, dtype=np.int64)
    rv, rs = _reciprocal_norms(v_norm2, rows_norm2)
    chunks = [(a - offset, b - offset) for a, b in chunks]
    if stack.device.type == "cpu" and v.device.type == "cpu" and {stack.dtype, v.dtype} <= set(_NUMPY_DTYPES):
        s_np, v_np = stack.numpy(), v.numpy()

        def task(first: int) -> np.ndarray:  # 16 chunks, every row: (rows, chunks) partial sums
            mine = chunks[first : first + 16]
            out = np.empty((rows.size, len(mine)))
            scaled, difference = _scratch()
            with np.errstate(invalid="ignore"):
                for c, (a, b) in enumerate(mine):
                    x = np.multiply(v_np[a:b], rv, out=scaled[: b - a], dtype=np.float64)
                    d = difference[: b - a]
                    for k, r in enumerate(rows):
                        np.multiply(s_np[r, a:b], rs[k], out=d, dtype=np.float64)
                        np.subtract(d, x, out=d)
                        out[k, c] = np.einsum("i,i->", d, d)
            return out

        parts = _map(task, list(range(0, len(chunks), 16)))
        return np.concatenate(parts, 1) if parts else np.zeros((rows.size, 0))
    index = torch.as_tensor(rows, device=stack.device)
    scale = torch.as_tensor(rs, device=stack.device)[:, None]
    parts = []
    for a, b in chunks:
        d = stack[:, a:b].index_select(0, index).to(torch.float64) * scale - v[a:b].to(torch.float64) * rv
        parts.append((d * d).sum(-1))
    return torch.stack(parts, 1).cpu().numpy() if parts else np.zeros((rows.size, 0))


def half_squared_distances(v: torch.Tensor, v_norm2: float, stack: torch.Tensor, rows: np.ndarray,
                           rows_norm2: np.ndarray, start: int, stop: int, *,
                           chunks: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
    """``½‖v/‖v‖ − s_r/‖s_r‖‖²`` over columns ``start:stop`` for the stack rows ``rows``; float64.

    The cancellation-free form of ``1 − cos``: exactly 0 for identical vectors, relative error ~γ_n for tiny
    values. ``v_norm2`` and ``rows_norm2`` are the squared norms over the same columns. The columns are summed in
    ``chunks`` (default: ``EXACT_BLOCK`` columns from ``start``), then pairwise.
    """
    if chunks is None:
        chunks = [(a, min(stop, a + EXACT_BLOCK)) for a in range(start, max(stop, start + 1), EXACT_BLOCK)]
    return 0.5 * _pairwise(half_square_sums(v, v_norm2, stack, rows, rows_norm2, chunks))


def cosine_values(dots: np.ndarray, v_norms: np.ndarray, stack_norms: np.ndarray) -> np.ndarray:
    """The dot-product form ``1 − ⟨v, s⟩ / (‖v‖‖s‖)`` per channel: float64 (channels, n), from :func:`dot_products`
    (channels, n), ``v``'s squared norms (channels,) and the stack's (n, channels)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1 - dots / np.sqrt(np.asarray(v_norms)[:, None] * np.asarray(stack_norms).T)


def inaccurate(values: np.ndarray, blocks: Blocks) -> list[np.ndarray]:
    """Per channel, the entries of :func:`cosine_values` too close to 0 for the dot-product form (module
    docstring): they must be recomputed with :func:`half_squared_distances`."""
    below = blocks.exact_below()
    with np.errstate(invalid="ignore"):
        return [np.flatnonzero(values[channel] < below[channel]) for channel in range(blocks.channels)]


def cosine_rows(v: torch.Tensor, v_norms: np.ndarray | None, stack: torch.Tensor, stack_norms: np.ndarray,
                blocks: Blocks) -> tuple[np.ndarray, np.ndarray]:
    """C (eq. 1) between ``v`` and each row of ``stack``, per channel: float64 (channels, n); and ``v``'s norms.

    ``v_norms`` (channels,) and ``stack_norms`` (n, channels) are :func:`squared_norms` of the vectors (``v_norms``
    None: computed in the same pass over ``v``). Dot-product form where it is accurate to ``RELATIVE_ERROR``, the
    cancellation-free form elsewhere (module docstring).
    """
    dots, fused = dot_products(v, stack, blocks, with_norms=v_norms is None)
    if v_norms is None:
        v_norms = fused if fused is not None else squared_norms(v, blocks)
    values = cosine_values(dots, v_norms, stack_norms)
    for channel, rows in enumerate(inaccurate(values, blocks)):
        if rows.size:
            start, stop = blocks.channel_range(channel)
            values[channel, rows] = half_squared_distances(v, v_norms[channel], stack, rows,
                                                           np.asarray(stack_norms)[rows, channel], start, stop,
                                                           chunks=exact_chunks(blocks, channel))
    return values, v_norms
