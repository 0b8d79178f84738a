"""cq_core.numerics.exact: arithmetic with the same bits on every device (checked here on the CPU;
bench/gpu_check.py checks CUDA against it), and the seeded low-rank SVD of the optimizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cq_core.builtin.rounding_objective import top_singular
from cq_core.numerics.exact import div, div_, sum_last


def values(n: int = 100_003, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 1e3


@pytest.mark.parametrize("divisor", [6.0, 448.0, 2688.0, 127, 7.0])
def test_div_is_the_correctly_rounded_quotient(divisor):
    x = values()
    expected = x.numpy() / np.float32(divisor)  # IEEE division in float32
    assert np.array_equal(div(x, divisor).numpy(), expected)
    assert np.array_equal(div(x, torch.tensor(float(divisor))).numpy(), expected)
    assert np.array_equal(div_(x.clone(), divisor).numpy(), expected)
    # The trap div avoids: multiplying by the reciprocal (CUDA's way with a CPU scalar) differs.
    if divisor not in (127,):
        assert not np.array_equal((x * (1 / divisor)).numpy(), expected)


def test_div_by_a_tensor_broadcasts_like_the_operator():
    x = values(12 * 5).reshape(12, 5)
    scale = torch.rand(12, 1, generator=torch.Generator().manual_seed(1)) + 0.5
    assert torch.equal(div(x, scale), x / scale)


@pytest.mark.parametrize("width", [1, 2, 3, 5, 16, 32, 33])
def test_sum_last_adds_pairwise_in_a_fixed_order(width):
    x = values(7 * width, seed=width).reshape(7, width)
    expected = x.double().sum(-1)
    assert torch.allclose(sum_last(x).double(), expected, rtol=1e-5, atol=1e-2)
    # The order is the documented one: neighbours pairwise, round after round.
    if width == 16:
        level = x
        while level.shape[-1] > 1:
            level = level[..., 0::2] + level[..., 1::2]
        assert torch.equal(sum_last(x), level[..., 0])
    if width == 3:
        assert torch.equal(sum_last(x), (x[:, 0] + x[:, 1]) + x[:, 2])


def test_sum_last_of_an_empty_dimension_is_zero():
    assert torch.equal(sum_last(torch.empty(3, 0)), torch.zeros(3))


@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
def test_top_singular_is_svd_lowrank_on_the_cpu_and_leaves_the_global_generator(shape):
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    ours = top_singular(a, 20, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(7)
    reference = torch.svd_lowrank(a, q=20, niter=2)
    for mine, theirs in zip(ours, reference):
        assert torch.equal(mine, theirs)
