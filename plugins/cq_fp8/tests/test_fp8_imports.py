"""fireworks-prequant MXFP8 and per-tensor Hugging Face FP8 into ComfyUI's mxfp8 / float8_e4m3fn
(cq_fp8/imports.py), loaded by ComfyUI's own loader and compared with the producers' decode.

fireworks-prequant's MXFP8 quantizer is flashinfer's CUDA kernel, so its files are built here
from the layout its ``quantize_weight_mxfp8`` documents (``weight`` F8_E4M3 ``[N, K]``,
``weight_scale_inv`` U8 E8M0 ``[N, K/32]`` unswizzled, decoded ``weight * 2**(e - 127)``).
"""

from __future__ import annotations

import pytest
import torch

from cq_core.commands.inspect import inspect_checkpoint
from cq_core.commands.migrate import migrate
from cq_core.errors import CqError
from cq_core.plugin.manager import Registry, make_plugin_manager
from tests.comfy import LAYOUTS, comfy_dequantize
from tests.conftest import write_checkpoint
from tests.foreign import comfyui_weights, foreign_file, quantized_layers, read_all
from tests.test_comfyui_loader import tiny_flux  # noqa: F401 (a fixture)


def fireworks_mxfp8(layer: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The OCP MX recipe (exponent floor(log2 amax) - 8, saturating), written independently of cq."""
    n, k = weight.shape
    blocks = weight.masked_fill(weight.abs() < 1e-10, 0).reshape(n, k // 32, 32)
    amax = blocks.abs().amax(-1)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 8 + 127, torch.zeros_like(amax)).clamp(0, 254)
    scale = torch.exp2(exponent - 127)
    codes = (blocks / scale.unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(n, k)
    return {f"{layer}.weight": codes, f"{layer}.weight_scale_inv": exponent.to(torch.uint8)}


def fireworks_mxfp8_decode(tensors: dict, layer: str) -> torch.Tensor:
    codes, exponents = tensors[f"{layer}.weight"], tensors[f"{layer}.weight_scale_inv"]
    scale = exponents.view(torch.float8_e8m0fnu).float()
    n, k = codes.shape
    return (codes.float().reshape(n, k // 32, 32) * scale.unsqueeze(-1)).reshape(n, k)


@pytest.mark.slow
def test_fireworks_mxfp8_loads_in_comfyui_bit_exact(tmp_path, tiny_flux):  # noqa: F811
    layers = quantized_layers(tiny_flux, "mxfp8", tmp_path)
    source = foreign_file(tiny_flux, layers, fireworks_mxfp8, tmp_path / "fw" / "model.safetensors")
    assert inspect_checkpoint(source)["foreign_formats"] == {"fireworks-prequant MXFP8": len(layers)}
    out = tmp_path / "comfy.safetensors"
    assert migrate(source, out).layers == dict.fromkeys(layers, "mxfp8")
    foreign, _ = read_all(source)
    imported, _ = read_all(out)
    loaded = comfyui_weights(out, tiny_flux)
    for layer in layers:
        want = fireworks_mxfp8_decode(foreign, layer)
        got = comfy_dequantize(LAYOUTS["mxfp8"], imported[f"{layer}.weight"], tuple(want.shape),
                               scale=imported[f"{layer}.weight_scale"].view(torch.float8_e8m0fnu))
        assert torch.equal(got, want) and torch.equal(loaded[layer], want), layer
        assert torch.equal(imported[f"{layer}.weight"].view(torch.uint8), foreign[f"{layer}.weight"].view(torch.uint8))


def hf_fp8_tensorwise(layer: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    scale = weight.abs().max() / 448
    return {f"{layer}.weight": (weight / scale).to(torch.float8_e4m3fn), f"{layer}.weight_scale_inv": scale.reshape(1)}


@pytest.mark.slow
def test_per_tensor_weight_scale_inv_becomes_float8_e4m3fn_bit_exact(tmp_path, tiny_flux):  # noqa: F811
    layers = quantized_layers(tiny_flux, "float8_e4m3fn", tmp_path)
    source = foreign_file(tiny_flux, layers, hf_fp8_tensorwise, tmp_path / "hf" / "model.safetensors")
    out = tmp_path / "comfy.safetensors"
    assert migrate(source, out).layers == dict.fromkeys(layers, "float8_e4m3fn")
    foreign, _ = read_all(source)
    imported, _ = read_all(out)
    loaded = comfyui_weights(out, tiny_flux)
    for layer in layers:
        want = foreign[f"{layer}.weight"].float() * foreign[f"{layer}.weight_scale_inv"]
        assert torch.equal(loaded[layer], want), layer
        assert float(imported[f"{layer}.input_scale"]) == 1.0  # explicit, as FORMATS.md asks for FP8


def test_fireworks_mxfp8_rows_comfyui_would_pad_are_refused_by_name(tmp_path):
    tensors = fireworks_mxfp8("a", torch.randn(40, 64))
    report = migrate(write_checkpoint(tmp_path / "f.safetensors", tensors), check=True)
    assert [n.subject for n in report.refused] == ["a"]
    assert "N=40 is not a multiple of 32" in report.refused[0].message


def test_a_bad_scale_is_named(tmp_path):
    tensors = hf_fp8_tensorwise("a", torch.randn(32, 64))
    tensors["a.weight_scale_inv"] = torch.tensor([float("nan")])
    with pytest.raises(CqError, match=r"scale tensor 'a.weight_scale_inv' holds \[nan\]"):
        migrate(write_checkpoint(tmp_path / "f.safetensors", tensors), check=True)


def test_a_scale_no_installed_plugin_reads_is_refused_not_called_current(tmp_path):
    """Without cq-int8 (which imports 128x128 blocks), a Hugging Face FP8 block file is no longer
    'current': ComfyUI would use its codes unscaled."""
    registry = Registry.from_plugin_manager(make_plugin_manager(load_entry_points=False, extra_plugins=("cq_fp8.plugin",)))
    tensors = {"a.weight": torch.randn(256, 256).to(torch.float8_e4m3fn), "a.weight_scale_inv": torch.ones(2, 2)}
    source = write_checkpoint(tmp_path / "f.safetensors", tensors)
    with pytest.raises(CqError, match=r"'a' stores a torch.float8_e4m3fn weight beside a.weight_scale_inv, which no "
                                      r"installed format or migration reads"):
        migrate(source, check=True, registry=registry)
