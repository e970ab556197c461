"""C rows (eq. 1 of the two-phase paper) of a sharded θ, from all-reduced float64 partial sums.

Under FSDP2 rank r holds a piece ``x_r`` of ``vec(θ_t)`` (its local shards, concatenated in parameter order) and the
same pieces ``y_{k,r}`` of the earlier snapshots. C is computed with the one cancellation-free form of
:mod:`dynprobe._util.distances` (the owner of the formula and of its error bound), whose terms are sums over
coordinates, hence sums over ranks of local sums::

    C(x, y_k) = ‖x − s_k·y_k‖² / (2‖x‖²),   s_k = ‖x‖ / ‖y_k‖,
    ‖x‖² = Σ_r ‖x_r‖²,   ‖x − s_k·y_k‖² = Σ_r ‖x_r − s_k·y_{k,r}‖²

per channel (the whole vector, then each layer). **Two SUM all-reduces per snapshot**, each with a failure flag so
that a rank that failed still takes part and every rank raises alike: (1) ``‖x_r‖²`` per layer — the new global
norms (the earlier ones are kept from their own snapshots), which give every scale ``s_k``; (2) for every channel
and earlier snapshot, this rank's ``‖x_r − s_k·y_{k,r}‖²``
(:func:`~dynprobe._util.distances.channel_block_sums` over the rank's piece, its block sums added in a balanced
tree) — the whole row in one pass over the rank's history. Every rank receives the same sums (an all-reduce returns
one result to all), so the rows are bit-identical on every rank.

**Error.** As in :mod:`dynprobe._util.distances`, the coordinates of ``x − s·y`` are formed without cancellation
(the split scale makes the products exact), and every sum is of positive terms: blocks of ``BLOCK`` squares, the
block sums of a rank in a balanced tree, the ranks' sums by the all-reduce (``R − 1`` additions, any order), the
layers' norms in a balanced tree. The summation height grows by ``R − 1`` over one process's
(``n ≤ BLOCK + ⌈log₂ M⌉ + R``), so the bound of :mod:`dynprobe._util.distances` holds with that ``n``: below 1e-12
relative for every C ≥ 1e-14, whatever how close two snapshots are, and exactly 0 for identical snapshots (bit-equal
norms: s = 1).

**Memory.** Each rank keeps its pieces of the earlier snapshots on the model's device, at most ``capacity`` of
them: the newest (and the first, the run's anchor). Older ones are read back from the rank's own shard files when
a row needs them (``load``, collective: :func:`~dynprobe.distributed.sharded_resume.own_pieces`), one at a time;
``capacity`` is the same on every rank (agreed at the second snapshot), so every rank loads the same snapshots in
the same order. A row's values do not depend on where a piece was kept: each entry's partial sum is formed from
that piece alone, in the same blocks.

The functions here are pure (tensors in, tensors out) and run on one process too: a test splits a vector into
pieces and adds the partial sums itself. :class:`ShardedCosineRows` is the online state (the history of local
pieces and their global norms) that calls them with the run's all-reduce.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from dynprobe._util.distances import channel_block_sums, pairwise_sum, scales, squared_norm_sums

__all__ = ["ShardedCosineRows", "ShardedRowError", "cosine_from_partial_sums", "local_norms", "local_row_sums",
           "split_by_channel", "square_difference_sum"]

EXACT_CHUNK = 2**15  # coordinates per partial sum of square_difference_sum
_NUMPY_DTYPES = {torch.float16, torch.float32, torch.float64}

AllReduce = Callable[[torch.Tensor], None]  # SUM over the ranks, in place


class ShardedRowError(RuntimeError):
    """A rank failed while computing its partial sums: raised on every rank alike."""


def _pairwise(values: torch.Tensor) -> torch.Tensor:
    """Sum the last axis in a balanced tree; zeros for an empty axis."""
    if values.shape[-1] == 0:
        return values.new_zeros(values.shape[:-1])
    return pairwise_sum(values)


def local_norms(x: torch.Tensor, bounds: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Round (1)'s local part: ``‖x_r‖²`` over each layer's local columns ``bounds[l]``, float64 (layers,) on
    ``x``'s device (:func:`~dynprobe._util.distances.squared_norm_sums`: block sums, a balanced tree; the same
    function for every snapshot, so identical pieces give bit-identical norms)."""
    if not bounds:
        return torch.zeros(0, dtype=torch.float64, device=x.device)
    return torch.stack([squared_norm_sums(x, a, b) if b > a else torch.zeros((), dtype=torch.float64, device=x.device)
                        for a, b in bounds])


def split_by_channel(per_layer: torch.Tensor, per_layer_channels: bool) -> torch.Tensor:
    """Layer sums (layers, ...) → channel sums (channels, ...): channel 0 the whole vector (a balanced sum over
    layers), then each layer when ``per_layer_channels``."""
    total = _pairwise(per_layer.movedim(0, -1))[None]
    return torch.cat([total, per_layer]) if per_layer_channels else total


def local_row_sums(x: torch.Tensor, stack: torch.Tensor, x_norm2: torch.Tensor, stack_norm2: torch.Tensor,
                   bounds: Sequence[tuple[int, int]], per_layer: bool) -> torch.Tensor:
    """Round (2)'s local part: ``‖x_r − s_{k,c}·y_{k,r}‖²`` over this rank's columns of channel ``c``, for every
    row ``k`` of ``stack``: float64 (channels, rows) on the stack's device.

    ``x_norm2`` (channels,) and ``stack_norm2`` (rows, channels) are the *global* squared norms (the scales
    ``s = ‖x‖/‖y‖`` are global); ``bounds`` the local column range of each layer (they tile the piece)."""
    rows, size = stack.shape[0], x.numel()
    channels = 1 + len(bounds) if per_layer else 1
    if rows == 0:
        return torch.zeros((channels, 0), dtype=torch.float64, device=stack.device)
    layers = [(a, b) for a, b in bounds] or [(0, size)]
    sums = channel_block_sums(x, stack, scales(x_norm2.to(stack.device), stack_norm2.to(stack.device)), layers,
                              per_layer, 0, size)
    return torch.stack([_pairwise(block_sums) for block_sums in sums])


def cosine_from_partial_sums(sums: np.ndarray, x_norm2: np.ndarray, stack_norm2: np.ndarray) -> np.ndarray:
    """``C = Σ_r ‖x_r − s·y_r‖² / (2‖x‖²)`` per channel and row from the all-reduced sums (channels, rows);
    NaN where a norm is zero or not finite (eq. 1 is undefined there)."""
    x_norm2 = np.asarray(x_norm2, dtype=np.float64)[:, None]
    stack_norm2 = np.asarray(stack_norm2, dtype=np.float64).reshape(-1, x_norm2.shape[0]).T
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        valid = (x_norm2 > 0) & (stack_norm2 > 0) & np.isfinite(x_norm2 * stack_norm2)
        return np.where(valid, sums / (2 * x_norm2), np.nan)


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


class ShardedCosineRows:
    """The online C rows (whole θ and per layer) of a sharded θ: each rank keeps its own pieces of the snapshots
    (at most ``capacity`` of them in memory) and their global squared norms; :meth:`row` costs two all-reduces
    (module docstring).

    Args:
        bounds: this rank's local column range of each layer, in layer order (they tile the local piece).
        world_size: the ranks the sums run over.
        all_reduce: SUM over the ranks, in place (identity on one process).
        rank: this process's rank (its slot when the ranks agree on ``capacity``).
        per_layer: also the per-layer channels (channels = 1 + layers; else 1).
        memory: bytes of pieces kept in memory on this rank (None: all of them); or a function returning them,
            called at the second snapshot (the probe's default measures the headroom after the first step). The
            pieces kept are the same number on every rank: the smallest over the ranks (one all-reduce).
        load: ``indices → pieces`` (an iterable, in order) reading this rank's pieces of those snapshots back
            (collective: every rank calls it with the same indices); needed when ``memory`` can be exceeded.
    """

    def __init__(self, bounds: Sequence[tuple[int, int]], world_size: int, all_reduce: AllReduce, *, rank: int = 0,
                 per_layer: bool = True, memory: int | Callable[[], int] | None = None,
                 load: Callable[[list[int]], Iterable[torch.Tensor]] | None = None) -> None:
        self.bounds = [(int(a), int(b)) for a, b in bounds]
        self.world_size, self.rank, self.per_layer = world_size, rank, per_layer
        self.channels = 1 + len(self.bounds) if per_layer else 1
        self.all_reduce = all_reduce
        self.size = self.bounds[-1][1] if self.bounds else 0
        self.memory, self.load = memory, load
        self.capacity: int | None = None  # pieces kept in memory (None: not decided yet, or unbounded)
        self._pieces: dict[int, torch.Tensor] = {}  # snapshot index → this rank's piece, the ones kept
        self.count = 0
        self.norms: list[np.ndarray] = []  # global squared norms per channel

    def row(self, x: torch.Tensor, error: str | None = None) -> np.ndarray:
        """Append snapshot ``x`` (this rank's piece) and return its row ``C[t, 0..t]`` per channel, float64
        (channels, t + 1). ``error``: this rank already failed; it still takes part in the collectives (with a
        failure flag), and every rank raises :class:`ShardedRowError`."""
        x_norm2, error = self._global_norms(x, error, "the C row's norms")
        count = self.count
        values = np.zeros((self.channels, count + 1))
        if count:
            earlier = np.stack(self.norms)
            sums = torch.zeros((self.channels, count), dtype=torch.float64)
            kept = sorted(self._pieces)
            if error is None and kept:
                try:
                    sums[:, kept] = self._sums(x, torch.stack([self._pieces[i] for i in kept]), x_norm2,
                                               earlier[kept])
                except Exception as failure:  # noqa: BLE001 - every rank must reach the all-reduce
                    error = f"{type(failure).__name__}: {failure}"
            far = [i for i in range(count) if i not in self._pieces]
            if far:  # read back one at a time (collective: every rank loads the same ones), even after a failure
                for index, piece in zip(far, self._load(far)):
                    if error is None:
                        try:
                            sums[:, [index]] = self._sums(x, piece[None], x_norm2, earlier[[index]])
                        except Exception as failure:  # noqa: BLE001 - every rank must reach the all-reduce
                            error = f"{type(failure).__name__}: {failure}"
            payload = torch.cat([sums.reshape(-1), torch.tensor([0.0 if error is None else 1.0],
                                                                 dtype=torch.float64)]).to(x.device)
            self.all_reduce(payload)
            _raise_if_failed(payload[-1], error, "the C row's partial sums")
            values[:, :count] = cosine_from_partial_sums(payload[:-1].reshape(self.channels, count).cpu().numpy(),
                                                         x_norm2, earlier)
        self._keep(x)
        self.norms.append(x_norm2)
        return values

    def _sums(self, x: torch.Tensor, stack: torch.Tensor, x_norm2: np.ndarray, stack_norm2: np.ndarray
              ) -> torch.Tensor:
        return local_row_sums(x, stack, torch.from_numpy(x_norm2), torch.from_numpy(stack_norm2), self.bounds,
                              self.per_layer).cpu()

    def _load(self, indices: list[int]) -> Iterable[torch.Tensor]:
        if self.load is None:
            raise RuntimeError("pieces of earlier snapshots are not in memory and no loader was given")
        return self.load(indices)

    def _global_norms(self, x: torch.Tensor, error: str | None, what: str) -> tuple[np.ndarray, str | None]:
        """Round (1): ``‖x‖²`` per channel, summed over the ranks (raises on every rank if any failed)."""
        payload = torch.zeros(len(self.bounds) + 1, dtype=torch.float64, device=x.device)
        if error is None:
            try:
                payload[:-1] = local_norms(x, self.bounds).to(x.device)
            except Exception as failure:  # noqa: BLE001 - every rank must reach the all-reduce
                error = f"{type(failure).__name__}: {failure}"
        payload[-1] = 0.0 if error is None else 1.0
        self.all_reduce(payload)
        _raise_if_failed(payload[-1], error, what)
        return split_by_channel(payload[:-1], self.per_layer).cpu().numpy(), error

    def restore(self, pieces: Iterable[torch.Tensor]) -> None:
        """A resumed run: keep the pieces of the kept snapshots (in order) and their global squared norms, as the
        uninterrupted run holds them after those snapshots; no row is formed (their rows are in the run).

        Each norm is round (1) of its snapshot again — the same local sums of the same piece, all-reduced in a
        payload of the same length (a collective's summation order may depend on the buffer's length) — so every
        norm, and every later row, is bit-identical to the uninterrupted run's. One small all-reduce per kept
        snapshot, at attach. ``pieces`` may be a generator (each rank loads one snapshot's shards at a time: the
        loader agrees on its own failures, :func:`dynprobe.distributed.sharded_resume.own_pieces`)."""
        for x in pieces:
            norms, _ = self._global_norms(x, None, "restoring the kept snapshots' norms")
            self._keep(x)
            self.norms.append(norms)

    def piece(self, index: int) -> torch.Tensor:
        """This rank's piece of snapshot ``index``: kept, or read back (collective when read back: every rank must
        ask for the same one)."""
        kept = self._pieces.get(index)
        return kept if kept is not None else next(iter(self._load([index])))

    @property
    def history(self) -> torch.Tensor:
        """The pieces kept in memory, stacked in snapshot order (a copy; count × local size while none was
        dropped)."""
        kept = [self._pieces[i] for i in sorted(self._pieces)]
        return torch.stack(kept) if kept else torch.zeros((0, self.size))

    @property
    def bytes_held(self) -> int:
        """Bytes of the pieces kept in memory — this rank's ``T·P/R`` numbers at most, the probe's one per-rank
        cost that grows with the run (bounded by ``memory``)."""
        return sum(t.numel() * t.element_size() for t in self._pieces.values())

    def _keep(self, x: torch.Tensor) -> None:
        if self.capacity is None and self.count == 1 and self.memory is not None:
            self.capacity = self._agreed_capacity(x)
        self._pieces[self.count] = x.detach().clone()
        self.count += 1
        if self.capacity is not None:  # the first (the anchor of C's first column) and the newest
            while len(self._pieces) > max(2, self.capacity):
                del self._pieces[sorted(self._pieces)[1]]

    def _agreed_capacity(self, x: torch.Tensor) -> int:
        """Pieces kept: ``memory`` // the piece's bytes, the smallest over the ranks (one all-reduce)."""
        budget = self.memory() if callable(self.memory) else self.memory
        mine = int(budget) // max(1, x.numel() * x.element_size())
        slots = torch.zeros(self.world_size, dtype=torch.float64, device=x.device)
        slots[self.rank] = float(mine)
        self.all_reduce(slots)
        return int(slots.min().item())

    def release(self) -> None:
        """Free the pieces (at close)."""
        self._pieces, self.count = {}, 0


def _raise_if_failed(flag: torch.Tensor, error: str | None, what: str) -> None:
    failed = int(flag.item())
    if failed:
        mine = f" (here: {error})" if error else ""
        raise ShardedRowError(f"{what} failed on {failed} rank(s){mine}")
