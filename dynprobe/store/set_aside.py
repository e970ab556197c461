"""Moving aside instead of deleting: what a resumed run drops stays on disk, under ``set-aside-STAMP/``.

A resume cuts the run back to its resume step (:mod:`dynprobe.store.resume`). Nothing it drops is deleted: a
whole entry (a later snapshot folder, a ghost's separation log, a damaged row file) is *moved* to
``set-aside-STAMP/<its path in the run>``; a file that is cut or rewritten (the event log, a (step, value) log, a
row file, the barrier records) is *copied* there first, whole. The folder is created on first use, so a resume
that drops nothing leaves none. Restoring is a move back (with the run closed).
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
from pathlib import Path

from .layout import set_aside_dir
from .reading import regular_size
from .safety import fsync_dir

__all__ = ["SetAside"]


class SetAside:
    """The set-aside folder of one resume of the run at ``root`` (``durable``: fsync what it moves)."""

    def __init__(self, root: Path, *, durable: bool = False, stamp: str | None = None) -> None:
        self.root = Path(root)
        self.stamp = stamp or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        self.folder = set_aside_dir(self.root, self.stamp)
        self.durable = durable
        self.moved: list[str] = []  # paths relative to the run, in order

    def _target(self, path: Path) -> Path:
        relative = Path(path).relative_to(self.root)
        target = self.folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        self.moved.append(str(relative))
        return target

    def move(self, path: Path) -> None:
        """Move a file or folder of the run aside (a missing one is nothing to move)."""
        if not os.path.lexists(path):
            return
        target = self._target(path)
        os.replace(path, target)
        if self.durable:
            fsync_dir(Path(path).parent)
            fsync_dir(target.parent)

    def copy(self, path: Path) -> None:
        """Copy a regular file aside, whole, before it is cut or rewritten (a missing or empty one is skipped)."""
        if regular_size(path) == 0:
            return
        shutil.copyfile(path, self._target(path), follow_symlinks=False)
        if self.durable:
            fsync_dir(self.folder)

    def copy_if_longer(self, path: Path, keep: int) -> None:
        """Copy ``path`` aside if cutting it to ``keep`` bytes would drop any."""
        if regular_size(path) > keep:
            self.copy(path)
