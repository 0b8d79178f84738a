"""cq_core.numerics.blockscale: the cuBLAS block-scale swizzle, checked against its published layout and comfy-kitchen."""

from __future__ import annotations

import pytest
import torch
from comfy_kitchen.float_utils import from_blocked, to_blocked

from cq_core.numerics.blockscale import (
    PaddedTensors,
    block_amax,
    roundup,
    scales_per_column,
    swizzle,
    swizzled_shape,
    unpadded_shape,
    unswizzle,
    unswizzle_rows,
)

SHAPES = [(1, 1), (5, 3), (128, 4), (130, 9), (256, 8), (300, 13)]


def numbered(rows, cols):
    return torch.arange(rows * cols, dtype=torch.int32).reshape(rows, cols)


def cublas_offset(r: int, c: int, padded_cols: int) -> int:
    """Where cuBLAS reads block scale (r, c): 512-entry tiles of 128x4, row r%128 split as 32 x 4."""
    tile = (r // 128) * (padded_cols // 4) + c // 4
    inner = r % 128
    return tile * 512 + (inner % 32) * 16 + (inner // 32) * 4 + c % 4


@pytest.mark.parametrize("shape", SHAPES)
def test_swizzle_puts_every_scale_where_cublas_reads_it(shape):
    rows, cols = shape
    stored = swizzle(numbered(rows, cols))
    assert tuple(stored.shape) == swizzled_shape(rows, cols) == (roundup(rows, 128), roundup(cols, 4))
    flat = stored.flatten()
    for r in range(rows):
        for c in range(cols):
            assert flat[cublas_offset(r, c, stored.shape[1])] == r * cols + c
    padding = torch.ones(stored.shape, dtype=torch.bool).flatten()
    for r in range(rows):
        for c in range(cols):
            padding[cublas_offset(r, c, stored.shape[1])] = False
    assert bool((flat[padding] == 0).all())


@pytest.mark.parametrize("shape", SHAPES)
def test_swizzle_round_trip_and_agreement_with_comfy_kitchen(shape):
    rows, cols = shape
    scales = torch.randint(0, 255, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    stored = swizzle(scales)
    assert torch.equal(unswizzle(stored, rows, cols), scales)
    assert torch.equal(stored, to_blocked(scales, flatten=False))
    assert torch.equal(from_blocked(stored, rows, cols), scales)


@pytest.mark.parametrize("shape", [(130, 9), (300, 13), (256, 8)])
def test_unswizzling_a_row_range_touches_only_its_tiles_and_matches_the_whole(shape):
    rows, cols = shape
    scales = torch.randint(0, 255, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    stored = swizzle(scales)
    for start, stop in [(0, 1), (0, rows), (5, 40), (120, 140), (127, 129), (rows - 3, rows), (rows - 1, rows + 50)]:
        assert torch.equal(unswizzle_rows(stored, rows, cols, start, stop), scales[start:stop]), (start, stop)
    # Rows past the first tile never read the first tile: poison it and decode later rows.
    poisoned = stored.clone()
    poisoned[:128] = 255
    assert torch.equal(unswizzle_rows(poisoned, rows, cols, 128, rows), scales[128:])


def test_swizzle_keeps_float8_scales_bit_for_bit():
    scales = torch.rand(40, 6).mul(400).to(torch.float8_e4m3fn)
    stored = swizzle(scales.view(torch.uint8)).view(torch.float8_e4m3fn)
    assert torch.equal(unswizzle(stored.view(torch.uint8), 40, 6).view(torch.float8_e4m3fn).float(), scales.float())


def test_unswizzle_refuses_a_matrix_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"\(128, 4\)"):
        unswizzle(torch.zeros(128, 8), 100, 3)


def test_block_amax_pads_the_last_block_with_zeros():
    weight = torch.tensor([[1.0, -3.0, 2.0, 0.5, -7.0], [0.0, 0.0, 0.0, 0.0, 0.25]])
    assert torch.equal(block_amax(weight, 2), torch.tensor([[3.0, 2.0, 7.0], [0.0, 0.0, 0.25]]))


def test_scales_per_column_follows_the_columns_position_in_the_full_weight():
    block_scales = torch.tensor([[1.0, 2.0, 3.0]])
    # columns 14..21 of a weight with 16-wide blocks: two in block 0, six in block 1
    got = scales_per_column(block_scales, 16, slice(14, 22), 8)
    assert got.tolist() == [[1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]]
    with pytest.raises(ValueError):
        scales_per_column(block_scales, 16, slice(0, 8, 2), 4)


def test_padded_tensors_carry_the_unpadded_shape():
    stored = PaddedTensors({"weight": torch.zeros(16, 8)}, (10, 12))
    assert unpadded_shape(stored, None, (16, 16)) == (10, 12)
    assert unpadded_shape(stored, (9, 9), (16, 16)) == (9, 9)
    assert unpadded_shape(dict(stored), None, (16, 16)) == (16, 16)
