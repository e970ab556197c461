"""The process's memory headroom (dynprobe._util.memory): min(MemAvailable, cgroup limit − usage,
RLIMIT_AS − VmSize), each term read from hand-written files and a stand-in ``resource`` module with known values."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from dynprobe._util import memory


class FakeResource:
    RLIMIT_AS = 9
    RLIM_INFINITY = -1

    def __init__(self, soft: int) -> None:
        self.soft = soft

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == self.RLIMIT_AS
        return self.soft, self.RLIM_INFINITY


def cgroup(tmp_path: Path, name: str, limit: str, usage: str) -> tuple[str, str]:
    (tmp_path / f"{name}.max").write_text(limit + "\n")
    (tmp_path / f"{name}.current").write_text(usage + "\n")
    return str(tmp_path / f"{name}.max"), str(tmp_path / f"{name}.current")


@pytest.mark.parametrize("v2, v1, soft, vmsize, expected", [
    (("1000", "300"), None, None, None, 700),  # cgroup v2 only
    (("max", "300"), None, None, None, math.inf),  # "max": no limit
    (("1000", "300"), ("600", "100"), None, None, 500),  # the tighter of v2 and v1
    (("1000", "300"), None, 5000, 4800, 200),  # RLIMIT_AS − VmSize is tighter
    (("1000", "1200"), None, None, None, 0),  # over the limit: none left, never negative
    (None, None, 100, 400, 0),
    (("9" * 19, "0"), None, None, None, math.inf),  # a "limit" above 2**60 is the kernel's "unlimited"
])
def test_process_headroom_is_the_tightest_limit_less_its_usage(tmp_path, monkeypatch, v2, v1, soft, vmsize,
                                                              expected):
    files = [cgroup(tmp_path, "v2", *v2) if v2 else (str(tmp_path / "no"), str(tmp_path / "no")),
             cgroup(tmp_path, "v1", *v1) if v1 else (str(tmp_path / "no"), str(tmp_path / "no"))]
    monkeypatch.setattr(memory, "_CGROUP_FILES", tuple(files))
    monkeypatch.setattr(memory, "resource", FakeResource(soft if soft is not None else FakeResource.RLIM_INFINITY))
    monkeypatch.setattr(memory, "_address_space_used", lambda: vmsize)
    assert memory.process_headroom() == expected


def test_cpu_headroom_is_the_smaller_of_available_ram_and_the_process_headroom(monkeypatch):
    monkeypatch.setattr(memory, "available_ram", lambda: 8 * 2**30)
    monkeypatch.setattr(memory, "process_headroom", lambda: 3 * 2**30)
    assert memory.device_headroom("cpu") == 3 * 2**30
    monkeypatch.setattr(memory, "process_headroom", lambda: math.inf)
    assert memory.device_headroom(torch.device("cpu")) == 8 * 2**30


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="needs /proc/meminfo")
def test_available_ram_is_memavailable_in_bytes():
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kib = int(fields["MemAvailable"].split()[0])
    assert abs(memory.available_ram() - kib * 1024) <= 256 * 2**20  # read at a slightly different moment


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_address_space_used_is_vmsize():
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    vmsize = int(status["VmSize"].split()[0]) * 1024
    assert abs(memory._address_space_used() - vmsize) <= 64 * 2**20
