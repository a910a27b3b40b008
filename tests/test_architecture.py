"""The layering rules, read from the source: the engine never imports a pass, the CLI or a recipe (also not
through `importlib`), and never names a pass, its tensors or its node tags; no pass imports another; nothing
imports in a cycle."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

import rewrite

from no_torch import NO_TORCH

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
    for prefix, layer in (("rewrite.passes", "passes"), ("rewrite.cli", "cli"), ("rewrite.recipes", "recipes"),
                          ("rewrite.serve", "serve")):  # the HTTP server: an application of the runtime, as the CLI is
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return "facade" if module == "rewrite" else "engine"


def _imports(module: str) -> set[str]:
    """The project modules `module` imports (`from rewrite.training import data` imports `rewrite.training.data`)."""
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


GENERIC_NAMES = {"weight", "bias"}  # tensor names every module has


def _tensor_names(tree: ast.AST) -> set[str]:
    """Names a pass gives tensors it creates: the dotted parts of `f"{path}.name"` strings (`ia3_l`)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            for part in node.values:
                if isinstance(part, ast.Constant) and part.value.startswith("."):
                    found.update(p for p in part.value.split(".") if p.isidentifier())
    return found - GENERIC_NAMES


def _is_tags(node: ast.AST) -> bool:
    """`x.meta["rewrite"]` or `tag(x)`."""
    if isinstance(node, ast.Call):
        return getattr(node.func, "id", None) == "tag"
    return (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "rewrite"
            and getattr(node.value, "attr", None) == "meta")


def _tag_keys(tree: ast.AST, written_only: bool = False) -> set[str]:
    """Node tag keys a module writes (`x.meta["rewrite"]["key"] = ...`, `.update(key=...)`, `NodeBuilder(...,
    **{"key": ...})`) and, unless `written_only`, reads (`tag(x).get("key")`, `tag(x)["key"]`)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _is_tags(node.value) and isinstance(node.slice, ast.Constant):
            if not written_only or isinstance(node.ctx, ast.Store):
                found.add(node.slice.value)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _is_tags(node.func.value):
            if node.func.attr == "update" or (node.func.attr == "get" and not written_only):
                found.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
                found.update(k.arg for k in node.keywords if k.arg)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                "NodeBuilder", "builder"):
            for keyword in node.keywords:
                if keyword.arg is None and isinstance(keyword.value, ast.Dict):
                    found.update(k.value for k in keyword.value.keys if isinstance(k, ast.Constant))
                elif keyword.arg:
                    found.add(keyword.arg)
    return found


def _owned_by_passes() -> dict[str, str]:
    """Tensor names and tag keys a pass module spells itself and the engine does not make (its `pass` and
    `target` tags, PEFT's `lora_A` in the adapter layer) -> the pass module. What the engine only reads is
    still the pass's: the engine must not know it."""
    made = set()
    for module in MODULES:
        if _layer(module) == "engine":
            tree = ast.parse(MODULES[module].read_text())
            made |= _tensor_names(tree) | _tag_keys(tree, written_only=True)
    owned = {}
    for module in MODULES:
        if _layer(module) == "passes" and module != "rewrite.passes":
            tree = ast.parse(MODULES[module].read_text())
            owned.update({name: module for name in (_tensor_names(tree) | _tag_keys(tree)) - made})
    return owned


def _spelled(module: str) -> set[str]:
    """The identifiers in a module's strings (dotted parts too), docstrings left out."""
    tree = ast.parse(MODULES[module].read_text())
    parts = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    parts &= _strings(module) | {p.value for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for p in n.values
                                 if isinstance(p, ast.Constant)}
    return {piece for part in parts for piece in part.split(".") if piece.isidentifier()}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) == "engine"))
def test_the_engine_spells_no_tensor_name_or_tag_of_a_pass(module):
    owned = _owned_by_passes()
    spelled = {name: owned[name] for name in _spelled(module) & set(owned)}
    assert not spelled, f"{module} spells {spelled}: a pass's own names; give the engine a typed API for them instead"


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


# Folders bottom-up: a module imports only from its own folder or one below it (the shared modules at the top
# of `rewrite/`, such as `errors`, sit at the bottom). The runtime serves without the training stack.
FOLDER_ORDER = [("rewrite.text",), ("rewrite.runtime",),
                ("rewrite.graph", "rewrite.adapters", "rewrite.training", "rewrite.export", "rewrite.recipes",
                 "rewrite.passes"),
                ("rewrite.serve", "rewrite.cli", "rewrite")]
TORCH_FREE = ("rewrite.text", "rewrite.runtime", "rewrite.serve")


def _rank(module: str) -> int:
    for rank, folders in enumerate(FOLDER_ORDER):
        if any(module == f or module.startswith(f + ".") for f in folders if f != "rewrite"):
            return rank
    return len(FOLDER_ORDER) - 1 if module == "rewrite" else 0


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_folder_imports_back_up(module):
    above = sorted(m for m in _imports(module) if _rank(m) > _rank(module))
    assert not above, f"{module} imports {above}, from a folder above its own"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("rewrite.text")))
def test_text_imports_nothing_of_rewrite_but_errors(module):
    others = sorted(m for m in _imports(module) if not m.startswith("rewrite.text") and m != "rewrite.errors")
    assert not others, f"{module} imports {others}"


BLOCKED = NO_TORCH + """
import importlib, pkgutil
for package in sys.argv[1:]:
    module = importlib.import_module(package)
    for found in pkgutil.walk_packages(module.__path__, package + "."):
        importlib.import_module(found.name)
print(sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "transformers")))
"""


def test_the_runtime_and_text_import_without_torch_or_transformers():
    done = subprocess.run([sys.executable, "-c", BLOCKED, *TORCH_FREE], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]"]
