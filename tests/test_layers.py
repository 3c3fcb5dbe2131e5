"""The package's import graph, read with ``ast``: the layers are what makes a change findable from the tree alone,
so an import cycle, an upward import, a private name used across modules or an oversized module fails here,
naming the edge or the file. Function-level (lazy) imports count like top-level ones."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "easier_export"

LAYERS = {"core": 0, "trace": 1, "load": 2, "fold": 3, "loop": 4, "ship": 4, "deploy": 5, "normalization": 5,
          "pipeline": 6, "demo": 7, "stages": 7, "cli": 8, "__main__": 9}
"""The rank of each top-level room: a module may import from its own room and from rooms of a lower rank only
(rooms of equal rank are siblings and may not import each other). The root ``__init__`` is below them all."""

MAX_LINES = 350


@dataclass(frozen=True)
class Edge:
    """``importer`` imports ``imported`` (both module names), on ``line``; ``names``: what it takes from it."""

    importer: str
    imported: str
    line: int
    names: tuple[str, ...] = ()

    def __str__(self) -> str:
        taken = f" ({', '.join(self.names)})" if self.names else ""
        return f"{self.importer}:{self.line} -> {self.imported}{taken}"


def module_files(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root`` by dotted name (a package by its ``__init__``'s)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def import_edges(root: Path) -> list[Edge]:
    """Every import of a module of the package by another, lazy ones included; ``from X import y`` is an edge to
    the submodule ``X.y`` when there is one, else to ``X`` taking ``y``."""
    modules = module_files(root)
    edges = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges += [Edge(name, alias.name, node.lineno) for alias in node.names if alias.name in modules]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                if base not in modules:
                    continue
                taken = []
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        edges.append(Edge(name, f"{base}.{alias.name}", node.lineno))
                    else:
                        taken.append(alias.name)
                if taken:
                    edges.append(Edge(name, base, node.lineno, tuple(taken)))
    return edges


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle (as its edges) per strongly connected group of modules that import each other."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.importer, {}).setdefault(e.imported, e)
    found, done = [], set()
    for start in sorted(graph):
        path = _path_back(graph, start, start, set())
        if path and not set(e.importer for e in path) & done:
            found.append(path)
            done |= {e.importer for e in path}
    return found


def _path_back(graph: dict[str, dict[str, Edge]], node: str, goal: str, seen: set[str]) -> list[Edge] | None:
    """The edges of a path from ``node`` to ``goal`` (depth first), None when there is none."""
    for target, edge in sorted(graph.get(node, {}).items()):
        if target == goal:
            return [edge]
        if target not in seen:
            seen.add(target)
            rest = _path_back(graph, target, goal, seen)
            if rest is not None:
                return [edge, *rest]
    return None


def room(module: str) -> str | None:
    """The top-level room a module belongs to (None for the root package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def upward(edges: list[Edge], layers: dict[str, int]) -> list[Edge]:
    """Imports into a higher room or a sibling room of equal rank; an unranked room cannot be shown to point down,
    so its imports count too."""
    bad = []
    for e in edges:
        a, b = room(e.importer), room(e.imported)
        if a == b or b is None:
            continue
        if a not in layers or b not in layers or layers[b] >= layers[a]:
            bad.append(e)
    return bad


def private_imports(edges: list[Edge]) -> list[Edge]:
    """Private names taken from another module, and private modules imported from outside their package."""
    bad = []
    for e in edges:
        module_package, _, leaf = e.imported.rpartition(".")
        outside = module_package not in (e.importer, e.importer.rpartition(".")[0])
        if any(_is_private(n) for n in e.names) or (_is_private(leaf) and outside):
            bad.append(e)
    return bad


def oversized(root: Path, limit: int = MAX_LINES) -> dict[str, int]:
    """Modules over ``limit`` lines, with their line counts."""
    counts = {name: len(path.read_text().splitlines()) for name, path in module_files(root).items()}
    return {name: n for name, n in counts.items() if n > limit}


def apart(root: Path) -> list[str]:
    """Modules that import nothing of the package and are imported by none: dead code, or unread (the checks would
    pass vacuously on them). Packages are exempt: importing a submodule runs its ``__init__`` without naming it."""
    connected = {m for e in import_edges(root) for m in (e.importer, e.imported)}
    return [m for m, path in module_files(root).items() if m not in connected and path.name != "__init__.py"]


def unranked(root: Path, layers: dict[str, int]) -> list[str]:
    """Top-level rooms that ``layers`` does not rank."""
    return sorted({room(m) for m in module_files(root)} - {None} - set(layers))


def _listed(edges: list[Edge] | list[list[Edge]]) -> str:
    return "\n".join(" | ".join(map(str, e)) if isinstance(e, list) else str(e) for e in edges)


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return import_edges(PACKAGE)


def test_every_module_is_in_the_graph() -> None:
    found = apart(PACKAGE)
    assert not found, f"modules outside the import graph: {found}"


def test_no_import_cycle(edges: list[Edge]) -> None:
    found = cycles(edges)
    assert not found, f"import cycles:\n{_listed(found)}"


def test_every_import_points_down(edges: list[Edge]) -> None:
    bad = upward(edges, LAYERS)
    assert not bad, f"upward or sibling imports (layers {LAYERS}):\n{_listed(bad)}"


def test_no_private_name_is_imported_across_modules(edges: list[Edge]) -> None:
    bad = private_imports(edges)
    assert not bad, f"private names imported across modules:\n{_listed(bad)}"


def test_every_room_is_ranked() -> None:
    found = unranked(PACKAGE, LAYERS)
    assert not found, f"rooms without a layer in LAYERS: {found}"


def test_no_module_is_oversized() -> None:
    big = oversized(PACKAGE)
    assert not big, f"modules over {MAX_LINES} lines: " + ", ".join(f"{m} ({n})" for m, n in sorted(big.items()))


def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    """A small package that breaks every rule once, lazily where it can."""
    return _package(tmp_path, {
        "__init__.py": "from .core import a\n",
        "core/__init__.py": "from ._hidden import x\n",
        "core/a.py": "from .b import helper\n",
        "core/b.py": "def helper():\n    from . import a\n",
        "core/_hidden.py": "",
        "core/c.py": "from ._hidden import x\n",
        "core/lonely.py": "x = 1\n",
        "fold/__init__.py": "from pkg.core.a import helper\n",
        "fold/rules.py": "def f():\n    import pkg.loop.x\n",
        "loop/__init__.py": "",
        "loop/x.py": "from pkg.ship import y\nfrom pkg.core.b import _secret\nfrom ..core import _hidden\n",
        "ship/__init__.py": "",
        "ship/y.py": "from ..core import c\n" + "z = 1\n" * 5,
        "attic/old.py": "from pkg.core import c\n",
    })


def test_the_checker_finds_a_lazy_cycle_and_names_it(fake: Path) -> None:
    (cycle,) = cycles(import_edges(fake))
    assert [str(e) for e in cycle] == ["pkg.core.a:1 -> pkg.core.b (helper)", "pkg.core.b:2 -> pkg.core.a"]


def test_the_checker_finds_upward_sibling_and_unranked_imports(fake: Path) -> None:
    assert sorted(str(e) for e in upward(import_edges(fake), LAYERS)) == [
        "pkg.attic.old:1 -> pkg.core.c", "pkg.fold.rules:2 -> pkg.loop.x", "pkg.loop.x:1 -> pkg.ship.y",
        "pkg:1 -> pkg.core.a"]


def test_the_checker_finds_private_names_and_modules(fake: Path) -> None:
    assert sorted(str(e) for e in private_imports(import_edges(fake))) == [
        "pkg.loop.x:2 -> pkg.core.b (_secret)", "pkg.loop.x:3 -> pkg.core._hidden"]


def test_the_checker_finds_unranked_rooms(fake: Path) -> None:
    assert unranked(fake, LAYERS) == ["attic"]


def test_the_checker_finds_modules_apart(fake: Path) -> None:
    assert apart(fake) == ["pkg.core.lonely"]


def test_the_checker_counts_lines(fake: Path) -> None:
    assert oversized(fake, limit=5) == {"pkg.ship.y": 6}
    assert oversized(fake, limit=6) == {}
