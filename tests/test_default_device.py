"""Formats and optimizers allocate where the weight is, never on torch's default device.

The crashes of the first GPU run (scale buffers made on the CPU beside a weight
on the GPU) were allocations that ignore the weight's device. On a machine
without a GPU the same mistake shows when torch's default device is ``meta``:
a buffer made without ``device=`` lands there, and the first operation that
mixes it with the CPU weight fails. Every installed format, with the options
that take other code paths, and both optimizers run here under that default
and must store the same bytes as without it. (A user's own
``torch.set_default_device("cuda")`` is the same case.)
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from cq_core.errors import CqError
from cq_core.plugin.manager import get_registry
from cq_core.plugin.types import OptimizeContext

REGISTRY = get_registry()
VARIANTS = [(name, {}) for name in sorted(REGISTRY.formats)] + [
    ("int8_tensorwise", {"convrot": True}),
    ("int8_tensorwise", {"clip_search": True}),
    ("int8_tensorwise", {"scaling": "tensor", "clip_search": True}),
    ("nvfp4", {"scale_search": False}),
    ("mxfp8", {"scale_rule": "floor"}),
]
WEIGHT = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
_inputs = torch.randn(512, 700, generator=torch.Generator().manual_seed(1)) * torch.logspace(0, -1, 512)[:, None]
STATS = {"H": _inputs @ _inputs.T / 700}


@contextlib.contextmanager
def default_device(device: str):
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(None)


def flat_bytes(value) -> list[bytes]:
    if isinstance(value, torch.Tensor):
        return [value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()]
    if isinstance(value, dict):
        return [b for key in sorted(value) for b in flat_bytes(value[key])]
    if isinstance(value, (tuple, list)):
        return [b for item in value for b in flat_bytes(item)]
    return [repr(value).encode()]


def operations(fmt):
    w = WEIGHT.float()
    context = OptimizeContext(layer="layer", stats=STATS)
    return {
        "encode": lambda: fmt.encode(WEIGHT),
        "encode_measured": lambda: fmt.encode_measured(WEIGHT),
        "to_grid": lambda: fmt.to_grid(w, fmt.compute_scales(w)),
        "grid_neighbours": lambda: fmt.grid_neighbours(w, fmt.compute_scales(w)),
        "learned": lambda: REGISTRY.optimizer("learned")(steps=4).optimize(WEIGHT, fmt, OptimizeContext(layer="x")).tensors,
        "gptq": lambda: REGISTRY.optimizer("gptq")().optimize(WEIGHT, fmt, context).tensors,
    }


def outcome(run):
    try:
        return flat_bytes(run())
    except CqError as exc:  # e.g. ConvRot refuses element-wise optimizers: must refuse alike
        return [f"CqError: {exc}".encode()]


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=lambda v: str(v))
def test_formats_and_optimizers_ignore_the_default_device(name, options):
    fmt = REGISTRY.format(name)(**options)
    for operation, run in operations(fmt).items():
        expected = outcome(run)
        with default_device("meta"):
            got = outcome(run)
        assert got == expected, f"{name} {options} {operation}: differs under torch.set_default_device('meta')"


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "nvfp4"])
def test_convert_ignores_the_default_device(tmp_path, fmt):
    # The pipeline's host buffers (reads, pinned copies) must be CPU memory whatever the default.
    from cq_core.commands.convert import convert
    from cq_core.io.synthetic import DEMO_LAYOUT, write_synthetic_checkpoint

    source = write_synthetic_checkpoint(tmp_path / "in.safetensors", DEMO_LAYOUT[:6])
    convert(source, tmp_path / "plain.safetensors", format=fmt, model="none")
    with default_device("meta"):
        convert(source, tmp_path / "meta.safetensors", format=fmt, model="none")
    assert (tmp_path / "plain.safetensors").read_bytes() == (tmp_path / "meta.safetensors").read_bytes()
