"""Per format, the first ComfyUI release that loads it: declared by the format, read from ComfyUI's trees.

Every registered format's ``comfyui_since`` must agree with ``tests/comfyui_quant_algos.json``
(the ``QUANT_ALGOS`` keys of each ComfyUI tree the tests have, ``tests/comfyui_versions.py``),
that table with the trees, and the static read with the ``QUANT_ALGOS`` the judge imports.
"""

from __future__ import annotations

import os

import pytest

from cq_core.errors import PluginError, UsageError
from cq_core import comfyui_loads, first_comfyui_version
from cq_core.plugin.comfyui_versions import parse_comfyui_version
from cq_core.plugin.types import Format
from tests import comfyui as loader
from tests.comfyui_versions import build_table, disagreement, load_table, read_quant_algos, render
from tests.conftest import build_registry

RELEASES = load_table()["releases"]
FORMATS = sorted(build_registry().formats)


def test_the_table_reads_every_tree_the_tests_have():
    assert sorted(RELEASES, key=parse_comfyui_version) == sorted(loader.TREES, key=parse_comfyui_version)


@pytest.mark.parametrize("version", list(loader.TREES))
def test_the_shipped_table_is_what_each_tree_says(version):
    if not loader.is_fetched(version):
        message = f"ComfyUI {version} is not fetched: run `python -m tests.comfyui fetch`"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    fresh = build_table({version: loader.comfyui_root(version)})["releases"][version]
    assert RELEASES[version] == fresh, "tests/comfyui_quant_algos.json is stale: run python -m tests.comfyui_versions"


def test_the_table_renders_as_written():
    from tests.comfyui_versions import TABLE_PATH

    assert TABLE_PATH.read_text(encoding="utf-8") == render(load_table())


@pytest.mark.parametrize("name", FORMATS)
def test_each_registered_format_declares_the_release_the_trees_support(registry, name):
    fmt = registry.formats[name]
    assert disagreement(name, fmt.comfyui_since, RELEASES) is None
    assert fmt.comfy_loadable == (fmt.comfyui_since is not None)


def test_the_judge_imports_the_formats_its_source_declares(comfyui):
    """The static read of the judge's ``comfy/quant_ops.py`` is what the imported module holds
    (comfy-kitchen 0.2.40 has MXFP8, so mxfp8's condition holds)."""
    assert sorted(comfyui.quant_ops.QUANT_ALGOS) == RELEASES[loader.active_version()]["formats"]


def test_the_facts_of_issue_28():
    """FORMATS.md: 0.30.0 loads six formats; asym_w4a8_int8 came with v0.31.0 (PR #15308);
    no release loads int8_blockwise."""
    assert RELEASES["0.30.0"]["formats"] == sorted(
        ["float8_e4m3fn", "float8_e5m2", "nvfp4", "mxfp8", "int8_tensorwise", "convrot_w4a4"])
    assert set(RELEASES["0.33.0"]["formats"]) - set(RELEASES["0.30.0"]["formats"]) == {"asym_w4a8_int8"}
    registry = build_registry()
    assert first_comfyui_version(registry.formats["asym_w4a8_int8"]) == "0.31.0"
    assert first_comfyui_version(registry.formats["int8_blockwise"]) is None
    assert not comfyui_loads(registry.formats["asym_w4a8_int8"], "0.30")
    assert comfyui_loads(registry.formats["asym_w4a8_int8"](), "0.31.0")
    assert comfyui_loads(registry.formats["nvfp4"], "v0.33.0")
    assert not any(comfyui_loads(registry.formats["int8_blockwise"], v) for v in ("0.30.0", "0.33.0", "9.0"))


@pytest.mark.parametrize("name, since, reason", [
    ("float8_e4m3fn", "0.30.0", None),
    ("asym_w4a8_int8", "0.31.0", None),
    ("asym_w4a8_int8", "0.33.0", None),
    ("int8_blockwise", None, None),
    ("asym_w4a8_int8", "0.30.0", "release 0.30.0 does not load it"),
    ("asym_w4a8_int8", "0.34.0", "release 0.33.0 loads it"),
    ("asym_w4a8_int8", None, "declares no ComfyUI release, but 0.33.0 load it"),
    ("float8_e4m3fn", "0.29.0", "older than 0.30.0, the oldest release the tests read"),
    ("int8_blockwise", "0.30.0", "no release the tests read loads it"),
])
def test_a_declaration_the_trees_do_not_support_is_named(name, since, reason):
    got = disagreement(name, since, RELEASES)
    assert (got is None) if reason is None else (reason in got), got


def test_the_reader_takes_every_spelling_and_its_conditions():
    source = '''
QUANT_ALGOS = {"a": {}, "b": {}}
if HAVE_C:
    QUANT_ALGOS["c"] = {}
else:
    QUANT_ALGOS.update({"d": {}})
try:
    QUANT_ALGOS["e"] = {}
except ImportError:
    pass
OTHER = {"z": {}}
'''
    assert read_quant_algos(source) == {"a": None, "b": None, "c": "HAVE_C", "d": "not (HAVE_C)", "e": None}
    with pytest.raises(ValueError, match="not a string literal"):
        read_quant_algos("QUANT_ALGOS[name] = {}")


@pytest.mark.parametrize("text, want", [("0.33.0", (0, 33, 0)), ("0.31", (0, 31, 0)), ("v1.2.3", (1, 2, 3)),
                                        (" 0.30.0 ", (0, 30, 0))])
def test_release_numbers_parse(text, want):
    assert parse_comfyui_version(text) == want


@pytest.mark.parametrize("text", ["", "latest", "0", "0.33.0.1", "0.x"])
def test_a_bad_release_number_is_one_sentence(text):
    with pytest.raises(UsageError, match=r"is not a release number like 0\.33 or 0\.33\.0\.$"):
        comfyui_loads(build_registry().formats["nvfp4"], text)


def _format_class(**attributes):
    return type("Probe", (Format,), {"name": "probe", **attributes})


def test_comfy_loadable_follows_the_release():
    assert _format_class(comfyui_since="0.31.0").comfy_loadable is True
    assert _format_class(comfyui_since=None).comfy_loadable is False
    assert _format_class(comfy_loadable=False).comfyui_since is None
    assert _format_class().comfy_loadable is False  # a name ComfyUI does not know, until a format says so
    assert type("Sub", (_format_class(comfyui_since="0.30.0"),), {}).comfy_loadable is True


@pytest.mark.parametrize("attributes, message", [
    ({"comfyui_since": "soon"}, "'soon' is not a ComfyUI release number"),
    ({"comfyui_since": None, "comfy_loadable": True}, "set comfyui_since alone"),
    ({"comfy_loadable": True}, "not since which release"),
])
def test_an_inconsistent_declaration_is_a_plugin_error(attributes, message):
    with pytest.raises(PluginError, match=message):
        _format_class(**attributes)
