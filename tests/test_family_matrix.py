"""The family matrix (issue 15) for image and video diffusion transformers: cq's output through ComfyUI.

For each tiny family of ``tests/families/image.py`` and ``video.py`` (ComfyUI's
own classes, seeded bf16 weights) and each naming it is published in, every
cell converts with ``cq_core.convert(src, dst, format=fmt)`` and no flags, loads
the result with the loader of the ComfyUI judging this run (0.30.0, and 0.33.0
under ``--also-comfyui 0.33.0`` / ``--comfyui 0.33.0``) and checks
(``tests/matrix.py``): the same detected ``unet_config`` as the bf16 file, no
missing / unexpected / left-over keys, a finite forward within the format's
bound of the bf16 forward. The columns are every format some ComfyUI release
loads (``MATRIX_FORMATS``): asym_w4a8_int8 goes through 0.33.0's loader and
forward; 0.30.0 must refuse it (``KeyError`` naming the format), checked on
FLUX.1 and WAN 2.1. ``test_preset`` checks the preset cq's
auto-detection picks.

CI size: the full product (52 rows x 6 formats, plus 52 asym_w4a8_int8 cells under 0.33.0 and
2 refusals under 0.30.0), every cell passing, costs about 75 s of CPU per judge (measured on
0.33.0 with the whole module; the asym cells 29 s of it). Each tiny model is built once and its
bf16 reference loaded once per session (``tests/matrix.py``). ``bench/comfyui_matrix.py --families ...``
runs the same cells on both releases and writes ``docs/comfyui_matrix.md``; the text-encoder,
UNet and all-in-one families are checked by ``tests/test_te_matrix.py``, whose
loaders and forwards they need.

Every cell failing today is in ``KNOWN_FAILURES``, marked ``xfail(strict=True)``:
whoever fixes cq deletes the entries their fix turns green (a passing entry
fails the run).
"""

from __future__ import annotations

import pytest

from tests.families import image, video
from tests.matrix import MATRIX_FORMATS, Matrix, judge_loads

FAMILIES = [*image.FAMILIES, *video.FAMILIES]
BY_NAME = {f.name: f for f in FAMILIES}

# Keys: (family, naming, format); format "*" covers every format of that row, "preset" is
# test_preset. The "before" run (docs/comfyui_matrix.md) had 197 entries: presets not detected in
# ComfyUI's naming, no shape guard for MXFP8 and most NVFP4/ConvRot reads, diffusers files quantized
# under names ComfyUI renames, prefixed files' re-created comfy_quant keys. The "after" run has none.
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {}


# A format the judge does not load is refused by its loader whatever the family: checked on the first
# image and the first video family, ComfyUI's naming (each refusal converts the file first).
REFUSAL_FAMILIES = (image.FAMILIES[0].name, video.FAMILIES[0].name)
CELLS = [(f.name, n, fmt) for f in FAMILIES for n in f.namings for fmt in MATRIX_FORMATS
         if judge_loads(fmt) or (n == "comfyui" and f.name in REFUSAL_FAMILIES)]
ROWS = [(f.name, n) for f in FAMILIES for n in f.namings]


def _known(family: str, naming: str, fmt: str) -> str | None:
    return KNOWN_FAILURES.get((family, naming, fmt)) or (
        KNOWN_FAILURES.get((family, naming, "*")) if fmt != "preset" else None)


def _param(family: str, naming: str, fmt: str):
    reason = _known(family, naming, fmt)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(family, naming, fmt, marks=marks, id=f"{family}-{naming}-{fmt}")


@pytest.fixture(scope="session")
def matrix(comfyui, tmp_path_factory) -> Matrix:
    return Matrix(tmp_path_factory.mktemp("family-matrix"))


@pytest.mark.parametrize("family,naming", [pytest.param(*r, id="-".join(r)) for r in ROWS])
def test_bf16_source_loads_cleanly(matrix, family, naming):
    """The instrument itself: each naming of each tiny family loads in ComfyUI with no key problems."""
    ref = matrix.reference(BY_NAME[family], naming)
    assert ref.error is None, ref.error
    assert ref.problems == []
    comfy_naming = matrix.reference(BY_NAME[family], "comfyui")
    assert ref.signature == comfy_naming.signature, "every naming must detect as the same model"
    if ref.output is not None:
        assert (ref.output - comfy_naming.output).abs().max() == 0, "every naming must hold the same weights"


@pytest.mark.parametrize("family,naming,fmt", [_param(*c) for c in CELLS])
def test_cell(matrix, family, naming, fmt):
    cell = matrix.run(BY_NAME[family], naming, fmt)
    assert cell.ok, cell.reason
    assert cell.refused == (not judge_loads(fmt)), cell.reason


@pytest.mark.parametrize("family,naming,fmt", [_param(f, n, "preset") for f, n in ROWS])
def test_preset(matrix, family, naming, fmt):
    cell = matrix.preset_check(BY_NAME[family], naming)
    assert cell.ok, cell.reason


def test_known_failures_name_real_cells():
    """A misspelled entry would silently mark nothing."""
    cells = ({(f.name, n, fmt) for f in FAMILIES for n in f.namings for fmt in MATRIX_FORMATS}
             | {(f, n, "preset") for f, n in ROWS} | {(f, n, "*") for f, n in ROWS})
    assert sorted(set(KNOWN_FAILURES) - cells) == []
