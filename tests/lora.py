"""A LoRA on cq's output, applied by ComfyUI's own LoRA loader: the LoRA cells of the family matrix.

A small LoRA in ComfyUI's own key format (what its ``LoraSave`` node writes,
``comfy_extras/nodes_lora_extract.py``: ``diffusion_model.<layer>.lora_up.weight``,
``.lora_down.weight``, ``.alpha``) on every 2-D weight of a tiny family, built
from a seed, goes through ``comfy.sd.load_lora_for_models`` (``comfy/lora.py``
``load_lora``) onto the model ComfyUI loaded from a file, and ComfyUI's
``ModelPatcher`` applies it in one of two ways (:data:`MODES`, the same code in 0.30.0
and 0.33.0):

- ``merged``: the model fits in memory (always on the CPU: ``load_models_gpu`` loads it
  whole). ``ModelPatcher.patch_weight_to_device`` dequantizes each patched weight, adds
  the LoRA (``comfy.lora.calculate_weight``) and hands it to the layer's ``set_weight``
  (``comfy/ops.py`` mixed-precision ``Linear``), which quantizes it again in the same
  layout: comfy-kitchen's ``requantize_from_float(..., scale="recalculate",
  stochastic_rounding=seed)``, keeping what the layout's ``requantize_kwargs`` keep.
- ``offloaded``: the model does not fit (``lowvram_model_memory`` below its size; forced
  here with 1 byte). Each patched weight gets a ``LowVramPatch`` weight function: the
  stored bytes stay, and every forward dequantizes the weight, adds the LoRA in high
  precision and runs a plain matmul (``cast_bias_weight``; the quantized compute path is
  skipped while a weight function is set).

A cell compares, through the same loader and forward, cq's file with and without the
LoRA against the bf16 file with and without it: the LoRA must change the output as it
changes the bf16 model's (:func:`compare`), and what the LoRA
path did to each quantized layer is recorded (its layout, its ConvRot flag and scale
shape, whether its stored values changed: re-quantized).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from tests.families import Family, StateDict

MODES = ("merged", "offloaded")
LORA_SEED = 7
LORA_RANK = 4
#: Every 2-D weight with both sides at least this wide gets a LoRA pair.
MIN_WIDTH = 16
#: How far the share of the bf16 model's LoRA change that the quantized model carries (``gain``) may
#: be from 1. Measured on the tiny families: 0.95-1.01 (docs/comfyui_matrix.md); no effect gives 0.
GAIN_TOLERANCE = 0.15


def make_lora(state: StateDict, rank: int = LORA_RANK, seed: int = LORA_SEED) -> StateDict:
    """A LoRA for every 2-D weight of ``state`` (ComfyUI's names, no prefix) in ComfyUI's own key format.

    ``up`` (N, rank) and ``down`` (rank, K) are N(0, 0.05^2), bf16; ``alpha`` = rank, so ComfyUI
    adds ``up @ down`` at strength 1 (``comfy/weight_adapter/lora.py``: scale alpha / rank). On the
    tiny families (weights N(0, 0.05^2)) that moves the forward by about 15% of its norm.
    """
    g = torch.Generator().manual_seed(seed)
    out: StateDict = {}
    for key, value in sorted(state.items()):
        if not (key.endswith(".weight") and value.ndim == 2 and min(value.shape) >= MIN_WIDTH):
            continue
        layer = key[: -len(".weight")]
        n, k = value.shape
        out[f"diffusion_model.{layer}.lora_up.weight"] = (torch.randn(n, rank, generator=g) * 0.05).to(torch.bfloat16)
        out[f"diffusion_model.{layer}.lora_down.weight"] = (torch.randn(rank, k, generator=g) * 0.05).to(torch.bfloat16)
        out[f"diffusion_model.{layer}.alpha"] = torch.tensor(float(rank))
    return out


@dataclass(frozen=True)
class LayerState:
    """A quantized layer's weight as the model holds it (a comfy-kitchen ``QuantizedTensor``)."""

    layout: str
    convrot: Any
    scale_shape: tuple[int, ...] | None
    digest: float  # a checksum of the stored values: it changes when the layer is re-quantized


def quantized_layers(model) -> dict[str, LayerState]:
    """Every module of ``model`` whose weight is a ``QuantizedTensor``, and its state."""
    from comfy.quant_ops import QuantizedTensor

    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, QuantizedTensor):
            params = weight._params
            scale = getattr(params, "scale", None)
            scale = scale if isinstance(scale, torch.Tensor) else None
            digest = weight._qdata.double().sum() + (scale.double().sum() if scale is not None else 0)
            found[name] = LayerState(weight._layout_cls, getattr(params, "convrot", None),
                                     tuple(scale.shape) if scale is not None else None, float(digest))
    return found


@dataclass
class Applied:
    """One forward through ComfyUI's model with and without the LoRA, and what the LoRA did to its layers."""

    without: torch.Tensor
    with_lora: torch.Tensor
    lora_keys: int  # LoRA pairs ComfyUI matched to a weight
    before: dict[str, LayerState] = field(default_factory=dict)
    after: dict[str, LayerState] = field(default_factory=dict)


def apply_lora(family: Family, patcher, lora: StateDict, mode: str, seed: int) -> Applied:
    """The family's forward on ``patcher``'s model, then with ``lora`` applied by ComfyUI in ``mode``."""
    import comfy.sd

    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: one of {MODES}")
    model = patcher.model.diffusion_model
    without = family.forward(model, seed).detach().float()
    before = quantized_layers(model)
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    patched.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=0 if mode == "merged" else 1)
    try:
        after = quantized_layers(model)
        with_lora = family.forward(model, seed).detach().float()
    finally:
        patched.unpatch_model()
    return Applied(without, with_lora, len(patched.patches), before, after)


@dataclass
class LoraCell:
    family: str
    naming: str
    format: str
    mode: str
    ok: bool
    reason: str = ""
    #: |f(q + LoRA) - f(q) - (f(bf16 + LoRA) - f(bf16))| / |f(bf16 + LoRA) - f(bf16)|: how far the LoRA's
    #: change of the output is from its change of the bf16 model's output (0: the same change)
    delta_error: float | None = None
    #: <f(q + LoRA) - f(q), f(bf16 + LoRA) - f(bf16)> / |f(bf16 + LoRA) - f(bf16)|^2: 1 when the LoRA takes
    #: full effect, 0 when it has none
    gain: float | None = None
    #: |f(q + LoRA) - f(bf16 + LoRA)| / |f(bf16 + LoRA)| and, beside it, the same without the LoRA
    rel_err: float | None = None
    rel_err_without: float | None = None
    lora_share: float | None = None  # |f(bf16 + LoRA) - f(bf16)| / |f(bf16)|
    quantized: int = 0  # layers held quantized before the LoRA
    requantized: int = 0  # of those, layers whose stored values or scales the LoRA changed
    lost: list[str] = field(default_factory=list)  # what the LoRA path dropped (layout, ConvRot, scale shape)
    seconds: float = 0.0


def compare(family: str, naming: str, fmt: str, mode: str, reference: Applied, got: Applied,
            bound: float) -> LoraCell:
    """The cell's numbers, and whether the LoRA changed the quantized forward as it changed the bf16 one:
    it takes its full effect (``gain`` within :data:`GAIN_TOLERANCE` of 1; a LoRA with no effect gives 0),
    the LoRA'd file stays within the format's ``bound`` of the LoRA'd bf16 model (``rel_err``, the
    matrix's measure), and every quantized layer keeps its layout (class, ConvRot flag, scale shape).

    ``delta_error`` is reported, not bounded: where ComfyUI merges the LoRA it re-quantizes the whole
    layer, so the change of the output carries that re-quantization's noise as well as the LoRA."""
    ref_delta = reference.with_lora - reference.without
    delta = got.with_lora - got.without
    scale = ref_delta.norm().clamp_min(1e-12)
    cell = LoraCell(family, naming, fmt, mode, False,
                    delta_error=((delta - ref_delta).norm() / scale).item(),
                    gain=(delta.flatten() @ ref_delta.flatten() / scale**2).item(),
                    rel_err=((got.with_lora - reference.with_lora).norm()
                             / reference.with_lora.norm().clamp_min(1e-12)).item(),
                    rel_err_without=((got.without - reference.without).norm()
                                     / reference.without.norm().clamp_min(1e-12)).item(),
                    lora_share=(scale / reference.without.norm().clamp_min(1e-12)).item(),
                    quantized=len(got.before))
    for name, before in got.before.items():
        after = got.after.get(name)
        if after is None:
            cell.lost.append(f"{name}: no longer quantized")
            continue
        if after.digest != before.digest:
            cell.requantized += 1
        for what in ("layout", "convrot", "scale_shape"):
            if getattr(after, what) != getattr(before, what):
                cell.lost.append(f"{name}: {what} {getattr(before, what)} -> {getattr(after, what)}")
    if got.lora_keys != reference.lora_keys:
        cell.reason = f"ComfyUI matched {got.lora_keys} LoRA weights, {reference.lora_keys} on the bf16 file"
    elif not (torch.isfinite(got.with_lora).all() and math.isfinite(cell.delta_error)):
        cell.reason = "non-finite output with the LoRA"
    elif cell.lost:
        cell.reason = f"the LoRA path lost the layout: {cell.lost[0]}"
    elif abs(cell.gain - 1) > GAIN_TOLERANCE:
        cell.reason = f"the LoRA takes {cell.gain:.2f} of its effect on the bf16 model (1 +- {GAIN_TOLERANCE})"
    elif cell.rel_err > bound:
        cell.reason = f"with the LoRA, relative error {cell.rel_err:.3f} > {bound} against the bf16 model with it"
    else:
        cell.ok = True
    return cell


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started
