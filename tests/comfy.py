"""Decoding with comfy-kitchen, ComfyUI's own layout library: the ground truth in tests."""

from __future__ import annotations

import torch
from comfy_kitchen.tensor import (
    TensorCoreFP8Layout,
    TensorCoreMXFP8Layout,
    TensorCoreNVFP4Layout,
    TensorWiseINT8Layout,
)
from comfy_kitchen.tensor.base import QuantizedTensor

LAYOUTS = {
    "float8_e4m3fn": TensorCoreFP8Layout,
    "float8_e5m2": TensorCoreFP8Layout,
    "int8_tensorwise": TensorWiseINT8Layout,
    "nvfp4": TensorCoreNVFP4Layout,
    "mxfp8": TensorCoreMXFP8Layout,
}


def comfy_dequantize(layout_cls, qdata: torch.Tensor, shape, orig_dtype=torch.float32, **params) -> torch.Tensor:
    """What ComfyUI computes when it dequantizes a stored weight."""
    p = layout_cls.Params(orig_dtype=orig_dtype, orig_shape=tuple(shape), **params)
    return QuantizedTensor(qdata, layout_cls.__name__, p).dequantize()
