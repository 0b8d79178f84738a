"""mxfp8 (in cq-fp8): stored layout decoded by comfy-kitchen (ComfyUI's own library) and by cq."""

from __future__ import annotations

import json

import pytest
import torch
from comfy_kitchen.backends.eager.quantization import quantize_mxfp8
from safetensors import safe_open

from cq_core import convert
from cq_core.errors import UsageError
from cq_core.numerics.metrics import tensor_sqnr_db
from cq_core.plugin.types import Format, LayerInfo
from cq_fp8.mxfp8 import Mxfp8Format, block_exponents
from tests.comfy import comfy_decode
from tests.helpers import gaussian, same_bits, small_model, write_checkpoint

# (100, 72) pads both dimensions; (33, 40) pads rows and a partial block; (128, 256) pads nothing.
SHAPES = [(100, 72), (33, 40), (128, 256), (32, 32)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rule", ["round_up", "floor"])
def test_comfy_kitchen_decodes_exactly_what_cq_decodes(shape, rule):
    weight = gaussian(*shape, seed=shape[1]).mul(0.02).to(torch.bfloat16)
    weight[:, :32] = 0  # all-zero blocks
    fmt = Mxfp8Format(scale_rule=rule)
    stored = fmt.encode(weight)
    for suffix, spec in fmt.stored_specs(shape).items():
        assert (stored[suffix].dtype, tuple(stored[suffix].shape)) == (spec.dtype, spec.shape), suffix
    ours = fmt.decode(stored)
    assert ours.shape == shape
    assert same_bits(comfy_decode("mxfp8", stored, shape), ours)
    assert same_bits(fmt.decode(dict(stored), shape=shape), ours)
    if shape[1] > 32:
        assert tensor_sqnr_db(weight.float(), ours) > (30 if rule == "round_up" else 28)


def test_stored_dtypes_and_shapes_follow_the_spec():
    specs = Mxfp8Format().stored_specs((100, 72))
    # the weight in its real FP8 dtype (ComfyUI value-casts), the exponents as plain bytes
    assert specs["weight"].dtype == torch.float8_e4m3fn and specs["weight"].shape == (128, 96)
    assert specs["weight_scale"].dtype == torch.uint8 and specs["weight_scale"].shape == (128, 4)
    assert set(specs) == {"weight", "weight_scale"}


def test_round_up_rule_matches_comfy_kitchens_own_quantizer_byte_for_byte():
    weight = gaussian(64, 96, seed=2)
    weight[3, :32] = 0
    stored = Mxfp8Format(scale_rule="round_up").encode(weight)
    codes, scales = quantize_mxfp8(weight)
    assert torch.equal(stored["weight"].view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(stored["weight_scale"], scales.view(torch.uint8))


def test_block_exponents_of_both_rules():
    amax = torch.tensor([448.0, 449.0, 256.0, 255.0, 500.0, 1.0, 0.0])
    # round_up: the smallest 2**(e-127) with amax / 2**(e-127) <= 448
    assert block_exponents(amax, "round_up").tolist() == [127, 128, 127, 127, 128, 119, 0]
    # floor (OCP): 2**(floor(log2 amax) - 8)
    assert block_exponents(amax, "floor").tolist() == [127, 127, 127, 126, 127, 119, 0]


def test_floor_rule_saturates_and_round_up_does_not_clip():
    weight = torch.full((1, 32), 1.0)
    weight[0, 0] = 500.0
    up, floor = Mxfp8Format().encode(weight), Mxfp8Format(scale_rule="floor").encode(weight)
    assert Mxfp8Format().decode(up)[0, 0] == 512.0  # 500 -> 250 * 2 rounds to 256 * 2 in e4m3
    assert Mxfp8Format().decode(floor)[0, 0] == 448.0


def test_to_grid_on_a_column_slice_matches_the_full_weight_and_pack_equals_encode():
    weight = gaussian(40, 100, seed=3)
    fmt = Mxfp8Format()
    scales = fmt.compute_scales(weight)
    full = fmt.to_grid(weight, scales)
    for cols in (slice(5, 70), slice(32, 64), slice(99, 100)):
        assert torch.equal(fmt.to_grid(weight[:, cols], scales, cols), full[:, cols])
    assert same_bits(full, fmt.decode(fmt.encode(weight)))
    packed, encoded = fmt.pack(full, scales), fmt.encode(weight, scales)
    assert torch.equal(packed["weight"].view(torch.uint8), encoded["weight"].view(torch.uint8))
    assert torch.equal(packed["weight_scale"], encoded["weight_scale"])


@pytest.mark.parametrize("amplitude", [1e-36, 1e36])
def test_extreme_magnitudes_stay_finite_and_exact(amplitude):
    weight = gaussian(32, 64, seed=10) * amplitude
    fmt = Mxfp8Format()
    stored = fmt.encode(weight)
    decoded = fmt.decode(stored)
    assert same_bits(comfy_decode("mxfp8", stored, (32, 64)), decoded)
    assert tensor_sqnr_db(weight, decoded) > 30


def test_grid_neighbours_bracket_each_element_and_agree_with_the_generic_search():
    weight = gaussian(32, 96, seed=11)
    weight[0, :32] = 0
    fmt = Mxfp8Format(scale_rule="round_up")
    scales = fmt.compute_scales(weight)
    below, above = fmt.grid_neighbours(weight, scales)
    nearest = fmt.to_grid(weight, scales)
    assert torch.equal(fmt.to_grid(below, scales), below) and torch.equal(fmt.to_grid(above, scales), above)
    assert bool(((below <= weight) & (weight <= above)).all())  # round_up never clips
    assert bool(((nearest == below) | (nearest == above)).all())
    assert bool((below < above)[weight != nearest].all())
    # the generic probe gives up on elements a hair from a grid point; where it finds both, they agree
    generic_below, generic_above = Format.grid_neighbours(fmt, weight, scales)
    found = generic_below < generic_above
    assert bool(found.float().mean() > 0.9)
    assert torch.equal(generic_below[found], below[found]) and torch.equal(generic_above[found], above[found])


def test_scales_off_the_power_of_two_grid_are_rounded_down_before_coding():
    weight = gaussian(32, 64, seed=12)
    fmt = Mxfp8Format()
    scales = fmt.compute_scales(weight)
    nudged = {"block_scale": scales["block_scale"] * 1.5}
    stored = fmt.encode(weight, nudged)
    assert torch.equal(stored["weight_scale"], fmt.encode(weight, scales)["weight_scale"])
    assert same_bits(fmt.decode(stored), fmt.to_grid(weight, scales))


def test_accepts_and_options():
    fmt = Mxfp8Format()
    reason = fmt.accepts(LayerInfo("blocks.0.proj", (100, 64), torch.bfloat16, bias_shape=(100,)))
    assert reason and "N=100" in reason
    assert fmt.accepts(LayerInfo("blocks.0.proj", (96, 64), torch.bfloat16, bias_shape=(96,))) is None
    assert fmt.accepts(LayerInfo("blocks.0.proj", (100, 72), torch.bfloat16)) is None
    with pytest.raises(UsageError, match="scale_rule"):
        Mxfp8Format(scale_rule="ceil")


def test_convert_writes_mxfp8_that_comfyui_decodes(tmp_path):
    model = {
        **small_model(torch.bfloat16),
        "blocks.0.odd.weight": gaussian(100, 72, seed=8).to(torch.bfloat16),
        "blocks.0.biased.weight": gaussian(40, 32, seed=9).to(torch.bfloat16),
        "blocks.0.biased.bias": torch.zeros(40, dtype=torch.bfloat16),
    }
    source = write_checkpoint(tmp_path / "m.safetensors", model)
    report = convert(source, tmp_path / "out.safetensors", format="mxfp8")
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    layers = json.loads(metadata["_quantization_metadata"])["layers"]
    assert set(layers) == {"blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.0.odd"}
    fmt = Mxfp8Format()
    for layer, config in layers.items():
        assert config == {"format": "mxfp8"}
        assert json.loads(bytes(tensors[f"{layer}.comfy_quant"].tolist())) == config
        shape = tuple(model[f"{layer}.weight"].shape)
        stored = {s: tensors[f"{layer}.{s}"] for s in ("weight", "weight_scale")}
        for suffix, spec in fmt.stored_specs(shape).items():
            assert (stored[suffix].dtype, tuple(stored[suffix].shape)) == (spec.dtype, spec.shape)
        decoded = comfy_decode("mxfp8", stored, shape)
        assert same_bits(decoded, fmt.decode(stored, shape=shape))
        assert tensor_sqnr_db(model[f"{layer}.weight"].float(), decoded) > 30
    assert tensors["blocks.0.odd.weight"].shape == (128, 96)
    assert tensors["blocks.0.biased.weight"].dtype == torch.bfloat16
    assert "N=40" in next(t.reason for t in report.tensors if t.name == "blocks.0.biased.weight")
    assert all(t.sqnr_db > 30 for t in report.quantized)
