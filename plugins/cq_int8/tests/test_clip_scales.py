"""The integer clipping search against brute force over every candidate ratio.

"Optimal" (``cq_int8.scales``): per group, of the scales ``scale_from_amax(absmax * 2**(-j/n))``,
``n`` 64 at 8 bits and 32 at 4, ``j = 0 .. 4n``, the one of least :func:`~cq_int8.scales.group_errors` (the group's
squared error, float32, one fixed order of addition); of equal errors the larger scale.
"""

from __future__ import annotations

import pytest
import torch

from cq_int8.blockwise import Int8BlockwiseFormat
from cq_int8.scales import (
    OCTAVES,
    clip_ratio,
    exact_clip_scales,
    group_errors,
    scale_from_amax,
    steps_per_octave,
    tensor_scale,
)
from cq_int8.tensorwise import Int8TensorwiseFormat
from cq_int8.w4a4 import ConvrotW4A4Format


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def brute_force(groups: torch.Tensor, qmax: int) -> torch.Tensor:
    amax = groups.abs().amax(dim=1, keepdim=True)
    steps = OCTAVES * steps_per_octave(qmax)
    scales = torch.stack([scale_from_amax(amax * clip_ratio(j, qmax), qmax) for j in range(steps + 1)])
    errors = torch.stack([group_errors(groups, scale, qmax) for scale in scales])  # (steps, rows)
    first = (errors == errors.amin(dim=0)).float().argmax(dim=0)  # the first: the largest scale
    return scales[first, torch.arange(groups.shape[0])]


def groups_of(name: str) -> torch.Tensor:
    if name == "gauss":
        return torch.randn(64, 512, generator=generator(0))
    if name == "student_t":
        return torch.distributions.StudentT(torch.tensor(2.5)).sample((64, 512))
    if name == "outliers":
        g = torch.randn(64, 512, generator=generator(1))
        g[:, :3] *= 40
        return g
    if name == "on_grid":  # integers times one scale: absmax exact, ties everywhere else
        return torch.randint(-127, 128, (64, 512), generator=generator(2)).float() * 0.01
    g = torch.randn(64, 512, generator=generator(3))
    g[::4] = 0.0  # all-zero groups
    return g


@pytest.mark.parametrize("qmax", [127, 7])
@pytest.mark.parametrize("name", ["gauss", "student_t", "outliers", "on_grid", "zeros"])
def test_the_search_is_the_brute_force_optimum(name, qmax):
    torch.manual_seed(0)
    groups = groups_of(name)
    assert torch.equal(exact_clip_scales(groups, qmax), brute_force(groups, qmax))


def test_one_scale_for_a_tensor_is_the_brute_force_optimum_over_its_chunks():
    torch.manual_seed(1)
    weight = torch.distributions.StudentT(torch.tensor(3.0)).sample((96, 256))
    chunks = lambda: iter((weight[:40], weight[40:]))  # noqa: E731
    got = tensor_scale(chunks, 127, True)
    amax = weight.abs().amax()
    candidates = [scale_from_amax(amax * clip_ratio(j, 127), 127).reshape(1, 1) for j in range(OCTAVES * 64 + 1)]
    totals = [sum(float(group_errors(c.reshape(1, -1), s, 127)[0]) for c in chunks()) for s in candidates]
    assert float(got) == float(candidates[totals.index(min(totals))])


def test_on_by_default_per_row_and_per_tile_never_worse_than_absmax():
    torch.manual_seed(2)
    weight = torch.distributions.StudentT(torch.tensor(3.0)).sample((128, 2048))
    for default, absmax in (
        (Int8TensorwiseFormat(), Int8TensorwiseFormat(clip_search=False)),
        (Int8BlockwiseFormat(block_size=64), Int8BlockwiseFormat(block_size=64, clip_search=False)),
        (ConvrotW4A4Format(convrot_groupsize=64, clip_search=True), ConvrotW4A4Format(convrot_groupsize=64)),
    ):
        errors = [float((f.decode(f.encode(weight)) - weight).double().square().sum()) for f in (default, absmax)]
        assert errors[0] < errors[1]
    assert not Int8TensorwiseFormat(scaling="tensor").clip_search()  # a pass per candidate: opt-in
    assert not ConvrotW4A4Format().clip_search()  # lost in ComfyUI's W4A4 path on the SD1.5 cell: opt-in
