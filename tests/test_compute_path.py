"""The compute path (activations quantized as on a GPU) against comfy-kitchen's eager backend.

Activation quantization is compared bit for bit with comfy-kitchen's own quantize/dequantize
functions. Whole-layer outputs of the integer formats are compared with a tolerance: the eager
kernels multiply integer codes first and scale afterwards, cq multiplies dequantized values,
so the two differ by float32 rounding of the sums (relative 1e-5 bounds it).
"""

from __future__ import annotations

import pytest
import torch
from comfy_kitchen.backends.eager import convrot_w4a4 as eager_w4a4
from comfy_kitchen.backends.eager import quantization as eager
from comfy_kitchen.float_utils import from_blocked

from cq_core.numerics.compute_path import layer_output, stored_weight
from cq_core.plugin.manager import get_registry
from cq_fp8.float8 import Float8E4M3Format, Float8E5M2Format
from cq_fp8.mxfp8 import Mxfp8Format
from cq_int8.tensorwise import Int8TensorwiseFormat
from cq_int8.w4a4 import ConvrotW4A4Format
from cq_nvfp4.nvfp4 import Nvfp4Format


def activations(rows, k, seed=0, outliers=True):
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    if outliers:  # a few large channels, as in real activations
        x[:, ::17] *= 30.0
    return x


def same_bits(a, b):
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


@pytest.mark.parametrize("fmt_cls", [Float8E4M3Format, Float8E5M2Format])
@pytest.mark.parametrize("input_scale", [None, 0.01, 0.5])
def test_fp8_activation_is_comfy_kitchens_static_quantization(fmt_cls, input_scale):
    x = activations(7, 48)
    fmt = fmt_cls()
    tensors = {} if input_scale is None else {"input_scale": torch.tensor(input_scale)}
    scale = torch.tensor(1.0 if input_scale is None else input_scale)
    expected = eager.dequantize_per_tensor_fp8(eager.quantize_per_tensor_fp8(x, scale, fmt.dtype), scale, torch.float32)
    assert same_bits(fmt.activation_fake_quant(x, tensors), expected)
    if input_scale == 0.01:  # values beyond 448 * 0.01 clamp, as ComfyUI clamps them
        assert float(fmt.activation_fake_quant(x, tensors).abs().max()) <= fmt.max_value * 0.01 * (1 + 1e-6)


@pytest.mark.parametrize("shape", [(5, 64), (3, 40), (2, 3, 32)])
@pytest.mark.parametrize("input_scale", [None, 0.004])
def test_nvfp4_activation_is_comfy_kitchens_two_level_quantization(shape, input_scale):
    x = activations(int(torch.tensor(shape[:-1]).prod()), shape[-1]).reshape(shape)
    rows = x.reshape(-1, shape[-1])
    k = shape[-1]
    g = torch.amax(rows.abs()) / (448.0 * 6.0) if input_scale is None else torch.tensor(input_scale)
    codes, blocked = eager.quantize_nvfp4(rows, g, pad_16x=k % 16 != 0)
    expected = eager.dequantize_nvfp4(codes, g, blocked, torch.float32)[: rows.shape[0], :k].reshape(shape)
    tensors = {} if input_scale is None else {"input_scale": torch.tensor(input_scale)}
    assert same_bits(Nvfp4Format().activation_fake_quant(x, tensors), expected)


def test_nvfp4_pre_quant_scale_multiplies_the_input_first():
    x = activations(6, 64)
    smoothing = torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.5
    g = torch.amax((x * smoothing).abs()) / (448.0 * 6.0)
    codes, blocked = eager.quantize_nvfp4(x * smoothing, g)
    expected = eager.dequantize_nvfp4(codes, g, blocked, torch.float32)
    assert same_bits(Nvfp4Format().activation_fake_quant(x, {"pre_quant_scale": smoothing}), expected)


def test_mxfp8_activation_is_comfy_kitchens_block_quantization():
    for k in (64, 40):
        x = activations(9, k)
        x[0, :32] = 0.0  # an all-zero block stays zero
        codes, blocked = eager.quantize_mxfp8(x, pad_32x=k % 32 != 0)
        expected = eager.dequantize_mxfp8(codes, blocked, torch.float32)[:9, :k]
        assert same_bits(Mxfp8Format().activation_fake_quant(x, {}), expected)


@pytest.mark.parametrize("convrot", [False, True])
def test_int8_activation_codes_are_comfy_kitchens_per_row_codes(convrot):
    x = activations(5, 64)
    fmt = Int8TensorwiseFormat(scaling="row", convrot=convrot, convrot_groupsize=16)
    tensors = fmt.encode(torch.randn(8, 64))
    seen = fmt.activation_fake_quant(x, tensors)
    if convrot:
        h = eager._build_hadamard(16, dtype=torch.float32)
        codes, scale = eager.quantize_and_rotate_rowwise(x, h, 16)
        expected = eager._rotate_activation(codes.float() * scale, h, 16)
    else:
        codes, scale = eager.quantize_int8_rowwise(x)
        expected = codes.float() * scale
    assert same_bits(seen, expected)


@pytest.mark.parametrize("convrot", [False, True])
def test_int8_layer_output_matches_comfy_kitchens_int8_linear(convrot):
    x = activations(6, 64, seed=1)
    weight, bias = torch.randn(24, 64), torch.randn(24)
    fmt = Int8TensorwiseFormat(scaling="row", convrot=convrot, convrot_groupsize=16)
    tensors = fmt.encode(weight)
    expected = eager.int8_linear(
        x, tensors["weight"], tensors["weight_scale"], bias, torch.float32, convrot=convrot, convrot_groupsize=16
    )
    ours = layer_output(fmt, x, tensors, (24, 64), bias)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_convrot_w4a4_layer_output_matches_comfy_kitchens_eager_linear():
    x = activations(6, 128, seed=2)
    weight = torch.randn(32, 128)
    fmt = ConvrotW4A4Format(convrot_groupsize=64)
    tensors = fmt.encode(weight)
    expected = eager_w4a4.convrot_w4a4_linear(x, tensors["weight"], tensors["weight_scale"], convrot_groupsize=64)
    ours = layer_output(fmt, x, tensors, (32, 128))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_fp8_and_nvfp4_layer_outputs_are_the_dequantized_product():
    """comfy-kitchen's fallback without the hardware kernel: linear(dequantize(x), dequantize(w))."""
    x, weight = activations(4, 64, seed=4), torch.randn(16, 64)
    fmt = Float8E4M3Format(input_scale=0.05)
    tensors = fmt.encode(weight)
    xq = eager.dequantize_per_tensor_fp8(
        eager.quantize_per_tensor_fp8(x, tensors["input_scale"]), tensors["input_scale"], torch.float32
    )
    expected = torch.nn.functional.linear(xq, fmt.decode(tensors))
    assert same_bits(layer_output(fmt, x, tensors, (16, 64)), expected)
    # nvfp4 with pre_quant_scale: the matmul sees quant(x * s) and the weight as stored.
    nv = Nvfp4Format()
    smoothing = torch.rand(64, generator=torch.Generator().manual_seed(5)) + 0.5
    stored = {**nv.encode(weight / smoothing), "pre_quant_scale": smoothing}
    raw = nv.decode({k: v for k, v in stored.items() if k != "pre_quant_scale"}, (16, 64))
    assert same_bits(stored_weight(nv, stored, (16, 64)), raw)
    expected = torch.nn.functional.linear(nv.activation_fake_quant(x, stored), raw)
    assert same_bits(layer_output(nv, x, stored, (16, 64)), expected)


def test_every_format_says_whether_it_quantizes_activations():
    registry = get_registry()
    x = activations(3, 64)
    quantizing = set()
    for name, fmt_cls in registry.formats.items():
        fmt = fmt_cls()
        if fmt.accepts(__import__("cq_core").LayerInfo("l", (16, 64), torch.float32)):
            continue
        tensors = fmt.encode(torch.randn(16, 64))
        seen = fmt.activation_fake_quant(x, tensors)
        if seen is not None:
            assert seen.shape == x.shape and seen.dtype == torch.float32 and not torch.equal(seen, x)
            quantizing.add(name)
    # ComfyUI 0.30 quantizes the inputs of these (comfy/quant_ops.py, comfy-kitchen's int8 kernels).
    assert {"float8_e4m3fn", "float8_e5m2", "nvfp4", "mxfp8", "int8_tensorwise", "convrot_w4a4"} <= quantizing
    assert from_blocked is not None
