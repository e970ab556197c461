"""C rows on the history's device, and the blocked float64 dot products that complete deferred rows in groups.

**Rows computed at once** (:func:`cosine_rows`): every entry of a new vector ``x`` against the earlier ones in
memory is the cancellation-free form ``‖x − (‖x‖/‖y‖)·y‖² / (2‖x‖²)`` of
:func:`dynprobe._util.distances.cosine_dissimilarity_rows` — the one owner of the formula and of its error bound
(relative error < 1e-12 for every C ≥ 1e-14, < 1e-9 down to C ≈ 2e-18; exactly 0 for identical vectors), torch
on the stack's device, one pass over the columns, the history read in place.

**Deferred rows, completed in groups** (:mod:`dynprobe.metrics._columns`): a group of new vectors against many
earlier ones is one product that reads the history once per group, so there the dot-product form is used first.
A row of C, eq. (1) of the two-phase paper, then needs ``⟨x, y_j⟩``, ``‖x‖`` and ``‖y_j‖`` for each earlier snapshot
``y_j``, accumulated in float64 over vectors kept in their own dtype (float32 products are exact in float64:
24 + 24 significant bits < 53). The columns are cut into blocks of at most ``BLOCK`` entries that never straddle a
layer, so the same pass also gives every layer's dot products and norms (per-layer C), and each block's partial
sum is combined with the others in a balanced tree.

**Error of the dot-product form.** With the products exact, the only rounding is in the sums: a block of ``w``
terms summed in any order, then partial sums combined pairwise over ``M`` blocks (and ``L`` layers), is a
summation tree of height ``n ≤ w + ⌈log₂ M⌉ + ⌈log₂ L⌉ + 3``, so (Higham, *Accuracy and Stability of Numerical
Algorithms*, §3.1) the computed ``s = ⟨x, y⟩`` satisfies ``|ŝ − s| ≤ γ_n Σ|x_i y_i| ≤ γ_n ‖x‖‖y‖`` with
``γ_n = nu/(1 − nu)``, ``u = 2⁻⁵³``; the squared norms carry relative errors ``≤ γ_n``, the square root, the
division and ``1 − cos`` a few ``u`` more. Hence, relative to 1 (the scale of cos), ::

    |Ĉ − C| ≤ ε = 2γ_n + 6u            (≈ 6e-14 for w = 256: switch below C ≈ 6e-5)

and the relative error of ``Ĉ = 1 − ŝ/(‖x‖‖y‖)`` is at most ``ε / C``: harmless for C of order 1, all lost for
``C ≲ ε``. The dot-product value is therefore kept only where ``Ĉ ≥ (1/ρ + 1)·ε`` with ``ρ = 1e-9`` (which
implies ``C ≥ ε/ρ``, so a relative error ≤ ρ); every other entry is recomputed in the cancellation-free form
above. Per layer, the same rule holds with the layer's ``n``.

**Many rows at once.** :meth:`dynprobe.metrics._spans.ColumnPass.products` gives the block sums for a whole group
of new vectors against many earlier ones: ``_SUB_BLOCKS`` blocks at a time are converted to float64 and
multiplied as a batch of small matrices, so the history is converted and read once per group instead of once per
row. The bound above holds for any order of the ``w`` terms of a block, so it holds there too.

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

from dynprobe._util.distances import BLOCK, cosine_dissimilarity_rows, pairwise_sum

__all__ = ["BLOCK", "RELATIVE_ERROR", "Blocks", "channel_ranges", "cosine_rows", "cosine_values", "dot_products",
           "inaccurate", "squared_norms"]

U = 2.0**-53  # unit roundoff of float64
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
    try:
        futures = [pool.submit(function, t) for t in tasks]
    except RuntimeError:  # interpreter exit: the pools are shut down before atexit (a probe closed by its atexit hook)
        return [function(t) for t in tasks]
    return [future.result() for future in futures]


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
    sums = pairwise_sum(np.concatenate(parts, 1) if len(parts) > 1 else parts[0])
    if not with_self:
        return sums
    own = ([np.einsum("mb,mb->m", head, head)] if full else []) + (
        [np.einsum("b,b->", tail, tail)[None]] if rest or not columns else [])
    return np.concatenate([sums, pairwise_sum(np.concatenate(own))[None]])


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
    return pairwise_sum(torch.cat(parts, 1) if len(parts) > 1 else parts[0])


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.numpy() if t.dtype in _NUMPY_DTYPES else t.to(torch.float64).numpy()


def _combine(per_task, tasks: list[tuple[int, int, int]], blocks: Blocks, numpy_path: bool) -> np.ndarray:
    """Task sums (rows × tasks) → per channel (channels × rows): pairwise within each layer, then over layers."""
    layer_of = np.array([t[0] for t in tasks])
    layers = [pairwise_sum(per_task[:, np.flatnonzero(layer_of == layer)]) for layer in range(len(blocks.layers))]
    stacked = np.stack(layers, 0) if numpy_path else torch.stack(layers, 0).cpu().numpy()
    total = pairwise_sum(stacked.T)  # (rows,)
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


# --------------------------------------------------------------------------------------------- C rows


def channel_ranges(blocks: Blocks) -> list[tuple[int, int]]:
    """The column range of each channel (the whole vector, then each layer)."""
    return [blocks.channel_range(channel) for channel in range(blocks.channels)]


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
    None: computed here). Every entry in the cancellation-free form of
    :func:`dynprobe._util.distances.cosine_dissimilarity_rows`, on the stack's device and in one pass over its
    columns (the stack is read in place: a view of the history buffer is never copied); only the (channels, n)
    values come back to the host.
    """
    if v_norms is None:
        v_norms = squared_norms(v, blocks)
    device = stack.device
    values = cosine_dissimilarity_rows(v.reshape(-1).to(device), torch.from_numpy(np.asarray(v_norms, np.float64)),
                                       stack, torch.from_numpy(np.asarray(stack_norms, np.float64)),
                                       blocks.layers, blocks.per_layer, width=blocks.width)
    return values.cpu().numpy(), v_norms
