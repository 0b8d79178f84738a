"""The text-encoder/UNet family matrix's shared part (tests/test_te_matrix.py, tests/test_embeddings.py):
the families, the error bound per format, and what ComfyUI's own loader made of a file."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests import comfyui as loader
from tests.helpers import write_checkpoint
from tests.families import Family, text, unet

STOCK_FORMATS = ("float8_e4m3fn", "float8_e5m2", "int8_tensorwise", "nvfp4", "mxfp8", "convrot_w4a4")

FAMILIES: list[Family] = [*text.FAMILIES, *unet.FAMILIES]
BY_NAME = {f.name: f for f in FAMILIES}

#: Relative L2 error of the forward against the bf16 file's, per format. Measured on these tiny
#: random networks (seeded weights, q/k damped so attention is not saturated); the worst family
#: is T5-XXL, whose 24 blocks compound each layer's error (e4m3 0.11, e5m2 0.27, int8 0.03,
#: nvfp4 0.46, mxfp8 0.12, convrot 0.34; the one-to-three-layer LLMs stay at 0.004-0.21). The
#: bounds sit ~1.5x above the worst passing cell; a layout bug (nibble order, swizzle, unscaled
#: FP8) gives ~1 or more.
REL_ERROR_BOUND = {
    "float8_e4m3fn": 0.2,
    "float8_e5m2": 0.4,
    "int8_tensorwise": 0.08,
    "nvfp4": 0.65,
    "mxfp8": 0.2,
    "convrot_w4a4": 0.5,
}

# -- what ComfyUI made of a file ----------------------------------------------------------------------

@dataclass
class Loaded:
    """What the tests compare between the bf16 file and a converted one."""

    identity: tuple  # detected type and model structure
    problem_keys: set[str]  # key names in missing / unexpected / left-over lines
    problem_lines: list[str]
    output: torch.Tensor | str | None  # a str says why the forward raised
    components: dict[str, bool]


_QUOTED = re.compile(r"'([^']+)'")


def _problem_keys(lines: list[str]) -> set[str]:
    keys: set[str] = set()
    for line in lines:
        found = _QUOTED.findall(line)
        keys.update(found or [line])
    return keys


def _module_tree(module: torch.nn.Module) -> tuple:
    """Every submodule's name, class and widths: equal trees mean ComfyUI built the same model."""
    rows = []
    for name, m in module.named_modules():
        widths = tuple(getattr(m, a, None) for a in ("in_features", "out_features", "num_embeddings",
                                                      "embedding_dim", "in_channels", "out_channels"))
        rows.append((name, type(m).__name__, widths))
    return tuple(rows)


def _run(forward, loaded, seed: int) -> torch.Tensor | str | None:
    """The family's forward, or the error it raised (reported after the identity checks)."""
    if forward is None:
        return None
    try:
        return forward(loaded, seed)
    except Exception as error:  # noqa: BLE001 - the cell reports it
        return f"forward raised {type(error).__name__}: {error}"


IDENTITY_PARTS = {"clip": ("detected TE type", "TE class", "TE module tree"),
                  "checkpoint": ("unet_config", "CLIP class", "CLIP module tree", "VAE module tree"),
                  "diffusion": ("unet_config",)}


def identity_difference(got: tuple, want: tuple) -> str:
    """Which part of a loaded model's identity differs, and its first differing entry."""
    parts = IDENTITY_PARTS["clip" if len(got) == 3 else "checkpoint" if len(got) == 4 else "diffusion"]
    out = []
    for label, g, w in zip(parts, got, want):
        if g == w:
            continue
        if isinstance(g, tuple) and isinstance(w, tuple):
            first = next(((a, b) for a, b in zip(g, w) if a != b), None)
            detail = f"first difference {first[0]} vs {first[1]}" if first else f"{len(g)} vs {len(w)} entries"
            out.append(f"{label}: {detail}")
        elif isinstance(g, dict) and isinstance(w, dict):
            out.append(f"{label}: " + ", ".join(f"{k}={g.get(k)!r} (bf16: {w.get(k)!r})"
                                                for k in sorted(set(g) | set(w), key=str) if g.get(k) != w.get(k)))
        else:
            out.append(f"{label}: {g!r:.80} vs {w!r:.80}")
    return "; ".join(out)


def load_in_comfyui(family: Family, path: Path, seed: int = 1) -> Loaded:
    comfy = loader.import_comfyui()
    try:
        if family.loader == "clip":
            clip, log = loader.load_clip([path], family.clip_type, **family.loader_options)
            sd = comfy.utils.load_torch_file(str(path))
            te_model = comfy.sd.detect_te_model(sd)
            identity = (te_model, type(clip.cond_stage_model).__qualname__, _module_tree(clip.cond_stage_model))
            output = _run(family.forward, clip, seed)
            components = {"clip": True}
        elif family.loader == "checkpoint":
            (model, clip, vae, _), log = loader.load_checkpoint(path, **family.loader_options)
            identity = (model.model.model_config.unet_config if model else None,
                        type(clip.cond_stage_model).__qualname__ if clip else None,
                        _module_tree(clip.cond_stage_model) if clip else None,
                        _module_tree(vae.first_stage_model) if vae and getattr(vae, "first_stage_model", None)
                        else None)
            components = {"model": model is not None, "clip": clip is not None, "vae": vae is not None}
            output = _run(family.forward, (model, clip, vae), seed)
        else:
            patcher, log = loader.load_diffusion_model(path, **family.loader_options)
            identity = (patcher.model.model_config.unet_config if patcher else None,)
            components = {"model": patcher is not None}
            output = _run(family.forward, patcher, seed) if patcher else "ComfyUI detected no model"
        # The VAE loader logs "Missing VAE keys" / "Leftover VAE keys", which LoadLog.problems() misses.
        problems = log.problems() + log.lines("VAE keys")
        return Loaded(identity, _problem_keys(problems), problems, output, components)
    finally:
        comfy.model_management.unload_all_models()


@pytest.fixture(scope="session")
def sources(comfyui, tmp_path_factory):
    """(family, naming) -> (bf16 file, what ComfyUI made of it), built on first use."""
    cache: dict[tuple[str, str], tuple[Path, Loaded]] = {}
    root = tmp_path_factory.mktemp("te-matrix")

    def get(name: str, naming: str) -> tuple[Path, Loaded]:
        if (name, naming) not in cache:
            family = BY_NAME[name]
            state = family.namings[naming](family.build(comfyui))
            path = write_checkpoint(root / f"{name}-{naming}.safetensors", state)
            cache[name, naming] = path, load_in_comfyui(family, path)
        return cache[name, naming]

    return get
