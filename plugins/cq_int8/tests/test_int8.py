"""cq-int8: every variant decoded by comfy-kitchen (ComfyUI's own layout library) and by cq."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from comfy_kitchen.backends.eager.quantization import (
    quantize_int8_convrot_weight,
    quantize_int8_rowwise,
    quantize_int8_tensorwise,
)
from comfy_kitchen.tensor import TensorWiseINT8Layout
from comfy_kitchen.tensor.base import QuantizedTensor

from cq_core import convert
from cq_core.errors import CqError, UsageError
from cq_core.numerics.metrics import tensor_sqnr_db, weight_sqnr_db
from cq_core.plugin.types import LayerInfo
from cq_int8.blockwise import Int8BlockwiseFormat
from cq_int8.hadamard import regular_hadamard, rotate_groups, unrotate_groups
from cq_int8.tensorwise import Int8TensorwiseFormat
from tests.cli_runner import run_cq
from tests.comfy import comfy_dequantize
from tests.helpers import gaussian, load, small_model, write_checkpoint


def student_t(n, k, seed=0):
    torch.manual_seed(seed)
    return torch.distributions.StudentT(4.0).sample((n, k))


# -- the rotation -------------------------------------------------------------------


@pytest.mark.parametrize("group", [16, 64, 256, 1024])
def test_hadamard_is_the_normalized_kronecker_power_and_its_own_inverse(group):
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64)
    expected = h4
    while expected.shape[0] < group:
        expected = torch.kron(expected, h4)
    h = regular_hadamard(group, torch.float64)
    assert torch.equal(h, expected / group**0.5)
    x = gaussian(3, 2 * group)
    torch.testing.assert_close(rotate_groups(rotate_groups(x, group), group), x, atol=1e-5, rtol=0)
    # group-wise: each block of G columns is multiplied by H on its own
    torch.testing.assert_close(rotate_groups(x, group)[:, group:], x[:, group:] @ h.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("group", [64, 256])
def test_rotation_into_the_basis_is_correctly_rounded_whatever_the_order_of_addition(group):
    # The bytes of a rotated format must not depend on how a device's matmul adds up:
    # the float64 sum of exact products, rounded once, is the same in any order.
    x = gaussian(32, 2 * group, seed=group)
    h = regular_hadamard(group, torch.float64)
    rotated = rotate_groups(x, group)
    blocks = x.double().reshape(32, 2, group)
    reverse = torch.arange(group - 1, -1, -1)
    forward = (blocks @ h).reshape(32, -1).float()
    backward = (blocks[..., reverse] @ h[reverse]).reshape(32, -1).float()
    assert torch.equal(rotated, forward) and torch.equal(rotated, backward)
    # A float32 product is not: its last bits depend on the order.
    assert not torch.equal((x.reshape(32, 2, group) @ h.float()).reshape(32, -1), forward)
    # Decoding rotates back in float32, as ComfyUI does.
    torch.testing.assert_close(unrotate_groups(rotated, group), x, atol=1e-5, rtol=0)


# -- int8_tensorwise, per tensor and per row ----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_row_matches_comfy_kitchen_quantizer_and_decoder(dtype):
    w = gaussian(48, 80).to(dtype)
    fmt = Int8TensorwiseFormat(clip_search=False)  # comfy-kitchen's quantizer: absmax / 127
    stored = fmt.encode(w)
    assert stored["weight"].dtype == torch.int8
    assert stored["weight_scale"].shape == (48, 1)  # (N, 1), never (N,)
    q_ref, s_ref = quantize_int8_rowwise(w.float())
    assert torch.equal(stored["weight"], q_ref)
    torch.testing.assert_close(stored["weight_scale"], s_ref, rtol=0, atol=0)
    comfy = comfy_dequantize(TensorWiseINT8Layout, stored["weight"], w.shape, scale=stored["weight_scale"])
    assert torch.equal(comfy, fmt.decode(stored))


def test_per_tensor_matches_comfy_kitchen_quantizer_and_decoder():
    w = gaussian(40, 72)
    fmt = Int8TensorwiseFormat(scaling="tensor")
    stored = fmt.encode(w)
    assert stored["weight_scale"].shape == ()
    q_ref, s_ref = quantize_int8_tensorwise(w)
    assert torch.equal(stored["weight"], q_ref)
    assert float(stored["weight_scale"]) == float(s_ref)
    comfy = comfy_dequantize(TensorWiseINT8Layout, stored["weight"], w.shape, scale=stored["weight_scale"])
    assert torch.equal(comfy, fmt.decode(stored))
    assert fmt.layer_config((40, 72)) == {"format": "int8_tensorwise"}


def test_sqnr_matches_the_quality_reference():
    # QUALITY.md, 4096x4096: per tensor 38.4 dB, per row 41.2 dB. Fewer, longer rows
    # keep the per-row absmax statistics (and so the SQNR) close to the reference.
    w = gaussian(256, 4096)
    tensor = weight_sqnr_db(Int8TensorwiseFormat(scaling="tensor"), w, Int8TensorwiseFormat(scaling="tensor").encode(w))
    row = weight_sqnr_db(Int8TensorwiseFormat(), w, Int8TensorwiseFormat().encode(w))
    assert 40.5 < row < 42.0
    assert 37.5 < tensor < row


# -- ConvRot ---------------------------------------------------------------------------


@pytest.mark.parametrize("group", [16, 64, 256])
def test_convrot_codes_match_comfy_kitchen_and_comfy_decodes_ours(group):
    w = gaussian(24, 512, seed=group)
    fmt = Int8TensorwiseFormat(convrot=True, convrot_groupsize=group, clip_search=False)  # absmax, as comfy-kitchen
    stored = fmt.encode(w)
    assert fmt.layer_config(tuple(w.shape)) == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": group}
    assert stored["weight_scale"].shape == (24, 1)
    q_ref, s_ref = quantize_int8_convrot_weight(w, group)
    assert (stored["weight"].int() - q_ref.int()).abs().max() <= 1
    assert (stored["weight"] != q_ref).float().mean() < 1e-3
    torch.testing.assert_close(stored["weight_scale"], s_ref.reshape(24, 1))
    comfy = comfy_dequantize(
        TensorWiseINT8Layout, stored["weight"], w.shape, scale=stored["weight_scale"], convrot=True, convrot_groupsize=group
    )
    torch.testing.assert_close(comfy, fmt.decode(stored), atol=1e-6, rtol=1e-6)
    assert tensor_sqnr_db(w, comfy) > 40


def test_comfy_int8_linear_with_convrot_on_our_weights_computes_x_w_t():
    w = gaussian(64, 512, seed=1)
    x = gaussian(16, 512, seed=2)
    x[:, [3, 100, 400]] *= 40.0  # a few outlier channels, what ConvRot is for
    fmt = Int8TensorwiseFormat(convrot=True, convrot_groupsize=256)
    stored = fmt.encode(w)
    params = TensorWiseINT8Layout.Params(
        scale=stored["weight_scale"], orig_dtype=torch.float32, orig_shape=tuple(w.shape), convrot=True, convrot_groupsize=256
    )
    out = F.linear(x, QuantizedTensor(stored["weight"], "TensorWiseINT8Layout", params))
    reference = x @ w.T
    # W8A8 with per-row activation scales; the rotation spreads the outliers.
    assert tensor_sqnr_db(reference, out) > 33
    plain = Int8TensorwiseFormat().encode(w)
    params = TensorWiseINT8Layout.Params(scale=plain["weight_scale"], orig_dtype=torch.float32, orig_shape=tuple(w.shape))
    out_plain = F.linear(x, QuantizedTensor(plain["weight"], "TensorWiseINT8Layout", params))
    assert tensor_sqnr_db(reference, out) > tensor_sqnr_db(reference, out_plain) + 3


def test_convrot_falls_back_per_layer_and_says_so():
    fmt = Int8TensorwiseFormat(convrot=True, convrot_groupsize=1024)
    assert fmt.layer_config((8, 3072))["convrot_groupsize"] == 1024
    assert fmt.layer_note((8, 3072)) is None
    assert fmt.layer_config((8, 96)) == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 16}
    assert "ConvRot group 16" in fmt.layer_note((8, 96))
    assert fmt.layer_config((8, 40)) == {"format": "int8_tensorwise"}
    assert "ConvRot off" in fmt.layer_note((8, 40))
    w = gaussian(8, 96)
    stored = fmt.encode(w)
    comfy = comfy_dequantize(
        TensorWiseINT8Layout, stored["weight"], w.shape, scale=stored["weight_scale"], convrot=True, convrot_groupsize=16
    )
    torch.testing.assert_close(comfy, fmt.decode(stored), atol=1e-6, rtol=1e-6)
    unrotated = fmt.encode(gaussian(8, 40))
    assert torch.equal(unrotated["weight"], quantize_int8_rowwise(gaussian(8, 40))[0])


def test_convrot_needs_per_row_scales_and_a_power_of_four_group():
    with pytest.raises(UsageError, match="scaling=row"):
        Int8TensorwiseFormat(convrot=True, scaling="tensor")
    with pytest.raises(UsageError, match="convrot_groupsize"):
        Int8TensorwiseFormat(convrot=True, convrot_groupsize="128")
    with pytest.raises(UsageError, match="scaling"):
        Int8TensorwiseFormat(scaling="column")


# -- the optimizer interface: to_grid on column slices, pack, chunked encode ------------------


@pytest.mark.parametrize(
    "fmt",
    [
        Int8TensorwiseFormat(),
        Int8TensorwiseFormat(scaling="tensor"),
        Int8TensorwiseFormat(clip_search=True),
        Int8BlockwiseFormat(block_size=16),
    ],
    ids=["row", "tensor", "row-clip", "block16"],
)
def test_to_grid_on_a_column_slice_equals_the_slice_of_to_grid(fmt):
    w = student_t(32, 96)
    scales = fmt.compute_scales(w)
    full = fmt.to_grid(w, scales)
    cols = slice(21, 70)  # deliberately not on a tile boundary
    torch.testing.assert_close(fmt.to_grid(w[:, cols], scales, cols), full[:, cols], rtol=0, atol=0)
    packed = fmt.pack(full, scales)
    encoded = fmt.encode(w)
    for suffix, tensor in encoded.items():
        assert torch.equal(packed[suffix], tensor), suffix
    torch.testing.assert_close(fmt.decode(packed), full, rtol=0, atol=0)


@pytest.mark.parametrize(
    "fmt", [Int8TensorwiseFormat(), Int8TensorwiseFormat(scaling="tensor"), Int8BlockwiseFormat(block_size=16)],
    ids=["row", "tensor", "block16"],
)
def test_grid_neighbours_bracket_and_include_the_nearest(fmt):
    w = student_t(32, 64) * 3.0
    scales = fmt.compute_scales(w)
    scales["weight_scale"] = scales["weight_scale"] * 0.5  # clip some elements at the range
    cols = slice(7, 40)
    below, above = fmt.grid_neighbours(w[:, cols], scales, cols)
    nearest = fmt.to_grid(w[:, cols], scales, cols)
    assert bool(((nearest == below) | (nearest == above)).all())
    inside = (below < above)
    assert bool((below[inside] <= w[:, cols][inside]).all() and (w[:, cols][inside] <= above[inside]).all())
    for value in (below, above):  # both lie on the grid
        torch.testing.assert_close(fmt.to_grid(value, scales, cols), value, rtol=0, atol=0)
    assert bool((below == above).any())  # clamped elements have one neighbour


def test_convrot_to_grid_takes_whole_groups_only():
    fmt = Int8TensorwiseFormat(convrot=True, convrot_groupsize=16)
    w = gaussian(8, 64)
    scales = fmt.compute_scales(w)
    full = fmt.to_grid(w, scales)
    torch.testing.assert_close(fmt.to_grid(w[:, 16:48], scales, slice(16, 48)), full[:, 16:48], atol=1e-6, rtol=0)
    with pytest.raises(CqError, match="whole groups of 16.*grid_basis"):
        fmt.to_grid(w[:, 5:21], scales, slice(5, 21))
    with pytest.raises(CqError, match="whole groups of 16"):
        fmt.grid_neighbours(w, scales)
    assert torch.equal(fmt.pack(full, scales)["weight"], fmt.encode(w)["weight"])


@pytest.mark.parametrize(
    "fmt",
    [Int8TensorwiseFormat(), Int8TensorwiseFormat(scaling="tensor", clip_search=True),
     Int8TensorwiseFormat(convrot=True, convrot_groupsize=16), Int8BlockwiseFormat(block_size=8)],
    ids=["row", "tensor-clip", "convrot", "block8"],
)
def test_chunked_encode_equals_one_shot(fmt, monkeypatch):
    w = gaussian(64, 48)
    whole = fmt.encode(w)
    monkeypatch.setattr("cq_int8.rows.rows_per_chunk", lambda shape: 5)
    monkeypatch.setattr("cq_int8.blockwise.CHUNK_ELEMENTS", 48 * 8)
    chunked = fmt.encode(w)
    for suffix in whole:
        assert torch.equal(whole[suffix], chunked[suffix]), suffix
    assert torch.equal(fmt.decode_rows(whole, 10, 27), fmt.decode(whole)[10:27])


# -- clipping search ---------------------------------------------------------------------


def test_clip_search_is_never_worse_per_row_and_rescues_a_heavy_tailed_tensor_scale():
    w = student_t(64, 2048)
    plain, clipped = Int8TensorwiseFormat(clip_search=False), Int8TensorwiseFormat(clip_search=True)
    assert Int8TensorwiseFormat().clip_search()  # on by default with per-row scales
    a, b = plain.encode(w), clipped.encode(w)
    row_err_plain = (plain.decode(a) - w).square().sum(1)
    row_err_clip = (clipped.decode(b) - w).square().sum(1)
    assert bool((row_err_clip <= row_err_plain * (1 + 1e-6)).all())
    assert bool((row_err_clip < row_err_plain).any())
    # clipped codes still decode the same in ComfyUI
    comfy = comfy_dequantize(TensorWiseINT8Layout, b["weight"], w.shape, scale=b["weight_scale"])
    assert torch.equal(comfy, clipped.decode(b))
    # One scale for a whole heavy-tailed tensor is where clipping pays most: +2.3 dB
    # here, about +7.7 dB on 4096x4096 where the absmax is more extreme.
    plain, clipped = Int8TensorwiseFormat(scaling="tensor"), Int8TensorwiseFormat(scaling="tensor", clip_search=True)
    assert weight_sqnr_db(clipped, w, clipped.encode(w)) > weight_sqnr_db(plain, w, plain.encode(w)) + 1.5


# -- int8_blockwise ----------------------------------------------------------------------


def test_blockwise_tiles_decode_like_comfy_int8_per_tile():
    # No comfy-kitchen layout reads tile scales (only a deprecated custom node does);
    # each tile is a tensor-wise INT8 tensor with its own scale, so decode tile by tile.
    b = 32
    w = student_t(96, 128)
    fmt = Int8BlockwiseFormat(block_size=b, clip_search=True)
    stored = fmt.encode(w)
    assert stored["weight_scale"].shape == (3, 4)
    assert fmt.layer_config((96, 128)) == {"format": "int8_blockwise", "group_size": b}
    decoded = fmt.decode(stored)
    for i in range(3):
        for j in range(4):
            tile = stored["weight"][i * b : (i + 1) * b, j * b : (j + 1) * b].contiguous()
            comfy = comfy_dequantize(TensorWiseINT8Layout, tile, (b, b), scale=stored["weight_scale"][i, j])
            assert torch.equal(comfy, decoded[i * b : (i + 1) * b, j * b : (j + 1) * b])
    assert weight_sqnr_db(fmt, w, stored) > 25


def test_blockwise_refuses_shapes_the_tiles_do_not_cover():
    fmt = Int8BlockwiseFormat()
    assert fmt.accepts(LayerInfo("a", (256, 384), torch.bfloat16)) is None
    reason = fmt.accepts(LayerInfo("a", (256, 200), torch.bfloat16))
    assert "multiples of block_size 128" in reason
    assert not Int8BlockwiseFormat.comfy_loadable
    assert Int8BlockwiseFormat.comfy_alternative == "int8_tensorwise"


def test_cli_says_comfyui_does_not_load_blockwise(tmp_path, capsys):
    source = write_checkpoint(tmp_path / "m.safetensors", small_model())
    listing = run_cq(capsys, "formats", "--json")
    rows = {r["name"]: r for r in json.loads(listing.out)}
    assert rows["int8_blockwise"]["comfy_loadable"] is False
    assert rows["int8_tensorwise"]["comfy_loadable"] is True
    assert rows["convrot_w4a4"]["comfy_loadable"] is True
    result = run_cq(capsys, "convert", source, "--format", "int8_blockwise", "-O", "block_size=32", "--dry-run")
    assert result.code == 0, result.err
    assert "does not load 'int8_blockwise'" in result.err and "'int8_tensorwise'" in result.err


# -- a whole checkpoint through cq_core.commands.convert ---------------------------------------------


def test_convert_writes_per_row_int8_with_both_metadata_carriers(tmp_path):
    source = write_checkpoint(tmp_path / "m.safetensors", small_model(torch.bfloat16))
    report = convert(source, tmp_path / "out.safetensors", format="int8_tensorwise")
    tensors, metadata = load(tmp_path / "out.safetensors")
    layers = json.loads(metadata["_quantization_metadata"])["layers"]
    assert set(layers) == {"blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"}
    original = small_model(torch.bfloat16)
    for layer, config in layers.items():
        assert config == {"format": "int8_tensorwise"}
        assert json.loads(bytes(tensors[f"{layer}.comfy_quant"].tolist())) == config
        q, scale = tensors[f"{layer}.weight"], tensors[f"{layer}.weight_scale"]
        n = original[f"{layer}.weight"].shape[0]
        assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (n, 1)
        comfy = comfy_dequantize(TensorWiseINT8Layout, q, q.shape, scale=scale)
        assert tensor_sqnr_db(original[f"{layer}.weight"].float(), comfy) > 38
    assert tensors["embed_tokens.weight"].dtype == torch.bfloat16
    assert all(t.sqnr_db > 38 for t in report.quantized)


def test_convert_with_convrot_records_each_layers_group(tmp_path):
    source = write_checkpoint(tmp_path / "m.safetensors", small_model(torch.float32))
    options = {"convrot": "true", "convrot_groupsize": "256", "clip_search": "true"}
    report = convert(source, tmp_path / "out.safetensors", format="int8_tensorwise", format_options=options)
    tensors, metadata = load(tmp_path / "out.safetensors")
    layers = json.loads(metadata["_quantization_metadata"])["layers"]
    # K = 32 for qkv and fc1, 128 for fc2: neither takes 256, each gets the largest group that fits
    assert layers["blocks.0.attn.qkv"] == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 16}
    assert layers["blocks.0.mlp.fc2"] == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 64}
    reasons = {t.name: t.reason for t in report.quantized}
    assert "ConvRot group 64: K=128" in reasons["blocks.0.mlp.fc2.weight"]
    original = small_model(torch.float32)["blocks.0.mlp.fc2.weight"]
    q, scale = tensors["blocks.0.mlp.fc2.weight"], tensors["blocks.0.mlp.fc2.weight_scale"]
    assert scale.shape == (32, 1)
    comfy = comfy_dequantize(TensorWiseINT8Layout, q, q.shape, scale=scale, convrot=True, convrot_groupsize=64)
    assert tensor_sqnr_db(original, comfy) > 38


def test_convert_blockwise_keeps_layers_it_cannot_tile(tmp_path):
    model = {**small_model(torch.float32), "blocks.0.odd.weight": gaussian(40, 64)}
    source = write_checkpoint(tmp_path / "m.safetensors", model)
    report = convert(source, tmp_path / "out.safetensors", format="int8_blockwise", format_options={"block_size": "32"})
    tensors, metadata = load(tmp_path / "out.safetensors")
    layers = json.loads(metadata["_quantization_metadata"])["layers"]
    assert layers["blocks.0.mlp.fc1"] == {"format": "int8_blockwise", "group_size": 32}
    assert tensors["blocks.0.mlp.fc1.weight_scale"].shape == (4, 1)
    assert tensors["blocks.0.mlp.fc2.weight_scale"].shape == (1, 4)
    assert "blocks.0.odd" not in layers and tensors["blocks.0.odd.weight"].dtype == torch.float32
    kept = next(t for t in report.tensors if t.name == "blocks.0.odd.weight")
    assert kept.action == "keep" and "multiples of block_size 32" in kept.reason
