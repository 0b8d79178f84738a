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

from pathlib import Path

import pytest
import torch

import cq_core
from tests.te_matrix import (  # noqa: F401 (sources: a fixture)
    BY_NAME, FAMILIES, REL_ERROR_BOUND, STOCK_FORMATS, Loaded, identity_difference, load_in_comfyui, sources,
)

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


def check_cell(name: str, naming: str, fmt: str, src: Path, reference: Loaded, out: Path) -> float | None:
    """Convert and compare one cell; returns the relative forward error (None without a forward)."""
    family = BY_NAME[name]
    cq_core.convert(src, out, format=fmt)
    got = load_in_comfyui(family, out)
    assert got.identity == reference.identity, \
        f"{name}/{naming}/{fmt}: ComfyUI built a different model: {identity_difference(got.identity, reference.identity)}"
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
