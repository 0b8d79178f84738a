"""Other producers' FP8 imported into ComfyUI's ``mxfp8`` and ``float8_e4m3fn`` by ``cq migrate``.

- fireworks-prequant 0.2 MXFP8 (``quantize_weight_mxfp8``; ``weight_block_size [1, 32]``):
  ``L.weight`` F8_E4M3 ``[N, K]`` and ``L.weight_scale_inv`` U8 E8M0 exponents ``[N, K/32]``,
  unswizzled; decoded ``weight * 2**(e - 127)``. ComfyUI's mxfp8 holds the same codes and
  exponents with the exponents in the cuBLAS 128x4 tiled layout under ``L.weight_scale``: the
  import swizzles them and copies everything else, bit-exact. (E8M0 byte 0 is 2**-127;
  comfy-kitchen decodes it to 0. fireworks-prequant flushes ``|w| < 1e-10`` to zero first,
  so a block with exponent 0 holds only zeros and both decode it to 0.)
- Hugging Face FP8 with a per-tensor ``L.weight_scale_inv`` (one element; the dequantization
  multiplier despite its name, ``weight * weight_scale_inv``): ComfyUI's float8_e4m3fn with the
  scale renamed ``weight_scale``, bit-exact. Hugging Face FP8 with 128x128 *block* scales is
  re-quantized (no ComfyUI layout has 2-D FP8 blocks): ``cq_int8.imports``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from cq_core import CheckpointDraft, CqError, FLOAT_SCALE_DTYPES, ForeignImport, ForeignLayer, TensorSpec
from cq_core.numerics.blockscale import swizzle, swizzled_shape
from cq_fp8.mxfp8 import BLOCK

SCALAR = ()
MODULE_SUFFIXES = {"bias", "comfy_quant"}
E8M0_DTYPES = (torch.uint8, torch.float8_e8m0fnu)




def _fp8_with_scale_inv(stored: Mapping[str, TensorSpec]) -> bool:
    weight, scale = stored.get("weight"), stored.get("weight_scale_inv")
    return (
        weight is not None and weight.dtype == torch.float8_e4m3fn and len(weight.shape) == 2
        and scale is not None and "weight_scale" not in stored
        and not set(stored) - {"weight", "weight_scale_inv", "input_scale"} - MODULE_SUFFIXES
    )


def check_positive(draft: CheckpointDraft, name: str) -> torch.Tensor:
    """``name`` read as float32; CqError naming it unless every value is positive and finite."""
    value = draft.read(name).float()
    if not bool(torch.isfinite(value).all()) or not bool((value > 0).all()):
        raise CqError(
            f"{draft.path}: scale tensor {name!r} holds {value.flatten()[:4].tolist()} (a scale must be positive "
            "and finite), so its layer cannot be decoded; nothing was written."
        )
    return value

FIREWORKS = "fireworks-prequant MXFP8"


class FireworksMxfp8(ForeignImport):
    name = "fireworks_mxfp8"
    description = (
        "fireworks-prequant MXFP8 (weight F8_E4M3, weight_scale_inv U8 E8M0 [N, K/32] unswizzled) -> mxfp8, "
        "bit-exact."
    )

    def foreign_layers(self, draft: CheckpointDraft) -> list[ForeignLayer]:
        found = []
        for layer, stored in draft.layer_tensors().items():
            if not _fp8_with_scale_inv(stored) or stored["weight_scale_inv"].dtype not in E8M0_DTYPES:
                continue
            weight, scale = stored["weight"], stored["weight_scale_inv"]
            rows, cols = weight.shape
            problem = None
            if cols % BLOCK or tuple(scale.shape) != (rows, cols // BLOCK):
                problem = (f"{layer}.weight_scale_inv is {CheckpointDraft.describe(scale)}; fireworks-prequant stores one E8M0 "
                           f"exponent per {BLOCK} along K, {[rows, cols // BLOCK]} next to a {CheckpointDraft.describe(weight)} weight")
            elif rows % BLOCK:
                problem = (f"N={rows} is not a multiple of {BLOCK}: ComfyUI's mxfp8 stores rows padded to {BLOCK}, "
                           "and cq migrate does not change a stored shape ComfyUI's model detection may read")
            found.append(ForeignLayer(layer, FIREWORKS, "mxfp8", problem and f"{FIREWORKS}: {problem}"))
        return found

    def import_layer(self, draft: CheckpointDraft, found: ForeignLayer) -> None:
        layer = found.layer
        name = f"{layer}.weight_scale_inv"
        rows, blocks = draft.spec(name).shape

        def tiles(load=draft.tensors[name].load) -> torch.Tensor:
            return swizzle(load().view(torch.uint8))

        draft.rewrite(name, new_name=f"{layer}.weight_scale", spec=TensorSpec(torch.uint8, swizzled_shape(rows, blocks)),
                      load=tiles)
        if f"{layer}.input_scale" in draft.tensors:
            draft.drop(f"{layer}.input_scale", "ComfyUI's mxfp8 quantizes activations per block and ignores it")
        draft.layers[layer] = {"format": "mxfp8"}
        draft.note(layer, f"{FIREWORKS} -> mxfp8: weight copied, weight_scale_inv swizzled into weight_scale (bit-exact)")


HF_FP8 = "Hugging Face FP8 (per-tensor weight_scale_inv)"


class HfFp8TensorScale(ForeignImport):
    name = "hf_fp8_tensor"
    description = "Hugging Face FP8 with one weight_scale_inv per tensor -> float8_e4m3fn, bit-exact."

    def foreign_layers(self, draft: CheckpointDraft) -> list[ForeignLayer]:
        found = []
        for layer, stored in draft.layer_tensors().items():
            if not _fp8_with_scale_inv(stored):
                continue
            scale = stored["weight_scale_inv"]
            if scale.dtype not in FLOAT_SCALE_DTYPES or math.prod(scale.shape) != 1:
                continue
            problem = None
            if "input_scale" in stored and math.prod(stored["input_scale"].shape) != 1:
                problem = f"{HF_FP8}: {layer}.input_scale is {CheckpointDraft.describe(stored['input_scale'])}, not one float"
            found.append(ForeignLayer(layer, HF_FP8, "float8_e4m3fn", problem))
        return found

    def import_layer(self, draft: CheckpointDraft, found: ForeignLayer) -> None:
        layer = found.layer
        name = f"{layer}.weight_scale_inv"
        check_positive(draft, name)
        draft.replace(name, new_name=f"{layer}.weight_scale", dtype=torch.float32, shape=SCALAR)
        if f"{layer}.input_scale" in draft.tensors:
            check_positive(draft, f"{layer}.input_scale")
            draft.replace(f"{layer}.input_scale", dtype=torch.float32, shape=SCALAR)
        else:
            # Dynamic activations in the source; ComfyUI's FP8 wants input_scale explicit, or FP8
            # hardware clips activations at 448 (FORMATS.md): write the 1.0 it would use.
            draft.add(f"{layer}.input_scale", torch.tensor(1.0, device="cpu"), after=f"{layer}.weight_scale")
        draft.layers[layer] = {"format": "float8_e4m3fn"}
        draft.note(layer, f"{HF_FP8} -> float8_e4m3fn: weight copied, weight_scale_inv renamed weight_scale (bit-exact)")
