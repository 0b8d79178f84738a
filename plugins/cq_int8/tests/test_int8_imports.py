"""Hugging Face FP8 with 128x128 block scales, re-quantized into per-row int8_tensorwise
(cq_int8/imports.py): inputs from fireworks-prequant's own ``quantize_weight_bw128`` (pure torch,
the DeepSeek-V3 layout), outputs through ComfyUI's loader, the loss against the FP8 decode."""

from __future__ import annotations

import json
import re

import pytest
import torch

from cq_core.commands.inspect import inspect_checkpoint
from cq_core.commands.migrate import migrate
from cq_int8.imports import decode_fp8_blocks
from tests.comfy import LAYOUTS, comfy_dequantize
from tests.conftest import write_checkpoint
from tests.foreign import comfyui_weights, foreign_file, quantized_layers, read_all, sqnr_db
from tests.test_comfyui_loader import tiny_flux  # noqa: F401 (a fixture)


def bw128(layer: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    from fireworks_prequant import quantize_weight_bw128

    return quantize_weight_bw128(f"{layer}.weight", weight, device="cpu")


@pytest.mark.slow
def test_hf_fp8_blocks_load_in_comfyui_as_per_row_int8_with_the_loss_reported(tmp_path, tiny_flux):  # noqa: F811
    layers = quantized_layers(tiny_flux, "int8_tensorwise", tmp_path)
    source = foreign_file(tiny_flux, layers, bw128, tmp_path / "hf" / "model.safetensors")
    foreign, _ = read_all(source)
    # A layer of one tile has one scale: per-tensor FP8, which ComfyUI holds as it is (cq_fp8/imports.py).
    single = [layer for layer in layers if foreign[f"{layer}.weight_scale_inv"].numel() == 1]
    blocks = [layer for layer in layers if layer not in single]
    assert single and blocks
    info = inspect_checkpoint(source)
    assert info["foreign_formats"] == {"Hugging Face FP8 (128x128 block weight_scale_inv)": len(blocks),
                                       "Hugging Face FP8 (per-tensor weight_scale_inv)": len(single)}
    check = migrate(source, check=True)
    assert check.changed and all(n.kind == "warning" for n in check.notes if n.by == "hf_fp8_blocks")

    out = tmp_path / "comfy.safetensors"
    report = migrate(source, out)
    assert report.layers == {**dict.fromkeys(blocks, "int8_tensorwise"), **dict.fromkeys(single, "float8_e4m3fn")}
    reported = {n.subject: float(re.search(r"SQNR (\S+) dB", n.message)[1])
                for n in report.notes if n.by == "hf_fp8_blocks" and n.kind == "change"}
    assert set(reported) == set(blocks)
    imported, _ = read_all(out)
    loaded = comfyui_weights(out, tiny_flux)
    for layer in single:
        assert torch.equal(loaded[layer], decode_fp8_blocks(foreign[f"{layer}.weight"],
                                                            foreign[f"{layer}.weight_scale_inv"], (128, 128)))
    for layer in blocks:
        codes, scale = foreign[f"{layer}.weight"], foreign[f"{layer}.weight_scale_inv"]
        tiles = codes.float().reshape(codes.shape[0] // 128, 128, -1, 128) if not codes.shape[0] % 128 and \
            not codes.shape[1] % 128 else None
        want = decode_fp8_blocks(codes, scale, (128, 128))
        if tiles is not None:  # the decode, as DeepSeek's weight_dequant writes it
            assert torch.equal(want, (tiles * scale[:, None, :, None]).reshape(codes.shape))
        got = comfy_dequantize(LAYOUTS["int8_tensorwise"], imported[f"{layer}.weight"], tuple(codes.shape),
                               scale=imported[f"{layer}.weight_scale"])
        assert imported[f"{layer}.weight_scale"].shape == (codes.shape[0], 1)
        assert torch.equal(loaded[layer], got)
        assert sqnr_db(want, got) > 35, layer
        assert abs(sqnr_db(want, got) - reported[layer]) < 0.05, layer


def test_a_block_size_from_the_producers_config_is_used(tmp_path):
    codes = torch.randn(96, 96).to(torch.float8_e4m3fn)
    tensors = {"a.weight": codes, "a.weight_scale_inv": torch.rand(2, 2) + 0.5}
    folder = tmp_path / "m"
    folder.mkdir()
    source = write_checkpoint(folder / "m.safetensors", tensors)
    refused = migrate(source, check=True).refused
    assert [n.subject for n in refused] == ["a"] and "not one scale per 128x128 tile" in refused[0].message
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8",
                                                                            "weight_block_size": [64, 64]}}))
    out = tmp_path / "out.safetensors"
    assert migrate(source, out).layers == {"a": "int8_tensorwise"}
    imported, _ = read_all(out)
    got = comfy_dequantize(LAYOUTS["int8_tensorwise"], imported["a.weight"], (96, 96), scale=imported["a.weight_scale"])
    assert sqnr_db(decode_fp8_blocks(codes, tensors["a.weight_scale_inv"], (64, 64)), got) > 35
