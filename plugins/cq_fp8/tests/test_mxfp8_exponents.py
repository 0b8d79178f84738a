"""MXFP8's exact E8M0 exponent rule against brute force over every exponent.

"Optimal" (``cq_fp8.mxfp8.exact_exponents``): per block of 32, the biased exponent whose
:func:`~cq_fp8.mxfp8.exponent_errors` (the block's squared error with each element rounded to
nearest e4m3 under that power of two, saturating at 448) is least; of equal errors the one
nearest the round_up exponent (then the lower); 0 for an all-zero block. The brute force
evaluates every exponent within 40 of round_up (further away float32 under- or overflows the
error's unit; the proof in the docstring covers those).
"""

from __future__ import annotations

import math

import pytest
import torch

from cq_fp8.mxfp8 import Mxfp8Format, block_exponents, exact_exponents, exponent_errors, exponent_values
from tests.comfy import LAYOUTS, comfy_dequantize

REACH = 40


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def brute_force(blocks: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    up = block_exponents(blocks.abs().amax(-1), "round_up")
    steps = range(-REACH, REACH + 1)
    errors = torch.stack([exponent_errors(blocks, (up + d).clamp(1, 254), up, weights) for d in steps])
    valid = torch.stack([((up + d) >= 1) & ((up + d) <= 254) for d in steps])
    errors = torch.where(valid, errors, math.inf)
    # the least error; of equal ones the nearest to round_up, then the lower
    rank = torch.tensor([2 * abs(d) + (d > 0) for d in steps], dtype=torch.float32).reshape(-1, *([1] * up.dim()))
    ranked = torch.where(errors == errors.amin(dim=0), rank, math.inf)
    chosen = ranked.argmin(dim=0) - REACH + up
    return torch.where(blocks.abs().amax(-1) > 0, chosen, 0).to(torch.int32)


def cases():
    gauss = torch.randn(64, 16, 32, generator=generator(0))
    # elements down to 1e-7 of their block's largest: e4m3 subnormals, where lower exponents win
    wide = torch.randn(64, 16, 32, generator=generator(1)) * torch.logspace(-7, 0, 32)
    spiky = torch.randn(64, 16, 32, generator=generator(2))
    spiky[:, :, 0] *= 1e5
    sparse = gauss * (torch.rand(64, 16, 32, generator=generator(3)) < 0.1)
    zeros = gauss.clone()
    zeros[::3] = 0.0
    tiny = torch.randn(16, 16, 32, generator=generator(4)) * 1e-38
    return {"gauss": gauss, "wide": wide, "spiky": spiky, "sparse": sparse, "zeros": zeros, "tiny": tiny}


@pytest.mark.parametrize("name", ["gauss", "wide", "spiky", "sparse", "zeros", "tiny"])
def test_the_exact_rule_is_the_brute_force_optimum(name):
    blocks = cases()[name]
    assert torch.equal(exact_exponents(blocks), brute_force(blocks))


def test_with_column_weights():
    blocks = torch.randn(64, 16, 32, generator=generator(5)) * torch.logspace(-7, 0, 32)
    weights = torch.rand(32, generator=generator(6)) * 3
    weights[4] = 0.0
    assert torch.equal(exact_exponents(blocks, weights), brute_force(blocks, weights))


def test_it_is_round_up_byte_for_byte_where_nothing_reaches_the_subnormals_and_wins_where_something_does():
    exact, round_up = Mxfp8Format(), Mxfp8Format(scale_rule="round_up")
    assert exact.opts["scale_rule"] == "exact"  # the default
    # magnitudes within a factor 3 of each other: no block reaches e4m3's subnormals
    narrow = (torch.rand(128, 256, generator=generator(7)) + 0.5) * torch.randn(128, 256, generator=generator(8)).sign()
    assert torch.equal(exact.encode(narrow)["weight_scale"], round_up.encode(narrow)["weight_scale"])
    spread = torch.randn(128, 256, generator=generator(9)) * torch.logspace(-6, 0, 256)
    errors = [float((f.decode(f.encode(spread)) - spread).double().square().sum()) for f in (exact, round_up)]
    assert errors[0] <= errors[1]
    # 3 * 2**-9 is e4m3's third subnormal: exact one exponent below round_up, where 448.01 clips by 0.01
    block = torch.full((1, 1, 32), 3 * 2.0**-9)
    block[0, 0, 0] = 448.01
    up = int(block_exponents(block.abs().amax(-1), "round_up"))
    assert int(exact_exponents(block)) == up - 1
    unit = torch.tensor([[up]], dtype=torch.int32)
    assert float(exponent_errors(block, unit - 1, unit)) < float(exponent_errors(block, unit, unit))


def test_exact_scales_decode_in_comfy_kitchen_as_in_cq():
    weight = (torch.randn(64, 96, generator=generator(8)) * torch.logspace(-6, 0, 96)).to(torch.bfloat16)
    fmt = Mxfp8Format()
    stored = fmt.encode(weight)
    comfy = comfy_dequantize(
        LAYOUTS["mxfp8"], stored["weight"], (64, 96), torch.float32, scale=stored["weight_scale"].view(torch.float8_e8m0fnu)
    )[:64, :96]
    assert torch.equal(comfy, fmt.decode(stored, shape=(64, 96)))
    assert torch.equal(fmt.compute_scales(weight)["block_scale"], exponent_values(exact_exponents(
        weight.float().reshape(64, 3, 32))))
