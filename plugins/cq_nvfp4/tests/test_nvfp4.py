"""cq-nvfp4: every stored layout decoded by comfy-kitchen (ComfyUI's own library) and by cq."""

from __future__ import annotations

import json

import pytest
import torch

from cq_core import convert
from cq_core.errors import UsageError
from cq_core.numerics.metrics import tensor_sqnr_db, weight_sqnr_db
from cq_core.plugin.types import Format, LayerInfo
from cq_nvfp4 import e2m1
from cq_nvfp4.block_scales import choose_block_scales
from cq_nvfp4.nvfp4 import Nvfp4Format
from tests.comfy import comfy_decode
from tests.helpers import gaussian, load, same_bits, small_model, write_checkpoint

# (100, 72) pads both dimensions; (33, 40) pads rows and a partial block; (128, 256) pads nothing.
SHAPES = [(100, 72), (33, 40), (128, 256), (16, 16)]


# -- the layout, against comfy-kitchen ------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale_search", [True, False])
def test_comfy_kitchen_decodes_exactly_what_cq_decodes(shape, scale_search):
    weight = gaussian(*shape, seed=shape[0]).to(torch.bfloat16)
    fmt = Nvfp4Format(scale_search=scale_search)
    stored = fmt.encode(weight)
    for suffix, spec in fmt.stored_specs(shape).items():
        assert (stored[suffix].dtype, tuple(stored[suffix].shape)) == (spec.dtype, spec.shape), suffix
    ours = fmt.decode(stored)
    assert ours.shape == shape
    assert same_bits(comfy_decode("nvfp4", stored, shape), ours)
    # tensors read back from a file carry no shape: the caller gives it
    assert same_bits(fmt.decode(dict(stored), shape=shape), ours)
    assert tensor_sqnr_db(weight.float(), ours) > 19.5


def test_stored_shapes_follow_the_spec():
    specs = Nvfp4Format().stored_specs((100, 72))
    assert specs["weight"].shape == (112, 40) and specs["weight"].dtype == torch.uint8
    # 80 padded columns -> 5 blocks -> padded to 8; 112 rows -> 128
    assert specs["weight_scale"].shape == (128, 8) and specs["weight_scale"].dtype == torch.float8_e4m3fn
    assert specs["weight_scale_2"].shape == () and specs["weight_scale_2"].dtype == torch.float32
    assert "input_scale" not in specs


def test_even_element_goes_to_the_high_nibble():
    # One block per row holding exactly representable values: amax 6 maps to block scale 448
    # times g = 6 / (448 * 6), so each value is its own E2M1 code.
    row = torch.tensor([6.0, 1.0, -0.5, 3.0] * 4)
    weight = torch.stack([row, row.flip(0)])
    stored = Nvfp4Format(scale_search=False).encode(weight)
    packed = stored["weight"]
    assert packed[0, 0] == 0x72  # 6 -> code 7 (high), 1 -> code 2 (low)
    assert packed[0, 1] == 0x95  # -0.5 -> code 9 (high), 3 -> code 5 (low)
    assert packed[1, 0] == 0x59  # the flipped row: 3 then -0.5
    assert torch.equal(comfy_decode("nvfp4", stored, weight.shape), weight)


def test_block_scales_index_by_column_through_the_swizzle():
    # Each (row, block) gets its own magnitude: a misplaced scale decodes the wrong magnitude.
    n, k = 130, 80
    magnitude = torch.arange(1, n * (k // 16) + 1, dtype=torch.float32).reshape(n, k // 16)
    weight = magnitude.repeat_interleave(16, dim=1) * torch.tensor([1.0, -0.5] * (k // 2))
    fmt = Nvfp4Format(scale_search=False)
    stored = fmt.encode(weight)
    decoded = comfy_decode("nvfp4", stored, (n, k))
    assert same_bits(decoded, fmt.decode(stored))
    assert tensor_sqnr_db(weight, decoded) > 30  # only e4m3 rounding of the block scales


# -- the grid, for optimizers ----------------------------------------------------------


def test_e2m1_rounding_is_nearest_with_ties_to_even_for_both_signs():
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    grid = torch.cat([-grid.flip(0), grid])
    x = torch.linspace(-7, 7, 5601)
    got = e2m1.nearest(x)
    distance = (x[:, None] - grid[None, :]).abs()
    closest = grid[distance.argmin(dim=1)]
    tie = (distance.sort(dim=1).values[:, 1] - distance.min(dim=1).values) < 1e-6
    assert torch.equal(got[~tie], closest[~tie])
    ties = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0}
    for value, expected in ties.items():
        assert e2m1.nearest(torch.tensor([value, -value])).tolist() == [expected, -expected], value
    values = e2m1.VALUES[:8]
    assert e2m1.codes(torch.cat([values, -values[1:]])).tolist() == [*range(8), *range(9, 16)]


def test_to_grid_on_a_column_slice_matches_the_full_weight():
    weight = gaussian(48, 100)
    fmt = Nvfp4Format()
    scales = fmt.compute_scales(weight)
    full = fmt.to_grid(weight, scales)
    for cols in (slice(5, 37), slice(16, 32), slice(99, 100), slice(0, 1)):
        assert torch.equal(fmt.to_grid(weight[:, cols], scales, cols), full[:, cols])
    assert same_bits(full, fmt.decode(fmt.encode(weight)))


def test_pack_of_grid_values_equals_encode():
    weight = gaussian(40, 72, seed=3)
    fmt = Nvfp4Format()
    scales = fmt.compute_scales(weight)
    packed, encoded = fmt.pack(fmt.to_grid(weight, scales), scales), fmt.encode(weight, scales)
    assert set(packed) == set(encoded)
    assert torch.equal(packed["weight"], encoded["weight"])
    assert torch.equal(packed["weight_scale"].view(torch.uint8), encoded["weight_scale"].view(torch.uint8))
    assert torch.equal(packed["weight_scale_2"], encoded["weight_scale_2"])


def test_scales_off_the_e4m3_grid_are_rounded_before_coding():
    weight = gaussian(32, 48, seed=12)
    fmt = Nvfp4Format()
    scales = fmt.compute_scales(weight)
    nudged = {**scales, "block_scale": scales["block_scale"] * 1.01}
    representable = {**scales, "block_scale": nudged["block_scale"].to(torch.float8_e4m3fn).float()}
    assert torch.equal(fmt.encode(weight, nudged)["weight"], fmt.encode(weight, representable)["weight"])
    assert same_bits(fmt.decode(fmt.encode(weight, nudged)), fmt.to_grid(weight, representable))


def test_grid_neighbours_bracket_each_element_on_the_grid():
    weight = gaussian(32, 64, seed=4)
    fmt = Nvfp4Format()
    scales = fmt.compute_scales(weight)
    below, above = fmt.grid_neighbours(weight, scales)
    nearest = fmt.to_grid(weight, scales)
    assert torch.equal(fmt.to_grid(below, scales), below) and torch.equal(fmt.to_grid(above, scales), above)
    step = scales["weight_scale_2"] * scales["block_scale"].repeat_interleave(16, dim=1)
    inside = weight.abs() <= 6 * step  # scale search may clip a block's largest element: one neighbour
    assert bool(inside.float().mean() > 0.9)
    assert bool(((below <= weight) & (weight <= above))[inside].all())
    assert bool(((nearest == below) | (nearest == above)).all())
    # the generic probe gives up on elements a hair from a grid point; where it finds both, they agree
    generic_below, generic_above = Format.grid_neighbours(fmt, weight, scales)
    found = generic_below < generic_above
    assert bool(found.float().mean() > 0.8)
    assert torch.equal(generic_below[found], below[found]) and torch.equal(generic_above[found], above[found])


def test_scale_search_never_loses_on_a_block_and_gains_about_a_db():
    weight = gaussian(256, 256, seed=5)
    blocks = weight.reshape(256, -1, 16)
    g = weight.abs().amax() / (448 * 6)
    errors = {}
    for name, search in (("amax", False), ("search", True)):
        block_scale, values = choose_block_scales(blocks, g, search)
        scale = (g * block_scale).unsqueeze(-1)
        decoded = e2m1.nearest(blocks / scale) * scale
        assert torch.equal(values * scale, decoded)
        errors[name] = (decoded - blocks).square().sum(dim=-1)
    assert bool((errors["search"] <= errors["amax"]).all())
    plain = weight_sqnr_db(Nvfp4Format(scale_search=False), weight, Nvfp4Format(scale_search=False).encode(weight))
    searched = weight_sqnr_db(Nvfp4Format(), weight, Nvfp4Format().encode(weight))
    assert 0.6 < searched - plain < 1.5


def test_an_all_zero_weight_decodes_to_zeros():
    fmt = Nvfp4Format()
    stored = fmt.encode(torch.zeros(20, 24))
    assert torch.equal(fmt.decode(stored), torch.zeros(20, 24))
    assert torch.equal(comfy_decode("nvfp4", stored, (20, 24)), torch.zeros(20, 24))


@pytest.mark.parametrize("amplitude", [1e-30, 1e30])
def test_extreme_magnitudes_stay_finite_and_exact(amplitude):
    weight = gaussian(32, 48, seed=10) * amplitude
    fmt = Nvfp4Format()
    stored = fmt.encode(weight)
    decoded = fmt.decode(stored)
    assert bool(torch.isfinite(decoded).all())
    assert same_bits(comfy_decode("nvfp4", stored, (32, 48)), decoded)
    assert tensor_sqnr_db(weight, decoded) > 19.5


def test_decode_rows_is_a_slice_of_decode():
    weight = gaussian(50, 40, seed=6)
    fmt = Nvfp4Format()
    stored = fmt.encode(weight)
    assert same_bits(fmt.decode_rows(stored, 17, 50), fmt.decode(stored)[17:50])


# -- what the format takes, and its options --------------------------------------------


def test_bias_with_unpadded_n_is_refused_and_the_rest_is_taken():
    fmt = Nvfp4Format()
    reason = fmt.accepts(LayerInfo("blocks.0.proj", (100, 64), torch.bfloat16, bias_shape=(100,)))
    assert reason and "N=100" in reason
    assert fmt.accepts(LayerInfo("blocks.0.proj", (96, 64), torch.bfloat16, bias_shape=(96,))) is None
    assert fmt.accepts(LayerInfo("double_blocks.0.img_attn.qkv", (100, 72), torch.bfloat16)) is None
    assert fmt.accepts(LayerInfo("double_blocks.0.img_in_proj", (96, 64), torch.bfloat16)) is None


def test_input_scale_is_written_only_when_asked_for():
    fmt = Nvfp4Format(input_scale="0.25")
    assert fmt.stored_specs((32, 32))["input_scale"].shape == ()
    stored = fmt.encode(gaussian(32, 32))
    assert stored["input_scale"].dtype == torch.float32 and float(stored["input_scale"]) == 0.25
    assert "input_scale" not in Nvfp4Format().encode(gaussian(32, 32))
    with pytest.raises(UsageError, match="scale_search"):
        Nvfp4Format(scale_search="maybe")


# -- a whole checkpoint through cq_core.commands.convert ---------------------------------------------


@pytest.mark.needs_plugins("cq_models.plugin")
def test_convert_writes_nvfp4_that_comfyui_decodes(tmp_path):
    model = {
        **small_model(torch.bfloat16),
        "img_in.weight": gaussian(64, 32, seed=7).to(torch.bfloat16),
        # With FLUX's QK norm beside it, ComfyUI reads img_in's shape to detect the model.
        "double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(16, dtype=torch.bfloat16),
        "blocks.0.odd.weight": gaussian(100, 72, seed=8).to(torch.bfloat16),
        "blocks.0.biased.weight": gaussian(40, 32, seed=9).to(torch.bfloat16),
        "blocks.0.biased.bias": torch.zeros(40, dtype=torch.bfloat16),
    }
    source = write_checkpoint(tmp_path / "m.safetensors", model)
    report = convert(source, tmp_path / "out.safetensors", format="nvfp4")
    tensors, metadata = load(tmp_path / "out.safetensors")
    layers = json.loads(metadata["_quantization_metadata"])["layers"]
    assert set(layers) == {"blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.0.odd"}
    fmt = Nvfp4Format()
    for layer, config in layers.items():
        assert config == {"format": "nvfp4"}
        assert json.loads(bytes(tensors[f"{layer}.comfy_quant"].tolist())) == config
        shape = tuple(model[f"{layer}.weight"].shape)
        stored = {s: tensors[f"{layer}.{s}"] for s in ("weight", "weight_scale", "weight_scale_2")}
        for suffix, spec in fmt.stored_specs(shape).items():
            assert (stored[suffix].dtype, tuple(stored[suffix].shape)) == (spec.dtype, spec.shape)
        assert f"{layer}.input_scale" not in tensors
        decoded = comfy_decode("nvfp4", stored, shape)
        assert same_bits(decoded, fmt.decode(stored, shape=shape))
        assert tensor_sqnr_db(model[f"{layer}.weight"].float(), decoded) > 19.5
    assert tensors["blocks.0.odd.weight"].shape == (112, 40)
    for kept in ("img_in.weight", "blocks.0.biased.weight", "embed_tokens.weight"):
        assert tensors[kept].dtype == torch.bfloat16 and torch.equal(tensors[kept], model[kept])
    reasons = {t.name: t.reason for t in report.tensors}
    assert "detect the model" in reasons["img_in.weight"]
    assert "N=40" in reasons["blocks.0.biased.weight"]
    assert all(t.sqnr_db > 19.5 for t in report.quantized)


def test_refit_scales_rechooses_one_block_and_weights_columns_by_importance():
    weight = gaussian(24, 48, seed=13)
    weight[0, 0] = 20.0  # the global scale stays the same for the shifted block below
    fmt = Nvfp4Format()
    scales = fmt.compute_scales(weight)
    before = scales["block_scale"].clone()
    shifted = weight[:, 16:32] * 0.3
    refit = fmt.refit_scales(shifted, scales, slice(16, 32))
    # Only block 1 changes, to what compute_scales picks for those values.
    assert torch.equal(refit["block_scale"][:, [0, 2]], before[:, [0, 2]])
    alone = fmt.compute_scales(torch.cat([weight[:, :16], shifted, weight[:, 32:]], 1))
    assert torch.equal(refit["block_scale"][:, 1], alone["block_scale"][:, 1])
    # With one column all that matters, the block's scale serves that column best.
    importance = torch.full((16,), 1e-6)
    importance[3] = 1.0
    focused = fmt.refit_scales(shifted, fmt.compute_scales(weight), slice(16, 32), importance)
    def column_error(s):
        return float((fmt.to_grid(shifted, s, slice(16, 32))[:, 3] - shifted[:, 3]).square().sum())
    assert column_error(focused) <= column_error(refit)
