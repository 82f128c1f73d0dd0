"""The sub-packages form a layered DAG: each imports only itself and the layers below it, lazy imports included
(docs/architecture.md says why each layer is where it is)."""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

from conftest import REPO

LAYERS = ["core", "tokenizers", "pipeline", "synthetic", "index", "model", "evaluation", "workflows"]  # lowest first
NOT_INSTALLED = {"tests", "benchmarks"}  # top-level folders with Python files that are not sub-packages of cm3


def cm3_imports(source: str, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, imported module) of every ``cm3.*`` import in ``source``, the module ``module``'s text: module level
    and inside functions, ``import cm3.x``, ``from cm3.x import y``, ``from cm3 import x`` and relative imports."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "cm3")
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join([*base, *([node.module] if node.module else [])])
            if name == "cm3":  # from cm3 import pipeline
                yield from ((node.lineno, f"cm3.{alias.name}") for alias in node.names)
            elif name.startswith("cm3."):
                yield node.lineno, name


def upward_imports(layer: str, path: Path, root: Path = REPO) -> list[str]:
    relative = path.relative_to(root)
    parts = relative.with_suffix("").parts
    is_package = parts[-1] == "__init__"
    module = ".".join(["cm3", *(parts[:-1] if is_package else parts)])
    problems = []
    for line, name in sorted(cm3_imports(path.read_text(encoding="utf-8"), module, is_package)):
        target = name.split(".")[1]
        if target not in LAYERS or LAYERS.index(target) > LAYERS.index(layer):
            problems.append(f"{relative}:{line} imports {name}")
    return problems


def test_every_import_goes_down_the_layers():
    problems = [problem for layer in LAYERS for path in sorted((REPO / layer).rglob("*.py"))
                for problem in upward_imports(layer, path)]
    assert problems == []


def test_the_check_sees_lazy_relative_and_package_imports(tmp_path):
    source = ("def f():\n    from cm3.workflows.cli import app\n"
              "from ..model import decoder\nfrom cm3 import index\nimport cm3.core.files\nfrom . import shards\n")
    found = list(cm3_imports(source, "cm3.pipeline.tokenize", is_package=False))
    assert sorted(found) == [(2, "cm3.workflows.cli"), (3, "cm3.model"), (4, "cm3.index"), (5, "cm3.core.files"),
                             (6, "cm3.pipeline")]
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "tokenize.py").write_text(source)
    assert upward_imports("pipeline", tmp_path / "pipeline" / "tokenize.py", root=tmp_path) == [
        "pipeline/tokenize.py:2 imports cm3.workflows.cli", "pipeline/tokenize.py:3 imports cm3.model",
        "pipeline/tokenize.py:4 imports cm3.index"]


def test_every_sub_package_has_a_layer_and_is_installed():
    folders = {path.name for path in REPO.iterdir()
               if path.is_dir() and not path.name.startswith(".") and next(path.rglob("*.py"), None) is not None}
    assert folders - NOT_INSTALLED == set(LAYERS)
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    installed = set(setuptools["packages"])
    packages = {"cm3." + ".".join(init.parent.relative_to(REPO).parts) for layer in LAYERS
                for init in (REPO / layer).rglob("__init__.py")}
    assert packages <= installed, f"add to pyproject.toml's packages: {sorted(packages - installed)}"
    assert {name.split(".")[1] for name in installed if name != "cm3"} == set(LAYERS)
    assert {setuptools["package-dir"][f"cm3.{layer}"] for layer in LAYERS} == set(LAYERS)
