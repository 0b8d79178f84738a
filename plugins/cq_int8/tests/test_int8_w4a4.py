"""convrot_w4a4: cq's output read by comfy-kitchen's TensorCoreConvRotW4A4Layout and its linear."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from comfy_kitchen.backends.eager.convrot_w4a4 import quantize_convrot_w4a4_weight
from comfy_kitchen.backends.eager.svdquant import _unpack_int4_row_major
from comfy_kitchen.tensor import TensorCoreConvRotW4A4Layout
from comfy_kitchen.tensor.base import QuantizedTensor
from safetensors import safe_open

from cq_core import convert
from cq_core.numerics.metrics import tensor_sqnr_db, weight_sqnr_db
from cq_core.plugin.types import LayerInfo
from cq_int8.w4a4 import ConvrotW4A4Format, pack_nibbles, unpack_nibbles
from tests.comfy import comfy_dequantize
from tests.helpers import gaussian, small_model, write_checkpoint


def test_nibbles_put_the_even_column_low_and_read_back_signed():
    codes = torch.tensor([[1, -2, 7, -7, 0, -8]])
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.int8 and packed.shape == (1, 3)
    assert packed.view(torch.uint8).tolist() == [[0xE1, 0x97, 0x80]]
    assert torch.equal(unpack_nibbles(packed), codes.float())
    assert torch.equal(_unpack_int4_row_major(packed), codes.to(torch.int8))


@pytest.mark.parametrize("group", [16, 64, 256])
def test_stored_layout_matches_comfy_kitchen_and_decodes_identically(group):
    w = gaussian(40, 512, seed=group)
    fmt = ConvrotW4A4Format(convrot_groupsize=group, clip_search=False)  # absmax / 7, as comfy-kitchen
    stored = fmt.encode(w)
    specs = fmt.stored_specs(tuple(w.shape))
    assert stored["weight"].dtype == torch.int8 and stored["weight"].shape == specs["weight"].shape == (40, 256)
    assert stored["weight_scale"].dtype == torch.float32 and stored["weight_scale"].shape == (40,)
    assert fmt.layer_config(tuple(w.shape)) == {"format": "convrot_w4a4", "convrot_groupsize": group}
    q_ref, s_ref = quantize_convrot_w4a4_weight(w, group)
    codes, codes_ref = unpack_nibbles(stored["weight"]), unpack_nibbles(q_ref)
    assert (codes - codes_ref).abs().max() <= 1
    assert (codes != codes_ref).float().mean() < 1e-3
    torch.testing.assert_close(stored["weight_scale"], s_ref)
    comfy = comfy_dequantize(
        TensorCoreConvRotW4A4Layout, stored["weight"], w.shape, scale=stored["weight_scale"], convrot_groupsize=group
    )
    torch.testing.assert_close(comfy, fmt.decode(stored), atol=1e-6, rtol=1e-6)
    assert 15.0 < tensor_sqnr_db(w, comfy) < 18.0  # 4 bits, absmax/7 per rotated row


def test_comfy_w4a4_linear_on_our_weights_computes_x_w_t():
    w = gaussian(96, 1024, seed=3)
    x = gaussian(8, 1024, seed=4)
    x[:, [5, 300]] *= 30.0  # outlier channels
    fmt = ConvrotW4A4Format(convrot_groupsize=256, clip_search=True)
    stored = fmt.encode(w)
    params = TensorCoreConvRotW4A4Layout.Params(
        scale=stored["weight_scale"], orig_dtype=torch.float32, orig_shape=tuple(w.shape), convrot_groupsize=256
    )
    out = F.linear(x, QuantizedTensor(stored["weight"], "TensorCoreConvRotW4A4Layout", params))
    reference = x @ w.T
    # Weights and activations both 4-bit: about 13 dB; a misread layout gives ~0 dB or less.
    assert tensor_sqnr_db(reference, out) > 10.0
    # the weight-only part of that error is what cq decodes
    assert tensor_sqnr_db(reference, x @ fmt.decode(stored).T) > 17.0


def test_clip_search_gains_at_four_bits():
    w = gaussian(64, 1024)
    plain, clipped = ConvrotW4A4Format(clip_search=False), ConvrotW4A4Format(clip_search=True)
    assert weight_sqnr_db(clipped, w, clipped.encode(w)) > weight_sqnr_db(plain, w, plain.encode(w)) + 1.5  # about +2 dB


def test_group_falls_back_and_k_must_be_a_multiple_of_64():
    fmt = ConvrotW4A4Format(convrot_groupsize=1024)
    assert fmt.layer_config((8, 3072)) == {"format": "convrot_w4a4", "convrot_groupsize": 1024}
    assert fmt.layer_config((8, 192)) == {"format": "convrot_w4a4", "convrot_groupsize": 64}
    assert "ConvRot group 64: K=192" in fmt.layer_note((8, 192))
    assert "multiple of 64" in fmt.accepts(LayerInfo("a", (8, 96), torch.bfloat16))
    assert fmt.accepts(LayerInfo("a", (8, 192), torch.bfloat16)) is None


def test_to_grid_and_pack_agree_with_encode():
    fmt = ConvrotW4A4Format(convrot_groupsize=64)
    w = gaussian(16, 256)
    scales = fmt.compute_scales(w)
    grid = fmt.to_grid(w, scales)
    torch.testing.assert_close(fmt.to_grid(w[:, 64:192], scales, slice(64, 192)), grid[:, 64:192], atol=1e-6, rtol=0)
    packed = fmt.pack(grid, scales)
    encoded = fmt.encode(w)
    assert torch.equal(packed["weight"], encoded["weight"])
    torch.testing.assert_close(fmt.decode(encoded), grid, atol=1e-6, rtol=1e-6)


def test_convert_writes_w4a4_layers_comfyui_reads(tmp_path):
    source = write_checkpoint(tmp_path / "m.safetensors", small_model(torch.bfloat16))
    report = convert(source, tmp_path / "out.safetensors", format="convrot_w4a4")
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
    # K = 32 (qkv, fc1) is refused; fc2 has K = 128 and takes group 64
    assert layers == {"blocks.0.mlp.fc2": {"format": "convrot_w4a4", "convrot_groupsize": 64}}
    assert json.loads(bytes(tensors["blocks.0.mlp.fc2.comfy_quant"].tolist())) == layers["blocks.0.mlp.fc2"]
    assert tensors["blocks.0.mlp.fc2.weight"].shape == (32, 64)
    assert tensors["blocks.0.mlp.fc2.weight_scale"].shape == (32,)
    assert tensors["blocks.0.attn.qkv.weight"].dtype == torch.bfloat16
    kept = {t.name: t.reason for t in report.tensors if t.action == "keep"}
    assert "multiple of 64" in kept["blocks.0.attn.qkv.weight"]
    original = small_model(torch.bfloat16)["blocks.0.mlp.fc2.weight"].float()
    comfy = comfy_dequantize(
        TensorCoreConvRotW4A4Layout,
        tensors["blocks.0.mlp.fc2.weight"],
        original.shape,
        scale=tensors["blocks.0.mlp.fc2.weight_scale"],
        convrot_groupsize=64,
    )
    assert tensor_sqnr_db(original, comfy) > 14.0
