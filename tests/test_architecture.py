"""The layering rules, read from the source: the engine never imports a pass, the CLI or a recipe, and
never names a pass; no pass imports another; nothing imports in a cycle."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

import rewrite

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"rewrite": ROOT / "rewrite", "rewrite.passes": ROOT / "passes", "rewrite.cli": ROOT / "cli"}


def _modules() -> dict[str, Path]:
    """Import name -> file, for every module of the project (the three folders and their subpackages)."""
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _layer(module: str) -> str:
    for prefix, layer in (("rewrite.passes", "passes"), ("rewrite.cli", "cli"), ("rewrite.recipes", "recipes")):
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return "facade" if module == "rewrite" else "engine"


def _imports(module: str) -> set[str]:
    """The project modules `module` imports (`from rewrite import data` imports `rewrite.training.data`)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
    return {name for name in found if name in MODULES}


def _strings(module: str) -> set[str]:
    """String constants in the code, docstrings left out."""
    tree = ast.parse(MODULES[module].read_text())
    docstrings = {id(body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and (body := node.body) and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) == "engine"))
def test_the_engine_imports_no_pass_cli_recipe_or_facade(module):
    above = sorted(m for m in _imports(module) if _layer(m) != "engine")
    assert not above, f"{module} imports {above}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) == "engine"))
def test_the_engine_names_no_pass(module):
    named = _strings(module) & set(rewrite.passes.available())
    assert not named, f"{module} names pass {sorted(named)}: ask the pass through a hook instead"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) == "passes" and m != "rewrite.passes"))
def test_a_pass_imports_only_the_engine(module):
    others = sorted(m for m in _imports(module) if _layer(m) != "engine")
    assert not others, f"{module} imports {others}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) == "recipes"))
def test_recipes_import_neither_the_cli_nor_the_facade(module):
    above = sorted(m for m in _imports(module) if _layer(m) in ("cli", "facade"))
    assert not above, f"{module} imports {above}"


def test_no_import_cycles():
    graph = nx.DiGraph((module, imported) for module in MODULES for imported in _imports(module))
    assert list(nx.simple_cycles(graph)) == []


def test_every_module_says_what_it_is_for():
    missing = sorted(m for m, path in MODULES.items() if ast.get_docstring(ast.parse(path.read_text())) is None)
    assert not missing
