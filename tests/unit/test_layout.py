"""The layout rules import-linter cannot state (its contracts are in `.importlinter`).

- No module imports another module's `_private` name.
- No import cycles between modules (function-level imports count: a cycle hidden in a
  function is still a cycle).
- A package's `__init__` says what it owns and what it may import, and re-exports nothing
  (no shims kept importable after a move); `kubetune.api` alone is a public surface.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"kubetune": ROOT / "operator/src/kubetune",
           "kubetune_trainer": ROOT / "trainer-image/src/kubetune_trainer"}
PUBLIC_SURFACES = {"kubetune.api"}
"""Packages whose `__init__` is their public API (the models both planes import)."""


def modules() -> dict[str, Path]:
    found = {}
    for top, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((top, *parts))] = path
    return found


def private_imports(name: str, path: Path) -> list[str]:
    """`from other.module import _name` statements in one module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.ImportFrom):
            continue
        source = node.module or ""
        if node.level:  # relative: resolve against this module's package
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            source = ".".join([*base, *([source] if source else [])])
        if not source.startswith(tuple(SOURCES)):
            continue
        found += [f"{name}:{node.lineno}: from {source} import {alias.name}"
                  for alias in node.names
                  if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    offenders = [line for name, path in modules().items() for line in private_imports(name, path)]
    assert offenders == []


def test_the_private_import_check_sees_one(tmp_path: Path) -> None:
    """The check above is only worth something if it finds a real offender."""
    module = tmp_path / "m.py"
    module.write_text("from kubetune.reconcile.children import _hidden, visible\n")
    assert private_imports("kubetune.local.m", module) == [
        "kubetune.local.m:1: from kubetune.reconcile.children import _hidden"
    ]


def cycles(graph: grimp.ImportGraph) -> list[tuple[str, ...]]:
    """One chain per module pair that import each other, directly or through others."""
    found = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None:
                found.append((importer, *back))
    return found


def test_no_import_cycles() -> None:
    graph = grimp.build_graph(*SOURCES, include_external_packages=False)
    # A package's __init__ is "imported" by each of its submodules; only module edges count.
    for name in modules():
        if (SOURCES[name.split(".")[0]] / Path(*name.split(".")[1:]) / "__init__.py").is_file():
            for child in graph.find_children(name):
                if graph.direct_import_exists(importer=child, imported=name):
                    graph.remove_import(importer=child, imported=name)
    assert cycles(graph) == []


def test_the_cycle_check_sees_one() -> None:
    graph = grimp.ImportGraph()
    for name in ("a.x", "a.y", "a.z"):
        graph.add_module(name)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.z")
    graph.add_import(importer="a.z", imported="a.x")
    assert ("a.x", "a.y", "a.z", "a.x") in cycles(graph)


@pytest.mark.parametrize("package", sorted(
    name for name, path in modules().items() if path.name == "__init__.py"
))
def test_each_package_says_what_it_owns_and_reexports_nothing(package: str) -> None:
    path = modules()[package]
    tree = ast.parse(path.read_text(), str(path))
    docstring = ast.get_docstring(tree)
    assert docstring and len(docstring) > 40, f"{path}: say what the package owns"
    if package in PUBLIC_SURFACES:
        return
    code = [node for node in tree.body
            if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    assert code == [], f"{path}: an __init__ holds a docstring only (import from the module)"
