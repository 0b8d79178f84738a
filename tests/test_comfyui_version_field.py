"""``--comfyui-version`` (recipe field ``comfyui_version``): a format the named ComfyUI release
does not load is refused before anything is written, and a size budget chooses only among
the formats it loads. The release facts are each format's ``comfyui_since``, which
tests/test_comfyui_versions.py holds to the QUANT_ALGOS of every ComfyUI tree the tests have."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from cq_core.commands.convert import convert
from cq_core.engine.budget import allowed_format_names
from cq_core.errors import UsageError
from cq_core.plugin.comfyui_versions import not_loaded_reason
from tests.cli_runner import run_cq
from tests.helpers import write_checkpoint


def formats_in(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
    return {layer["format"] for layer in layers.values()}


def test_a_format_the_release_loads_is_written_as_without_the_field(model_file, tmp_path):
    plain = convert(model_file, tmp_path / "plain.safetensors", format="asym_w4a8_int8")
    pinned = convert(model_file, tmp_path / "pinned.safetensors", format="asym_w4a8_int8", comfyui_version="0.33")
    assert plain.quantized and "does not load" not in " ".join(pinned.warnings)
    assert pinned.recipe["recipe"]["comfyui_version"] == "0.33"
    plain_tensors = safe_open(str(tmp_path / "plain.safetensors"), "pt")
    pinned_tensors = safe_open(str(tmp_path / "pinned.safetensors"), "pt")
    for name in plain_tensors.keys():
        assert plain_tensors.get_tensor(name).equal(pinned_tensors.get_tensor(name)), name


def test_an_older_release_refuses_naming_the_first_that_loads_and_writes_nothing(model_file, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    r = run_cq(capsys, "convert", model_file, "-o", out, "-f", "asym_w4a8_int8", "--comfyui-version", "0.30")
    assert r.code != 0 and not out.exists()
    line = r.err.strip()
    assert "ComfyUI 0.30.0 does not load 'asym_w4a8_int8'" in line and "0.31.0 is the first" in line, line
    assert "blocks.0." in line and line.count("\n") == 0


def test_a_format_no_release_loads_is_refused_with_the_one_it_suggests(tmp_path):
    g = torch.Generator().manual_seed(0)
    model_file = write_checkpoint(tmp_path / "m.safetensors", {"proj.weight": torch.randn(256, 256, generator=g)})
    with pytest.raises(UsageError, match=r"no ComfyUI release loads 'int8_blockwise'; 'int8_tensorwise'"):
        convert(model_file, tmp_path / "o.safetensors", format="int8_blockwise", comfyui_version="0.33.0")
    assert not (tmp_path / "o.safetensors").exists()
    # without the field it is a warning, as before
    report = convert(model_file, tmp_path / "o.safetensors", format="int8_blockwise")
    assert any("does not load 'int8_blockwise'" in w for w in report.warnings)


def test_a_per_layer_rule_in_an_unloaded_format_is_refused_too(model_file, tmp_path):
    with pytest.raises(UsageError, match=r"asym_w4a8_int8.*layer 'blocks.0.mlp.fc1.weight'"):
        convert(model_file, tmp_path / "o.safetensors", format="float8_e4m3fn", comfyui_version="0.30.0",
                layer=["fc1=asym_w4a8_int8"])


@pytest.mark.parametrize("bad", ["latest", "0.3x", "1", ""])
def test_a_version_that_is_not_a_release_number_is_one_sentence(model_file, tmp_path, capsys, bad):
    r = run_cq(capsys, "convert", model_file, "-o", tmp_path / "o.safetensors", "--comfyui-version", bad)
    assert r.code != 0 and "--comfyui-version must be a ComfyUI release number like 0.30 or 0.33.0" in r.err
    assert not (tmp_path / "o.safetensors").exists()


def test_a_recipe_file_names_the_field(model_file, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('format = "nvfp4"\ncomfyui_version = "soon"\n')
    r = run_cq(capsys, "convert", model_file, "-o", tmp_path / "o.safetensors", "--recipe", recipe)
    assert r.code != 0 and "r.toml: recipe field 'comfyui_version' must be a ComfyUI release number" in r.err, r.err


def fake_format(name, gpus, since):
    return type(name, (), {"name": name, "native_gpus": gpus, "comfyui_since": since})


def test_the_budget_on_a_gpu_chooses_only_what_the_release_loads(registry):
    installed = {
        "old8": fake_format("old8", ("blackwell", "hopper"), "0.30.0"),
        "new4": fake_format("new4", ("blackwell",), "0.33.0"),
        "never": fake_format("never", ("blackwell",), None),
    }
    assert allowed_format_names([], "blackwell", "x", installed) == ("old8", "new4", "never", "bf16")
    assert allowed_format_names([], "blackwell", "x", installed, "0.30") == ("old8", "bf16")
    assert allowed_format_names([], "blackwell", "x", installed, "0.33.0") == ("old8", "new4", "bf16")
    assert allowed_format_names([], "blackwell", "x", installed, "1.2") == ("old8", "new4", "bf16")
    # the installed formats: every one a release loads is kept at its own first release
    for name, cls in registry.formats.items():
        if cls.native_gpus and cls.comfyui_since:
            assert name in allowed_format_names([], cls.native_gpus[0], "x", registry.formats, cls.comfyui_since)


def test_the_budget_refuses_a_named_format_the_release_does_not_load(model_file, tmp_path):
    with pytest.raises(UsageError, match=r"--formats names 'asym_w4a8_int8', but ComfyUI 0.30.0 does not load"):
        convert(model_file, tmp_path / "o.safetensors", bits_per_weight=6.0,
                formats=("asym_w4a8_int8", "float8_e4m3fn", "bf16"), comfyui_version="0.30", dry_run=True)


def test_the_budget_within_a_release_writes_only_formats_it_loads(model_file, tmp_path, registry):
    out = tmp_path / "b.safetensors"
    report = convert(model_file, out, bits_per_weight=12.0, gpu="blackwell", comfyui_version="0.30")
    assert report.quantized
    for name in formats_in(out):
        assert not_loaded_reason(registry.formats[name], "0.30") is None, name


def test_a_release_older_than_the_facts_is_refused_not_answered(model_file, tmp_path, capsys):
    r = run_cq(capsys, "convert", model_file, "-o", tmp_path / "o.safetensors", "--target-size", "200KB",
               "--gpu", "blackwell", "--comfyui-version", "0.29")
    assert r.code == 2 and "--comfyui-version 0.29.0 is older than ComfyUI 0.30.0, the oldest release" in r.err
    assert r.err.count("\n") == 1 and not (tmp_path / "o.safetensors").exists(), r.err


def test_a_release_that_loads_none_of_the_gpus_formats_says_so_not_the_size(registry, monkeypatch):
    from cq_core.engine.budget import budget_candidates

    installed = {"new4": fake_format("new4", ("blackwell",), "0.33.0")}
    with pytest.raises(UsageError, match=r"--comfyui-version 0.30 loads none of the formats --gpu blackwell runs "
                                         r"natively \(ComfyUI 0.30.0 does not load 'new4' \(ComfyUI 0.33.0 is the first"):
        budget_candidates((), "blackwell", "x", installed, None, comfyui_version="0.30")


def test_a_float_version_from_python_is_refused_not_read_as_another_release(model_file, tmp_path):
    with pytest.raises(UsageError, match=r"--comfyui-version must be a string, not 0.3\."):  # "0.30" as a float
        convert(model_file, tmp_path / "o.safetensors", format="float8_e4m3fn", comfyui_version=0.30)
