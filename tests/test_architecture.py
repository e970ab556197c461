"""The package's shape, read from its import graph with ``ast``: layers, private modules, no cycles.

dynprobe's subpackages mirror its data flow (hooks → capture → snapshot → store → metrics → analysis → report).
The rules, which the contributor guide (docs/contributing.md) states (its layer table is read here, not restated):

1. A module imports only its own subpackage or lower layers (:data:`LAYERS`, lowest first, from that guide).
2. A private module (``_name``) is imported only from inside its own subpackage; ``dynprobe._util`` and
   ``dynprobe._version`` are the package-wide exceptions. Integrations use the public API only.
3. No function-level imports of dynprobe modules, the command line included (lazy imports there saved about
   0.5 s of ``dynprobe --help``; not worth an exception). ``if TYPE_CHECKING:`` imports count as imports.
4. No import cycles, inside a subpackage either.
5. No module over :data:`MAX_LINES` lines.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CONTRIBUTING = ROOT / "docs" / "contributing.md"


def documented_layers(text: str) -> list[list[str]]:
    """The layer table of the contributor guide (``docs/contributing.md``), lowest first: each row's names
    (``_util/`` → ``_util``, ``cli.py`` → ``cli``). It is the one statement of the layering; this test enforces it."""
    section = text[text.index("# For contributors"):]
    layers: dict[int, list[str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].isdigit():
            names = [name.rstrip("/").removesuffix(".py") for name in re.findall(r"`([\w./]+)`", cells[1])]
            layers.setdefault(int(cells[0]), []).extend(names)
    return [layers[rank] for rank in sorted(layers)]


LAYERS: list[list[str]] = documented_layers(CONTRIBUTING.read_text())
PACKAGE_WIDE_PRIVATE = {"_util", "_version"}
MAX_LINES = 500


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    imported: str  # dotted module name (or module.attribute when it could not be told apart)
    names: tuple[str, ...]
    line: int
    function_level: bool


def module_files(root: Path) -> dict[str, Path]:
    """Dotted name → file, for dynprobe/ and integrations/ (as dynprobe.integrations)."""
    files: dict[str, Path] = {}
    for base, prefix in ((root / "dynprobe", "dynprobe"), (root / "integrations", "dynprobe.integrations")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([prefix, *parts])] = path
    return files


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def read_imports(files: dict[str, Path]) -> list[Import]:
    """Every import of a dynprobe module, with whether it sits inside a function (or a TYPE_CHECKING block)."""
    imports: list[Import] = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        nested: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                nested.update(id(child) for child in ast.walk(node) if child is not node)
        for node in ast.walk(tree):
            targets: list[tuple[str, tuple[str, ...]]] = []
            if isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                for alias in node.names:  # "from pkg import submodule" imports the submodule
                    candidate = f"{base}.{alias.name}"
                    targets.append((candidate if candidate in files else base, (alias.name,)))
            elif isinstance(node, ast.Import):
                targets = [(alias.name, ()) for alias in node.names]
            for imported, names in targets:
                if imported == "dynprobe" or imported.startswith("dynprobe."):
                    imports.append(Import(name, imported, names, node.lineno, id(node) in nested))
    return imports


def _component(module: str) -> str:
    """``dynprobe.kernels._chunking`` → ``kernels``; the package itself → ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(component: str) -> int | None:
    for rank, names in enumerate(LAYERS):
        if component in names:
            return rank
    return None


def _owner(imported: str, files: dict[str, Path]) -> str:
    """The module an import refers to (``dynprobe.store.files.X`` → ``dynprobe.store.files``)."""
    while imported not in files and "." in imported:
        imported = imported.rpartition(".")[0]
    return imported


def violations(root: Path) -> list[str]:
    """Every broken rule of the package at ``root``, one line each (empty when the package is in shape)."""
    files = module_files(root)
    problems: list[str] = []
    for component in sorted({_component(m) for m in files} - {""}):
        if _layer(component) is None:
            problems.append(f"dynprobe.{component} is in no layer: add it to LAYERS")
    graph: dict[str, set[str]] = {m: set() for m in files}
    for imp in read_imports(files):
        target = _owner(imp.imported, files)
        where = f"{imp.importer}:{imp.line} imports {target}"
        if imp.function_level:
            problems.append(f"{where} inside a function (import it at module level)")
        graph[imp.importer].add(target)
        here, there = _component(imp.importer), _component(target)
        if here == "" or here == there or there == "":
            if there == "" and here not in ("", "integrations"):
                problems.append(f"{where}: import the module that defines it, not the package top level")
            continue
        rank_here, rank_there = _layer(here), _layer(there)
        if rank_here is not None and rank_there is not None and rank_there >= rank_here:
            problems.append(f"{where}: dynprobe.{there} is not in a lower layer than dynprobe.{here}")
        private = [p for p in target.split(".")[1:] if p.startswith("_")]
        if private and there not in PACKAGE_WIDE_PRIVATE:
            problems.append(f"{where}: a private module of another subpackage")
        if here == "integrations":
            if private or there in PACKAGE_WIDE_PRIVATE:
                problems.append(f"{where}: integrations use the public API only")
            if any(n.startswith("_") for n in imp.names):
                problems.append(f"{where}: integrations use the public API only (private name {imp.names})")
    problems += [f"import cycle: {' → '.join(cycle)}" for cycle in _cycles(graph)]
    problems = list(dict.fromkeys(problems))  # one line per problem, not per imported name
    for module, path in files.items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            problems.append(f"{module} has {lines} lines (at most {MAX_LINES}): split it by concern")
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One representative cycle per strongly connected component with more than one module (or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm, iterative enough for a package of ~100 modules
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in graph:
                continue
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(sorted(component) + [sorted(component)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


# Violations being removed while the package moves into this layout (issue 12); each entry is a prefix of a
# problem line. The list only shrinks: an entry that no longer matches anything fails the test too.
KNOWN_VIOLATIONS: list[str] = [
]


def test_the_package_follows_its_layers_and_has_no_cycles():
    problems = violations(ROOT)
    unexpected = [p for p in problems if not any(p.startswith(known) for known in KNOWN_VIOLATIONS)]
    stale = [known for known in KNOWN_VIOLATIONS if not any(p.startswith(known) for p in problems)]
    assert not unexpected, "\n".join(unexpected)
    assert not stale, f"fixed: remove from KNOWN_VIOLATIONS: {stale}"


def _fake_package(tmp_path: Path, modules: dict[str, str]) -> Path:
    for dotted, source in {"dynprobe": "", "dynprobe.store": "", "dynprobe.metrics": "", **modules}.items():
        parts = dotted.split(".")
        path = tmp_path.joinpath(*parts)
        if dotted in ("dynprobe", "dynprobe.store", "dynprobe.metrics"):
            path.mkdir(parents=True, exist_ok=True)
            (path / "__init__.py").write_text(source)
        else:
            path.with_suffix(".py").write_text(source)
    (tmp_path / "integrations").mkdir(exist_ok=True)
    return tmp_path


def test_the_checker_finds_a_deliberately_added_cycle(tmp_path):
    root = _fake_package(tmp_path, {
        "dynprobe.metrics.a": "from .b import x\n",
        "dynprobe.metrics.b": "from .a import y\n",
    })
    problems = violations(root)
    assert any(p.startswith("import cycle: dynprobe.metrics.a → dynprobe.metrics.b") for p in problems), problems


@pytest.mark.parametrize("source, expected", [
    ("from dynprobe.metrics.a import f\n", "is not in a lower layer"),      # store (layer 2) → metrics (3)
    ("def f():\n    from dynprobe.metrics import a\n", "inside a function"),
    ("from dynprobe.metrics._private import f\n", "a private module of another subpackage"),
])
def test_the_checker_finds_each_kind_of_violation(tmp_path, source, expected):
    root = _fake_package(tmp_path, {
        "dynprobe.metrics.a": "",
        "dynprobe.metrics._private": "",
        "dynprobe.store.reader": source,
    })
    assert any(expected in p for p in violations(root)), violations(root)


def test_the_checker_accepts_a_clean_package(tmp_path):
    root = _fake_package(tmp_path, {"dynprobe.metrics.a": "from dynprobe.store.b import f\n",
                                    "dynprobe.store.b": "def f():\n    return 1\n"})
    assert violations(root) == []


def test_every_subpackage_is_installed():
    """A non-editable install ships only the packages pyproject.toml lists: a new subpackage must be added there."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "dynprobe").rglob("__init__.py")}
    assert found - listed == set(), f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"


PROJECT_WIDE_TESTS = {"test_architecture", "test_docs", "test_module_coverage", "test_bench_gpu"}
NOT_A_SUBPACKAGE = {"science", "benchmarks"}  # the ground truth and the benchmarks


def misplaced_tests(root: Path) -> list[str]:
    """Test files that do not mirror the package: ``tests/<subpackage>/test_<module>[_<aspect>].py`` (top-level
    modules: ``tests/test_<module>...``), with the documented exceptions."""
    tests, package = root / "tests", root / "dynprobe"
    wrong = []
    for path in sorted(tests.rglob("test_*.py")):
        relative = path.relative_to(tests)
        if relative.parts[0] in NOT_A_SUBPACKAGE or (len(relative.parts) == 1 and path.stem in PROJECT_WIDE_TESTS):
            continue
        parts = relative.parts[:-1]
        folder = root / "integrations" if parts[:1] == ("integrations",) else package.joinpath(*parts)
        modules = {m.stem.lstrip("_") for m in folder.glob("*.py") if m.stem != "__init__"}
        name = path.stem.removeprefix("test_")
        if not any(name == m or name.startswith(m + "_") for m in modules):
            wrong.append(str(relative))
    return wrong


def test_tests_mirror_the_package():
    assert misplaced_tests(ROOT) == [], "move or rename: tests/<subpackage>/test_<module>[_<aspect>].py"
