"""``int8_tensorwise``: I8 codes with a per-tensor ``()`` or per-row ``(N, 1)`` F32 scale,
optionally ConvRot-rotated along K.

ComfyUI decodes ``q.float() * weight_scale`` (then, with ``convrot``, applies
the group-wise Hadamard again). The per-row scale must be ``(N, 1)``: with
``(N,)`` the INT8 matmul still works but dequantization (LoRA, fallbacks)
broadcasts it along the wrong axis. ConvRot requires per-row scales.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from cq_core import (
    FLOAT_SCALE_DTYPES,
    Contract,
    Format,
    LegacyLayer,
    Option,
    TensorRule,
    TensorSpec,
    UsageError,
    same_as_weight,
)
from cq_int8.hadamard import GROUP_SIZES, fitting_group_size
from cq_int8.rows import IntegerRowsFormat

ROW, TENSOR = "row", "tensor"

CLIP_SEARCH = Option(
    "clip_search",
    bool,
    None,
    "Per scale group (row, tile or tensor), the clip ratio of absmax with the least squared error, "
    "exact over ratios 1.1% apart (2.2% at 4 bits) (never worse than absmax). Default: on for per-row and per-tile "
    "scales, off for one scale per tensor (there each candidate is a pass over the whole tensor).",
)


def _tensor_or_row_scale(weight_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    return ((), (weight_shape[0], 1), (1,), (1, 1))


def _flat_row_scale(weight_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    return ((weight_shape[0],),)


#: What ComfyUI 0.30 loads for int8_tensorwise (``comfy/quant_ops.py`` QUANT_ALGOS: parameters
#: ``weight_scale`` only, so an ``input_scale`` is left over as unexpected; ``comfy/ops.py``
#: ``_load_quantized_module`` raises without ``weight_scale`` and reads ``convrot`` /
#: ``convrot_groupsize``, also nested under ``params``). comfy-kitchen dequantizes
#: ``q * scale``: a per-row scale stored ``(N,)`` loads but broadcasts along the wrong axis.
INT8_TENSORWISE_CONTRACT = Contract(
    tensors={
        "weight": TensorRule((torch.int8,), same_as_weight),
        "weight_scale": TensorRule(
            FLOAT_SCALE_DTYPES, _tensor_or_row_scale, repairable=_flat_row_scale,
            describe="a float scale per tensor or per row",
        ),
    },
    json={"full_precision_matrix_mult": bool, "convrot": bool, "convrot_groupsize": int, "params": dict},
)


class Int8TensorwiseFormat(IntegerRowsFormat):
    name = "int8_tensorwise"
    description = "INT8 with a per-row (N, 1) or per-tensor scale; optional ConvRot Hadamard rotation."
    qmax = 127
    # comfy-kitchen eager quantize_int8_rowwise: amax / 127, at least 1e-30; codes in [-128, 127]
    activation_qmax = 127
    activation_low = -128
    activation_scale_floor = 1e-30
    contract = INT8_TENSORWISE_CONTRACT
    comfyui_since = "0.30.0"  # in QUANT_ALGOS of every ComfyUI the tests read (0.30.0 the oldest)
    comfyui_lora = ("merged: re-quantized keeping per-row or per-tensor scales and ConvRot "
                    "(comfy-kitchen 0.2.40; ComfyUI #14642)")
    # Row-wise INT8 tables, as Comfy's own published text encoders store them; ComfyUI's Embedding
    # gathers rows and dequantizes them (comfy-kitchen ``dequantize_embedding``).
    embedding_options = {"scaling": ROW, "convrot": False, "clip_search": True}
    embedding_alias = "int8"
    # comfy-kitchen's int8_linear (torch._int_mm) runs wherever CUDA does; ComfyUI 0.30 never
    # emulates it (it is not on ``comfy/model_management.py``'s list). A size budget for Blackwell
    # offers fp8 / mxfp8 / nvfp4 instead: the same or fewer bytes on its faster FP8/FP4 cores.
    native_gpus = ("hopper", "ada", "older")
    options = (
        Option("scaling", str, ROW, "Scale granularity: one per output row, or one per tensor.", (ROW, TENSOR)),
        Option("convrot", bool, False, "Rotate weights group-wise along K with a regular Hadamard (ConvRot)."),
        Option(
            "convrot_groupsize",
            int,
            256,
            "ConvRot group size; layers whose K it does not divide use the largest that does, or none.",
            GROUP_SIZES,
        ),
        CLIP_SEARCH,
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.opts["convrot"] and self.opts["scaling"] == TENSOR:
            raise UsageError("Option convrot=true of format 'int8_tensorwise' needs scaling=row.")

    @property
    def per_tensor(self) -> bool:
        return self.opts["scaling"] == TENSOR

    def rotation_group(self, shape: tuple[int, ...]) -> int | None:
        if not self.opts["convrot"]:
            return None
        return fitting_group_size(shape[-1], self.opts["convrot_groupsize"])

    @classmethod
    def from_legacy_scale(cls, weight: TensorSpec, scale: TensorSpec) -> LegacyLayer | None:
        # Scaled INT8 files: one scale per tensor, or per row; (N,) loads in ComfyUI but
        # dequantizes wrong, (N, 1) is the per-row layout.
        if weight.dtype != torch.int8:
            return None
        if math.prod(scale.shape) == 1:
            return LegacyLayer(())
        if tuple(scale.shape) in ((weight.shape[0],), (weight.shape[0], 1)):
            return LegacyLayer((weight.shape[0], 1))
        return None

    def stored_specs(self, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        scale_shape = () if self.per_tensor else (shape[0], 1)
        return {
            "weight": TensorSpec(torch.int8, tuple(shape)),
            "weight_scale": TensorSpec(torch.float32, scale_shape),
        }

    @classmethod
    def from_layer_config(cls, config: Mapping[str, Any], stored: Mapping[str, TensorSpec]) -> Format:
        # The JSON carries the rotation; the scale's stored shape tells row from tensor scaling.
        scale = stored.get("weight_scale")
        scaling = TENSOR if scale is not None and scale.shape == () else ROW
        if not config.get("convrot"):
            return cls(scaling=scaling)
        return cls(scaling=scaling, convrot=True, convrot_groupsize=config.get("convrot_groupsize", 256))

    def layer_config(self, shape: tuple[int, ...]) -> dict[str, Any]:
        group = self.rotation_group(shape)
        if group is None:
            return {"format": self.name}
        return {"format": self.name, "convrot": True, "convrot_groupsize": group}

    def layer_note(self, shape: tuple[int, ...]) -> str | None:
        if not self.opts["convrot"]:
            return None
        wanted, group = self.opts["convrot_groupsize"], self.rotation_group(shape)
        if group == wanted:
            return None
        if group is None:
            return f"ConvRot off: K={shape[-1]} is not a multiple of 16"
        return f"ConvRot group {group}: K={shape[-1]} is not a multiple of {wanted}"

    def store_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.int8)

    def load_codes(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(torch.float32)
