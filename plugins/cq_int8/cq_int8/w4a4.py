"""``convrot_w4a4``: ConvRot-rotated signed INT4 weights, for GPUs without FP4 hardware.

The layout comfy-kitchen's ``TensorCoreConvRotW4A4Layout`` reads:
- ``L.weight``: I8, (N, K/2), two signed 4-bit codes per byte, the even
  column in the LOW nibble (the opposite of NVFP4's order);
- ``L.weight_scale``: F32, 1-D (N,): one scale per output row, ``absmax/7`` of
  the rotated row; codes are in [-7, 7] (-8 fits the nibble but is never used);
- JSON ``{"format": "convrot_w4a4", "convrot_groupsize": G}``; ComfyUI fixes its
  ``quant_group_size`` at 64, so K must be a multiple of 64.

Decode: ``unpack(q) * scale[:, None]``, then the group-wise Hadamard along K.
At run time activations are rotated and quantized to 4 bits per row, too.
The stored weight is (N, K/2): layers whose shape ComfyUI reads to detect the
model should stay unquantized.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cq_core import (
    FLOAT_SCALE_DTYPES,
    Contract,
    Format,
    LayerInfo,
    Option,
    TensorRule,
    TensorSpec,
)
from cq_int8.hadamard import GROUP_SIZES, fitting_group_size
from cq_int8.rows import IntegerRowsFormat

#: ComfyUI's INT4 kernels take K in multiples of their 64-wide quantization group.
K_MULTIPLE = 64


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Signed codes (rows, K) in [-8, 7] -> I8 (rows, K/2), even column in the low nibble."""
    nibbles = codes.to(torch.int16) & 0x0F
    packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return packed.to(torch.uint8).view(torch.int8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`, as float32 codes (rows, K)."""
    raw = packed.view(torch.uint8).to(torch.int16)
    pair = torch.stack((raw & 0x0F, raw >> 4), dim=-1).reshape(raw.shape[0], -1)
    return torch.where(pair >= 8, pair - 16, pair).to(torch.float32)


def _packed_weight(weight_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    ok = len(weight_shape) == 2 and not (2 * weight_shape[1]) % K_MULTIPLE
    return (tuple(weight_shape),) if ok else ()


def _row_scale(weight_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    return ((weight_shape[0],),)


#: What ComfyUI 0.30 loads for convrot_w4a4 (``comfy/quant_ops.py`` QUANT_ALGOS: parameters
#: ``weight_scale`` only; ``comfy/ops.py`` ``_load_quantized_module`` raises without it and
#: reads ``convrot_groupsize`` and ``linear_dtype``, also nested under ``params``). comfy-kitchen's
#: kernels take the scale exactly 1-D ``(N,)``; ``(N, 1)`` fails at the first forward.
CONVROT_W4A4_CONTRACT = Contract(
    tensors={
        "weight": TensorRule((torch.int8,), _packed_weight, describe="I8 signed 4-bit pairs"),
        "weight_scale": TensorRule(FLOAT_SCALE_DTYPES, _row_scale, describe="one float scale per row"),
    },
    json={"full_precision_matrix_mult": bool, "convrot_groupsize": int, "linear_dtype": str, "params": dict},
)


class ConvrotW4A4Format(IntegerRowsFormat):
    name = "convrot_w4a4"
    description = "ConvRot-rotated signed INT4 weights, per-row scale; INT4 GEMM without FP4 hardware."
    qmax = 7
    # comfy-kitchen eager quantize_signed_int4_rowwise: max(amax, 1e-10) / 7; codes in [-7, 7]
    activation_qmax = 7
    activation_low = -7
    activation_amax_floor = 1e-10
    contract = CONVROT_W4A4_CONTRACT
    comfyui_since = "0.30.0"  # in QUANT_ALGOS of every ComfyUI the tests read (0.30.0 the oldest)
    comfyui_lora = "merged: re-quantized keeping the rotation group and per-row scales"
    options = (
        Option(
            "convrot_groupsize",
            int,
            256,
            "Hadamard group size; layers whose K it does not divide use the largest that does.",
            GROUP_SIZES,
        ),
        Option(
            "clip_search", bool, False,
            "Per row, the clip ratio of absmax with the least squared error, exact over ratios 2.2% apart "
            "(+2.7 dB weight SQNR on Gaussian weights); off by default: in ComfyUI's W4A4 path it raised the "
            "relative output error of the SD1.5 UNet test cell from 0.38 to 0.55 (docs/scales.md).",
        ),
    )

    def accepts(self, layer: LayerInfo) -> str | None:
        refusal = super().accepts(layer)
        if refusal is None and layer.shape[1] % K_MULTIPLE:
            return f"{self.name} needs K (in_features) to be a multiple of {K_MULTIPLE}, this one is {layer.shape[1]}"
        return refusal

    def rotation_group(self, shape: tuple[int, ...]) -> int | None:
        return fitting_group_size(shape[-1], self.opts["convrot_groupsize"])

    def stored_specs(self, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        n, k = shape
        return {
            "weight": TensorSpec(torch.int8, (n, k // 2)),
            "weight_scale": TensorSpec(torch.float32, (n,)),
        }

    def logical_shape(self, stored: Mapping[str, TensorSpec]) -> tuple[int, ...]:
        n, packed = stored["weight"].shape  # two INT4 values per byte
        return (n, 2 * packed)

    @classmethod
    def from_layer_config(cls, config: Mapping[str, Any], stored: Mapping[str, TensorSpec]) -> Format:
        return cls(convrot_groupsize=config.get("convrot_groupsize", 256))

    def layer_config(self, shape: tuple[int, ...]) -> dict[str, Any]:
        return {"format": self.name, "convrot_groupsize": self.rotation_group(shape)}

    def layer_note(self, shape: tuple[int, ...]) -> str | None:
        wanted, group = self.opts["convrot_groupsize"], self.rotation_group(shape)
        return None if group == wanted else f"ConvRot group {group}: K={shape[-1]} is not a multiple of {wanted}"

    def store_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_nibbles(codes)

    def load_codes(self, stored: torch.Tensor) -> torch.Tensor:
        return unpack_nibbles(stored)

    def store_scale(self, scale: torch.Tensor) -> torch.Tensor:
        # comfy-kitchen's CUDA kernels require the 1-D (N,) shape here.
        return scale.float().reshape(-1).contiguous()
