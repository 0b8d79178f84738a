"""Files in other producers' quantized layouts, for the tests of ``cq migrate``'s imports.

A tiny FLUX (ComfyUI's own class, ``tests/test_comfyui_loader.py``) whose Linear layers are
replaced by a producer's tensors: the tests make those with the producer's own package where
it runs on a CPU, import them with ``cq migrate`` and hand the result to ComfyUI's loader.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

import cq_core
from tests.comfyui import load_diffusion_model
from tests.conftest import write_checkpoint
from tests.test_comfyui_loader import _forward


def read_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(every tensor, the header's layer configs)."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layers = json.loads(metadata.get("_quantization_metadata", '{"layers": {}}'))["layers"]
    return tensors, layers


def quantized_layers(source: Path, fmt: str, folder: Path) -> list[str]:
    """The layers cq itself quantizes in ``source`` for ``fmt`` (preset and ComfyUI's shape reads
    applied): the layers a producer's file may hold quantized and still build the same model."""
    out = folder / f"cq-{fmt}.safetensors"
    if not out.exists():
        cq_core.convert(source, out, format=fmt)
    return sorted(read_all(out)[1])


def foreign_file(
    source: Path,
    layers: list[str],
    produce: Callable[[str, torch.Tensor], dict[str, torch.Tensor]],
    out: Path,
    beside: dict[str, dict] | None = None,
) -> Path:
    """``source`` with each of ``layers`` replaced by ``produce(layer, float32 weight)`` (the
    producer's tensors for that layer, full names) and JSON files ``beside`` it."""
    tensors, _ = read_all(source)
    for layer in layers:
        weight = tensors.pop(f"{layer}.weight").float()
        tensors.update(produce(layer, weight))
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, content in (beside or {}).items():
        (out.parent / name).write_text(json.dumps(content))
    return write_checkpoint(out, tensors)


def comfyui_weights(path: Path, reference: Path) -> dict[str, torch.Tensor]:
    """Load ``path`` with ComfyUI's own loader: it must build the model ``reference`` builds,
    report no missing or unused key, and run a finite forward close to the reference's.
    Returns each quantized layer's weight as ComfyUI dequantizes it (float32)."""
    from comfy.quant_ops import QuantizedTensor

    want_patcher, _ = load_diffusion_model(reference)
    patcher, log = load_diffusion_model(path)
    assert patcher.model.model_config.unet_config == want_patcher.model.model_config.unet_config
    assert log.problems() == []
    want, got = _forward(want_patcher), _forward(patcher)
    assert torch.isfinite(got).all()
    assert (got - want).norm() / want.norm() < 0.5
    return {
        name: module.weight.dequantize().float()
        for name, module in patcher.model.diffusion_model.named_modules()
        if isinstance(getattr(module, "weight", None), QuantizedTensor)
    }


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    noise = (reference.double() - approximation.double()).pow(2).sum()
    return math.inf if noise == 0 else 10 * math.log10(float(reference.double().pow(2).sum() / noise))
