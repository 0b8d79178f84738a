"""LoRAs on cq's output, applied by ComfyUI's own LoRA loader (issue 28): the LoRA cells of the matrix.

For a tiny FLUX.1 (ComfyUI's naming; ``bench/comfyui_matrix.py`` adds SD3, WAN 2.1 and
HunyuanVideo, docs/comfyui_matrix.md) and every format the judging ComfyUI loads (0.30.0, and 0.33.0 under ``--also-comfyui``),
a seeded LoRA in ComfyUI's own key format goes through ``comfy.sd.load_lora_for_models``
onto cq's file and onto the bf16 file, merged and offloaded (``tests/lora.py``).
Each cell: the LoRA takes its full effect on cq's file (the share of the bf16
model's change it carries is 1 +- 0.15; a LoRA with no effect gives 0), the file
with the LoRA stays within the format's bound of the bf16 file with it, and no
quantized layer loses its layout. Beside them, what ComfyUI's LoRA path does to
the layers, as docs/comfyui_matrix.md and ``cq formats`` say it: merged, every
patched layer is re-quantized in its own layout (new scales, ConvRot and per-row
scales kept); offloaded, the stored bytes stay and the LoRA is added at each forward.
"""

from __future__ import annotations

import pytest

from tests.families import image, video
from tests.lora import MODES
from tests.matrix import MATRIX_FORMATS, Matrix, judge_loads

FAMILIES = {f.name: f for f in [*image.FAMILIES, *video.FAMILIES] if f.name == "flux"}
CELLS = [(family, fmt) for family in FAMILIES for fmt in MATRIX_FORMATS if judge_loads(fmt)]


@pytest.fixture(scope="module")
def matrix(comfyui, tmp_path_factory) -> Matrix:
    return Matrix(tmp_path_factory.mktemp("lora-matrix"))


@pytest.fixture(scope="module")
def cells(matrix):
    """(family, format) -> {mode: LoraCell}, each format converted once for both modes."""
    cache = {}

    def get(family: str, fmt: str):
        if (family, fmt) not in cache:
            cache[family, fmt] = {c.mode: c for c in matrix.lora_cells(FAMILIES[family], "comfyui", fmt)}
        return cache[family, fmt]

    return get


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family, fmt", CELLS, ids=[f"{f}-{x}" for f, x in CELLS])
def test_a_lora_changes_cqs_output_as_it_changes_the_bf16_model(cells, family, fmt, mode):
    cell = cells(family, fmt).get(mode)
    assert cell is not None, next(iter(cells(family, fmt).values())).reason
    assert cell.ok, cell.reason
    assert cell.quantized > 0, "the LoRA found no quantized layer to act on"


@pytest.mark.parametrize("family, fmt", CELLS, ids=[f"{f}-{x}" for f, x in CELLS])
def test_comfyui_re_quantizes_a_merged_lora_and_keeps_an_offloaded_layers_bytes(cells, family, fmt):
    by_mode = cells(family, fmt)
    merged, offloaded = by_mode["merged"], by_mode["offloaded"]
    assert merged.requantized == merged.quantized and merged.lost == []
    assert offloaded.requantized == 0 and offloaded.lost == []
    # Re-quantizing costs precision: the merged file is further from the LoRA'd bf16 model than the
    # file itself is from the bf16 model; offloaded, the LoRA is added in high precision and costs none.
    assert merged.rel_err > merged.rel_err_without
    assert offloaded.rel_err <= offloaded.rel_err_without * 1.1 + 1e-3


def test_convrot_int8_keeps_its_rotation_when_a_lora_is_merged(matrix):
    """ComfyUI #14642 (ConvRot INT8 re-quantized as plain tensorwise on LoRA offload): with comfy-kitchen
    0.2.40 the merged re-quantization keeps the rotation and the per-row scale (``requantize_kwargs``)."""
    import cq_core

    from tests.lora import apply_lora
    from tests.matrix import FORWARD_SEED, load_patcher

    family = FAMILIES["flux"]
    out = matrix.workdir / "flux-convrot-int8.safetensors"
    cq_core.convert(matrix.source(family, "comfyui"), out, format="int8_tensorwise", format_options={"convrot": True})
    patcher, _ = load_patcher(family, out)
    got = apply_lora(family, patcher, matrix.lora(family), "merged", FORWARD_SEED)
    assert got.before and all(state.convrot is True for state in got.before.values())
    assert {name: (s.convrot, s.scale_shape) for name, s in got.after.items()} == \
        {name: (s.convrot, s.scale_shape) for name, s in got.before.items()}


def test_an_awq_smoothed_nvfp4_layer_takes_the_lora_on_its_smoothed_weight(matrix, tmp_path, capsys):
    """A layer with ``pre_quant_scale`` s (``--awq``) stores W / s and multiplies its input by s
    (``comfy/ops.py``); ComfyUI's LoRA path adds the LoRA's B @ A to the stored weight, so the layer
    computes x (W + B @ A diag(s))^T: the LoRA's effect is scaled by s per input channel. The change
    of cq's output is that of the LoRA with ``down`` scaled by s on the bf16 model, not the LoRA's own."""
    import cq_core
    from safetensors import safe_open

    from tests.cli_runner import run_cq
    from tests.comfyui import comfyui_root
    from tests.lora import apply_lora, compare
    from tests.matrix import FORWARD_SEED, load_patcher

    family = FAMILIES["flux"]
    source = matrix.source(family, "comfyui")
    stats = tmp_path / "stats.safetensors"
    result = run_cq(capsys, "calibrate", source, "--comfyui", comfyui_root(), "-o", stats, "--runs", "2",
                    "--steps", "2", "--latent-size", "8x8")
    assert result.code == 0, result.err
    out = tmp_path / "flux-nvfp4-awq.safetensors"
    cq_core.convert(source, out, format="nvfp4", awq=True, calibration=stats, model="none")
    with safe_open(str(out), "pt") as f:
        scales = {k[: -len(".pre_quant_scale")]: f.get_tensor(k).float() for k in f.keys()
                  if k.endswith(".pre_quant_scale")}
    assert scales and max((s - 1).abs().max().item() for s in scales.values()) > 0.05
    lora = matrix.lora(family)
    smoothed = dict(lora)
    for layer, s in scales.items():
        key = f"diffusion_model.{layer}.lora_down.weight"
        smoothed[key] = (lora[key].float() * s[None, :]).to(lora[key].dtype)

    patcher, _ = load_patcher(family, out)
    got = apply_lora(family, patcher, lora, "offloaded", FORWARD_SEED)
    as_stored = compare("flux", "comfyui", "nvfp4", "offloaded", matrix.lora_reference(family, "comfyui", "offloaded"),
                        got, 0.5)
    patcher, _ = load_patcher(family, source)
    predicted = compare("flux", "comfyui", "nvfp4", "offloaded", apply_lora(family, patcher, smoothed, "offloaded",
                                                                           FORWARD_SEED), got, 0.5)
    # The smoothed LoRA predicts the change (gain 1.00, what is left is NVFP4's own noise on the 20
    # layers: 0.07); the LoRA itself misses it twice as far, its effect off by the scales (gain 0.95
    # with s in 0.91-1.10 on this tiny model; a real model's smoothing spreads s wider).
    assert abs(predicted.gain - 1) < 0.01 and predicted.delta_error < 0.1
    assert abs(as_stored.gain - 1) > 3 * abs(predicted.gain - 1)
    assert as_stored.delta_error > 1.5 * predicted.delta_error


def test_cq_formats_says_what_comfyuis_lora_path_does_to_each_format(capsys, registry):
    """Every format a ComfyUI release loads declares it (``Format.comfyui_lora``), and ``cq formats``
    shows it, in its table's notes and its --json."""
    import json

    from tests.cli_runner import run_cq

    loadable = {n for n, c in registry.formats.items() if c.comfyui_since}
    assert {n for n in loadable if not registry.formats[n].comfyui_lora} == set()
    text = run_cq(capsys, "formats").out
    assert "re-quantizes each patched layer in its own format" in text
    assert "LoRA, int8_tensorwise: merged: re-quantized keeping per-row or per-tensor scales and ConvRot" in text
    rows = {r["name"]: r for r in json.loads(run_cq(capsys, "formats", "--json").out)}
    assert {n for n, r in rows.items() if r["comfyui_lora"]} == loadable
