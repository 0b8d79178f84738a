"""cq meta: show both carriers, set/unset typed keys, sync one carrier from the other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from comfy_kitchen.tensor import TensorCoreFP8Layout

import cq_core
from cq_core.commands import meta
from cq_core.errors import CqError, UsageError
from tests.cli_runner import run_cq
from tests.comfy import comfy_dequantize
from tests.helpers import carriers, load, rewrite_metadata

torch.set_num_threads(2)
ATTN, FC1, FC2 = "blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"


@pytest.fixture
def fp8_file(tmp_path, model_file) -> Path:
    out = tmp_path / "fp8.safetensors"
    cq_core.convert(model_file, out, measure=False)
    return out


def test_parse_value_types():
    assert meta.parse_value("true") is True and meta.parse_value("False") is False
    assert meta.parse_value("64") == 64 and type(meta.parse_value("64")) is int
    assert meta.parse_value("0.5") == 0.5
    assert meta.parse_value("nvfp4") == "nvfp4"
    assert meta.parse_value('"1"') == "1"


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("format=float8_e4m3", "Unknown format 'float8_e4m3'"),
        ("full_precision_matrix_mult=yes", "takes a bool"),
        ("full_precision_matrix_mult=1", "takes a bool"),
        ("group_size=true", "takes an integer"),
        ("convrot_groupsize=0", "positive"),
        ("group_size", "KEY=VALUE"),
    ],
)
def test_known_keys_are_validated(pair, message):
    with pytest.raises(UsageError, match=message):
        meta.parse_assignments([pair])


def test_set_on_attention_layers_keeps_both_carriers_and_tensors(fp8_file, tmp_path, capsys):
    out = tmp_path / "fpmm.safetensors"
    result = run_cq(capsys, "meta", "set", fp8_file, "-o", out, "--layer", r"attn", "full_precision_matrix_mult=true",
                    "note=hello")
    assert result.code == 0, result.err
    before, _ = load(fp8_file)
    after, metadata = load(out)
    header, per_layer = carriers(after, metadata)
    assert header == per_layer
    assert header[ATTN] == {"format": "float8_e4m3fn", "full_precision_matrix_mult": True, "note": "hello"}
    assert header[FC1] == header[FC2] == {"format": "float8_e4m3fn"}
    for name in before:
        if not name.endswith(".comfy_quant"):
            assert torch.equal(before[name], after[name]), name
    # Still decodes as ComfyUI would.
    decoded = comfy_dequantize(TensorCoreFP8Layout, after[f"{ATTN}.weight"], (96, 32), scale=after[f"{ATTN}.weight_scale"])
    torch.testing.assert_close(decoded, after[f"{ATTN}.weight"].float() * after[f"{ATTN}.weight_scale"], rtol=0, atol=0)


def test_set_refuses_unknown_formats_and_mismatched_relabels(fp8_file, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    bad = run_cq(capsys, "meta", "set", fp8_file, "-o", out, "format=fp8")
    assert bad.code == 2 and "Unknown format 'fp8'" in bad.err and not out.exists()
    # nvfp4 stores uint8 codes; calling FP8 bytes nvfp4 would decode garbage.
    relabel = run_cq(capsys, "meta", "set", fp8_file, "-o", out, "format=nvfp4")
    assert relabel.code == 2 and "stores" in relabel.err and not out.exists()
    e5m2 = run_cq(capsys, "meta", "set", fp8_file, "-o", out, "--layer", "fc2$", "format=float8_e5m2")
    assert e5m2.code == 2 and "float8_e4m3fn weight" in e5m2.err and not out.exists()
    same = run_cq(capsys, "meta", "set", fp8_file, "-o", out, "--layer", "fc2$", "format=float8_e4m3fn")
    assert same.code == 0 and out.exists()
    nomatch = run_cq(capsys, "meta", "set", fp8_file, "-o", tmp_path / "y.safetensors", "--layer", "nothing", "convrot=true")
    assert nomatch.code == 2 and "matches none" in nomatch.err


def test_unset_removes_keys_but_never_format(fp8_file, tmp_path):
    with_key = tmp_path / "k.safetensors"
    meta.set_keys(fp8_file, with_key, {"full_precision_matrix_mult": True, "group_size": 16})
    out = tmp_path / "u.safetensors"
    result = meta.unset_keys(with_key, out, ["group_size"], layer_regex="mlp")
    assert sorted(result.layers) == [FC1, FC2]
    header, per_layer = carriers(*load(out))
    assert header == per_layer
    assert header[ATTN] == {"format": "float8_e4m3fn", "full_precision_matrix_mult": True, "group_size": 16}
    assert header[FC1] == {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}
    with pytest.raises(UsageError, match="'format'"):
        meta.unset_keys(with_key, tmp_path / "f.safetensors", ["format"])
    with pytest.raises(UsageError, match="'convrot'"):
        meta.unset_keys(with_key, tmp_path / "f.safetensors", ["convrot"])


def test_show_flags_disagreements(fp8_file, tmp_path, capsys):
    header = {ATTN: {"format": "float8_e4m3fn"}, FC1: {"format": "float8_e4m3fn"}, FC2: {"format": "float8_e4m3fn"}}
    tensors = {ATTN: {"format": "float8_e4m3fn"}, FC1: {"format": "float8_e5m2"}}
    odd = rewrite_metadata(fp8_file, tmp_path / "odd.safetensors", header=header, tensors=tensors)
    info = meta.show(odd)
    assert info["layers"][ATTN]["status"] == "agree"
    assert info["layers"][FC1]["status"] == "differ"
    assert info["layers"][FC2]["status"] == "header only"
    assert info["disagreeing"] == [FC1, FC2]
    shown = run_cq(capsys, "meta", "show", odd)
    assert shown.code == 0 and "DIFFER" in shown.out and "HEADER ONLY" in shown.out and "2 layers DISAGREE" in shown.out
    assert json.loads(run_cq(capsys, "meta", "show", odd, "--json").out)["disagreeing"] == [FC1, FC2]
    clean = run_cq(capsys, "meta", "show", fp8_file)
    assert "carriers agree" in clean.out


def test_sync_rebuilds_one_carrier_from_the_other(fp8_file, tmp_path):
    tensors = {ATTN: {"format": "float8_e4m3fn", "full_precision_matrix_mult": True},
               FC1: {"format": "float8_e4m3fn"}, FC2: {"format": "float8_e4m3fn"}}
    # Older writers: per-layer tensors only, no header.
    no_header = rewrite_metadata(fp8_file, tmp_path / "nh.safetensors", header=None, tensors=tensors)
    meta.sync(no_header, tmp_path / "from_tensors.safetensors")
    assert carriers(*load(tmp_path / "from_tensors.safetensors")) == (tensors, tensors)
    with pytest.raises(CqError, match="no _quantization_metadata header"):
        meta.sync(no_header, tmp_path / "nope.safetensors", source="header")

    header = {ATTN: {"format": "float8_e4m3fn"}, FC1: {"format": "float8_e4m3fn"}, FC2: {"format": "float8_e4m3fn"}}
    header_only = rewrite_metadata(fp8_file, tmp_path / "ho.safetensors", header=header, tensors=None)
    result = meta.sync(header_only, tmp_path / "from_header.safetensors", source="header")
    assert carriers(*load(tmp_path / "from_header.safetensors")) == (header, header)
    assert result.layers == []  # the configs are unchanged; only the missing carrier was written
    with pytest.raises(UsageError, match="--from"):
        meta.sync(header_only, tmp_path / "x.safetensors", source="both")


def test_edits_refuse_to_overwrite_and_need_quantized_input(fp8_file, model_file, tmp_path):
    with pytest.raises(UsageError, match="overwrite the input"):
        meta.set_keys(fp8_file, fp8_file, {"convrot": True}, overwrite=True)
    with pytest.raises(CqError, match="no quantized layers"):
        meta.set_keys(model_file, tmp_path / "x.safetensors", {"convrot": True})
    assert not (tmp_path / "x.safetensors").exists()
