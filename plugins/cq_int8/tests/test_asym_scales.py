"""asym_w4a8_int8's exact fp8 group scales against brute force over every e4m3 value.

"Optimal" (``cq_int8.asym_w4a8.exact_group_scales``): per group of targets (the rotated weight
over its row's ``s_channel``), the e4m3 ``s_rel`` whose INT8 grid ``clamp(round(level * s),
±127)`` (comfy-kitchen's decode) leaves the least :func:`~cq_int8.asym_w4a8.grid_errors`, over
all 126 positive finite e4m3 values; of equal errors the smallest; for the Lloyd-Max codebook
cq writes by default and for uniform codes.
"""

from __future__ import annotations

import pytest
import torch

from cq_int8.asym_w4a8 import (
    LLOYD_MAX_LEVELS,
    UNIFORM_LEVELS,
    AsymW4A8Int8Format,
    exact_group_scales,
    grid_errors,
    int8_levels,
)

E4M3 = torch.arange(1, 127, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def brute_force(target: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    flat = target.reshape(-1, target.shape[-1])
    errors = torch.stack([grid_errors(flat, int8_levels(levels, value.expand(flat.shape[0]))) for value in E4M3])
    first = (errors == errors.amin(dim=0)).float().argmax(dim=0)
    return E4M3[first].reshape(target.shape[:2])


def targets(name: str) -> torch.Tensor:
    if name == "gauss":
        return torch.randn(16, 64, 16, generator=generator(0)) * 30
    if name == "student_t":
        return torch.distributions.StudentT(torch.tensor(3.0)).sample((16, 64, 16)) * 20
    if name == "full_range":
        return (torch.rand(16, 64, 16, generator=generator(1)) * 2 - 1) * 127
    if name == "tiny":  # below one INT8 step: most scales round everything to 0
        return torch.randn(16, 16, 16, generator=generator(2)) * 0.3
    t = torch.randn(16, 64, 16, generator=generator(3)) * 30
    t[:, ::4] = 0.0
    return t


@pytest.mark.parametrize("codebook", ["lloyd_max", "uniform"])
@pytest.mark.parametrize("name", ["gauss", "student_t", "full_range", "tiny", "zeros"])
def test_the_search_is_the_brute_force_optimum(name, codebook):
    torch.manual_seed(0)
    levels = torch.tensor(LLOYD_MAX_LEVELS if codebook == "lloyd_max" else UNIFORM_LEVELS)
    target = targets(name).clamp(-127, 127)
    assert torch.equal(exact_group_scales(target, levels), brute_force(target, levels))


def test_the_format_chooses_and_stores_them():
    weight = torch.randn(64, 256, generator=generator(4)) * 0.02
    fmt = AsymW4A8Int8Format()
    scales = fmt.compute_scales(weight)
    rotated = fmt.grid_basis((64, 256)).into(weight)
    target = rotated.reshape(64, -1, 16) / scales["weight_s_channel"].reshape(-1, 1, 1)
    assert torch.equal(scales["weight_s_rel"], exact_group_scales(target, fmt.levels()))
    stored = fmt.encode(weight)
    assert torch.equal(stored["weight_s_rel"].float(), scales["weight_s_rel"])


def brute_force_weighted(target: torch.Tensor, levels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    flat = target.reshape(-1, target.shape[-1])
    errors = torch.stack(
        [grid_errors(flat, int8_levels(levels, value.expand(flat.shape[0])), weights) for value in E4M3]
    )
    first = (errors == errors.amin(dim=0)).float().argmax(dim=0)
    return E4M3[first].reshape(target.shape[:2])


@pytest.mark.parametrize("codebook", ["lloyd_max", "uniform"])
@pytest.mark.parametrize("name", ["gauss", "student_t", "tiny"])
def test_with_column_weights_zeros_included(name, codebook):
    levels = torch.tensor(LLOYD_MAX_LEVELS if codebook == "lloyd_max" else UNIFORM_LEVELS)
    target = targets(name).clamp(-127, 127)
    weights = torch.rand(16, generator=generator(5)) ** 3 * 10
    weights[3] = 0.0
    assert torch.equal(exact_group_scales(target, levels, weights=weights), brute_force_weighted(target, levels, weights))


def test_gptq_refits_each_group_in_the_rotated_basis():
    # The view optimizers see has 16-column scale blocks; refit_scales sets one group's exact
    # weighted s_rel for the values given and leaves the other groups and s_channel alone.
    weight = torch.randn(32, 256, generator=generator(6)) * 0.02
    view = AsymW4A8Int8Format().grid_basis((32, 256)).format
    assert view.scale_block == 16 and AsymW4A8Int8Format().scale_block is None
    rotated = AsymW4A8Int8Format().grid_basis((32, 256)).into(weight)
    scales = view.compute_scales(rotated)
    before = {k: v.clone() for k, v in scales.items()}
    values = rotated[:, 32:48] * 1.7
    importance = torch.rand(16, generator=generator(7))
    view.refit_scales(values, scales, slice(32, 48), importance)
    target = (values / scales["weight_s_channel"].reshape(-1, 1)).unsqueeze(1)
    assert torch.equal(scales["weight_s_rel"][:, 2], exact_group_scales(target, view.levels(), weights=importance)[:, 0])
    assert not torch.equal(scales["weight_s_rel"][:, 2], before["weight_s_rel"][:, 2])
    others = [i for i in range(16) if i != 2]
    assert torch.equal(scales["weight_s_rel"][:, others], before["weight_s_rel"][:, others])
    assert torch.equal(scales["weight_s_channel"], before["weight_s_channel"])


def test_gptq_with_refit_group_scales_beats_it_without():
    from cq_core.plugin.manager import get_registry
    from cq_core.plugin.types import OptimizeContext

    registry = get_registry()
    fmt = registry.format("asym_w4a8_int8")()
    w = torch.randn(64, 256, generator=generator(0)) * 0.02
    x = torch.randn(2000, 256, generator=generator(1)) * (torch.rand(256, generator=generator(2)) * 3)
    h = x.T @ x / 2000

    def output_error(refit: bool) -> float:
        result = registry.optimizer("gptq")(refit_scales=refit).optimize_layer(
            w, fmt, OptimizeContext(layer="a", stats={"H": h})
        )
        error = fmt.decode(result.tensors) - w
        return float(((error @ h) * error).sum())

    assert output_error(True) < output_error(False) * 0.9
