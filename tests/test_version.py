"""The package version (dynprobe._version) is the one pyproject.toml declares, and the one the package exports."""
from __future__ import annotations

import re
from pathlib import Path

import dynprobe
from dynprobe._version import __version__

ROOT = Path(__file__).resolve().parents[1]


def declared_version() -> str:
    """``version`` of pyproject's ``[project]`` table, read by hand (tomllib is Python 3.11+, the package 3.10+)."""
    text = (ROOT / "pyproject.toml").read_text()
    project = re.search(r"^\[project\]\n(.*?)(?=^\[)", text, flags=re.S | re.M).group(1)
    return re.search(r'^version\s*=\s*"([^"]+)"', project, flags=re.M).group(1)


def test_the_version_is_pyprojects_and_the_packages():
    assert __version__ == declared_version()
    assert dynprobe.__version__ == __version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)  # plain X.Y.Z
