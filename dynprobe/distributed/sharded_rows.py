"""C rows (eq. 1 of the two-phase paper) of a sharded θ, from all-reduced float64 partial sums.

Under FSDP2 rank r holds a piece ``x_r`` of ``vec(θ_t)`` (its local shards, concatenated in parameter order) and the
same pieces ``y_{j,r}`` of the earlier snapshots. Everything C needs is a sum over coordinates, hence a sum over
ranks of local sums::

    ⟨x, y_j⟩ = Σ_r ⟨x_r, y_{j,r}⟩,     ‖x‖² = Σ_r ‖x_r‖²,
    C(x, y_j) = 1 − ⟨x, y_j⟩ / (‖x‖ ‖y_j‖)                                   (dot-product form)
    C(x, y_j) = ½ Σ_r ‖x_r/‖x‖ − y_{j,r}/‖y_j‖‖²                              (cancellation-free form)

**At most two all-reduces per snapshot.** (1) One SUM all-reduce of the float64 vector ``[⟨x_r, y_{j,r}⟩ per layer
and j, ‖x_r‖² per layer, failure flag]`` gives every dot product and the new squared norms (the earlier norms are
kept from their own snapshots). (2) Only if some entry is too small for the dot-product form (below): one more SUM
all-reduce of the partial sums ``‖x_r/‖x‖ − y_{j,r}/‖y_j‖‖²`` of exactly those entries (+ a failure flag); it needs
the global norms from (1), which is why the form costs a second round and never a third. Every rank receives
bit-identical sums (an all-reduce returns one result to all), so every rank takes the same decision and issues
the same second collective.

**Error bound and switch.** Products of float32 (or float64) values are formed in float64; each layer's local
piece is cut into blocks of ``WIDTH`` coordinates, each block summed (any order), the block sums combined in a
balanced tree, the ranks' sums added by the all-reduce (any order, ``R − 1`` additions) and the layers combined in a
balanced tree. The summation tree then has height ``n ≤ WIDTH + ⌈log₂ M⌉ + R + ⌈log₂ L⌉ + 3`` (M blocks per layer,
L layers), so as in :mod:`dynprobe.metrics._blocked` (Higham §3.1) ``|Ĉ − C| ≤ ε = 2γ_n + 6u``, ``γ_n = nu/(1−nu)``,
``u = 2⁻⁵³``; the dot-product value is kept where ``Ĉ ≥ (1/ρ + 1)ε`` (relative error ≤ ρ = 1e-9) and recomputed
in the cancellation-free form elsewhere (its terms are ≥ 0: chunks of ``EXACT_CHUNK`` squares summed pairwise, then
over the ranks, relative error ≈ γ_n + 4u/√(2C); exactly 0 for identical snapshots, whose norms and unit vectors
are then bit-identical).

The functions here are pure (tensors in, tensors out) and run on one process too: a test splits a vector into
pieces and adds the partial sums itself. :class:`ShardedCosineRows` is the online state (the history of local
pieces and their global norms) that calls them with the run's all-reduce.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from dynprobe._util.distances import pairwise_sum

__all__ = ["RELATIVE_ERROR", "WIDTH", "ShardedCosineRows", "ShardedRowError", "cosine_from_sums", "dot_error_bound",
           "exact_partial_sums", "exact_threshold", "partial_sums", "split_by_channel", "square_difference_sum"]

U = 2.0**-53  # unit roundoff of float64
WIDTH = 256  # coordinates per block of the dot products (bounds the summation error)
SPAN_NUMBERS = 2**21  # float64 temporaries per conversion: rows × span ≤ this (16 MiB)
EXACT_CHUNK = 2**15  # coordinates per partial sum of the cancellation-free form
RELATIVE_ERROR = 1e-9  # target relative error of every stored C value
_NUMPY_DTYPES = {torch.float16, torch.float32, torch.float64}

AllReduce = Callable[[torch.Tensor], None]  # SUM over the ranks, in place


class ShardedRowError(RuntimeError):
    """A rank failed while computing its partial sums: raised on every rank alike."""


def _pairwise(values: torch.Tensor) -> torch.Tensor:
    """Sum the last axis in a balanced tree (each term in at most ⌈log₂ m⌉ additions); zeros for an empty axis."""
    if values.shape[-1] == 0:
        return values.new_zeros(values.shape[:-1])
    return pairwise_sum(values)


def _block_dots(x: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """Per stack row, the ``WIDTH``-block sums of ``x_i s_i`` in float64: (rows, blocks). On the CPU numpy's
    ``einsum`` casts the stack to float64 in small internal buffers (no float64 copy of the history); elsewhere
    (and for bfloat16) the columns are converted a span of at most ``SPAN_NUMBERS`` numbers at a time."""
    rows, size = stack.shape[0], x.numel()
    full, rest = divmod(size, WIDTH)
    if x.device.type == "cpu" and stack.device.type == "cpu" and {x.dtype, stack.dtype} <= _NUMPY_DTYPES:
        v, s = x.numpy().astype(np.float64), stack.numpy()
        parts = []
        if full:
            parts.append(np.einsum("nmw,mw->nm", s[:, : full * WIDTH].reshape(rows, full, WIDTH),
                                   v[: full * WIDTH].reshape(full, WIDTH), dtype=np.float64))
        if rest:
            parts.append(np.einsum("nw,w->n", s[:, full * WIDTH :], v[full * WIDTH :], dtype=np.float64)[:, None])
        return torch.from_numpy(np.concatenate(parts, 1) if parts else np.zeros((rows, 0)))
    return _block_sums(x, stack)


def _block_sums(x: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """:func:`_block_dots` in torch: the columns converted to float64 a span at a time (at most ``SPAN_NUMBERS``
    numbers), each block's products summed by one batched product."""
    rows, size = stack.shape[0], x.numel()
    span = max(1, SPAN_NUMBERS // max(1, rows) // WIDTH) * WIDTH
    parts = []
    for start in range(0, size, span):
        stop = min(size, start + span)
        v = x[start:stop].to(torch.float64)
        s = stack[:, start:stop].to(torch.float64)
        full, rest = divmod(stop - start, WIDTH)
        if full:
            parts.append(torch.einsum("nmw,mw->nm", s[:, : full * WIDTH].reshape(rows, full, WIDTH),
                                      v[: full * WIDTH].reshape(full, WIDTH)))
        if rest:
            parts.append((s[:, full * WIDTH :] * v[full * WIDTH :]).sum(-1, keepdim=True))
    return torch.cat(parts, 1) if parts else x.new_zeros((rows, 0), dtype=torch.float64)


def square_difference_sum(x: torch.Tensor, scale_x: float, y: torch.Tensor, scale_y: float) -> float:
    """``Σ_i (y_i·scale_y − x_i·scale_x)²`` in float64, in chunks of ``EXACT_CHUNK`` summed pairwise.

    Every term is ≥ 0, so the relative error is γ_n with n ≤ ``EXACT_CHUNK`` + ⌈log₂ chunks⌉ whatever the order
    within a chunk; equal inputs and equal scales give exactly 0. On the CPU the chunks go through two reused float64
    buffers (numpy); elsewhere through torch."""
    size = x.numel()
    if size == 0:
        return 0.0
    sums = []
    if x.device.type == "cpu" and y.device.type == "cpu" and {x.dtype, y.dtype} <= _NUMPY_DTYPES:
        xs, ys = x.numpy(), y.numpy()
        scaled, difference = np.empty(min(size, EXACT_CHUNK)), np.empty(min(size, EXACT_CHUNK))
        for start in range(0, size, EXACT_CHUNK):
            stop = min(size, start + EXACT_CHUNK)
            d = np.multiply(ys[start:stop], scale_y, out=difference[: stop - start], dtype=np.float64)
            np.subtract(d, np.multiply(xs[start:stop], scale_x, out=scaled[: stop - start], dtype=np.float64),
                        out=d)
            sums.append(float(np.dot(d, d)))
    else:
        for start in range(0, size, EXACT_CHUNK):
            stop = min(size, start + EXACT_CHUNK)
            d = y[start:stop].to(torch.float64) * scale_y - x[start:stop].to(torch.float64) * scale_x
            sums.append(float(torch.dot(d, d)))
    return float(_pairwise(torch.tensor(sums, dtype=torch.float64)))


def partial_sums(x: torch.Tensor, stack: torch.Tensor, bounds: Sequence[tuple[int, int]]) -> torch.Tensor:
    """This rank's part of round (1): per layer ``l`` (local columns ``bounds[l]``), ``⟨x_r, y_{k,r}⟩`` for each
    row ``k`` of ``stack`` and, last, ``‖x_r‖²``: float64 (layers, rows + 1), each a balanced sum of block sums.

    ``x`` is the local piece (1-D), ``stack`` the earlier pieces (rows × size, any floating dtype), on one device.
    """
    out = torch.zeros((len(bounds), stack.shape[0] + 1), dtype=torch.float64, device=x.device)
    for layer, (a, b) in enumerate(bounds):
        if stack.shape[0]:
            out[layer, :-1] = _pairwise(_block_dots(x[a:b], stack[:, a:b])).to(x.device)
        # the norm by the same function for every snapshot: identical pieces give bit-identical norms
        out[layer, -1] = _pairwise(_block_dots(x[a:b], x[None, a:b]))[0]
    return out


def split_by_channel(per_layer: torch.Tensor, per_layer_channels: bool) -> torch.Tensor:
    """Layer sums (layers, ...) → channel sums (channels, ...): channel 0 the whole vector (a balanced sum over
    layers), then each layer when ``per_layer_channels``."""
    total = _pairwise(per_layer.movedim(0, -1))[None]
    return torch.cat([total, per_layer]) if per_layer_channels else total


def cosine_from_sums(dots: np.ndarray, x_norm2: np.ndarray, stack_norm2: np.ndarray) -> np.ndarray:
    """Dot-product form of eq. (1): ``1 − ⟨x, y_k⟩/(‖x‖‖y_k‖)`` per channel, float64 (channels, rows), from the
    global sums ``dots`` (channels, rows), ``x_norm2`` (channels,) and ``stack_norm2`` (rows, channels)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1 - dots / np.sqrt(np.asarray(x_norm2)[:, None] * np.asarray(stack_norm2).T)


def dot_error_bound(layer_sizes: Sequence[int], world_size: int) -> float:
    """ε, the bound on ``|Ĉ − C|`` of the dot-product form over the ranks (module docstring), for layers of these
    global sizes: ``2γ_n + 6u`` with ``n = WIDTH + ⌈log₂ M⌉ + R + ⌈log₂ L⌉ + 3``."""
    blocks = max([math.ceil(max(1, size) / WIDTH) + 1 for size in layer_sizes] or [1])
    n = WIDTH + math.ceil(math.log2(blocks)) + int(world_size) + math.ceil(math.log2(max(2, len(layer_sizes)))) + 3
    return 2 * n * U / (1 - n * U) + 6 * U


def exact_threshold(layer_sizes: Sequence[int], world_size: int) -> float:
    """Dot-product values below this are recomputed in the cancellation-free form (relative error ≤ 1e-9)."""
    return dot_error_bound(layer_sizes, world_size) * (1 / RELATIVE_ERROR + 1)


def exact_partial_sums(x: torch.Tensor, x_norm2: np.ndarray, stack: torch.Tensor, stack_norm2: np.ndarray,
                       entries: Sequence[tuple[int, int]], ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
    """This rank's part of round (2): for each ``(channel c, row k)`` in ``entries``, ``‖x_r/‖x‖_c −
    y_{k,r}/‖y_k‖_c‖²`` over the local columns ``ranges[c]`` of the channel: float64 (len(entries),).

    ``x_norm2`` (channels,) and ``stack_norm2`` (rows, channels) are the *global* squared norms from round (1).
    """
    out = torch.zeros(len(entries), dtype=torch.float64)
    for position, (channel, row) in enumerate(entries):
        a, b = ranges[channel]
        out[position] = square_difference_sum(x[a:b], 1 / math.sqrt(float(x_norm2[channel])), stack[row, a:b],
                                              1 / math.sqrt(float(stack_norm2[row, channel])))
    return out.to(x.device)


class ShardedCosineRows:
    """The online C rows (whole θ and per layer) of a sharded θ: each rank keeps its own pieces of every
    snapshot and their global squared norms; :meth:`row` costs one or two all-reduces (module docstring).

    Args:
        bounds: this rank's local column range of each layer, in layer order (they tile the local piece).
        layer_sizes: each layer's global size (for the error bound).
        world_size: the ranks the sums run over.
        all_reduce: SUM over the ranks, in place (identity on one process).
        per_layer: also the per-layer channels (channels = 1 + layers; else 1).
    """

    def __init__(self, bounds: Sequence[tuple[int, int]], layer_sizes: Sequence[int], world_size: int,
                 all_reduce: AllReduce, *, per_layer: bool = True) -> None:
        self.bounds = [(int(a), int(b)) for a, b in bounds]
        self.per_layer = per_layer
        self.channels = 1 + len(self.bounds) if per_layer else 1
        self.threshold = exact_threshold(layer_sizes, world_size)
        self.all_reduce = all_reduce
        size = self.bounds[-1][1] if self.bounds else 0
        self.ranges = [(0, size)] + (self.bounds if per_layer else [])
        self._buffer: torch.Tensor | None = None  # local pieces in rows 0..count-1, their own dtype (grows ×2)
        self.count = 0
        self.norms: list[np.ndarray] = []  # global squared norms per channel
        self.exact_entries = 0  # entries computed in the cancellation-free form so far (for the convention)

    def row(self, x: torch.Tensor, error: str | None = None) -> np.ndarray:
        """Append snapshot ``x`` (this rank's piece) and return its row ``C[t, 0..t]`` per channel, float64
        (channels, t + 1). ``error``: this rank already failed; it still takes part in the collectives (with a
        failure flag), and every rank raises :class:`ShardedRowError`."""
        count = self.count
        layers = len(self.bounds)
        payload = torch.zeros(layers * (count + 1) + 1, dtype=torch.float64, device=x.device)
        stack = self.history
        if error is None:
            try:
                payload[:-1] = partial_sums(x, stack, self.bounds).reshape(-1)
            except Exception as failure:  # noqa: BLE001 - every rank must reach the all-reduce
                error = f"{type(failure).__name__}: {failure}"
        payload[-1] = 0.0 if error is None else 1.0
        self.all_reduce(payload)
        _raise_if_failed(payload[-1], error, "the C row's partial sums")
        sums = split_by_channel(payload[:-1].reshape(layers, count + 1), self.per_layer).cpu().numpy()
        x_norm2 = sums[:, -1]
        values = np.zeros((self.channels, count + 1))
        if count:
            earlier = np.stack(self.norms)
            values[:, :count] = cosine_from_sums(sums[:, :count], x_norm2, earlier)
            with np.errstate(invalid="ignore"):
                entries = [(int(c), int(k)) for c, k in zip(*np.nonzero(values[:, :count] < self.threshold))]
            if entries:
                values_exact = self._exact(x, x_norm2, stack, earlier, entries)
                for (channel, row), value in zip(entries, values_exact):
                    values[channel, row] = value
                self.exact_entries += len(entries)
        self._keep(x)
        self.norms.append(x_norm2)
        return values

    def restore(self, pieces: Iterable[torch.Tensor]) -> None:
        """A resumed run: keep the pieces of the kept snapshots (in order) and their global squared norms, as the
        uninterrupted run holds them after those snapshots; no dot product is formed (their rows are in the run).

        The k-th norm is summed by an all-reduce of the *same length* as that snapshot's round (1) payload
        (``layers·(k + 1) + 1``, zeros but this rank's ``‖x_r‖²`` per layer and a failure flag): a collective's
        summation order may depend on the buffer's length (ring all-reduces cut it into per-rank chunks), and with
        the same local sums (:func:`partial_sums`, the same function on the same piece) and the same order, every
        norm — and so every later row — is bit-identical to the uninterrupted run's. One small all-reduce per kept
        snapshot, at attach. ``pieces`` may be a generator (each rank loads one snapshot's shards at a time); an
        exception from it on one rank is flagged in the next all-reduce and raised on every rank."""
        layers = len(self.bounds)
        iterator = iter(pieces)
        while True:
            error, x = None, None
            try:
                x = next(iterator)
            except StopIteration:
                return
            payload = torch.zeros((layers, self.count + 1), dtype=torch.float64)
            try:
                payload[:, -1] = partial_sums(x, x[None][:0], self.bounds)[:, -1].cpu()
            except Exception as failure:  # noqa: BLE001 - every rank must reach the all-reduce
                error = f"{type(failure).__name__}: {failure}"
            flat = torch.cat([payload.reshape(-1), torch.tensor([0.0 if error is None else 1.0],
                                                                 dtype=torch.float64)]).to(x.device)
            self.all_reduce(flat)
            _raise_if_failed(flat[-1], error, "restoring the kept snapshots' norms")
            sums = split_by_channel(flat[:-1].reshape(layers, self.count + 1), self.per_layer).cpu().numpy()
            self._keep(x)
            self.norms.append(sums[:, -1])

    @property
    def history(self) -> torch.Tensor:
        """The earlier pieces, stacked (count × local size; a view of the buffer)."""
        if self._buffer is None:
            return torch.zeros((0, self.ranges[0][1]))
        return self._buffer[: self.count]

    @property
    def bytes_held(self) -> int:
        """Bytes of the history buffer as allocated (rows for ``max(4, 2·count)`` pieces once it grew: at most
        twice the pieces kept, plus four) — this rank's ``T·P/R`` numbers, the probe's one per-rank cost that grows
        with the run."""
        return 0 if self._buffer is None else self._buffer.numel() * self._buffer.element_size()

    def _keep(self, x: torch.Tensor) -> None:
        if self._buffer is None or self.count == self._buffer.shape[0]:
            grown = torch.empty((max(4, 2 * self.count), x.numel()), dtype=x.dtype, device=x.device)
            if self._buffer is not None:
                grown[: self.count] = self._buffer[: self.count]
            self._buffer = grown
        self._buffer[self.count] = x.detach()
        self.count += 1

    def _exact(self, x: torch.Tensor, x_norm2: np.ndarray, stack: torch.Tensor, earlier: np.ndarray,
               entries: list[tuple[int, int]]) -> np.ndarray:
        """Round (2): the cancellation-free form of ``entries``, summed over the ranks."""
        payload = torch.zeros(len(entries) + 1, dtype=torch.float64, device=x.device)
        error = None
        try:
            payload[:-1] = exact_partial_sums(x, x_norm2, stack, earlier, entries, self.ranges)
        except Exception as failure:  # noqa: BLE001 - every rank must reach the all-reduce
            error = f"{type(failure).__name__}: {failure}"
        payload[-1] = 0.0 if error is None else 1.0
        self.all_reduce(payload)
        _raise_if_failed(payload[-1], error, "the C row's cancellation-free sums")
        return 0.5 * payload[:-1].cpu().numpy()

    def release(self) -> None:
        """Free the history (at close)."""
        self._buffer, self.count = None, 0


def _raise_if_failed(flag: torch.Tensor, error: str | None, what: str) -> None:
    failed = int(flag.item())
    if failed:
        mine = f" (here: {error})" if error else ""
        raise ShardedRowError(f"{what} failed on {failed} rank(s){mine}")
