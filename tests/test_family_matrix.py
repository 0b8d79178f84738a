"""The family matrix (issue 15) for image and video diffusion transformers: cq's output through ComfyUI.

For each tiny family of ``tests/families/image.py`` and ``video.py`` (ComfyUI's
own classes, seeded bf16 weights) and each naming it is published in, every
cell converts with ``cq_core.convert(src, dst, format=fmt)`` and no flags, loads
the result with ComfyUI 0.30's loader and checks (``tests/matrix.py``): the
same detected ``unet_config`` as the bf16 file, no missing / unexpected /
left-over keys, a finite forward within the format's bound of the bf16
forward. ``test_preset`` checks the preset cq's auto-detection picks.

CI size: the full product (52 rows x 6 formats) runs in about 45 s on two
cores: each tiny model is built once and its bf16 reference loaded once per
session (``tests/matrix.py``). ``bench/comfyui_matrix.py`` runs the same cells
plus the families of the other modules (text encoders, UNets) and writes
``docs/comfyui_matrix.md``.

Every cell failing today is in ``KNOWN_FAILURES``, marked ``xfail(strict=True)``:
whoever fixes cq deletes the entries their fix turns green (a passing entry
fails the run).
"""

from __future__ import annotations

import pytest

from tests.families import image, video
from tests.matrix import STOCK_FORMATS, Matrix

FAMILIES = [*image.FAMILIES, *video.FAMILIES]
BY_NAME = {f.name: f for f in FAMILIES}

# Keys: (family, naming, format); format "*" covers every format of that row, "preset" is
# test_preset. Measured on the "before" run (docs/comfyui_matrix.md); reasons name the cause.
_SHAPE = "shape guard: the format pads or halves a layer whose shape ComfyUI's detection reads"
_PREFIXED = ("prefixed file: ComfyUI's load_diffusion_model strips the prefix, then re-creates `comfy_quant` "
             "tensors from the header's layer names, which keep the prefix: reported unexpected")
_DIFFUSERS = ("diffusers layout: ComfyUI renames the keys on load; cq's `comfy_quant` and scale tensors under "
              "the diffusers names are dropped as left over, so weights load unscaled (FP8/INT8) or mis-shaped (NVFP4)")
_FLUX_SCALE = ("cq's FLUX rules anchor on the release's `.scale` QK-norm names; ComfyUI's own files "
               "(and their prefixed form) name them `.weight`")
_LONGCAT = "cq's FLUX rule requires vector_in and the release's `.scale` QK norms; LongCat has neither"
_NO_DIFFUSERS_RULE = "cq's detection has no rule for the diffusers layout of this family"
_HUNYUAN_QKV = "cq's hunyuan rule requires the release name `img_attn_qkv`; ComfyUI's own files name it `img_attn.qkv`"
_NO_RULE = "the preset exists but cq's detection has no rule for this family"
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {
    ("flux", "comfyui", "preset"): _FLUX_SCALE,
    ("flux", "comfyui", "convrot_w4a4"): _SHAPE + " (detected in_channels 8 (bf16 16))",
    ("flux", "prefixed", "preset"): _FLUX_SCALE,
    ("flux", "prefixed", "float8_e4m3fn"): _PREFIXED,
    ("flux", "prefixed", "float8_e5m2"): _PREFIXED,
    ("flux", "prefixed", "int8_tensorwise"): _PREFIXED,
    ("flux", "prefixed", "nvfp4"): _PREFIXED,
    ("flux", "prefixed", "mxfp8"): _PREFIXED,
    ("flux", "prefixed", "convrot_w4a4"): _SHAPE + " (detected in_channels 8 (bf16 16))",
    ("flux", "diffusers", "preset"): _NO_DIFFUSERS_RULE,
    ("flux", "diffusers", "float8_e4m3fn"): _DIFFUSERS + " (left over: norm_out.linear.comfy_quant, .input_scale, ...)",
    ("flux", "diffusers", "float8_e5m2"): _DIFFUSERS + " (left over: norm_out.linear.comfy_quant, .input_scale, ...)",
    ("flux", "diffusers", "int8_tensorwise"): _DIFFUSERS + " (left over: norm_out.linear.comfy_quant, .weight_scale, ...)",
    ("flux", "diffusers", "nvfp4"): _DIFFUSERS + " (load: size mismatch for double_blocks.0.img_mod.lin.weight, file [768, 64])",
    ("flux", "diffusers", "mxfp8"): _DIFFUSERS + " (left over: norm_out.linear.comfy_quant, .weight_scale, ...)",
    ("flux", "diffusers", "convrot_w4a4"): _DIFFUSERS + " (load: size mismatch for time_in.in_layer.weight, file [128, 128])",
    ("flux_schnell", "comfyui", "preset"): _FLUX_SCALE,
    ("flux_schnell", "comfyui", "convrot_w4a4"): _SHAPE + " (detected in_channels 8 (bf16 16))",
    ("flux_schnell", "prefixed", "preset"): _FLUX_SCALE,
    ("flux_schnell", "prefixed", "float8_e4m3fn"): _PREFIXED,
    ("flux_schnell", "prefixed", "float8_e5m2"): _PREFIXED,
    ("flux_schnell", "prefixed", "int8_tensorwise"): _PREFIXED,
    ("flux_schnell", "prefixed", "nvfp4"): _PREFIXED,
    ("flux_schnell", "prefixed", "mxfp8"): _PREFIXED,
    ("flux_schnell", "prefixed", "convrot_w4a4"): _SHAPE + " (detected in_channels 8 (bf16 16))",
    ("longcat_image", "comfyui", "preset"): _LONGCAT,
    ("longcat_image", "comfyui", "convrot_w4a4"): _SHAPE + " (detected context_in_dim 1792 (bf16 3584), in_channels 8 (bf16 16), txt_ids_dims [] (bf16 [1, 2]))",
    ("longcat_image", "prefixed", "preset"): _LONGCAT,
    ("longcat_image", "prefixed", "float8_e4m3fn"): _PREFIXED,
    ("longcat_image", "prefixed", "float8_e5m2"): _PREFIXED,
    ("longcat_image", "prefixed", "int8_tensorwise"): _PREFIXED,
    ("longcat_image", "prefixed", "nvfp4"): _PREFIXED,
    ("longcat_image", "prefixed", "mxfp8"): _PREFIXED,
    ("longcat_image", "prefixed", "convrot_w4a4"): _SHAPE + " (detected context_in_dim 1792 (bf16 3584), in_channels 8 (bf16 16), txt_ids_dims [] (bf16 [1, 2]))",
    ("flux2", "comfyui", "preset"): _FLUX_SCALE,
    ("flux2", "comfyui", "convrot_w4a4"): _SHAPE + " (detected context_in_dim 32 (bf16 64), in_channels 64 (bf16 128))",
    ("flux2", "prefixed", "preset"): _FLUX_SCALE,
    ("flux2", "prefixed", "float8_e4m3fn"): _PREFIXED,
    ("flux2", "prefixed", "float8_e5m2"): _PREFIXED,
    ("flux2", "prefixed", "int8_tensorwise"): _PREFIXED,
    ("flux2", "prefixed", "nvfp4"): _PREFIXED,
    ("flux2", "prefixed", "mxfp8"): _PREFIXED,
    ("flux2", "prefixed", "convrot_w4a4"): _SHAPE + " (detected context_in_dim 32 (bf16 64), in_channels 64 (bf16 128))",
    ("sd3", "comfyui", "preset"): "no 'sd3' preset in cq yet",
    ("sd3", "comfyui", "convrot_w4a4"): _SHAPE + " (detected adm_in_channels 32 (bf16 64))",
    ("sd3", "prefixed", "preset"): "no 'sd3' preset in cq yet",
    ("sd3", "prefixed", "float8_e4m3fn"): _PREFIXED,
    ("sd3", "prefixed", "float8_e5m2"): _PREFIXED,
    ("sd3", "prefixed", "int8_tensorwise"): _PREFIXED,
    ("sd3", "prefixed", "nvfp4"): _PREFIXED,
    ("sd3", "prefixed", "mxfp8"): _PREFIXED,
    ("sd3", "prefixed", "convrot_w4a4"): _SHAPE + " (detected adm_in_channels 32 (bf16 64))",
    ("sd3", "diffusers", "preset"): "no 'sd3' preset in cq yet",
    ("sd3", "diffusers", "float8_e4m3fn"): _DIFFUSERS + " (left over: norm_out.linear.comfy_quant, .input_scale, ...)",
    ("sd3", "diffusers", "float8_e5m2"): _DIFFUSERS + " (left over: norm_out.linear.comfy_quant, .input_scale, ...)",
    ("sd3", "diffusers", "int8_tensorwise"): _DIFFUSERS + " (left over: norm_out.linear.comfy_quant, .weight_scale, ...)",
    ("sd3", "diffusers", "nvfp4"): _DIFFUSERS + " (load: size mismatch for joint_blocks.0.context_block.attn.qkv.weight, file [192, 32])",
    ("sd3", "diffusers", "mxfp8"): _DIFFUSERS + " (left over: norm_out.linear.comfy_quant, .weight_scale, ...)",
    ("sd3", "diffusers", "convrot_w4a4"): _DIFFUSERS + " (load: size mismatch for t_embedder.mlp.0.weight, file [64, 128])",
    ("hunyuan_dit", "comfyui", "preset"): "no 'hunyuan_dit' preset in cq yet",
    ("hunyuan_dit", "prefixed", "preset"): "no 'hunyuan_dit' preset in cq yet",
    ("hunyuan_dit", "prefixed", "float8_e4m3fn"): _PREFIXED,
    ("hunyuan_dit", "prefixed", "float8_e5m2"): _PREFIXED,
    ("hunyuan_dit", "prefixed", "int8_tensorwise"): _PREFIXED,
    ("hunyuan_dit", "prefixed", "nvfp4"): _PREFIXED,
    ("hunyuan_dit", "prefixed", "mxfp8"): _PREFIXED,
    ("hunyuan_dit", "prefixed", "convrot_w4a4"): _PREFIXED,
    ("hunyuan_image21", "comfyui", "preset"): _HUNYUAN_QKV,
    ("hunyuan_image21", "prefixed", "preset"): _HUNYUAN_QKV,
    ("hunyuan_image21", "prefixed", "float8_e4m3fn"): _PREFIXED,
    ("hunyuan_image21", "prefixed", "float8_e5m2"): _PREFIXED,
    ("hunyuan_image21", "prefixed", "int8_tensorwise"): _PREFIXED,
    ("hunyuan_image21", "prefixed", "nvfp4"): _PREFIXED,
    ("hunyuan_image21", "prefixed", "mxfp8"): _PREFIXED,
    ("hunyuan_image21", "prefixed", "convrot_w4a4"): _PREFIXED,
    ("krea2", "comfyui", "preset"): _NO_RULE,
    ("krea2", "comfyui", "nvfp4"): _SHAPE + " (load: size mismatch for last.linear.bias, file [64])",
    ("krea2", "comfyui", "mxfp8"): _SHAPE + " (detected txtlayers 32 (bf16 2))",
    ("krea2", "comfyui", "convrot_w4a4"): _SHAPE + " (load: size mismatch for last.linear.bias, file [64])",
    ("krea2", "prefixed", "preset"): _NO_RULE,
    ("krea2", "prefixed", "float8_e4m3fn"): _PREFIXED,
    ("krea2", "prefixed", "float8_e5m2"): _PREFIXED,
    ("krea2", "prefixed", "int8_tensorwise"): _PREFIXED,
    ("krea2", "prefixed", "nvfp4"): _SHAPE + " (load: size mismatch for last.linear.bias, file [64])",
    ("krea2", "prefixed", "mxfp8"): _SHAPE + " (detected txtlayers 32 (bf16 2))",
    ("krea2", "prefixed", "convrot_w4a4"): _SHAPE + " (load: size mismatch for last.linear.bias, file [64])",
    ("lens", "comfyui", "preset"): _NO_RULE,
    ("lens", "comfyui", "convrot_w4a4"): _SHAPE + " (detected in_channels 32 (bf16 64))",
    ("lens", "prefixed", "preset"): _NO_RULE,
    ("lens", "prefixed", "float8_e4m3fn"): _PREFIXED,
    ("lens", "prefixed", "float8_e5m2"): _PREFIXED,
    ("lens", "prefixed", "int8_tensorwise"): _PREFIXED,
    ("lens", "prefixed", "nvfp4"): _PREFIXED,
    ("lens", "prefixed", "mxfp8"): _PREFIXED,
    ("lens", "prefixed", "convrot_w4a4"): _SHAPE + " (detected in_channels 32 (bf16 64))",
    ("joyimage", "comfyui", "preset"): "no 'joyimage' preset in cq yet",
    ("joyimage", "prefixed", "preset"): "no 'joyimage' preset in cq yet",
    ("joyimage", "prefixed", "float8_e4m3fn"): _PREFIXED,
    ("joyimage", "prefixed", "float8_e5m2"): _PREFIXED,
    ("joyimage", "prefixed", "int8_tensorwise"): _PREFIXED,
    ("joyimage", "prefixed", "nvfp4"): _PREFIXED,
    ("joyimage", "prefixed", "mxfp8"): _PREFIXED,
    ("joyimage", "prefixed", "convrot_w4a4"): _PREFIXED,
    ("cosmos_predict2_t2i", "comfyui", "preset"): "no 'cosmos_predict2' preset in cq yet",
    ("cosmos_predict2_t2i", "comfyui", "mxfp8"): _SHAPE + " (load: ComfyUI matches no model (a width its detection reads changed))",
    ("cosmos_predict2_t2i", "prefixed", "preset"): "no 'cosmos_predict2' preset in cq yet",
    ("cosmos_predict2_t2i", "prefixed", "float8_e4m3fn"): _PREFIXED,
    ("cosmos_predict2_t2i", "prefixed", "float8_e5m2"): _PREFIXED,
    ("cosmos_predict2_t2i", "prefixed", "int8_tensorwise"): _PREFIXED,
    ("cosmos_predict2_t2i", "prefixed", "nvfp4"): _PREFIXED,
    ("cosmos_predict2_t2i", "prefixed", "mxfp8"): _SHAPE + " (load: ComfyUI matches no model (a width its detection reads changed))",
    ("cosmos_predict2_t2i", "prefixed", "convrot_w4a4"): _PREFIXED,
    ("cosmos_predict2_t2i", "release", "preset"): "no 'cosmos_predict2' preset in cq yet",
    ("cosmos_predict2_t2i", "release", "float8_e4m3fn"): _PREFIXED + " (the release prefix is `net.`)",
    ("cosmos_predict2_t2i", "release", "float8_e5m2"): _PREFIXED + " (the release prefix is `net.`)",
    ("cosmos_predict2_t2i", "release", "int8_tensorwise"): _PREFIXED + " (the release prefix is `net.`)",
    ("cosmos_predict2_t2i", "release", "nvfp4"): _SHAPE + " (load: ComfyUI matches no model (a width its detection reads changed))",
    ("cosmos_predict2_t2i", "release", "mxfp8"): _SHAPE + " (load: ComfyUI matches no model (a width its detection reads changed))",
    ("cosmos_predict2_t2i", "release", "convrot_w4a4"): _PREFIXED + " (the release prefix is `net.`)",
    ("wan21_t2v", "prefixed", "float8_e4m3fn"): _PREFIXED,
    ("wan21_t2v", "prefixed", "float8_e5m2"): _PREFIXED,
    ("wan21_t2v", "prefixed", "int8_tensorwise"): _PREFIXED,
    ("wan21_t2v", "prefixed", "nvfp4"): _PREFIXED,
    ("wan21_t2v", "prefixed", "mxfp8"): _PREFIXED,
    ("wan21_t2v", "prefixed", "convrot_w4a4"): _PREFIXED,
    ("wan21_i2v", "prefixed", "float8_e4m3fn"): _PREFIXED,
    ("wan21_i2v", "prefixed", "float8_e5m2"): _PREFIXED,
    ("wan21_i2v", "prefixed", "int8_tensorwise"): _PREFIXED,
    ("wan21_i2v", "prefixed", "nvfp4"): _PREFIXED,
    ("wan21_i2v", "prefixed", "mxfp8"): _PREFIXED,
    ("wan21_i2v", "prefixed", "convrot_w4a4"): _PREFIXED,
    ("wan21_vace", "prefixed", "float8_e4m3fn"): _PREFIXED,
    ("wan21_vace", "prefixed", "float8_e5m2"): _PREFIXED,
    ("wan21_vace", "prefixed", "int8_tensorwise"): _PREFIXED,
    ("wan21_vace", "prefixed", "nvfp4"): _PREFIXED,
    ("wan21_vace", "prefixed", "mxfp8"): _PREFIXED,
    ("wan21_vace", "prefixed", "convrot_w4a4"): _PREFIXED,
    ("wan22_ti2v", "prefixed", "float8_e4m3fn"): _PREFIXED,
    ("wan22_ti2v", "prefixed", "float8_e5m2"): _PREFIXED,
    ("wan22_ti2v", "prefixed", "int8_tensorwise"): _PREFIXED,
    ("wan22_ti2v", "prefixed", "nvfp4"): _PREFIXED,
    ("wan22_ti2v", "prefixed", "mxfp8"): _PREFIXED,
    ("wan22_ti2v", "prefixed", "convrot_w4a4"): _PREFIXED,
    ("ltxv", "comfyui", "preset"): "no 'ltxv' preset in cq yet",
    ("ltxv", "comfyui", "nvfp4"): _SHAPE + " (detected cross_attention_dim 64 (bf16 128))",
    ("ltxv", "comfyui", "convrot_w4a4"): _SHAPE + " (detected cross_attention_dim 64 (bf16 128))",
    ("ltxv", "prefixed", "preset"): "no 'ltxv' preset in cq yet",
    ("ltxv", "prefixed", "float8_e4m3fn"): _PREFIXED,
    ("ltxv", "prefixed", "float8_e5m2"): _PREFIXED,
    ("ltxv", "prefixed", "int8_tensorwise"): _PREFIXED,
    ("ltxv", "prefixed", "nvfp4"): _SHAPE + " (detected cross_attention_dim 64 (bf16 128))",
    ("ltxv", "prefixed", "mxfp8"): _PREFIXED,
    ("ltxv", "prefixed", "convrot_w4a4"): _SHAPE + " (detected cross_attention_dim 64 (bf16 128))",
    ("ltxav", "prefixed", "float8_e4m3fn"): _PREFIXED,
    ("ltxav", "prefixed", "float8_e5m2"): _PREFIXED,
    ("ltxav", "prefixed", "int8_tensorwise"): _PREFIXED,
    ("ltxav", "prefixed", "nvfp4"): _PREFIXED,
    ("ltxav", "prefixed", "mxfp8"): _PREFIXED,
    ("ltxav", "prefixed", "convrot_w4a4"): _PREFIXED,
    ("hunyuan_video", "comfyui", "preset"): _HUNYUAN_QKV,
    ("hunyuan_video", "prefixed", "preset"): _HUNYUAN_QKV,
    ("hunyuan_video", "prefixed", "float8_e4m3fn"): _PREFIXED,
    ("hunyuan_video", "prefixed", "float8_e5m2"): _PREFIXED,
    ("hunyuan_video", "prefixed", "int8_tensorwise"): _PREFIXED,
    ("hunyuan_video", "prefixed", "nvfp4"): _PREFIXED,
    ("hunyuan_video", "prefixed", "mxfp8"): _PREFIXED,
    ("hunyuan_video", "prefixed", "convrot_w4a4"): _PREFIXED,
    ("hunyuan_video15", "comfyui", "preset"): _HUNYUAN_QKV,
    ("hunyuan_video15", "prefixed", "preset"): _HUNYUAN_QKV,
    ("hunyuan_video15", "prefixed", "float8_e4m3fn"): _PREFIXED,
    ("hunyuan_video15", "prefixed", "float8_e5m2"): _PREFIXED,
    ("hunyuan_video15", "prefixed", "int8_tensorwise"): _PREFIXED,
    ("hunyuan_video15", "prefixed", "nvfp4"): _PREFIXED,
    ("hunyuan_video15", "prefixed", "mxfp8"): _PREFIXED,
    ("hunyuan_video15", "prefixed", "convrot_w4a4"): _PREFIXED,
    ("cogvideox", "comfyui", "preset"): "no 'cogvideox' preset in cq yet",
    ("cogvideox", "comfyui", "nvfp4"): _SHAPE + " (load: size mismatch for time_embedding_linear_1.bias, file [64])",
    ("cogvideox", "comfyui", "convrot_w4a4"): _SHAPE + " (load: size mismatch for time_embedding_linear_1.bias, file [64])",
    ("cogvideox", "prefixed", "preset"): "no 'cogvideox' preset in cq yet",
    ("cogvideox", "prefixed", "float8_e4m3fn"): _PREFIXED,
    ("cogvideox", "prefixed", "float8_e5m2"): _PREFIXED,
    ("cogvideox", "prefixed", "int8_tensorwise"): _PREFIXED,
    ("cogvideox", "prefixed", "nvfp4"): _SHAPE + " (load: size mismatch for time_embedding_linear_1.bias, file [64])",
    ("cogvideox", "prefixed", "mxfp8"): _PREFIXED,
    ("cogvideox", "prefixed", "convrot_w4a4"): _SHAPE + " (load: size mismatch for time_embedding_linear_1.bias, file [64])",
    ("kandinsky5", "comfyui", "preset"): "no 'kandinsky5' preset in cq yet",
    ("kandinsky5", "comfyui", "nvfp4"): _SHAPE + " (detected visual_embed_dim 72 (bf16 132))",
    ("kandinsky5", "comfyui", "mxfp8"): _SHAPE + " (detected visual_embed_dim 160 (bf16 132))",
    ("kandinsky5", "prefixed", "preset"): "no 'kandinsky5' preset in cq yet",
    ("kandinsky5", "prefixed", "float8_e4m3fn"): _PREFIXED,
    ("kandinsky5", "prefixed", "float8_e5m2"): _PREFIXED,
    ("kandinsky5", "prefixed", "int8_tensorwise"): _PREFIXED,
    ("kandinsky5", "prefixed", "nvfp4"): _SHAPE + " (detected visual_embed_dim 72 (bf16 132))",
    ("kandinsky5", "prefixed", "mxfp8"): _SHAPE + " (detected visual_embed_dim 160 (bf16 132))",
    ("kandinsky5", "prefixed", "convrot_w4a4"): _PREFIXED,
    ("cosmos_predict2_i2v", "comfyui", "preset"): "no 'cosmos_predict2' preset in cq yet",
    ("cosmos_predict2_i2v", "comfyui", "mxfp8"): _SHAPE + " (load: ComfyUI matches no model (a width its detection reads changed))",
}


CELLS = [(f.name, n, fmt) for f in FAMILIES for n in f.namings for fmt in STOCK_FORMATS]
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


@pytest.mark.parametrize("family,naming,fmt", [_param(f, n, "preset") for f, n in ROWS])
def test_preset(matrix, family, naming, fmt):
    cell = matrix.preset_check(BY_NAME[family], naming)
    assert cell.ok, cell.reason


def test_known_failures_name_real_cells():
    """A misspelled entry would silently mark nothing."""
    cells = {(f, n, fmt) for f, n, fmt in CELLS} | {(f, n, "preset") for f, n in ROWS} | {(f, n, "*") for f, n in ROWS}
    assert sorted(set(KNOWN_FAILURES) - cells) == []
