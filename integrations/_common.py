"""What the Lightning and Hugging Face callbacks share: option checks, ghost settings read from the trainer,
resuming, exporters and closing. Imports no framework."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import dynprobe
from dynprobe.exporters import Exporter, combined, resolve_exporters
from dynprobe.probe.options import ProbeOptions, option_names
from dynprobe.store.layout import MANIFEST

__all__ = ["check_version", "checked_probe_options", "declared_clipping", "open_probe", "sequential_ghosts"]

# Arguments the callbacks fill in themselves.
_OWNED = ("model", "optimizer")


def checked_probe_options(framework: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``DynprobeCallback(**probe_options)``: ``eval_data``, ``out`` and the probe's options
    (:class:`dynprobe.probe.options.ProbeOptions`, validated now), so a typo or a bad value fails when the callback
    is built, not at the end of a long setup. Returns them as a dict."""
    owned = sorted(set(options) & set(_OWNED))
    if owned:
        raise TypeError(f"{framework} DynprobeCallback finds the {' and '.join(owned)} itself; do not pass them")
    accepted = ("eval_data", "out", *option_names())
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"{framework} DynprobeCallback got unknown option(s) {unknown}; it takes dynprobe.Probe's "
                        f"keyword arguments: {', '.join(sorted(accepted))}")
    ProbeOptions.from_keywords({k: v for k, v in options.items() if k not in ("eval_data", "out")},
                               caller=f"{framework} DynprobeCallback")
    return dict(options)


def check_version(framework: str, version: str, minimum: tuple[int, int], install: str) -> None:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    if tuple(parts) < minimum:
        raise RuntimeError(f"dynprobe's {framework} callback needs {framework} >= {minimum[0]}.{minimum[1]}; "
                           f"found {version}. Upgrade: pip install -U {install}")


def sequential_ghosts(ghosts: dynprobe.Ghosts | None, framework: str, **declared: float | None
                      ) -> dynprobe.Ghosts | None:
    """The user's ghost settings with what the trainer does declared to them: clipping (``clip_grad_norm`` /
    ``clip_grad_value`` as the trainer applies it) and sequential deep copies (a framework's training step is
    replayed on a module copy; it cannot be vmapped). A conflicting user setting is an error."""
    if ghosts is None:
        return None
    if ghosts.vectorize is True:
        raise ValueError(f"Ghosts(vectorize=True) is not supported through the {framework} callback: ghosts replay "
                         "the framework's training step on deep copies; use vectorize=False (or 'auto')")
    changes: dict[str, Any] = {"vectorize": False}
    for name, value in declared.items():
        mine = getattr(ghosts, name)
        if value is None:
            continue
        if mine is not None and float(mine) != float(value):
            raise ValueError(f"Ghosts({name}={mine}) disagrees with the trainer's gradient clipping ({value}); the "
                             f"callback reads the trainer's setting itself: leave Ghosts({name}=None)")
        changes[name] = float(value)
    return dataclasses.replace(ghosts, **changes)


def declared_clipping(value: float | None, algorithm: str | None) -> dict[str, float | None]:
    """Trainer clipping → ``Ghosts(clip_grad_norm=...)`` / ``Ghosts(clip_grad_value=...)``."""
    if value is None or float(value) <= 0:
        return {"clip_grad_norm": None, "clip_grad_value": None}
    if algorithm in (None, "norm"):
        return {"clip_grad_norm": float(value), "clip_grad_value": None}
    if algorithm == "value":
        return {"clip_grad_norm": None, "clip_grad_value": float(value)}
    raise ValueError(f"unsupported gradient clipping algorithm {algorithm!r} (dynprobe ghosts replay 'norm' and "
                     "'value')")


def open_probe(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, options: dict[str, Any], out: Path,
               start_step: int, exporters: list[Exporter], framework: str) -> dynprobe.Probe:
    """Build the probe. A trainer restarting from a checkpoint at ``start_step`` > 0 continues the dynprobe run
    in ``out`` (``resume=True, resume_step=start_step``); without such a run it is an error saying what to do."""
    options = dict(options)
    if start_step > 0 and not options.get("resume"):
        if not (out / MANIFEST).exists():
            raise RuntimeError(
                f"the {framework} trainer starts at step {start_step} (restored from a checkpoint) but there is no "
                f"dynprobe run to continue in {out}. Pass out= pointing at the run recorded before the checkpoint, "
                "or start training from step 0"
            )
        options.update(resume=True, resume_step=start_step)
    options["on_snapshot"] = combined([options.get("on_snapshot"), *exporters])
    return dynprobe.Probe(model, optimizer, out=out, **options)


def close_exporters(exporters: list[Exporter]) -> None:
    for exporter in exporters:
        close = getattr(exporter, "close", None)
        if close is not None:
            close()


def resolved_exporters(exporters: Any, tensorboard_dir: Any, tensorboard_writer: Any = None) -> list[Exporter]:
    return resolve_exporters(exporters, tensorboard_dir=tensorboard_dir, tensorboard_writer=tensorboard_writer)


def default_out(directory: str | os.PathLike) -> Path:
    return Path(directory) / "dynprobe"
