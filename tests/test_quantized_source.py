"""A quantized input (an FP8-only release, a legacy scaled file) is decoded and quantized again."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cq_core
from cq_core.errors import CqError
from cq_core.plugin.manager import get_registry
from tests.cli_runner import run_cq
from tests.comfyui import load_diffusion_model
from tests.helpers import flux_forward, legacy_fp8_file, quantized_tensors


def decoded_copy(fp8_file, folder):
    """The FP8 file's decode as a float32 checkpoint: what re-quantizing it must start from."""
    registry = get_registry()
    tensors, layers = {}, {}
    with safe_open(str(fp8_file), "pt") as f:
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
        for name in f.keys():
            layer, _, suffix = name.rpartition(".")
            if layer in layers and suffix in ("weight_scale", "input_scale", "comfy_quant"):
                continue
            if layer in layers and suffix == "weight":
                stored = {s: f.get_tensor(f"{layer}.{s}") for s in ("weight", "weight_scale", "input_scale")}
                tensors[name] = registry.format(layers[layer]["format"])().decode(stored).float()
            else:
                tensors[name] = f.get_tensor(name)
    path = folder / "decoded.safetensors"
    save_file(tensors, str(path))
    return path


def test_an_fp8_release_converts_to_nvfp4_with_a_warning_and_loads_in_comfyui(capsys, tmp_path, tiny_flux):
    fp8 = tmp_path / "flux-fp8.safetensors"
    cq_core.convert(tiny_flux, fp8, format="float8_e4m3fn")
    out = tmp_path / "flux-fp8-nvfp4.safetensors"
    result = run_cq(capsys, "convert", fp8, "-o", out, "-f", "nvfp4")
    assert result.code == 0, result.err
    assert "warning: the input was already quantized (float8_e4m3fn (" in result.err
    assert "each SQNR is against that decode" in result.err
    reference, _ = load_diffusion_model(tiny_flux)
    patcher, log = load_diffusion_model(out)
    assert patcher.model.model_config.unet_config == reference.model.model_config.unet_config
    assert log.problems() == []
    want, got = flux_forward(reference), flux_forward(patcher)
    assert torch.isfinite(got).all() and (got - want).norm() / want.norm() < 0.5
    # The same bytes as quantizing the FP8 file's exact decode, written as float32.
    direct = tmp_path / "decoded-nvfp4.safetensors"
    cq_core.convert(decoded_copy(fp8, tmp_path), direct, format="nvfp4")
    a, b = quantized_tensors(out), quantized_tensors(direct)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a)
    # Layers the new plan keeps are written in the checkpoint's own high-precision dtype.
    kept = load_file(out)
    assert kept["img_in.weight"].dtype == torch.bfloat16
    # cq verify takes the FP8 file as the source: the nvfp4 layers against its decode.
    verified = run_cq(capsys, "verify", fp8, out)
    assert verified.code == 0 and " 0 failed" in verified.out


def test_a_legacy_scaled_fp8_file_converts_to_int8(tmp_path):
    src = tmp_path / "legacy.safetensors"
    legacy = legacy_fp8_file(src)
    out = tmp_path / "legacy-int8.safetensors"
    report = cq_core.convert(src, out, format="int8_tensorwise")
    assert any("already quantized" in w for w in report.warnings)
    tensors = load_file(out)
    assert "scaled_fp8" not in tensors and not any(k.endswith(("scale_weight", "scale_input")) for k in tensors)
    layers = [t for t in report.quantized]
    assert layers and all(t.format == "int8_tensorwise" and t.sqnr_db > 30 for t in layers)
    for t in layers:
        layer = t.name.removesuffix(".weight")
        decoded = legacy[f"{layer}.weight"].float() * legacy[f"{layer}.scale_weight"].float()
        stored = tensors[f"{layer}.weight"].float() * tensors[f"{layer}.weight_scale"].float()
        assert (stored - decoded).norm() / decoded.norm() < 0.02


def test_a_quantized_layer_no_installed_format_decodes_is_one_sentence(tmp_path):
    tensors = {"fc.weight": torch.randint(-8, 8, (32, 32), dtype=torch.int8),
               "fc.weight_scale": torch.tensor(0.1), "fc.comfy_quant": torch.frombuffer(
                   bytearray(b'{"format":"int4_made_up"}'), dtype=torch.uint8)}
    src = tmp_path / "odd.safetensors"
    save_file(tensors, str(src), metadata={"_quantization_metadata": json.dumps(
        {"format_version": "1.0", "layers": {"fc": {"format": "int4_made_up"}}})})
    with pytest.raises(CqError, match="int4_made_up"):
        cq_core.convert(src, tmp_path / "out.safetensors", format="nvfp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.safetensors"]
