"""How much memory this process may still use, where a tensor would live: the one owner of that question.

CUDA: the device's free memory (what PyTorch's caching allocator holds is not free), within
``torch.cuda.set_per_process_memory_fraction`` when set. CPU (and devices that share its memory): the available
RAM (``MemAvailable``), within the process's own limits — a cgroup memory limit (v2 ``memory.max``, v1
``memory.limit_in_bytes``) and ``RLIMIT_AS`` (address space: what is mapped counts, touched or not) — less what
the process already uses of each::

    headroom = min(MemAvailable, memory.max − memory.current, RLIMIT_AS − VmSize)
"""
from __future__ import annotations

import math
import os

import torch

try:
    import resource  # POSIX only
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

__all__ = ["available_ram", "device_headroom", "process_headroom"]

FALLBACK_MEMORY = 512 * 2**20  # when the platform says nothing about its RAM
_CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # v2
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))  # v1


def _read_int(path: str) -> int | None:
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _address_space_used() -> int | None:
    """VmSize of this process in bytes (None where ``/proc`` is absent)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def process_headroom() -> float:
    """Bytes this process may still allocate under its cgroup memory limit and ``RLIMIT_AS`` (inf: no limit)."""
    headroom = math.inf
    for limit_file, usage_file in _CGROUP_FILES:
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:
            headroom = min(headroom, max(0, limit - usage))
    if resource is not None:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        used = _address_space_used()
        if soft != resource.RLIM_INFINITY and used is not None:
            headroom = min(headroom, max(0, soft - used))
    return headroom


def available_ram() -> int:
    """``MemAvailable`` of the machine in bytes (the free pages where ``/proc/meminfo`` is absent)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return FALLBACK_MEMORY


def device_headroom(device: torch.device | str) -> int:
    """Bytes this process may still allocate on ``device``, measured now (module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device)
        if fraction < 1.0:
            free = min(free, max(0, int(fraction * total) - torch.cuda.memory_reserved(device)))
        return int(free)
    return int(min(available_ram(), process_headroom()))
