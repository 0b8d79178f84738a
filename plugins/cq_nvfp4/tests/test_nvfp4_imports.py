"""Other producers' NVFP4 into ComfyUI's nvfp4 (cq_nvfp4/imports.py), judged by ComfyUI's loader
and by each producer's own decode: ModelOpt's ``NVFP4QTensor`` (and its real HF export),
llm-dequant for compressed-tensors, fireworks-prequant's own quantizer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cq_core.commands.inspect import inspect_checkpoint
from cq_core.commands.migrate import migrate
from cq_core.errors import CqError, UsageError
from cq_core.numerics.blockscale import swizzle
from cq_nvfp4.imports import divisor_as_multiplier, swap_nibbles
from tests.cli_runner import run_cq
from tests.comfy import LAYOUTS, comfy_dequantize
from tests.conftest import write_checkpoint
from tests.foreign import comfyui_weights, foreign_file, quantized_layers, read_all, sqnr_db
from tests.test_comfyui_loader import tiny_flux  # noqa: F401 (a fixture)

HF_QUANT_CONFIG = {"producer": {"name": "modelopt", "version": "0.47.0"},
                   "quantization": {"quant_algo": "NVFP4", "group_size": 16}}


def comfy_nvfp4(tensors: dict, layer: str, shape: tuple[int, int]) -> torch.Tensor:
    """comfy-kitchen's float32 decode of an imported layer."""
    return comfy_dequantize(LAYOUTS["nvfp4"], tensors[f"{layer}.weight"], shape,
                            scale=tensors[f"{layer}.weight_scale_2"], block_scale=tensors[f"{layer}.weight_scale"])


# -- NVIDIA ModelOpt ---------------------------------------------------------------------------------


def modelopt_tensors(layer: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """ModelOpt's own NVFP4 quantization, named as its HF export names it."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    packed, block_scale, scale_2 = NVFP4QTensor.quantize(weight, 16)
    return {f"{layer}.weight": packed._quantized_data, f"{layer}.weight_scale": block_scale,
            f"{layer}.weight_scale_2": scale_2, f"{layer}.input_scale": torch.tensor(0.0125)}


def modelopt_decode(tensors: dict, layer: str) -> torch.Tensor:
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    packed = tensors[f"{layer}.weight"]
    qtensor = NVFP4QTensor((packed.shape[0], 2 * packed.shape[1]), torch.float32, packed)
    return qtensor.dequantize(dtype=torch.float32, scale=tensors[f"{layer}.weight_scale"],
                              double_scale=tensors[f"{layer}.weight_scale_2"], block_sizes={-1: 16})


@pytest.mark.slow
def test_modelopt_nvfp4_loads_in_comfyui_and_decodes_as_modelopt_does(tmp_path, tiny_flux):  # noqa: F811
    layers = quantized_layers(tiny_flux, "nvfp4", tmp_path)
    source = foreign_file(tiny_flux, layers, modelopt_tensors, tmp_path / "modelopt" / "model.safetensors",
                          beside={"hf_quant_config.json": HF_QUANT_CONFIG})
    info = inspect_checkpoint(source)
    assert info["foreign_formats"] == {"NVIDIA ModelOpt NVFP4": len(layers)}
    assert info["quantized_layers"] == len(layers) and info["unlabelled_layers"] == 0

    out = tmp_path / "comfy.safetensors"
    report = migrate(source, out)
    assert report.layers == dict.fromkeys(layers, "nvfp4") and not report.refused
    foreign, _ = read_all(source)
    imported, configs = read_all(out)
    assert configs == {layer: {"format": "nvfp4"} for layer in layers}
    loaded = comfyui_weights(out, tiny_flux)
    for layer in layers:
        want = modelopt_decode(foreign, layer)
        assert torch.equal(comfy_nvfp4(imported, layer, tuple(want.shape)), want), layer
        assert torch.equal(loaded[layer], want), layer  # ComfyUI's own dequantize of the loaded model
        assert torch.equal(imported[f"{layer}.input_scale"], foreign[f"{layer}.input_scale"])
    assert migrate(out, check=True).changed is False  # the output is current


@pytest.mark.slow
def test_a_real_modelopt_hf_export_imports_bit_exact(tmp_path):
    """ModelOpt's own quantize-and-export pipeline (a tiny Llama, on the CPU), not a hand-made file."""
    pytest.importorskip("modelopt")
    # In a fresh interpreter: the ComfyUI the other tests import stubs torchvision, which
    # transformers' model imports then trip over.
    subprocess.run([sys.executable, "-c", MODELOPT_EXPORT, str(tmp_path / "export")], check=True,
                   capture_output=True, timeout=300)
    source = tmp_path / "export" / "model.safetensors"
    foreign, _ = read_all(source)
    layers = sorted(name.removesuffix(".weight_scale_2") for name in foreign if name.endswith(".weight_scale_2"))
    assert len(layers) == 7

    out = tmp_path / "comfy.safetensors"
    assert migrate(source, out).layers == dict.fromkeys(layers, "nvfp4")
    imported, _ = read_all(out)
    for layer in layers:
        want = modelopt_decode(foreign, layer)
        assert torch.equal(comfy_nvfp4(imported, layer, tuple(want.shape)), want), layer
        assert torch.equal(imported[f"{layer}.input_scale"], foreign[f"{layer}.input_scale"])
    for name in ("lm_head.weight", "model.norm.weight"):
        assert torch.equal(imported[name], foreign[name])


MODELOPT_EXPORT = """
import sys, torch
import modelopt.torch.quantization as mtq
from modelopt.torch.export import export_hf_checkpoint
from transformers import LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
model = mtq.quantize(LlamaForCausalLM(config).eval(), mtq.NVFP4_DEFAULT_CFG,
                     lambda m: m(torch.randint(0, 128, (2, 16))))
export_hf_checkpoint(model, export_dir=sys.argv[1])
"""


def modelopt_like(n: int, k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One layer in ModelOpt's layout, built from the published layout (no ModelOpt needed)."""
    g = torch.Generator().manual_seed(seed)
    return {"blocks.0.fc.weight": torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g),
            "blocks.0.fc.weight_scale": (torch.rand(n, k // 16, generator=g) * 400 + 1).to(torch.float8_e4m3fn),
            "blocks.0.fc.weight_scale_2": torch.tensor(0.01)}


def test_unswizzled_shapes_are_modelopt_and_the_bytes_are_swapped_and_swizzled(tmp_path):
    tensors = modelopt_like(64, 64)  # block scales (64, 4); ComfyUI would store (128, 4)
    source = write_checkpoint(tmp_path / "m.safetensors", tensors)
    out = tmp_path / "out.safetensors"
    assert migrate(source, out).applied[0][0] == "modelopt_nvfp4"
    got, _ = read_all(out)
    packed = tensors["blocks.0.fc.weight"]
    assert torch.equal(got["blocks.0.fc.weight"], (packed << 4) | (packed >> 4))
    assert torch.equal(got["blocks.0.fc.weight_scale"].view(torch.uint8),
                       swizzle(tensors["blocks.0.fc.weight_scale"].view(torch.uint8)))
    assert torch.equal(swap_nibbles(swap_nibbles(packed)), packed)


def test_shapes_that_fit_both_layouts_are_refused_in_one_sentence_until_the_producer_is_known(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    source = write_checkpoint(folder / "m.safetensors", modelopt_like(128, 64))  # (128, 4) both ways
    with pytest.raises(CqError, match=r"fit both ComfyUI's swizzled block scales and NVIDIA ModelOpt's") as err:
        migrate(source, tmp_path / "out.safetensors")
    assert str(err.value).count(". ") == 0 and "--producer modelopt_nvfp4" in str(err.value)
    assert not (tmp_path / "out.safetensors").exists()
    checked = run_cq(capsys, "migrate", source, "--check")
    assert checked.code != 0 and "--producer comfyui" in checked.err
    info = inspect_checkpoint(source)
    assert info["unlabelled_formats"] == {"ambiguous": 1} and info["quantized_layers"] == 0
    assert info["unlabelled"]["blocks.0.fc"]["candidates"] == ["nvfp4", "NVIDIA ModelOpt NVFP4"]

    as_modelopt = migrate(source, tmp_path / "a.safetensors", producer="modelopt_nvfp4")
    as_comfyui = migrate(source, tmp_path / "b.safetensors", producer="comfyui")
    assert as_modelopt.applied[0][0] == "modelopt_nvfp4" and as_comfyui.applied == []
    assert as_modelopt.layers == as_comfyui.layers == {"blocks.0.fc": "nvfp4"}
    a, b = read_all(tmp_path / "a.safetensors")[0], read_all(tmp_path / "b.safetensors")[0]
    assert not torch.equal(a["blocks.0.fc.weight"], b["blocks.0.fc.weight"])  # one of them swapped nibbles
    with pytest.raises(UsageError, match="--producer 'tessera' is none of: comfyui"):
        migrate(source, check=True, producer="tessera")

    (folder / "hf_quant_config.json").write_text(json.dumps(HF_QUANT_CONFIG))
    assert migrate(source, check=True).applied[0][0] == "modelopt_nvfp4"


def test_a_file_mixing_swizzled_and_unswizzled_block_scales_is_refused(tmp_path):
    tensors = modelopt_like(64, 64)
    tensors.update({"blocks.1.fc.weight": torch.zeros(32, 32, dtype=torch.uint8),
                    "blocks.1.fc.weight_scale": torch.ones(128, 4).to(torch.float8_e4m3fn),
                    "blocks.1.fc.weight_scale_2": torch.tensor(1.0)})
    source = write_checkpoint(tmp_path / "m.safetensors", tensors)
    with pytest.raises(CqError, match="layer 'blocks.1.fc' stores its block scales swizzled as ComfyUI does"):
        migrate(source, check=True)


def test_comfyuis_own_layout_without_metadata_is_not_taken_for_modelopt(tmp_path):
    tensors = {"blocks.0.fc.weight": torch.zeros(32, 32, dtype=torch.uint8),
               "blocks.0.fc.weight_scale": torch.ones(128, 4).to(torch.float8_e4m3fn),  # swizzled only
               "blocks.0.fc.weight_scale_2": torch.tensor(1.0)}
    report = migrate(write_checkpoint(tmp_path / "c.safetensors", tensors), check=True)
    assert report.applied == [] and report.layers == {"blocks.0.fc": "nvfp4"}


def test_modelopt_input_scale_zero_is_named(tmp_path):
    tensors = modelopt_like(64, 64)
    tensors["blocks.0.fc.input_scale"] = torch.tensor(0.0)
    with pytest.raises(CqError, match=r"scale tensor 'blocks.0.fc.input_scale' holds 0.0"):
        migrate(write_checkpoint(tmp_path / "m.safetensors", tensors), tmp_path / "o.safetensors")


# -- compressed-tensors ---------------------------------------------------------------------------------


def compressed_tensors_tensors(layer: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """compressed-tensors' nvfp4-pack-quantized layout by its recipe (global scale 448 * 6 / amax,
    a divisor; block scales of the globally scaled blocks), packed with llm-dequant's ``pack_fp4``
    (its independent reimplementation of the compressed-tensors packer)."""
    from llm_dequant.nvfp4 import pack_fp4

    n, k = weight.shape
    divisor = torch.tensor(448.0 * 6.0) / weight.abs().max()
    blocks = weight.reshape(n, k // 16, 16)
    block_scale = (blocks.abs().amax(-1) / 6.0 * divisor).clamp(min=2.0**-9, max=448).to(torch.float8_e4m3fn)
    effective = block_scale.float() / divisor
    return {f"{layer}.weight_packed": pack_fp4((blocks / effective.unsqueeze(-1)).reshape(n, k)),
            f"{layer}.weight_scale": block_scale, f"{layer}.weight_global_scale": divisor.reshape(1),
            f"{layer}.input_global_scale": torch.tensor([80.0])}


@pytest.mark.slow
def test_compressed_tensors_nvfp4_loads_in_comfyui_and_decodes_as_llm_dequant_does(tmp_path, tiny_flux):  # noqa: F811
    from llm_dequant.nvfp4 import dequantize_nvfp4

    layers = quantized_layers(tiny_flux, "nvfp4", tmp_path)
    source = foreign_file(tiny_flux, layers, compressed_tensors_tensors, tmp_path / "ct" / "model.safetensors")
    out = tmp_path / "comfy.safetensors"
    report = migrate(source, out)
    assert report.layers == dict.fromkeys(layers, "nvfp4")
    notes = {n.subject: n.message for n in report.notes if n.by == "compressed_tensors_nvfp4"}
    foreign, _ = read_all(source)
    imported, _ = read_all(out)
    loaded = comfyui_weights(out, tiny_flux)
    exact = 0
    for layer in layers:
        want = dequantize_nvfp4(foreign[f"{layer}.weight_packed"], foreign[f"{layer}.weight_scale"],
                                foreign[f"{layer}.weight_global_scale"], dtype=torch.float32)
        got = comfy_nvfp4(imported, layer, tuple(want.shape))
        assert torch.equal(loaded[layer], got)
        if "(bit-exact)" in notes[layer]:
            exact += 1
            assert torch.equal(got, want), layer
        else:  # 1/g not exact in float32: an ulp of the block scale, and the code's product rounding
            assert ((got - want).abs() <= want.abs() * 2.0**-22).all(), layer
        assert sqnr_db(want, got) > 130
        assert float(imported[f"{layer}.input_scale"]) == float(torch.tensor(1.0) / torch.tensor(80.0))
    assert exact >= 1  # the multiplier search finds exact ones in practice (bench/foreign_imports.py counts)


def test_divisor_as_multiplier_is_exact_for_powers_of_two_and_bounded_otherwise():
    scales = torch.tensor([2.0**e * m for e in range(-6, 8) for m in (1, 1.125, 1.25, 1.375, 1.5, 1.625, 1.75, 1.875)])
    scales = scales.to(torch.float8_e4m3fn)
    multiplier, error = divisor_as_multiplier(torch.tensor([64.0]), scales)
    assert error == 0.0 and float(multiplier) == 1 / 64
    for divisor in (3.0, 448 * 6 / 0.3, 7.1, 1e-3):
        multiplier, error = divisor_as_multiplier(torch.tensor(divisor), scales)
        values = scales.float()
        got, want = values * multiplier, values / torch.tensor(divisor)
        assert float(((got - want).abs() / want).max()) == error <= 2.0**-23


def test_compressed_tensors_layers_comfyui_cannot_hold_are_named(tmp_path):
    def layer(n: int) -> dict[str, torch.Tensor]:
        return {"weight_packed": torch.zeros(n, 32, dtype=torch.uint8),
                "weight_scale": torch.ones(n, 4).to(torch.float8_e4m3fn), "weight_global_scale": torch.tensor([2.0])}

    tensors = {f"a.{k}": v for k, v in layer(32).items()} | {f"b.{k}": v for k, v in layer(24).items()}
    tensors["a.weight_zero_point"] = torch.zeros(32, 4, dtype=torch.int8)
    report = migrate(write_checkpoint(tmp_path / "ct.safetensors", tensors), check=True)
    refused = {n.subject: n.message for n in report.refused}
    assert "asymmetric NVFP4" in refused["a"] and "N=24 is not a multiple of 16" in refused["b"]
    with pytest.raises(CqError, match="2 layers have no layout ComfyUI loads"):
        migrate(tmp_path / "ct.safetensors", tmp_path / "out.safetensors")


def test_a_zero_global_divisor_is_named(tmp_path):
    tensors = {"a.weight_packed": torch.zeros(32, 32, dtype=torch.uint8),
               "a.weight_scale": torch.ones(32, 4).to(torch.float8_e4m3fn), "a.weight_global_scale": torch.tensor([0.0])}
    with pytest.raises(CqError, match=r"scale tensor 'a.weight_global_scale' holds 0.0"):
        migrate(write_checkpoint(tmp_path / "ct.safetensors", tensors), check=True)


# -- fireworks-prequant --------------------------------------------------------------------------------


def fireworks_tensors(layer: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    from fireworks_prequant import quantize_weight

    return quantize_weight(f"{layer}.weight", weight, device="cpu")


@pytest.mark.slow
def test_fireworks_nvfp4_loads_in_comfyui_bit_exact(tmp_path, tiny_flux):  # noqa: F811
    pytest.importorskip("triton.tools.mxfp", reason="fireworks-prequant's NVFP4 packer is triton's MXFP4Tensor")
    layers = quantized_layers(tiny_flux, "nvfp4", tmp_path)
    source = foreign_file(tiny_flux, layers, fireworks_tensors, tmp_path / "fw" / "model.safetensors")
    foreign, _ = read_all(source)
    assert foreign[f"{layers[0]}.weight"].dtype == torch.float4_e2m1fn_x2
    out = tmp_path / "comfy.safetensors"
    assert migrate(source, out).layers == dict.fromkeys(layers, "nvfp4")
    imported, _ = read_all(out)
    loaded = comfyui_weights(out, tiny_flux)
    original, _ = read_all(tiny_flux)
    for layer in layers:
        packed = foreign[f"{layer}.weight"].view(torch.uint8)
        scale = foreign[f"{layer}.weight_scale_inv"].float() * foreign[f"{layer}.weight_scale_global"]
        values = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
        codes = torch.stack((packed & 0x0F, packed >> 4), -1).reshape(packed.shape[0], -1)  # even column low
        want = (values[codes.long()].reshape(packed.shape[0], -1, 16) * scale.unsqueeze(-1)).reshape(codes.shape)
        assert torch.equal(comfy_nvfp4(imported, layer, tuple(want.shape)), want), layer
        assert torch.equal(loaded[layer], want), layer
        assert sqnr_db(original[f"{layer}.weight"].float(), want) > 15  # NVFP4's usual ~20 dB: the nibbles are right
