"""The architecture on disk: imports point one way, algorithms are pure, tests sit beside their twin modules.

    service.algorithms <- service.recipes <- service.engine <- service.jobs <- workers <- api

Every import of every module is read with ``ast`` (function-level ones too: a lazy import is still an arrow) and
a name is resolved to its package; an arrow that points up, or out of ``service`` to ``workers``/``api``, fails.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["service.algorithms", "service.recipes", "service.engine", "service.jobs", "workers", "api"]
# What the pure algorithms may import besides each other: the standard library and torch (no logging: a pure
# function reports what it did in its result, and its caller, which knows the module, logs).
ALGORITHM_IMPORTS = {"torch"}
PACKAGES = ("service", "workers", "api")


def layer_of(module: str) -> int | None:
    """The index in LAYERS of a dotted module name of ours, None for anything else. ``service`` itself (its
    ``__init__``) sits below everything."""
    for index in range(len(LAYERS) - 1, -1, -1):
        if module == LAYERS[index] or module.startswith(LAYERS[index] + "."):
            return index
    return -1 if module == "service" else None


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in ``source`` (the text of ``module``), including ``from X import
    Y`` as ``X.Y`` (Y may be a module) and relative imports resolved against ``module``."""
    package = module.rsplit(".", 1)[0]  # "service.recipes" for service.recipes.x and service.recipes.__init__
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}" if base else alias.name) for alias in node.names]
    return found


def upward_imports(source: str, module: str) -> list[str]:
    """The imports of ``module`` that break the layering, as 'module:line -> target (why)'."""
    own = layer_of(module)
    problems = []
    for line, target in imported_modules(source, module):
        if target.split(".")[0] == "__future__":
            continue
        theirs = layer_of(target)
        if theirs is not None and own is not None and theirs > own:
            problems.append(f"{module}:{line} -> {target} (points up, {LAYERS[own]} may not import {LAYERS[theirs]})")
        if own == 0:
            top = target.split(".")[0]
            if theirs is None and top not in ALGORITHM_IMPORTS and top not in sys.stdlib_module_names:
                problems.append(f"{module}:{line} -> {target} (algorithms import torch and the standard library only)")
            if top == "logging":
                problems.append(f"{module}:{line} -> {target} (algorithms do not log)")
        if module == "service.__init__" and theirs is not None:
            problems.append(f"{module}:{line} -> {target} (service/__init__.py imports nothing)")
    return problems


def our_modules() -> list[tuple[str, Path]]:
    modules = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules.append((".".join(path.relative_to(ROOT).with_suffix("").parts), path))
    return modules


def test_imports_point_one_way():
    problems = []
    for module, path in our_modules():
        problems += upward_imports(path.read_text(), module)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module, source, why", [
    ("service.algorithms.sparsegpt", "from service.recipes.targets import find_blocks", "points up"),
    ("service.recipes.spinquant", "def f():\n    from service.engine.pipeline import capture", "points up"),
    ("service.engine.compress", "import service.jobs.storage", "points up"),
    ("service.jobs.job_runner", "from workers import dispatch", "points up"),
    ("workers.dispatch", "from api.app import build_app", "points up"),
    ("service.engine.cli", "from service import jobs", "points up"),
    ("service.algorithms.gptq", "import logging", "do not log"),
    ("service.algorithms.gptq", "import transformers", "torch and the standard library only"),
    ("service.recipes.pruning_modifiers", "from ..engine import oneshot", "points up"),
])
def test_the_checker_catches_an_arrow_that_points_up(module, source, why):
    problems = upward_imports(source, module)
    assert problems and why in problems[0], problems


def test_allowed_arrows_pass_the_checker():
    assert not upward_imports("from service.algorithms import hadamard\nimport torch\nimport math",
                              "service.algorithms.x")
    assert not upward_imports("from service.engine.options import CompressionOptions", "service.jobs.request")
    assert not upward_imports("from service.jobs.settings import Settings\nfrom workers import dispatch", "api.app")


def test_each_package_says_what_it_holds_and_may_import():
    for package in ("service", *LAYERS):
        init = ROOT / Path(*package.split(".")) / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc.lower(), f"{init} needs a docstring saying what it holds and may import"


def test_tests_sit_beside_their_twin_modules():
    """tests/<package>/test_<name>.py tests service/<package>/<name>.py (or workers/, api/): no test file at the
    top of tests/ but this one, and none whose package has no such folder of code."""
    tests = ROOT / "tests"
    top = sorted(p.name for p in tests.glob("test_*.py"))
    assert top == ["test_layout.py"], f"move these beside their modules' twins: {top}"
    code_packages = {"algorithms", "recipes", "engine", "jobs"}
    for folder in sorted(p for p in tests.iterdir() if p.is_dir() and list(p.glob("test_*.py"))):
        if folder.name in code_packages:
            assert (ROOT / "service" / folder.name).is_dir()
        else:
            # deploy/ has its own folder at the top; faults/ breaks the whole service (kill -9, full disks, S3 and
            # database outages), which is no one module's twin.
            assert folder.name in {"workers", "api", "deploy", "faults"}, f"tests/{folder.name} has no twin package"
