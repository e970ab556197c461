"""Hostile or damaged run directories, one per way a reader could hang or exhaust memory (issue 25, item 7).

Each case damages a copy of a small, valid run (:func:`tests.small_runs.write_small_run`) in one place and names
the reader call that reaches the damaged file. Shared by ``tests/store/test_reading.py`` (every case raises
:class:`dynprobe.RunFormatError` in bounded time) and ``tests/benchmarks/bench_hostile.py`` (time and peak memory
of ``dynprobe show`` on each). Not collected by pytest (no ``test_`` prefix).
"""
from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynprobe.store.layout import (
    BUFFERS,
    EVENTS,
    KERNEL_LAYERS,
    MANIFEST,
    PARAMS,
    barriers_path,
    rows_path,
    separation_path,
    snapshot_file,
    train_loss_path,
)
from dynprobe.store.rows import PairLog

from .small_runs import write_small_run

__all__ = ["CASES", "HostileCase", "build_case", "write_base_run"]

SPARSE_BYTES = 64 * 2**30  # what a sparse file declares: 64 GiB, stored in no blocks
NESTING = 100_000  # far past Python's recursion limit


@dataclass(frozen=True)
class HostileCase:
    """``damage(root)`` turns a valid run into the hostile one; ``read(run)`` is the reader call that reaches the
    damaged file once the run is open (None when opening the run already reads it); ``blocks``: a regression
    would hang (run it in a subprocess with a timeout); ``prefix``: the damage is in the event log, which a reader
    keeps up to its first damaged line (a RunFormatWarning, not an error)."""

    damage: Callable[[Path], None]
    read: Callable[[Any], Any] | None = None
    blocks: bool = False
    prefix: bool = False


def _replace(path: Path, make: Callable[[Path], None]) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    make(path)


def _fifo(path: Path) -> None:
    _replace(path, os.mkfifo)


def _zero_link(path: Path) -> None:
    _replace(path, lambda p: p.symlink_to("/dev/zero"))


def _sparse(path: Path) -> None:
    def make(p: Path) -> None:
        with open(p, "wb") as handle:
            handle.truncate(SPARSE_BYTES)
    _replace(path, make)


def _nested_manifest(root: Path) -> None:
    (root / MANIFEST).write_bytes(b"[" * NESTING + b"]" * NESTING)


def _nested_event(root: Path) -> None:
    with open(root / EVENTS, "ab") as handle:
        handle.write(b'{"event": "x", "deep": ' + b"[" * NESTING + b"]" * NESTING + b"}\n")


def _many_layers(root: Path) -> None:
    """A 16 MB per-layer kernel whose header declares 2 M layers of 1×1 kernels (the manifest has 1 layer)."""
    np.save(snapshot_file(root, 0, KERNEL_LAYERS), np.zeros((2_000_000, 1, 1)))


def _zip_bomb(root: Path) -> None:
    """``buffers.npz`` with a member the manifest does not describe: 256 MiB of zeros (a valid .npy), deflated to
    about 256 KB."""
    path = snapshot_file(root, 0, BUFFERS)
    count = 64 * 2**20  # float32 entries
    header = {"descr": "<f4", "fortran_order": False, "shape": (count,)}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive, \
            archive.open("extra_buffer.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)
        block = bytes(2**20)
        for _ in range(count * 4 // len(block)):
            member.write(block)


def _folder(path: Path) -> None:
    _replace(path, lambda p: p.mkdir())


CASES: dict[str, HostileCase] = {
    "fifo run.json": HostileCase(lambda r: _fifo(r / MANIFEST), blocks=True),
    "fifo events.jsonl": HostileCase(lambda r: _fifo(r / EVENTS), blocks=True),
    "fifo B.jsonl": HostileCase(lambda r: _fifo(barriers_path(r)), lambda run: run.B, blocks=True),
    "fifo separation": HostileCase(lambda r: _fifo(separation_path(r, 1)), lambda run: run.separation(1), blocks=True),
    "fifo params.npy": HostileCase(lambda r: _fifo(snapshot_file(r, 0, PARAMS)),
                                   lambda run: run.params(snapshot_index=0), blocks=True),
    "fifo C.rows": HostileCase(lambda r: _fifo(rows_path(r, "C")), blocks=True),
    "/dev/zero run.json": HostileCase(lambda r: _zero_link(r / MANIFEST)),
    "/dev/zero events.jsonl": HostileCase(lambda r: _zero_link(r / EVENTS)),
    "/dev/zero separation": HostileCase(lambda r: _zero_link(separation_path(r, 1)), lambda run: run.separation(1)),
    "nested run.json": HostileCase(_nested_manifest),
    "nested event line": HostileCase(_nested_event, prefix=True),
    "sparse run.json": HostileCase(lambda r: _sparse(r / MANIFEST)),
    "sparse events.jsonl": HostileCase(lambda r: _sparse(r / EVENTS), prefix=True),
    "sparse separation": HostileCase(lambda r: _sparse(separation_path(r, 1)), lambda run: run.separation(1)),
    "sparse train_loss.f8": HostileCase(lambda r: _sparse(train_loss_path(r)),
                                        lambda run: PairLog(train_loss_path(run.path)).read()),
    "2M-layer kernel_layers.npy": HostileCase(_many_layers, lambda run: run.S_layers),
    "zip-bomb buffers.npz": HostileCase(_zip_bomb, lambda run: run.buffers(snapshot_index=0)),
    "folder at D.rows": HostileCase(lambda r: _folder(rows_path(r, "D"))),
    "folder at params.npy": HostileCase(lambda r: _folder(snapshot_file(r, 0, PARAMS)),
                                        lambda run: run.params(snapshot_index=0)),
}


def write_base_run(root: Path) -> Path:
    """The valid run every case damages a copy of."""
    write_small_run(root)
    return root


def build_case(base: Path, name: str, root: Path) -> Path:
    """A copy of ``base`` at ``root`` with case ``name``'s damage."""
    shutil.copytree(base, root, symlinks=True)
    CASES[name].damage(root)
    return root
