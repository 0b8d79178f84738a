"""The calibration files of the checker's tests (tests/test_calibration_checks.py,
tests/test_degenerate_calibration.py): a four-layer model, its statistics with one layer
(``BAD``) changed, and the ``cq convert`` readers of statistics."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

LAYERS = ("blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2")
BAD = "blocks.0.fc1"


def model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"{layer}.weight": torch.randn(64, 128, generator=g) for layer in LAYERS}


def statistics(k: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, k, generator=g) * torch.logspace(0, -1, k)
    return {"H": x.T @ x / 512, "absmax": x.abs().amax(0), "absmean": x.abs().mean(0), "sample": x[:128].clone()}


def calibration_file(path: Path, change=None) -> Path:
    tensors = {}
    for n, layer in enumerate(LAYERS):
        stats = statistics(seed=n)
        if layer == BAD and change is not None:
            change(stats)
        tensors.update({f"{layer}.{k}": v.contiguous() for k, v in stats.items()})
    save_file(tensors, str(path))
    return path


COMMANDS = {
    "budget": ("--bits-per-weight", "8", "--formats", "nvfp4,float8_e4m3fn,bf16"),
    "gptq": ("-f", "nvfp4", "--optimizer", "gptq"),
    "learned": ("--optimizer", "learned", "--optimizer-option", "steps=2"),
    "awq": ("-f", "nvfp4", "--awq"),
    "input_scale": ("--input-scale", "calibrated"),
}
