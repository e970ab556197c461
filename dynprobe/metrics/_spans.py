"""The blocked float64 sums of :mod:`dynprobe.metrics._blocked`, one column span at a time and for a group of rows.

:class:`ColumnPass` cuts the columns into spans of whole tasks of :func:`~dynprobe.metrics._blocked.dot_products`,
so that vectors read back in slices give the sums of the whole vectors; :meth:`ColumnPass.products` computes the
block sums of a whole group of new vectors against many earlier ones, converting the history to float64 once for
the group (the error bound of ``_blocked`` holds for any order of a block's terms).
"""
from __future__ import annotations

import numpy as np
import torch

from dynprobe._util.distances import pairwise_sum

from ._blocked import (
    _NUMPY_DTYPES,
    _THREAD,
    Blocks,
    _chunk_sum_numpy,
    _chunk_sum_torch,
    _chunks,
    _combine,
    _map,
)

__all__ = ["ColumnPass"]


_SUB_BLOCKS = 16  # blocks converted to float64 at a time by the products kernel


def _task_products(targets: np.ndarray, group: np.ndarray, blocks: Blocks, start: int, columns: int) -> np.ndarray:
    """Σ over the task's blocks (pairwise, the tree of ``_blocked._chunk_sum_numpy``) of ``⟨t_j, g_k⟩`` per block:
    float64 (J, K). ``_SUB_BLOCKS`` blocks at a time are converted to float64 and multiplied as a batch of
    (J × w) @ (w × K) matrices: the history is converted once for all K rows of a group."""
    w, n_rows, k_rows = blocks.width, targets.shape[0], group.shape[0]
    full, rest = divmod(columns, w)
    per_block = np.empty((full + (1 if rest or not columns else 0), n_rows, k_rows))
    buffers = getattr(_THREAD, "products", None)
    if buffers is None or buffers[0].shape[1] < n_rows or buffers[1].shape[2] < k_rows:
        n_max = max(n_rows, buffers[0].shape[1] if buffers else 0)
        k_max = max(k_rows, buffers[1].shape[2] if buffers else 0)
        buffers = _THREAD.products = (np.empty((_SUB_BLOCKS, n_max, w)), np.empty((_SUB_BLOCKS, w, k_max)))
    for b in range(0, full, _SUB_BLOCKS):
        n, a = min(_SUB_BLOCKS, full - b), start + b * w
        h, g = buffers[0][:n, :n_rows], buffers[1][:n, :, :k_rows]
        np.copyto(h, targets[:, a : a + n * w].reshape(n_rows, n, w).transpose(1, 0, 2))
        np.copyto(g, group[:, a : a + n * w].reshape(k_rows, n, w).transpose(1, 2, 0))
        np.matmul(h, g, out=per_block[b : b + n])
    if rest or not columns:
        a = start + full * w
        np.matmul(targets[:, a : a + rest].astype(np.float64), group[:, a : a + rest].astype(np.float64).T,
                  out=per_block[full])
    return pairwise_sum(per_block.transpose(1, 2, 0))


class ColumnPass:
    """The sums of :func:`~dynprobe.metrics._blocked.dot_products` (and ``squared_norms``) computed one column span
    at a time — for vectors read back from disk in slices — and for a group of rows at once (:meth:`products`).

    The spans are runs of whole tasks of ``dot_products``, so the task sums, combined by :meth:`combine`, are
    the numbers the whole vectors give (bit for bit on the CPU, where the tasks do not depend on the stack's
    height). ``max_columns`` bounds a span (at least one task).
    """

    def __init__(self, blocks: Blocks, rows: int, *, device: torch.device, max_columns: int) -> None:
        self.blocks, self.rows = blocks, int(rows)
        self.numpy_path = torch.device(device).type == "cpu"
        self.tasks = _chunks(blocks, self.rows, None if self.numpy_path else 256 * 2**20)
        self.spans: list[tuple[int, int, int, int]] = []  # (first column, end column, first task, end task)
        first = 0
        for end in range(1, len(self.tasks) + 1):
            stop = self.tasks[end - 1][1] + self.tasks[end - 1][2]
            following = self.tasks[end][1] + self.tasks[end][2] if end < len(self.tasks) else None
            if following is None or following - self.tasks[first][1] > max_columns:
                self.spans.append((self.tasks[first][1], stop, first, end))
                first = end

    def _part(self, part: torch.Tensor) -> torch.Tensor:
        return part if not self.numpy_path or part.dtype in _NUMPY_DTYPES else part.to(torch.float32)  # exact

    def products(self, span: int, targets: torch.Tensor, group: torch.Tensor) -> np.ndarray:
        """Task sums of ``⟨t_j, g_k⟩`` for every pair of rows, float64 (J, K, tasks of the span): the sums of
        :func:`~dynprobe.metrics._blocked.dot_products` (block dot products in float64, pairwise within each
        task), the history converted once for the whole group (:func:`_task_products`)."""
        start, _, first, end = self.spans[span]
        targets, group = self._part(targets), self._part(group)
        tasks = [(t[1] - start, t[2]) for t in self.tasks[first:end]]
        if self.numpy_path:
            t_np, g_np = targets.numpy(), group.numpy()
            return np.stack(_map(lambda t: _task_products(t_np, g_np, self.blocks, t[0], t[1]), tasks), -1)
        out = []
        w = self.blocks.width
        for a, columns in tasks:
            full, rest = divmod(columns, w)
            parts = []
            if full:
                h = targets[:, a : a + full * w].to(torch.float64).unflatten(1, (full, w)).transpose(0, 1)
                g = group[:, a : a + full * w].to(torch.float64).unflatten(1, (full, w)).permute(1, 2, 0)
                parts.append(torch.matmul(h, g))
            if rest or not columns:
                h = targets[:, a + full * w : a + columns].to(torch.float64)
                parts.append((h @ group[:, a + full * w : a + columns].to(torch.float64).T)[None])
            out.append(pairwise_sum(torch.cat(parts, 0).permute(1, 2, 0)))
        return torch.stack(out, -1).cpu().numpy()

    def norm_sums(self, span: int, v_part: torch.Tensor) -> np.ndarray:
        """Task sums of ``‖v‖²`` over the span's tasks, computed as ``squared_norms`` does: (1, tasks)."""
        start, _, first, end = self.spans[span]
        v_part = self._part(v_part)
        tasks = [(t[0], t[1] - start, t[2]) for t in self.tasks[first:end]]
        if self.numpy_path:
            empty = v_part[None][:0]
            return np.stack(_map(lambda t: _chunk_sum_numpy(v_part, empty, self.blocks, t[1], t[2], True), tasks), 1)
        return torch.stack([_chunk_sum_torch(v_part, v_part[None], self.blocks, t[1], t[2]) for t in tasks],
                           1).cpu().numpy()

    def combine(self, per_task: np.ndarray) -> np.ndarray:
        """Task sums (rows, tasks) → values per channel (channels, rows), as ``dot_products`` combines them."""
        return _combine(per_task, self.tasks, self.blocks, True)
