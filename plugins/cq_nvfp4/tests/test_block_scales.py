"""The exact NVFP4 block-scale search against brute force over every e4m3 code.

"Optimal" (``cq_nvfp4.block_scales.exact_block_scales``): per block, the e4m3 scale whose
:func:`~cq_nvfp4.block_scales.block_errors` (the block's squared error, float32, one fixed
order of addition) is least over all 126 positive finite e4m3 values; of equal errors the
smallest scale; an all-zero block gets 0. The brute force below evaluates all 126.
"""

from __future__ import annotations

import math

import pytest
import torch

from cq_nvfp4 import e2m1
from cq_nvfp4.block_scales import (
    E4M3_VALUES,
    block_errors,
    choose_block_scales,
    exact_block_scales,
    global_scale,
    neighbour_block_scales,
    searched_global_scale,
)
from cq_nvfp4.nvfp4 import Nvfp4Format


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def brute_force(blocks: torch.Tensor, g: torch.Tensor, importance: torch.Tensor | None = None):
    """(scales (n, nb), errors (126, n * nb)): the first least error over every code 1..0x7E."""
    n, nb, _ = blocks.shape
    magnitudes = blocks.reshape(-1, 16).abs().T.contiguous()
    if importance is None:
        weights = None
    elif importance.dim() == 1:
        weights = importance.float().reshape(16, 1)
    else:
        weights = importance.float().T.repeat(1, n)
    errors = torch.stack([block_errors(magnitudes, g, value.expand(n * nb), weights) for value in E4M3_VALUES[1:]])
    first = (errors == errors.amin(dim=0)).float().argmax(dim=0)  # argmax: the first True
    scales = torch.where(magnitudes.amax(dim=0) > 0, E4M3_VALUES[1:][first], 0.0)
    return scales.reshape(n, nb), errors


def assert_exact(blocks, g, importance=None):
    expected, _ = brute_force(blocks, g, importance)
    got = exact_block_scales(blocks, g, importance)
    assert torch.equal(got, expected), f"{int((got != expected).sum())} of {got.numel()} blocks differ"


def tensors():
    gauss = torch.randn(48, 64, 16, generator=generator(0))
    student = torch.distributions.StudentT(3.0).sample((48, 64, 16))
    # Rows from 1e-8 to 1 of the largest: block scales deep in e4m3's subnormals.
    wide = torch.randn(48, 64, 16, generator=generator(1)) * torch.logspace(-8, 0, 48).reshape(48, 1, 1)
    # Values on the E2M1 grid times powers of two: many blocks with several exact scales (ties).
    grid = e2m1.VALUES[torch.randint(0, 16, (48, 64, 16), generator=generator(2))]
    grid = grid * 2.0 ** torch.randint(-3, 3, (48, 64, 1), generator=generator(3)).float()
    sparse = gauss * (torch.rand(48, 64, 16, generator=generator(4)) < 0.1)
    zeros = gauss.clone()
    zeros[::3, ::2] = 0.0
    return {"gauss": gauss, "student_t": student, "wide": wide, "grid": grid, "sparse": sparse, "zeros": zeros}


@pytest.mark.parametrize("name", ["gauss", "student_t", "wide", "grid", "sparse", "zeros"])
def test_the_search_is_the_brute_force_optimum(name):
    torch.manual_seed(0)
    blocks = tensors()[name]
    assert_exact(blocks, global_scale(blocks.abs().amax()))


@pytest.mark.parametrize("factor", [1 / 8, 0.37, 1.0, 1.9, 64.0])
def test_any_global_scale_even_one_that_clips_the_largest_blocks(factor):
    blocks = torch.randn(32, 64, 16, generator=generator(5))
    assert_exact(blocks, global_scale(blocks.abs().amax()) * factor)


@pytest.mark.parametrize("g", [1e-30, 1e30, 1e-38])
def test_global_scales_at_float32s_limits(g):
    blocks = torch.randn(8, 32, 16, generator=generator(6))
    assert_exact(blocks, torch.tensor(g))


def test_importance_weights_per_column_and_per_block_zeros_included():
    blocks = torch.distributions.StudentT(3.0).sample((32, 48, 16))
    g = global_scale(blocks.abs().amax())
    shared = torch.rand(16, generator=generator(7)) * 3
    shared[3] = 0.0
    assert_exact(blocks, g, shared)
    per_block = torch.rand(48, 16, generator=generator(8)) * 3
    per_block[::5, :] = 0.0  # whole blocks whose columns cost nothing
    per_block[1::5, 7] = 0.0
    assert_exact(blocks, g, per_block)


def test_all_zero_blocks_get_a_zero_scale_and_decode_to_zero():
    blocks = torch.zeros(4, 8, 16)
    blocks[1, 2, 5] = 1e-3
    scales, values = choose_block_scales(blocks, torch.tensor(1e-3 / 2688), "exact")
    assert int((scales == 0).sum()) == 31 and float(scales[1, 2]) > 0
    assert torch.equal(values[scales == 0], torch.zeros(31, 16))


def test_it_never_loses_to_the_neighbours_search_and_wins_about_half_a_db():
    weight = torch.randn(256, 1024, generator=generator(9)) * 0.02
    blocks = weight.reshape(256, -1, 16)
    g = global_scale(weight.abs().amax())
    magnitudes = blocks.reshape(-1, 16).abs().T.contiguous()
    exact = block_errors(magnitudes, g, exact_block_scales(blocks, g).reshape(-1))
    old, _ = neighbour_block_scales(blocks, g)
    neighbours = block_errors(magnitudes, g, old.reshape(-1))
    assert bool((exact <= neighbours).all())
    gain = 10 * torch.log10(neighbours.double().sum() / exact.double().sum())
    assert 0.3 < float(gain) < 0.8


# -- the global scale ----------------------------------------------------------------------


def total_error(weight: torch.Tensor, g: torch.Tensor) -> float:
    """Every block at its brute-force optimum at global scale ``g``: the absolute total."""
    blocks = weight.reshape(weight.shape[0], -1, 16)
    scales, errors = brute_force(blocks, g)
    chosen = errors.gather(0, torch.searchsorted(E4M3_VALUES[1:], scales.reshape(1, -1)).clamp(max=125))
    chosen = torch.where(scales.reshape(1, -1) > 0, chosen, 0.0)
    return float(chosen.double().sum()) * float(g) ** 2


@pytest.mark.parametrize("name", ["gauss", "wide", "one_outlier"])
def test_the_global_scale_is_the_best_power_of_two_multiple(name):
    weight = torch.randn(64, 256, generator=generator(10))
    if name == "wide":  # rows down to 1e-7 of the largest: subnormal block scales
        weight = weight * torch.logspace(-7, 0, 64).reshape(64, 1)
    elif name == "one_outlier":  # one huge element pushes every other block into the subnormals
        weight[0, 0] = 3e4
    fmt = Nvfp4Format()
    g = fmt.compute_scales(weight)["weight_scale_2"]
    start = searched_global_scale(weight.abs().amax())
    totals = {k: total_error(weight, start * 2.0**k) for k in (1, 0, -1, -2, -3)}
    chosen = round(math.log2(float(g / start)))
    assert totals[chosen] == min(totals.values())
    # never more error than ComfyUI's amax / 2688 with the same exact block scales
    assert totals[chosen] <= total_error(weight, global_scale(weight.abs().amax()))
    if name == "one_outlier":
        assert chosen < 0  # the lower octaves rescue the small blocks
