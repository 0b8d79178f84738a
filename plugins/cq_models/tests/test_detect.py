"""Model-family detection from tensor names: each family, its prefixes, and the near-misses.

The key sets (tests/key_layouts.py) use each family's real tensor names (as ComfyUI's and
the reference implementations' checkpoints spell them), with small shapes so the same sets
serve the preset tests as tiny checkpoints.
"""

from __future__ import annotations

import pytest

from cq_core.commands.convert import convert
from cq_core.errors import CqError
from cq_models.detect import detect
from tests.key_layouts import (
    FAMILIES, D, W, blocks, chroma, diffusers_flux, flux1, flux2, llm, ltx_video, prefixed, qwen35, sdxl_unet, t5,
    wan, write_keys, zimage,
)


@pytest.mark.parametrize("preset", sorted(FAMILIES))
def test_each_family_is_recognised_by_its_own_names(preset):
    detection = detect(list(FAMILIES[preset]()))
    assert detection is not None and detection.preset == preset, detection


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", "transformer."])
@pytest.mark.parametrize("preset", ["flux", "flux2", "hunyuan", "wan", "qwen", "zimage", "ltxv2"])
def test_prefixed_checkpoints_are_recognised_and_the_prefix_reported(preset, prefix):
    detection = detect(list(prefixed(FAMILIES[preset](), prefix)))
    assert detection is not None and detection.preset == preset
    assert repr(prefix) in detection.reason


def test_text_encoder_prefixes_are_handled():
    assert detect(list(prefixed(t5(), "text_encoders.t5xxl.transformer."))).preset == "t5xxl"
    assert detect(list(prefixed(llm(), "text_encoders.qwen3_4b.transformer."))).preset == "generic_text"


def test_reasons_name_the_key_as_the_file_writes_it():
    """FLUX releases write the QK norm as '.scale'; detection reads it as ComfyUI's '.weight'."""
    reason = detect(list(flux1(dev=True))).reason
    assert "'double_blocks.0.img_attn.norm.key_norm.scale'" in reason and "key_norm.weight" not in reason
    renamed = [k[: -len(".scale")] + ".weight" if k.endswith(".scale") else k for k in flux1(dev=True)]
    assert "'double_blocks.0.img_attn.norm.key_norm.weight'" in detect(renamed).reason


def test_reasons_name_the_variant():
    assert "dev" in detect(list(flux1(dev=True))).reason
    assert "schnell" in detect(list(flux1(dev=False))).reason
    assert "UMT5" not in detect(list(t5())).reason and "XXL" in detect(list(t5())).reason
    assert "6 transformer blocks" in detect(list(ltx_video(depth=6))).reason


@pytest.mark.parametrize(
    ("name", "keys", "expected"),
    [
        ("FLUX.1 schnell is still FLUX.1", flux1(dev=False), "flux"),
        ("FLUX.2 is not FLUX.1", flux2(), "flux2"),
        ("WAN 2.x image-to-video is WAN", wan(i2v=True), "wan"),
        ("Chroma shares FLUX.1's blocks but is not FLUX.1", chroma(), "chroma"),
        ("LTX-Video 1 (no audio) is not LTX-Video 2", ltx_video(audio=False), "ltxv"),
        ("Z-Image without pad tokens is still Z-Image (its adaLN has no SiLU)", zimage(pad_tokens=False), "zimage"),
        ("diffusers FLUX shares Qwen-Image's attention names", diffusers_flux(), None),
        ("an SDXL UNet", sdxl_unet(), "sdxl"),
        ("T5 encoder only", t5(decoder=False), "t5xxl"),
        ("a hybrid Qwen3.5 is not a generic LLM", qwen35(), "qwen35"),
        ("an LLM without its MLP is no LLM", {k: v for k, v in llm().items() if ".mlp." not in k}, None),
        ("nothing at all", {}, None),
    ],
)
def test_near_misses_are_not_misdetected(name, keys, expected):
    detection = detect(list(keys))
    assert (detection.preset if detection else None) == expected, f"{name}: {detection}"


def test_a_signature_name_alone_does_not_decide():
    # One FLUX.2 name pasted into a WAN checkpoint (e.g. a merged file) does not make it FLUX.2.
    keys = {**wan(), "double_stream_modulation_img.lin.weight": (D, D)}
    assert detect(list(keys)).preset == "wan"


@pytest.mark.needs_plugins("cq_fp8.plugin")
def test_convert_uses_the_detected_preset_and_says_why(tmp_path):
    path = write_keys(tmp_path / "flux.safetensors", prefixed(flux1(), "model.diffusion_model."))
    report = convert(path, dry_run=True)
    assert report.preset == "flux"
    assert report.preset_reason.startswith("detected: FLUX.1 (dev") and "model.diffusion_model." in report.preset_reason
    by_name = {t.name: t for t in report.tensors}
    assert by_name["model.diffusion_model.img_in.weight"].action == "keep"
    assert "preset 'flux' keeps 'img_in'" in by_name["model.diffusion_model.img_in.weight"].reason


@pytest.mark.needs_plugins("cq_fp8.plugin")
def test_an_unknown_model_gets_no_preset_and_the_plain_rules(tmp_path):
    path = write_keys(tmp_path / "unknown.safetensors", blocks(2, {"mixer.fc.weight": W}, "encoder.layers"))
    report = convert(path, dry_run=True)
    assert report.preset is None and report.preset_reason == "no preset detected"
    assert {t.name: t.action for t in report.tensors}["encoder.layers.1.mixer.fc.weight"] == "quantize"


@pytest.mark.needs_plugins("cq_fp8.plugin")
def test_a_diffusers_flux_missing_part_of_a_fused_tensor_is_refused(tmp_path):
    # Diffusers FLUX is converted to ComfyUI's names (tests/test_diffusers.py); q without k and v cannot be.
    path = write_keys(tmp_path / "half.safetensors", diffusers_flux())
    with pytest.raises(CqError, match="is fused from 3 tensors but .*to_k.weight' is missing"):
        convert(path, dry_run=True)


@pytest.mark.needs_plugins("cq_fp8.plugin")
def test_model_none_and_model_name_override_detection(tmp_path):
    path = write_keys(tmp_path / "flux.safetensors", flux1())
    report = convert(path, dry_run=True, model="none")
    assert report.preset is None and {t.name: t.action for t in report.tensors}["img_in.weight"] == "quantize"
    report = convert(path, dry_run=True, model="flux2")
    assert report.preset == "flux2" and report.preset_reason == "chosen with --model flux2"
