"""Counting host synchronisations: every operation that makes the host wait for the device's queued work.

A :class:`HostSyncCounter` counts, while it is active:

- the dispatcher ops that read a device value on the host: ``aten._local_scalar_dense`` (``.item()``, ``float(t)``,
  ``int(t)``), ``aten.is_nonzero`` (``bool(t)``), ``aten.equal`` (``torch.equal`` returns a Python bool), and copies
  from a non-CPU tensor to the CPU (``aten._to_copy`` / ``aten.copy_``);
- the Python methods that copy to the host without a dispatcher op on a CPU tensor — ``Tensor.cpu()`` and
  ``Tensor.tolist()`` — so the count on a CPU-only machine is the count a GPU would see. (``.to(device)`` is not
  counted on the CPU: ``.to(x.device)`` names the CPU there without meaning the host; on a GPU a copy to the host
  is an ``aten._to_copy`` to the CPU, counted above.)

On the CPU this counts what would synchronize if the tensors lived on a GPU. Some tensors are on the CPU on every
device, and their reads are no synchronisation: e.g. Adam's and AdamW's ``step`` counters (``.item()`` per
parameter tensor unless ``capturable``/``fused``); tests that count use SGD.
"""
from __future__ import annotations

import collections
import traceback
import warnings
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter"]

_READS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::item"}
_COPIES = {"aten::_to_copy", "aten::copy_"}


def _is_cpu_device(value: Any) -> bool:
    return (isinstance(value, str) and value.split(":")[0] == "cpu") or (
        isinstance(value, torch.device) and value.type == "cpu")


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as counter: ...``; then ``counter.total`` and ``counter.counts`` (by op or method);
    ``counter.where`` says which lines of dynprobe (or the test) made them.

    With ``cuda=True`` (and an initialized CUDA device) it also counts what the CUDA runtime itself reports as a
    synchronizing call (``torch.cuda.set_sync_debug_mode("warn")``: device-to-host copies, ``cudaStreamSynchronize``
    in blocking host-to-device copies, ...) under ``"cuda sync"``.
    """

    def __init__(self, *, cuda: bool = False) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.where: collections.Counter[str] = collections.Counter()
        self._patched: dict[str, Any] = {}
        self._cuda = cuda and torch.cuda.is_available() and torch.cuda.is_initialized()
        self._caught: Any = None
        self._debug_mode = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def reset(self) -> None:
        self.counts.clear()
        self.where.clear()

    def _note(self, name: str) -> None:
        self.counts[name] += 1
        frames = [f for f in traceback.extract_stack()
                  if "/torch/" not in f.filename and "host_syncs" not in f.filename][-3:]
        lines = " < ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in reversed(frames))
        self.where[f"{name} at {lines}"] += 1

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func._schema.name
        if name in _READS:
            self._note(name)
        elif name in _COPIES:
            source = args[1] if name == "aten::copy_" else args[0]
            target_cpu = (args[0].device.type == "cpu" if name == "aten::copy_"
                          else _is_cpu_device(kwargs.get("device")))
            if target_cpu and isinstance(source, torch.Tensor) and source.device.type != "cpu":
                self._note(f"{name} to cpu")
        return func(*args, **kwargs)

    def __enter__(self) -> HostSyncCounter:
        counter = self
        original = {name: getattr(torch.Tensor, name) for name in ("cpu", "tolist")}

        def cpu(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if tensor.device.type == "cpu":  # a no-op here, a device-to-host copy on a GPU
                counter._note("Tensor.cpu")
            return original["cpu"](tensor, *args, **kwargs)

        def tolist(tensor: torch.Tensor) -> Any:
            if tensor.device.type == "cpu":  # on a GPU the copy to the host is an aten op, counted there
                counter._note("Tensor.tolist")
            return original["tolist"](tensor)

        self._patched = original
        torch.Tensor.cpu, torch.Tensor.tolist = cpu, tolist
        if self._cuda:
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            self._debug_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        return super().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        for name, method in self._patched.items():
            setattr(torch.Tensor, name, method)
        if self._cuda:
            torch.cuda.set_sync_debug_mode(self._debug_mode)
            self._caught.__exit__(None, None, None)
            synchronizing = [r for r in self._records if "synchronizing" in str(r.message)]
            if synchronizing:
                self.counts["cuda sync"] += len(synchronizing)
                for record in synchronizing:
                    self.where[f"cuda sync at {record.filename.rsplit('/', 2)[-1]}:{record.lineno}"] += 1
        return super().__exit__(*exc)
