"""Shared pieces of the diffusion-transformer families (``image.py``, ``video.py``).

A tiny model is ComfyUI's own: :func:`tiny` hands a complete ``unet_config``
(what ``comfy.model_detection.detect_unet_config`` returns for the real
checkpoint, with small widths) to ``model_config_from_unet_config``, checks
that ComfyUI picks the expected ``supported_models`` class, builds
``model_config.get_model({})`` with ``comfy.ops.manual_cast`` and fills every
tensor with seeded values: N(0, 0.05), norm weights 1 + N(0, 0.05). Each
tensor's values depend only on the seed and its name, so namings and rebuilds
agree. Namings are plain key maps; the diffusers one is produced from
ComfyUI's own ``comfy.utils.*_to_diffusers`` maps (diffusers key -> ComfyUI
key), read backwards.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import torch

from tests.families import StateDict

PREFIX = "model.diffusion_model."


def _is_norm_weight(name: str, tensor: torch.Tensor) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 2)[-2] if name.count(".") else ""
    return tensor.ndim == 1 and leaf in ("weight", "scale", "gamma") and "norm" in parent.lower()


def seeded(state: dict[str, torch.Tensor], seed: int = 0) -> StateDict:
    """Every floating tensor replaced by seeded values (per name), saved as bf16."""
    out: StateDict = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            out[name] = tensor.clone()
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        noise = torch.randn(tensor.shape, generator=g) * 0.05
        value = 1.0 + noise if _is_norm_weight(name, tensor) else noise
        out[name] = value.to(torch.bfloat16).contiguous()
    return out


def tiny(comfy, unet_config: dict[str, Any], expect: str, seed: int = 0, extra: StateDict | None = None) -> StateDict:
    """ComfyUI's model for ``unet_config`` (must resolve to supported_models.``expect``), seeded, bf16.

    ``extra``: marker tensors that the model holds no parameter for but
    detection reads (e.g. Chroma Radiance's ``__x0__``).
    """
    model_config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    got = type(model_config).__name__ if model_config is not None else None
    if got != expect:
        raise AssertionError(f"unet_config resolves to {got}, not {expect}: {unet_config}")
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    state = seeded(model.diffusion_model.state_dict(), seed)
    state.update(extra or {})
    return state


def builder(unet_config: dict[str, Any], expect: str, **kwargs) -> Callable[[Any], StateDict]:
    return lambda comfy: tiny(comfy, unet_config, expect, **kwargs)


# --- namings -----------------------------------------------------------------

def comfyui(state: StateDict) -> StateDict:
    return dict(state)


def prefixed(state: StateDict) -> StateDict:
    return {PREFIX + k: v for k, v in state.items()}


def with_prefix(prefix: str) -> Callable[[StateDict], StateDict]:
    return lambda state: {prefix + k: v for k, v in state.items()}


def renamed(*pairs: tuple[str, str]) -> Callable[[StateDict], StateDict]:
    """A naming that replaces substrings of every key, in order."""

    def rename(state: StateDict) -> StateDict:
        out = {}
        for k, v in state.items():
            for old, new in pairs:
                k = k.replace(old, new)
            out[k] = v
        return out

    return rename


def from_diffusers_map(make_map: Callable[[Any, StateDict], dict]) -> Callable[[StateDict], StateDict]:
    """A naming built from a ComfyUI ``*_to_diffusers`` map (diffusers key -> ComfyUI key or (key, (dim, start, len)[, fn])).

    ``make_map(comfy, state)`` returns the map for this state dict. Every
    ComfyUI key must be covered, or the naming raises (a stale map would
    silently drop weights otherwise).
    """

    def convert(state: StateDict) -> StateDict:
        from tests.comfyui import import_comfyui

        comfy = import_comfyui()
        mapping = make_map(comfy, state)
        # The maps list aliases (LoRA and FLUX.2 spellings) after the release names:
        # the first name per target piece wins, and a target split into pieces is never also written whole.
        split = {t[0] for t in mapping.values() if not isinstance(t, str) and t[1] is not None}
        out: StateDict = {}
        used: set[str] = set()
        seen: set = set()
        for diffusers_key, target in mapping.items():
            key, offset, fn = (target, None, None) if isinstance(target, str) else \
                (target[0], target[1], target[2] if len(target) > 2 else None)
            piece = (key, tuple(offset) if offset is not None else None)
            if key not in state or piece in seen or (offset is None and key in split):
                continue
            seen.add(piece)
            value = state[key]
            if fn is not None:
                value = fn(value)  # ComfyUI's functions here (swap_scale_shift) are their own inverse
            if offset is not None:
                dim, start, length = offset
                value = value.narrow(dim, start, length)
            out[diffusers_key] = value.contiguous()
            used.add(key)
        unmapped = sorted(set(state) - used)
        if unmapped:
            raise AssertionError(f"diffusers map leaves ComfyUI keys unmapped: {unmapped[:8]}")
        return out

    return convert


# --- forward helpers ---------------------------------------------------------

def rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def run(fn: Callable[[], Any]) -> torch.Tensor:
    with torch.no_grad():
        out = fn()
    if isinstance(out, (tuple, list)):
        out = torch.cat([o.float().flatten() for o in out if isinstance(o, torch.Tensor)])
    return out.float()
