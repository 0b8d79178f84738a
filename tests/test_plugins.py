"""Plugin discovery and the contract: duplicates, blocking, typos, third-party packages."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cq_core import hookimpl
from cq_core.plugin import hookspecs
from cq_core.errors import PluginError
from cq_core.plugin.manager import Registry, make_plugin_manager
from tests.helpers import build_registry

HOOKS = [name for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("cq_")]
TESTS = Path(__file__).parent


def test_every_hook_is_documented_and_tested():
    """Each hook has a docstring naming every parameter, and a test named after it."""
    assert HOOKS, "no hookspecs found"
    test_names = set(re.findall(r"def (test_\w+)", "\n".join(p.read_text() for p in TESTS.glob("test_*.py"))))
    for name in HOOKS:
        spec = getattr(hookspecs, name)
        assert spec.__doc__ and len(spec.__doc__.strip()) > 40, f"{name} has no docstring"
        for param in inspect.signature(spec).parameters:
            assert f":param {param}:" in spec.__doc__, f"{name} does not document {param}"
        stem = name.removeprefix("cq_")
        assert any(stem in test for test in test_names), f"no test_*{stem}* for hook {name}"


def test_register_formats_hook(registry):
    assert {"float8_e4m3fn", "float8_e5m2"} <= set(registry.formats)
    assert registry.owners[("format", "float8_e4m3fn")] == "cq_fp8.plugin"


def test_register_optimizers_hook(registry):
    assert "rtn" in registry.optimizers and registry.owners[("optimizer", "rtn")] == "cq_core.builtin.rtn"


def test_register_metadata_writers_hook(registry):
    assert registry.owners[("metadata writer", "comfyui")] == "cq_core.builtin.comfy_metadata"


class PresetPlugin:
    @hookimpl
    def cq_register_model_filters(self, register):
        from cq_core.plugin.types import ModelFilter

        register(ModelFilter("toy", "text", "Toy preset.", high_precision=("fc1",), remove=("conv",)))


def test_register_model_filters_hook(tmp_path, model_file):
    import cq_core

    registry = build_registry(_named(PresetPlugin(), "preset"))
    report = cq_core.convert(model_file, tmp_path / "o.safetensors", model="toy", registry=registry)
    actions = {t.name: (t.action, t.reason) for t in report.tensors}
    assert actions["blocks.0.mlp.fc1.weight"][0] == "keep" and "toy" in actions["blocks.0.mlp.fc1.weight"][1]
    assert actions["blocks.0.conv.weight"][0] == "drop"
    assert actions["blocks.0.mlp.fc2.weight"][0] == "quantize"


class DuplicateFormatPlugin:
    @hookimpl
    def cq_register_formats(self, register):
        from cq_fp8.float8 import Float8E4M3Format

        register(Float8E4M3Format)


def test_a_name_registered_twice_names_both_plugins():
    with pytest.raises(PluginError, match="cq_fp8.plugin.*duplicate|both 'cq_fp8.plugin' and"):
        Registry.from_plugin_manager(
            make_plugin_manager(load_entry_points=False, extra_plugins=("cq_fp8.plugin", _named(DuplicateFormatPlugin(), "duplicate")))
        )


def _named(obj, name):
    obj.__name__ = name
    return obj


class MisspelledHookPlugin:
    @hookimpl
    def cq_register_format(self, register):  # missing the "s"
        pass


def test_a_misspelled_hook_leaves_its_plugin_out_naming_the_closest_hook():
    pm = make_plugin_manager(load_entry_points=False, extra_plugins=(_named(MisspelledHookPlugin(), "typo"),))
    assert not pm.has_plugin("typo")
    (broken,) = pm.broken
    assert broken.name == "typo"
    assert "'cq_register_format' (did you mean 'cq_register_formats'?)" in broken.error, broken.error


def test_disable_env_blocks_a_plugin(monkeypatch):
    monkeypatch.setenv("CQ_DISABLE_PLUGINS", "cq_fp8.plugin, other")
    registry = build_registry()
    assert "float8_e4m3fn" not in registry.formats
    assert "rtn" in registry.optimizers


def test_a_disable_name_that_matches_no_plugin_is_a_warning(monkeypatch, capsys):
    from tests.cli_runner import run_cq

    monkeypatch.setenv("CQ_DISABLE_PLUGINS", "fp8, nosuchplugin")
    result = run_cq(capsys, "formats")
    assert result.code == 0
    assert "CQ_DISABLE_PLUGINS names 'nosuchplugin', which is not an installed plugin" in result.err
    assert "'fp8'" not in result.err  # an installed entry point's name is no typo


class DetectingPlugin:
    @hookimpl
    def cq_detect_model(self, keys, metadata):
        from cq_core.plugin.types import Detection

        if "magic.weight" in keys:
            return Detection("magic", "it has magic.weight")
        return None


def test_detect_model_hook_first_result_wins():
    registry = build_registry(_named(DetectingPlugin(), "detector"))
    assert registry.detect_model(["magic.weight"], {}).preset == "magic"
    assert registry.detect_model(["other.weight"], {}) is None


class ComponentPlugin:
    """Claims a text encoder, a diffusion model that overlaps cq-models' claim, and nothing else."""

    @hookimpl
    def cq_detect_model(self, keys, metadata):
        from cq_core.plugin.types import Detection

        return [Detection("mistral", "my encoder", "text_encoders.mine."),
                Detection("chroma", "my DiT", "model.diffusion_model.")]


def test_detect_model_hook_merges_components_from_every_plugin():
    """Each plugin names the components it knows; the first plugin called wins where prefixes overlap,
    and a keep-all component (the VAE cq-models finds) always stands."""
    from tests import key_layouts as fam

    registry = build_registry(_named(ComponentPlugin(), "components"))
    keys = [f"model.diffusion_model.{k}" for k in fam.flux1()] + ["text_encoders.mine.x.weight", "vae.decoder.w"]
    components = registry.detect_components(keys, {})
    assert [(c.prefix, c.preset) for c in components] == [
        ("text_encoders.mine.", "mistral"), ("model.diffusion_model.", "chroma"), ("vae.", "vae")]
    assert registry.detect_model(keys, {}).preset == "mistral"  # the first model component


# ---------------------------------------------------------------------------
# A real third-party package, installed with pip, discovered through entry points.
# ---------------------------------------------------------------------------

THIRD_PARTY_PYPROJECT = """
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "cq-toy-format"
version = "0.0.7"
dependencies = []

[project.entry-points.cq]
toy = "cq_toy_format"
"""

THIRD_PARTY_MODULE = '''
"""A toy format: float16 weights with a unit scale."""
import torch
from cq_core import Format, TensorSpec, hookimpl


class ToyHalf(Format):
    name = "toy_f16"
    description = "Toy float16 storage (test plugin)."
    comfy_loadable = False

    def stored_specs(self, shape):
        return {"weight": TensorSpec(torch.float16, tuple(shape))}

    def compute_scales(self, weight):
        return {}

    def to_grid(self, weight, scales, cols=slice(None)):
        return weight.half().float()

    def pack(self, weight_on_grid, scales):
        return {"weight": weight_on_grid.half()}

    def decode(self, tensors, shape=None):
        return tensors["weight"].float()


@hookimpl
def cq_register_formats(register):
    register(ToyHalf)
'''


def _cq(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cq_core", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


@pytest.fixture
def toy_plugin(tmp_path):
    package = tmp_path / "toy"
    package.mkdir()
    (package / "pyproject.toml").write_text(THIRD_PARTY_PYPROJECT)
    (package / "cq_toy_format.py").write_text(textwrap.dedent(THIRD_PARTY_MODULE))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", str(package)], check=True,
                   capture_output=True, timeout=300)
    try:
        yield
    finally:
        subprocess.run([*pip, "uninstall", "-y", "cq-toy-format"], capture_output=True, timeout=300)


@pytest.mark.slow
def test_third_party_plugin_is_discovered_converts_and_can_be_disabled(toy_plugin, tmp_path, model_file):
    listed = json.loads(_cq("plugins", "--json").stdout)
    toy = next(p for p in listed if p["name"] == "toy")
    assert toy["distribution"] == "cq-toy-format" and toy["version"] == "0.0.7"
    assert toy["registers"] == {"format": ["toy_f16"]}

    out = tmp_path / "toy.safetensors"
    result = _cq("convert", str(model_file), "-o", str(out), "--format", "toy_f16", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["format"] == "toy_f16" and len([t for t in report["tensors"] if t["action"] == "quantize"]) == 3
    assert out.exists()

    hidden = _cq("plugins", "--json", env={"CQ_DISABLE_PLUGINS": "toy"})
    assert "toy" not in [p["name"] for p in json.loads(hidden.stdout)]
    refused = _cq("convert", str(model_file), "--format", "toy_f16", env={"CQ_DISABLE_PLUGINS": "toy"})
    assert refused.returncode == 2
    assert "Unknown format 'toy_f16'" in refused.stderr


def test_every_hook_and_argument_is_in_the_readme():
    readme = (TESTS.parent / "README.md").read_text()
    for name in HOOKS:
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"`{name}({params})`" in readme, f"README does not document {name}({params})"
