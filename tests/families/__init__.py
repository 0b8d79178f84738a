"""Tiny instances of every model family ComfyUI knows, for the family matrix (issue 15).

Each module here (``image.py``, ``video.py``, ``text.py``, ...) defines ``FAMILIES``:
a list of :class:`Family`. :func:`all_families` gathers them. The matrix test
(``tests/test_family_matrix.py``) and ``bench/comfyui_matrix.py`` run every
family x naming x stock format: build with ComfyUI's own class, save in bf16 in
that naming, ``cq convert`` with no flags, load with ComfyUI's loader, compare.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

#: A state dict as saved to disk: tensor name -> tensor.
StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    """One model family, as a tiny model built with ComfyUI's own classes.

    ``build(comfy)`` returns the bf16 state dict in ComfyUI's own naming (what
    its model-save nodes write), without any ``model.diffusion_model.`` prefix,
    built from the real model class with small widths and seeded weights (not
    zeros: quantization error must be measurable). ``namings`` maps a naming's
    name to a function turning that state dict into the naming found in the
    wild (``"comfyui"`` is the identity; ``"release"`` the original release's
    key names, e.g. ``.scale`` QK norms; ``"prefixed"`` under
    ``model.diffusion_model.``; ``"diffusers"`` the diffusers layout where a
    family is published that way). ``loader`` is ``"diffusion"``
    (``comfy.sd.load_diffusion_model``), ``"checkpoint"``
    (``load_checkpoint_guess_config``) or ``"clip"`` (``load_clip`` with
    ``clip_type``, a ``comfy.sd.CLIPType`` member name). ``forward(model, seed)``
    runs the loaded model (the ModelPatcher's ``model.diffusion_model``, or the
    CLIP's encoder) on fixed random inputs and returns one float tensor; None
    where no forward is feasible (say why in ``notes``). ``preset`` is the cq
    preset the family should get from auto-detection (None: no preset needed,
    say why in ``notes``). ``loader_options``: extra keyword arguments for the
    loader function of ``tests/comfyui.py`` (``load_clip(..., model_options=...)``,
    ``load_checkpoint(..., te_model_options=...)``); text encoders need it,
    because ComfyUI builds them from fixed configs and a tiny instance loads only
    through its own ``"<name>_model_config"`` override.
    """

    name: str
    build: Callable[[Any], StateDict]
    loader: str = "diffusion"
    namings: dict[str, Callable[[StateDict], StateDict]] = field(default_factory=dict)
    forward: Callable[[Any, int], torch.Tensor] | None = None
    preset: str | None = None
    clip_type: str | None = None
    notes: str = ""
    loader_options: dict[str, Any] = field(default_factory=dict)
    #: safetensors header metadata the file carries (e.g. LTX-2's ``config``, which ComfyUI's detection reads).
    metadata: dict[str, str] | None = None


@dataclass(frozen=True)
class Impossible:
    """A family ComfyUI knows that has no tiny instance here, and why (e.g. detection hard-codes full widths)."""

    name: str
    reason: str


def all_families() -> tuple[list[Family], list[Impossible]]:
    """Every ``FAMILIES`` and ``IMPOSSIBLE`` list of the modules in this package."""
    families: list[Family] = []
    impossible: list[Impossible] = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        families.extend(getattr(module, "FAMILIES", ()))
        impossible.extend(getattr(module, "IMPOSSIBLE", ()))
    return families, impossible
