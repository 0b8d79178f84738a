"""Synthetic transformer checkpoints with realistic shapes, for the demo, tests and benchmarks.

Weights are Gaussian with std 1/sqrt(K) and a few input channels scaled up,
as real checkpoints have outlier channels. Written tensor by tensor with the
streaming writer, so a multi-GB benchmark file never sits in memory whole.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from cq_core.io.safetensors_io import TensorSpec, write_safetensors

Layout = list[tuple[str, tuple[int, ...]]]


def transformer_layout(hidden: int, mlp: int, blocks: int, *, vocab: int | None = None) -> Layout:
    """Tensor names and shapes of a plain pre-norm transformer."""
    layout: Layout = []
    if vocab:
        layout.append(("embed_tokens.weight", (vocab, hidden)))
    for i in range(blocks):
        p = f"blocks.{i}"
        layout += [
            (f"{p}.norm1.weight", (hidden,)),
            (f"{p}.attn.qkv.weight", (3 * hidden, hidden)),
            (f"{p}.attn.qkv.bias", (3 * hidden,)),
            (f"{p}.attn.proj.weight", (hidden, hidden)),
            (f"{p}.norm2.weight", (hidden,)),
            (f"{p}.mlp.fc1.weight", (mlp, hidden)),
            (f"{p}.mlp.fc2.weight", (hidden, mlp)),
        ]
    layout.append(("final_norm.weight", (hidden,)))
    return layout


def synthetic_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator, outliers: int) -> torch.Tensor:
    if len(shape) == 1:
        base = 1.0 if "norm" in name else 0.0
        return base + 0.02 * torch.randn(shape, generator=generator, device="cpu")
    weight = torch.randn(shape, generator=generator, device="cpu").div_(math.sqrt(shape[-1]))
    if outliers and "embed" not in name:
        channels = torch.randperm(shape[-1], generator=generator)[:outliers]
        weight[:, channels] *= 8.0
    return weight


def write_synthetic_checkpoint(
    path: str | os.PathLike,
    layout: Layout,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    outliers: int = 4,
    overwrite: bool = False,
) -> Path:
    path = Path(path)
    generator = torch.Generator().manual_seed(seed)
    entries = [(name, TensorSpec(dtype, shape)) for name, shape in layout]
    with write_safetensors(path, entries, {"generator": "cq synthetic"}, overwrite=overwrite) as out:
        for name, shape in layout:
            out.write(name, synthetic_tensor(name, shape, generator, outliers).to(dtype))
    return path


#: The demo model: small enough to convert in seconds with every format.
DEMO_LAYOUT = transformer_layout(hidden=1024, mlp=4096, blocks=2, vocab=2048)
