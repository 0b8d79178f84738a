"""The core's tree shows its architecture: groups by role, imports only downward, no cycles.

Groups, lowest first (a module imports only from its own group or lower ones):
``errors`` -> ``numerics`` -> ``io`` -> ``plugin`` and ``builtin`` -> ``engine``
-> ``commands`` -> ``cli``. Every import counts, including one deferred into a
function (the usual way to hide a cycle) and one under ``if TYPE_CHECKING:``
(never run, but a cycle of types is a cycle of ideas all the same).

No registered format is named in core's code: what a format is (its default, its
GPUs, its token-table alias, its legacy layout) is said by the format itself.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import cq_core

CORE = Path(cq_core.__file__).parent
PLUGINS = CORE.parent / "plugins"
RANK = {"errors": 0, "numerics": 1, "io": 2, "plugin": 3, "builtin": 3, "engine": 4, "commands": 5, "cli": 6}


def module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.AST, package: str) -> set[str]:
    """Every cq_core module imported anywhere in ``tree``, ``if TYPE_CHECKING:`` blocks included."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cq_core"))
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            if module.startswith("cq_core"):
                for alias in node.names:  # ``from cq_core.io import shards`` imports a module
                    sub = f"{module}.{alias.name}"
                    found.add(sub if (CORE.parent / sub.replace(".", "/")).with_suffix(".py").exists() else module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def core_modules() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(CORE.rglob("*.py")):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = runtime_imports(ast.parse(path.read_text()), package)
    return graph


def group(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


GRAPH = core_modules()


def test_every_core_module_belongs_to_a_group():
    loose = [m for m in GRAPH if m != "cq_core" and group(m) not in RANK and m != "cq_core.__main__"]
    assert loose == []


@pytest.mark.parametrize("module", [m for m in GRAPH if group(m) in RANK])
def test_imports_go_only_downward(module):
    own = RANK[group(module)]
    upward = sorted(
        target for target in GRAPH[module]
        if target != "cq_core" and RANK.get(group(target), 99) > own
    )
    assert upward == [], f"{module} (group {group(module)}) imports from higher groups: {upward}"


def test_no_module_imports_the_package_root():
    """``cq_core/__init__`` is the public face; a module importing it would pull in everything."""
    assert [m for m, targets in GRAPH.items() if m != "cq_core" and "cq_core" in targets] == []


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def walk(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if target not in GRAPH or target == "cq_core":
                continue
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                walk(target)
        stack.pop()
        state[module] = 2

    for module in GRAPH:
        if module not in state:
            walk(module)
    assert cycles == []


def test_the_import_graph_sees_deferred_and_type_only_imports():
    """The checker itself: an import inside a function counts, and one under TYPE_CHECKING."""
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from cq_core.cli.app import main\n"
        "def f():\n    from cq_core.engine.plan import Plan\n"
    )
    assert runtime_imports(tree, "cq_core.io") == {"cq_core.engine.plan", "cq_core.cli.app"}


def _code_strings(tree: ast.AST) -> list[ast.Constant]:
    """The string literals of ``tree`` that are code, not docstrings."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings]


def test_core_names_no_registered_format(registry):
    names = sorted(registry.formats)
    word = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    found = []
    for path in sorted(CORE.rglob("*.py")):
        for node in _code_strings(ast.parse(path.read_text())):
            if word.search(node.value):
                found.append(f"{path.relative_to(CORE.parent)}:{node.lineno}: {node.value[:60]!r}")
    assert found == []


def test_the_format_name_check_sees_code_and_skips_docstrings():
    tree = ast.parse('"""nvfp4 is named here."""\nDEFAULT = "nvfp4"\ndef f():\n    """float8_e4m3fn"""\n')
    assert [n.value for n in _code_strings(tree)] == ["nvfp4"]


def test_plugins_import_the_public_names():
    """The shipped plugins use what a third-party plugin would: names from ``cq_core``
    itself, and the format helpers in ``cq_core.numerics``; nothing else of core's insides."""
    allowed = ("cq_core", "cq_core.numerics")
    inside = []
    for path in sorted(PLUGINS.rglob("*.py")):
        if ".venv" in path.parts or "egg-info" in str(path) or "tests" in path.parts:  # a plugin's tests use core's API
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cq_core"):
                if node.module not in allowed and not node.module.startswith("cq_core.numerics."):
                    inside.append(f"{path.relative_to(PLUGINS)}: {node.module}")
                if node.module == "cq_core":
                    missing = [a.name for a in node.names if not hasattr(cq_core, a.name)]
                    assert missing == [], f"{path}: cq_core has no {missing}"
    assert inside == []
