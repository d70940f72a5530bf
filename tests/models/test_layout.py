"""The layout of the code: no import cycles in flows/ and models/, the rooms of models/ import
down only, imports inside models/ are relative, and no file is over 400 lines.

Imports are read from the source (every ``import`` statement, also function-local and
type-only ones), so a cycle fails here even where Python would tolerate it at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "models")
MAX_LINES = 400
ARCHITECTURES = ("models.density", "models.nice", "models.realnvp", "models.glow", "models.maf", "models.nsf",
                 "models.multiscale", "models.residual", "models.continuous", "models.tarflow")

Graph = dict[str, set[str]]


def module_files(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file under ``packages`` (a package is its ``__init__``)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """Every import of ``path`` as ``(absolute module, names imported from it, level)``; level 0 is absolute."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.append((target, [alias.name for alias in node.names], node.level))
    return found


def import_graph(modules: dict[str, Path]) -> Graph:
    """Module -> the modules of ``modules`` whose code runs when it is imported.

    ``from a import b`` imports the module ``a.b`` if there is one, else ``a``; importing a
    module also runs the packages above it, except those above the importer itself
    (already running when it is imported).
    """
    graph: Graph = {}
    for module, path in modules.items():
        edges = set()
        for target, names, _ in imported_names(module, path):
            for name in names or [None]:
                found = f"{target}.{name}" if name and f"{target}.{name}" in modules else target
                parts = found.split(".")
                edges |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        above = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        graph[module] = {m for m in edges if m in modules and m != module and m not in above}
    return graph


def find_cycle(graph: Graph) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, str] = {}  # module -> "open" (on the current path) or "done"
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return module_files(ROOT)


@pytest.fixture(scope="module")
def graph(modules: dict[str, Path]) -> Graph:
    return import_graph(modules)


def test_no_import_cycles(graph: Graph) -> None:
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_can_fail(tmp_path: Path) -> None:
    (tmp_path / "models" / "data").mkdir(parents=True)
    (tmp_path / "flows").mkdir()
    for name, text in {
        "models/__init__.py": "",
        "models/data/__init__.py": "from .split import DataSplit\n",
        "models/data/split.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .loaders import load\n",
        "models/data/loaders.py": "def load():\n    from models.data.split import DataSplit\n",
        "models/fine.py": "import flows\n",
        "flows/__init__.py": "",
    }.items():
        (tmp_path / name).write_text(text)
    graph = import_graph(module_files(tmp_path))
    assert graph["models.fine"] == {"flows"}
    cycle = find_cycle(graph)
    assert cycle[0] == cycle[-1] and set(cycle) == {"models.data.loaders", "models.data.split"}


def test_no_file_over_400_lines(modules: dict[str, Path]) -> None:
    sizes = {path.relative_to(ROOT): len(path.read_text().splitlines()) for path in modules.values()}
    sizes[Path("train.py")] = len((ROOT / "train.py").read_text().splitlines())
    assert not {str(path): n for path, n in sizes.items() if n > MAX_LINES}


def test_data_never_imports_training_and_architectures_import_neither(graph: Graph) -> None:
    def reaches(module: str, room: str) -> list[str]:
        return sorted(m for m in graph[module] if m == room or m.startswith(room + "."))

    for module in (m for m in graph if m.startswith("models.data")):
        assert not reaches(module, "models.training"), module
    for module in ARCHITECTURES:
        if module in graph:
            assert not reaches(module, "models.data") and not reaches(module, "models.training"), module


def test_imports_inside_models_are_relative(modules: dict[str, Path]) -> None:
    # The package is also installed as ``jacflow.models``: an absolute ``models.x`` would not resolve there.
    absolute = [
        f"{module}: {target}"
        for module, path in modules.items() if module.startswith("models")
        for target, _, level in imported_names(module, path)
        if level == 0 and (target == "models" or target.startswith("models."))
    ]
    assert not absolute
