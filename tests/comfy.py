"""Decoding with comfy-kitchen, ComfyUI's own layout library: the ground truth in tests."""

from __future__ import annotations

import os

import pytest
import torch

try:
    from comfy_kitchen.tensor import (
        TensorCoreFP8Layout,
        TensorCoreMXFP8Layout,
        TensorCoreNVFP4Layout,
        TensorWiseINT8Layout,
    )
    from comfy_kitchen.tensor.base import QuantizedTensor
except ModuleNotFoundError:
    # A plugin's tests with only that plugin installed (.ci/check-plugin-isolation sets this; conftest.py):
    # the tests that decode with comfy-kitchen skip when they call it, the others run.
    if not os.environ.get("CQ_TESTS_WITHOUT_COMFYUI"):
        raise
    TensorCoreFP8Layout = TensorCoreMXFP8Layout = TensorCoreNVFP4Layout = TensorWiseINT8Layout = None
    QuantizedTensor = None

LAYOUTS = {
    "float8_e4m3fn": TensorCoreFP8Layout,
    "float8_e5m2": TensorCoreFP8Layout,
    "int8_tensorwise": TensorWiseINT8Layout,
    "nvfp4": TensorCoreNVFP4Layout,
    "mxfp8": TensorCoreMXFP8Layout,
}


def comfy_dequantize(layout_cls, qdata: torch.Tensor, shape, orig_dtype=torch.float32, **params) -> torch.Tensor:
    """What ComfyUI computes when it dequantizes a stored weight."""
    if QuantizedTensor is None:
        pytest.skip("comfy-kitchen is not installed ($CQ_TESTS_WITHOUT_COMFYUI)")
    p = layout_cls.Params(orig_dtype=orig_dtype, orig_shape=tuple(shape), **params)
    return QuantizedTensor(qdata, layout_cls.__name__, p).dequantize()


def comfy_decode(format_name: str, stored: dict, shape) -> torch.Tensor:
    """What ComfyUI computes from a layer's stored tensors (comfy-kitchen, not cq), sliced to the layer's
    ``shape`` as ComfyUI does for the padded block layouts. nvfp4 and mxfp8: the block scales; mxfp8's U8
    exponents go to comfy-kitchen as E8M0, as ComfyUI hands them; int8_tensorwise and FP8: ``weight_scale``."""
    if format_name == "nvfp4":
        full = comfy_dequantize(
            LAYOUTS["nvfp4"], stored["weight"], shape, scale=stored["weight_scale_2"],
            block_scale=stored["weight_scale"],
        )
        return full[: shape[0], : shape[1]]
    if format_name == "mxfp8":  # ComfyUI hands the U8 exponents to comfy-kitchen as E8M0
        full = comfy_dequantize(LAYOUTS["mxfp8"], stored["weight"], shape,
                                scale=stored["weight_scale"].view(torch.float8_e8m0fnu))
        return full[: shape[0], : shape[1]]
    layout = TensorWiseINT8Layout if format_name == "int8_tensorwise" else TensorCoreFP8Layout
    return comfy_dequantize(layout, stored["weight"], shape, scale=stored["weight_scale"])
