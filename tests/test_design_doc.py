"""docs/DESIGN.md's module map is drawn from the code: every module of the package has a row
with its floor, and no module imports one on its own floor or above (the floors are the
layering: a module's floor is above everything it imports).

Run it as a script (``python tests/test_design_doc.py``) to print each module's lowest
possible floor (one above the highest floor among its imports) and what it imports, for
redrawing the map.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pilothandshake"
DESIGN = ROOT / "docs" / "DESIGN.md"
# A row of the module map: | floor | `module` | what it holds |
ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*`([\w/]+)`\s*\|", re.M)


def modules() -> dict[str, Path]:
    """Every module of the package by its map name: ``manager/decide``,
    ``manager/__init__`` (the package itself), ``constants``."""
    return {
        path.relative_to(PACKAGE).with_suffix("").as_posix(): path
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _dotted(name: str) -> str:
    parts = name.split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["pilothandshake", *parts])


def imports() -> dict[str, set[str]]:
    """The package's modules each imports (at any depth of its code, except under
    ``if TYPE_CHECKING``: those are for the type checker only)."""
    found = modules()
    by_dotted = {_dotted(name): name for name in found}
    result: dict[str, set[str]] = {}
    for name, path in found.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = _dotted(name) if name.endswith("__init__") else _dotted(name).rpartition(".")[0]
        checking_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for inner in ast.walk(node)
        }
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in checking_only:
                continue
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets.update(f"{base}.{alias.name}" for alias in node.names)
                if node.module:
                    targets.add(base)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        result[name] = {by_dotted[t] for t in targets if t in by_dotted} - {name}
    return result


def lowest_floors() -> dict[str, int]:
    """Each module's lowest possible floor: 0 without imports from the package, else one
    above the highest floor among its imports."""
    graph = imports()
    floors: dict[str, int] = {}

    def floor(name: str, path: tuple[str, ...]) -> int:
        if name not in floors:
            assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
            floors[name] = 1 + max((floor(d, (*path, name)) for d in graph[name]), default=-1)
        return floors[name]

    for name in graph:
        floor(name, ())
    return floors


def documented_floors() -> dict[str, int]:
    """The module map of DESIGN.md: module -> floor."""
    rows = ROW.findall(DESIGN.read_text(encoding="utf-8"))
    return {module: int(level) for level, module in rows}


def test_every_module_of_the_package_has_a_row_in_the_design_map() -> None:
    documented = documented_floors()
    assert sorted(set(modules()) - set(documented)) == []
    assert sorted(set(documented) - set(modules())) == []  # no row for a module that is gone


def test_the_package_has_no_import_cycle() -> None:
    floors = lowest_floors()
    assert set(floors) == set(modules())


def test_no_module_imports_one_on_its_own_floor_or_above() -> None:
    documented = documented_floors()
    upward = [
        f"{name} (floor {documented[name]}) imports {used} (floor {documented[used]})"
        for name, used_modules in sorted(imports().items())
        for used in sorted(used_modules)
        if name in documented and used in documented and documented[used] >= documented[name]
    ]
    assert upward == []


if __name__ == "__main__":
    graph = imports()
    floors = lowest_floors()
    for module in sorted(floors, key=lambda m: (floors[m], m)):
        print(floors[module], module, "<-", ", ".join(sorted(graph[module])), file=sys.stdout)
