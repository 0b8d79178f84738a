"""The family matrix for text encoders, UNets and all-in-one checkpoints (issue 15, parts 2 and 4).

For every family of ``tests/families/text.py`` and ``unet.py`` x naming x stock
format: write the tiny bf16 file, ``cq_core.convert(src, dst, format=fmt)``
with no preset flag, load both with ComfyUI's own loader and check that

* ComfyUI sees the same model: for text encoders the same ``detect_te_model``
  type, the same TE classes and the same module tree (every Linear/Embedding
  with its widths); for checkpoints the same ``unet_config``, and a CLIP and a
  VAE present;
* nothing is missing, unexpected or left over beyond what the bf16 file itself
  reports (the Qwen2.5-VL vision tower, the decoder of a full T5 file);
* the forward is finite and within :data:`REL_ERROR_BOUND` of the bf16 one.

Separately, the preset cq auto-detects (``Report.preset``) must equal
``Family.preset``; for the all-in-one checkpoint that is the diffusion model's
(``flux``), and what should happen per component is in its ``notes``: flux
rules under ``model.diffusion_model.``, t5xxl rules under
``text_encoders.t5xxl.`` only, CLIP-L kept, ``vae.*`` untouched. Every cell
that fails today is in :data:`KNOWN_FAILURES`, marked ``xfail(strict=True)``:
whoever fixes one deletes its entry.

Cost: ~2m15s of CPU time on 2 cores (5m50s wall on a machine loaded ~9x);
T5-XXL's cells dominate, because detection pins 24 blocks of d_ff 10240 and
ComfyUI's CPU path dequantizes every weight on each forward.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import cq_core
from tests import comfyui as loader
from tests.conftest import write_checkpoint
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

#: Every failing cell: (family, naming, format) for a load cell, (family, naming, "preset") for
#: the auto-detection cell. Delete an entry when its cell passes (xfail is strict).
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {
    # none in the "after" run (docs/comfyui_matrix.md); the "before" run had 24
}


def _marked(key: tuple[str, str, str]):
    reason = KNOWN_FAILURES.get(key)
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


LOAD_CELLS = [
    pytest.param(f.name, naming, fmt, id=f"{f.name}-{naming}-{fmt}", marks=_marked((f.name, naming, fmt)))
    for f in FAMILIES for naming in f.namings for fmt in STOCK_FORMATS
]
PRESET_CELLS = [
    pytest.param(f.name, naming, id=f"{f.name}-{naming}", marks=_marked((f.name, naming, "preset")))
    for f in FAMILIES for naming in f.namings
]


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


def _difference(got: tuple, want: tuple) -> str:
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


def _load(family: Family, path: Path, seed: int = 1) -> Loaded:
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
            cache[name, naming] = path, _load(family, path)
        return cache[name, naming]

    return get


def check_cell(name: str, naming: str, fmt: str, src: Path, reference: Loaded, out: Path) -> float | None:
    """Convert and compare one cell; returns the relative forward error (None without a forward)."""
    family = BY_NAME[name]
    cq_core.convert(src, out, format=fmt)
    got = _load(family, out)
    assert got.identity == reference.identity, \
        f"{name}/{naming}/{fmt}: ComfyUI built a different model: {_difference(got.identity, reference.identity)}"
    assert got.components == reference.components and all(got.components.values()), \
        f"{name}/{naming}/{fmt}: components {got.components}"
    new_problems = got.problem_keys - reference.problem_keys
    assert not new_problems, f"{name}/{naming}/{fmt}: keys ComfyUI did not use or find: {sorted(new_problems)[:8]}"
    if reference.output is None:
        return None
    assert not isinstance(got.output, str), f"{name}/{naming}/{fmt}: {got.output}"
    assert torch.isfinite(got.output).all(), f"{name}/{naming}/{fmt}: non-finite output"
    rel = ((got.output - reference.output).norm() / reference.output.norm()).item()
    assert rel < REL_ERROR_BOUND[fmt], f"{name}/{naming}/{fmt}: relative output error {rel:.3f}"
    return rel


@pytest.mark.parametrize("name, naming, fmt", LOAD_CELLS)
def test_converted_file_loads_in_comfyui_as_the_bf16_one(sources, tmp_path, name, naming, fmt):
    src, reference = sources(name, naming)
    assert all(reference.components.values()), f"{name}/{naming}: the bf16 file itself loads without {reference.components}"
    assert not isinstance(reference.output, str), f"{name}/{naming}: bf16 file: {reference.output}"
    check_cell(name, naming, fmt, src, reference, tmp_path / f"{name}-{naming}-{fmt}.safetensors")


@pytest.mark.parametrize("name, naming", PRESET_CELLS)
def test_auto_detected_preset_is_the_familys(sources, name, naming):
    src, _ = sources(name, naming)
    report = cq_core.convert(src, format="float8_e4m3fn", dry_run=True)
    # Report.preset names the main model's preset only; a file whose one component is kept whole (a CLIP,
    # like a VAE) reports None there and names its preset in components.
    detected = report.preset or next((c["preset"] for c in report.components), None)
    assert detected == BY_NAME[name].preset, f"{name}/{naming}: {report.preset_reason}"


def test_every_known_failure_names_a_cell():
    cells = {(f.name, n, x) for f in FAMILIES for n in f.namings for x in (*STOCK_FORMATS, "preset")}
    assert set(KNOWN_FAILURES) <= cells, sorted(set(KNOWN_FAILURES) - cells)
