"""Which formats each ComfyUI release loads, read from its own source: ``tests/comfyui_quant_algos.json``.

    python -m tests.comfyui_versions [--check]

A ComfyUI release loads a ``format`` string when it is a key of ``QUANT_ALGOS`` in
its ``comfy/quant_ops.py``; ``comfy/ops.py`` (``_load_quantized_module``) looks every
layer's format up there and raises ``KeyError`` on any other name. This module reads
that dict statically (``QUANT_ALGOS = {...}``, ``QUANT_ALGOS["name"] = {...}``,
``QUANT_ALGOS.update({...})``, with the ``if`` conditions around an entry, e.g. mxfp8's
``_CK_MXFP8_AVAILABLE``: comfy-kitchen has the MXFP8 layout) in every tree of
``tests.comfyui.TREES``, so one process reads them all, and writes the table.

``tests/test_comfyui_versions.py`` fails when the shipped table is stale, when a
judge's imported ``QUANT_ALGOS`` differs from its static read, and when a registered
format's ``comfyui_since`` disagrees with the table (:func:`disagreement`).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cq_core.plugin.comfyui_versions import parse_comfyui_version

TABLE_PATH = Path(__file__).with_name("comfyui_quant_algos.json")
QUANT_OPS = Path("comfy") / "quant_ops.py"
DICT_NAME = "QUANT_ALGOS"


def read_quant_algos(source: str) -> dict[str, str | None]:
    """Every key ``QUANT_ALGOS`` gets in ``comfy/quant_ops.py``'s source -> the condition it is under
    (``ast.unparse`` of the enclosing ``if`` tests, joined by `` and ``; None: always).

    Raises ``ValueError`` when the module writes the dict in a way this reader cannot spell (a key
    that is not a string literal), so a new spelling fails loudly instead of hiding a format.
    """
    found: dict[str, str | None] = {}

    def keys_of(node: ast.expr) -> list[str]:
        if not isinstance(node, ast.Dict):
            raise ValueError(f"{DICT_NAME} built from {ast.unparse(node)!r}: not a dict literal")
        out = []
        for key in node.keys:
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                raise ValueError(f"{DICT_NAME} key {ast.unparse(key) if key else '**'!r} is not a string literal")
            out.append(key.value)
        return out

    def add(names: list[str], conditions: tuple[str, ...]) -> None:
        for name in names:
            found.setdefault(name, " and ".join(conditions) or None)

    def visit(statements: list[ast.stmt], conditions: tuple[str, ...]) -> None:
        for stmt in statements:
            if isinstance(stmt, ast.Assign):
                for target in stmt.targets:
                    if isinstance(target, ast.Name) and target.id == DICT_NAME:
                        add(keys_of(stmt.value), conditions)
                    elif (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
                          and target.value.id == DICT_NAME):
                        key = target.slice
                        if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                            raise ValueError(f"{DICT_NAME}[{ast.unparse(key)}] is not a string literal")
                        add([key.value], conditions)
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) \
                    and stmt.target.id == DICT_NAME and stmt.value is not None:
                add(keys_of(stmt.value), conditions)
            elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
                call = stmt.value
                if (isinstance(call.func, ast.Attribute) and call.func.attr == "update"
                        and isinstance(call.func.value, ast.Name) and call.func.value.id == DICT_NAME):
                    for arg in call.args:
                        add(keys_of(arg), conditions)
            elif isinstance(stmt, ast.If):
                test = ast.unparse(stmt.test)
                visit(stmt.body, (*conditions, test))
                visit(stmt.orelse, (*conditions, f"not ({test})"))
            elif isinstance(stmt, ast.Try):
                visit(stmt.body, conditions)
                for handler in stmt.handlers:
                    visit(handler.body, (*conditions, "on an import failure"))
                visit(stmt.orelse, conditions)
                visit(stmt.finalbody, conditions)
            elif isinstance(stmt, (ast.With, ast.For, ast.While)):
                visit(stmt.body, conditions)

    visit(ast.parse(source).body, ())
    return found


def release_entry(root: Path) -> dict[str, Any]:
    """The table's entry for the ComfyUI tree at ``root``: its formats, and the conditional ones."""
    algos = read_quant_algos((root / QUANT_OPS).read_text(encoding="utf-8"))
    return {"formats": sorted(algos), "conditions": {k: v for k, v in sorted(algos.items()) if v}}


def build_table(roots: Mapping[str, Path]) -> dict[str, Any]:
    """The table for the trees ``roots`` (release -> ComfyUI tree), oldest release first."""
    ordered = sorted(roots, key=parse_comfyui_version)
    return {
        "generated_by": "python -m tests.comfyui_versions",
        "about": ("Per ComfyUI release the tests have: the format strings its loader takes (the keys of "
                  "QUANT_ALGOS in comfy/quant_ops.py; comfy/ops.py raises KeyError on any other), and the "
                  "condition of each entry that is conditional."),
        "releases": {version: release_entry(roots[version]) for version in ordered},
    }


def render(table: Mapping[str, Any]) -> str:
    return json.dumps(table, indent=1) + "\n"


def load_table() -> dict[str, Any]:
    return json.loads(TABLE_PATH.read_text(encoding="utf-8"))


def disagreement(name: str, since: str | None, releases: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Why a format ``name`` declaring ``comfyui_since = since`` disagrees with ``releases`` (the
    table's), or None when the trees support it.

    Supported: None, and the name is in no release; or the name is absent from every release older
    than ``since`` and present in every release from ``since`` on, ``since`` no later than the first
    release that has it, and no earlier than the oldest release read when that one has it already
    (nothing older was read, so nothing older can be claimed).
    """
    ordered = sorted(releases, key=parse_comfyui_version)
    having = [v for v in ordered if name in releases[v]["formats"]]
    if since is None:
        return f"declares no ComfyUI release, but {', '.join(having)} load it" if having else None
    if not having:
        return f"declares ComfyUI {since}, but no release the tests read loads it ({', '.join(ordered)})"
    key = parse_comfyui_version(since)
    wrong = [v for v in ordered if (v in having) != (parse_comfyui_version(v) >= key)]
    if wrong:
        return (f"declares ComfyUI {since}, but release {wrong[0]} "
                f"{'loads' if wrong[0] in having else 'does not load'} it")
    if having[0] == ordered[0] and key < parse_comfyui_version(ordered[0]):
        return f"declares ComfyUI {since}, older than {ordered[0]}, the oldest release the tests read"
    return None


def main(argv: list[str] | None = None) -> int:
    from tests.comfyui import TREES, comfyui_root, is_fetched

    parser = argparse.ArgumentParser(prog="python -m tests.comfyui_versions", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the shipped table differs")
    args = parser.parse_args(argv)
    missing = [v for v in TREES if not is_fetched(v)]
    if missing:
        print(f"ComfyUI {', '.join(missing)} not fetched: run python -m tests.comfyui fetch", file=sys.stderr)
        return 2
    text = render(build_table({v: comfyui_root(v) for v in TREES}))
    if args.check:
        if not TABLE_PATH.exists() or TABLE_PATH.read_text(encoding="utf-8") != text:
            print(f"{TABLE_PATH} is stale; rerun without --check", file=sys.stderr)
            return 1
        return 0
    TABLE_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {TABLE_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
