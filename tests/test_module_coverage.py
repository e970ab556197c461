"""Every dynprobe module is reached by a test that imports it by name.

A module only ever exercised through the public facade (``dynprobe.Probe``, ``load_run``) can lose a branch, a
conversion or an edge case without a test noticing; naming it in a test file means some test calls it with
inputs chosen for it. "Imported by name" is read with ``ast`` from ``tests/**/test_*.py`` and ``conftest.py``:
``import dynprobe.a.b``, ``from dynprobe.a.b import x`` and ``from dynprobe.a import b`` (b a module) all name
``dynprobe.a.b``; ``from dynprobe import Probe`` names only ``dynprobe``. A package (its ``__init__``, which
only re-exports) is reached when one of its modules is.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Modules no test imports by name yet (issue 22 brought it to none). It only shrinks: a new module comes with a test
# that imports it (the test below fails while a listed module is in fact covered: the list cannot go stale).
NOT_YET_IMPORTED_BY_A_TEST: set[str] = set()


def package_modules(root: Path) -> set[str]:
    """Dotted names of dynprobe's modules (a package is its ``__init__``)."""
    modules = set()
    for path in (root / "dynprobe").rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules.add(".".join(parts))
    return modules


def suite_files(root: Path) -> list[Path]:
    tests = root / "tests"
    return sorted(p for p in tests.rglob("*.py") if "benchmarks" not in p.relative_to(tests).parts
                  and (p.name.startswith("test_") or p.name == "conftest.py"))


def imported_by_name(path: Path, modules: set[str]) -> set[str]:
    """The dynprobe modules ``path`` imports by name (see the module docstring)."""
    named = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
            named.add(node.module)
            named.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in modules)
    return named


def modules_not_imported_by_a_test(root: Path) -> set[str]:
    modules = package_modules(root)
    reached = set().union(*(imported_by_name(path, modules) for path in suite_files(root)))
    packages = {name.rsplit(".", 1)[0] for name in reached if "." in name}
    while packages - reached:
        reached |= packages
        packages = {name.rsplit(".", 1)[0] for name in reached if "." in name}
    return modules - reached


def test_every_module_is_imported_by_name_by_some_test():
    missing = modules_not_imported_by_a_test(ROOT)
    assert missing - NOT_YET_IMPORTED_BY_A_TEST == set(), "modules no test imports by name"
    assert NOT_YET_IMPORTED_BY_A_TEST - missing == set(), "covered now: remove them from NOT_YET_IMPORTED_BY_A_TEST"


def test_the_reader_tells_import_forms_apart(tmp_path):
    (tmp_path / "dynprobe" / "sub").mkdir(parents=True)
    (tmp_path / "dynprobe" / "other").mkdir()
    for name in ("__init__", "sub/__init__", "sub/a", "sub/b", "sub/c", "sub/d", "top", "other/__init__", "other/e"):
        (tmp_path / "dynprobe" / f"{name}.py").write_text("")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "import dynprobe.sub.a\nfrom dynprobe.sub import b, Thing\nfrom dynprobe import top\n"
        "def f():\n    from dynprobe.sub.c import g\n")
    (tmp_path / "tests" / "helper.py").write_text("import dynprobe.sub.d\n")  # not a test file
    (tmp_path / "tests" / "benchmarks").mkdir()
    (tmp_path / "tests" / "benchmarks" / "test_y.py").write_text("import dynprobe.other.e\n")  # not collected
    assert modules_not_imported_by_a_test(tmp_path) == {"dynprobe.sub.d", "dynprobe.other", "dynprobe.other.e"}
