"""A checkpoint with several components: each preset acts inside its own prefix, the VAE is kept whole.

The all-in-one layout is ComfyUI's (``load_checkpoint_guess_config``): the diffusion model under
``model.diffusion_model.``, text encoders under ``text_encoders.<name>.transformer.``, the VAE
under ``vae.`` (``first_stage_model.`` in SD 1.x/SDXL files).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from cq_core.commands.convert import convert
from tests import key_layouts as fam
from tests.cli_runner import run_cq
from tests.helpers import write_checkpoint


def _random(shape, g) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)


def vae_tensors(prefix: str, g) -> dict[str, torch.Tensor]:
    """An autoencoder's names, 2-D attention projections included (what a global format would take)."""
    shapes = {
        "encoder.conv_in.weight": (32, 3, 3, 3), "encoder.mid.attn_1.q.weight": (32, 32),
        "decoder.conv_in.weight": (32, 16, 3, 3), "decoder.mid.attn_1.q.weight": (32, 32),
        "decoder.mid.attn_1.proj_out.weight": (32, 32), "decoder.up.0.block.0.norm1.weight": (32,),
        "decoder.up.0.block.0.conv1.weight": (32, 32, 3, 3), "decoder.conv_out.weight": (3, 32, 3, 3),
    }
    return {prefix + k: _random(s, g) for k, s in shapes.items()}


def all_in_one(vae_prefix: str = "vae.") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.diffusion_model.{k}": _random(s, g) for k, s in fam.flux1().items()}
    tensors |= {f"text_encoders.t5xxl.transformer.{k}": _random(s, g) for k, s in fam.t5(depth=2).items()}
    tensors |= {"text_encoders.t5xxl.logit_scale": torch.tensor(4.6, dtype=torch.bfloat16)}
    tensors |= vae_tensors(vae_prefix, g)
    return tensors


@pytest.fixture
def aio_file(tmp_path):
    return write_checkpoint(tmp_path / "flux_aio.safetensors", all_in_one())


def test_an_all_in_one_file_gets_a_preset_per_component(aio_file):
    report = convert(aio_file, dry_run=True)
    assert [(c["prefix"], c["preset"]) for c in report.components] == [
        ("model.diffusion_model.", "flux"), ("text_encoders.t5xxl.", "t5xxl"), ("vae.", "vae")]
    assert report.preset == "flux" and report.preset_reason.startswith("detected: FLUX.1")
    actions = {t.name: (t.action, t.reason) for t in report.tensors}
    assert actions["model.diffusion_model.img_in.weight"] == ("keep", "preset 'flux' keeps 'img_in' in high precision")
    assert actions["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"][0] == "quantize"
    assert actions["text_encoders.t5xxl.transformer.decoder.block.0.layer.0.SelfAttention.q.weight"][0] == "drop"
    assert actions["text_encoders.t5xxl.transformer.encoder.block.1.layer.0.SelfAttention.q.weight"][0] == "quantize"
    for name, (action, reason) in actions.items():
        if name.startswith("vae."):
            assert (action, reason) == ("keep", "preset 'vae' keeps every tensor under 'vae.' as it is"), name


@pytest.mark.parametrize("vae_prefix", ["vae.", "first_stage_model."])
def test_the_vae_comes_out_byte_identical(tmp_path, vae_prefix):
    source = all_in_one(vae_prefix)
    path = write_checkpoint(tmp_path / "aio.safetensors", source)
    out = tmp_path / "aio_fp8.safetensors"
    report = convert(path, out, format="float8_e4m3fn")
    assert report.output == str(out)
    with safe_open(str(out), "pt") as f:
        names = set(f.keys())
        vae = {k: f.get_tensor(k) for k in names if k.startswith(vae_prefix)}
        header = json.loads(f.metadata()["_quantization_metadata"])["layers"]
    expected = {k: v for k, v in source.items() if k.startswith(vae_prefix)}
    assert set(vae) == set(expected)
    for name, tensor in expected.items():
        assert vae[name].dtype == tensor.dtype and torch.equal(vae[name].view(torch.uint8), tensor.view(torch.uint8)), name
    assert not any(layer.startswith(vae_prefix) for layer in header)
    # the decoder the T5 preset removes is the T5's, not the VAE's
    assert not any(k.startswith("text_encoders.t5xxl.transformer.decoder.") for k in names)
    assert any(layer.startswith("model.diffusion_model.double_blocks.") for layer in header)


def test_a_preset_never_touches_tensors_outside_its_prefix(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = all_in_one()
    # Names the T5 and FLUX presets would remove or keep, outside their components.
    tensors |= {"extra.decoder.proj.weight": _random((64, 64), g), "extra.lm_head.weight": _random((64, 64), g),
                "extra.img_in.weight": _random((64, 64), g)}
    path = write_checkpoint(tmp_path / "aio.safetensors", tensors)
    actions = {t.name: (t.action, t.reason) for t in convert(path, dry_run=True).tensors}
    for name in ("extra.decoder.proj.weight", "extra.lm_head.weight", "extra.img_in.weight"):
        assert actions[name] == ("quantize", "--format float8_e4m3fn"), (name, actions[name])


def test_model_none_keeps_the_vae_protected_and_model_name_replaces_the_main_preset(aio_file):
    report = convert(aio_file, dry_run=True, model="none")
    actions = {t.name: t.action for t in report.tensors}
    assert report.preset is None and [c["preset"] for c in report.components] == ["vae"]
    assert actions["model.diffusion_model.img_in.weight"] == "quantize"
    assert actions["text_encoders.t5xxl.transformer.decoder.final_layer_norm.weight"] == "keep"  # not removed
    assert actions["vae.decoder.mid.attn_1.q.weight"] == "keep"

    report = convert(aio_file, dry_run=True, model="chroma")
    assert [(c["prefix"], c["preset"]) for c in report.components] == [
        ("model.diffusion_model.", "chroma"), ("text_encoders.t5xxl.", "t5xxl"), ("vae.", "vae")]
    assert report.preset_reason == "chosen with --model chroma"


def test_explicit_rules_do_not_reach_into_the_vae(aio_file):
    report = convert(aio_file, dry_run=True, layer=[r"attn_1\.q=float8_e4m3fn"], exclude=["decoder"])
    actions = {t.name: t.action for t in report.tensors}
    assert actions["vae.decoder.mid.attn_1.q.weight"] == "keep"
    assert actions["vae.encoder.mid.attn_1.q.weight"] == "keep"


def test_cq_models_detect_and_dry_run_show_every_component(capsys, aio_file):
    r = run_cq(capsys, "models", "detect", aio_file)
    assert r.code == 0, r.err
    lines = r.out.strip().splitlines()
    assert lines[0].startswith("flux: FLUX.1") and lines[0].endswith("[component 'model.diffusion_model.']")
    assert lines[1].startswith("t5xxl: T5 encoder") and lines[2].startswith("vae: autoencoder")
    r = run_cq(capsys, "models", "detect", aio_file, "--json")
    assert [c["preset"] for c in json.loads(r.out)] == ["flux", "t5xxl", "vae"]
    r = run_cq(capsys, "convert", aio_file, "--dry-run")
    assert r.code == 0, r.err
    assert "  text_encoders.t5xxl.: t5xxl (detected: T5 encoder" in r.out and "  vae.: vae (detected: autoencoder" in r.out


def test_a_bare_vae_file_is_kept_whole(tmp_path):
    path = write_checkpoint(tmp_path / "ae.safetensors", vae_tensors("", torch.Generator().manual_seed(2)))
    report = convert(path, dry_run=True)
    assert [c["preset"] for c in report.components] == ["vae"] and report.preset is None
    assert all(t.action == "keep" for t in report.tensors)


def test_ltx2_all_in_one_keeps_its_text_projection_and_its_audio_vae(tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors = {f"model.diffusion_model.{k}": _random(s, g) for k, s in fam.ltx_video(depth=6).items()}
    tensors |= {"text_embedding_projection.aggregate_embed.weight": _random((64, 64), g)}
    tensors |= vae_tensors("vae.", g) | vae_tensors("audio_vae.", g)
    tensors |= {"vocoder.resblocks.0.convs1.0.weight": _random((32, 32, 3), g), "vocoder.proj.weight": _random((32, 32), g)}
    path = write_checkpoint(tmp_path / "ltx2.safetensors", tensors)
    report = convert(path, dry_run=True)
    assert [(c["prefix"], c["preset"]) for c in report.components] == [
        ("model.diffusion_model.", "ltxv2"), ("text_embedding_projection.", "ltxv2"), ("vae.", "vae"),
        ("audio_vae.", "vae"), ("vocoder.", "vae")]
    actions = {t.name: t.action for t in report.tensors}
    assert actions["text_embedding_projection.aggregate_embed.weight"] == "keep"
    assert actions["vocoder.proj.weight"] == "keep" and actions["audio_vae.decoder.mid.attn_1.q.weight"] == "keep"
    assert actions["model.diffusion_model.transformer_blocks.2.attn1.to_q.weight"] == "quantize"


def test_comfyui_loads_the_vae_of_a_converted_all_in_one_file(comfyui, tmp_path):
    """The bug this guards: t5xxl's remove=('decoder',) dropped vae.decoder.* and ComfyUI found no VAE."""
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.models.autoencoder import AutoencoderKL

    torch.manual_seed(0)
    flux = Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
                theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[],
                operations=comfyui.ops.manual_cast, dtype=torch.float32)
    # The smallest autoencoder ComfyUI's VAE loader builds from a state dict (ch_mult [1, 2, 4]).
    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=16)
    state = {}
    for prefix, module in (("model.diffusion_model.", flux), ("vae.", vae)):
        for name, tensor in module.state_dict().items():
            state[prefix + name] = (torch.randn(tensor.shape) * 0.05).to(torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    state |= {f"text_encoders.t5xxl.transformer.{k}": _random(s, g) for k, s in fam.t5(depth=2).items()}
    source = write_checkpoint(tmp_path / "aio.safetensors", state)
    out = tmp_path / "aio_fp8.safetensors"
    report = convert(source, out, format="float8_e4m3fn")
    assert [c["preset"] for c in report.components] == ["flux", "t5xxl", "vae"]

    model, _, loaded_vae, *_ = comfyui.sd.load_checkpoint_guess_config(str(out), output_vae=True, output_clip=False)
    assert model is not None and loaded_vae is not None
    loaded = loaded_vae.first_stage_model.state_dict()
    expected = {k.removeprefix("vae."): v for k, v in state.items() if k.startswith("vae.")}
    assert set(expected) <= set(loaded)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name].to(torch.bfloat16), tensor), name


def test_a_preset_can_quantize_a_linear_layer_the_embed_default_keeps(tmp_path):
    from cq_core.plugin.hookspecs import hookimpl
    from cq_core.plugin.manager import set_registry
    from cq_core.plugin.types import ModelFilter
    from tests.helpers import build_registry

    class QuantizeEmbedder:
        __name__ = "quantize_embedder"

        @hookimpl
        def cq_register_model_filters(self, register):
            register(ModelFilter("sd3_q", "image", "SD3 with its context embedder quantized (test).",
                                 high_precision=("final_layer",), quantize=("context_embedder",)))

    set_registry(build_registry(QuantizeEmbedder()))
    g = torch.Generator().manual_seed(5)
    path = write_checkpoint(tmp_path / "m.safetensors", {
        "context_embedder.weight": _random((64, 64), g), "x_embedder.weight": _random((64, 64), g),
        "final_layer.linear.weight": _random((64, 64), g)})
    actions = {t.name: (t.action, t.reason) for t in convert(path, dry_run=True, model="sd3_q").tensors}
    assert actions["context_embedder.weight"] == ("quantize", "--format float8_e4m3fn")
    assert actions["x_embedder.weight"] == ("keep", "norm or embedding table (kept by default)")
    assert actions["final_layer.linear.weight"][0] == "keep"
