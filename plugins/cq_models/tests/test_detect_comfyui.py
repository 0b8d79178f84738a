"""Detection of every family in every naming, from key sets that ComfyUI's own classes produce.

Each family's model is built by ComfyUI 0.30 itself (``supported_models.X(unet_config).get_model``)
on the meta device, so full-size configs cost nothing and the key names are exactly those
ComfyUI's model-save nodes write. The other namings are derived from them: the original
release's (undoing the renames of the family's ``process_unet_state_dict``: ``.scale`` QK
norms, HunyuanVideo's ``img_attn_qkv``), and each naming with the prefixes checkpoints carry.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch

from cq_models.detect import detect, detect_components
from cq_models.presets import PRESETS
from tests import comfyui



@pytest.fixture(autouse=True)
def _needs_comfyui(comfyui):
    """Every test here builds key sets with ComfyUI's classes: skipped without it, failed under CI (conftest)."""


def _flux(**extra):
    return dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56],
                theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[]) | extra


def _chroma(**extra):
    return dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=4096, hidden_size=3072,
                mlp_ratio=4.0, num_heads=24, depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56], theta=10000,
                patch_size=2, qkv_bias=True, in_dim=64, out_dim=3072, hidden_dim=5120, n_layers=5, txt_ids_dims=[],
                vec_in_dim=None) | extra


def _hunyuan(**extra):
    config = dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                  hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=2, depth_single_blocks=2,
                  axes_dim=[16, 56, 56], theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True,
                  byt5=False, meanflow=False, use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False)
    return config | extra


#: family -> (ComfyUI supported_models class, unet_config, the preset detection must pick)
FAMILIES: dict[str, tuple[str, dict, str]] = {
    "flux1_dev": ("Flux", _flux(), "flux"),
    "flux1_schnell": ("FluxSchnell", _flux(guidance_embed=False), "flux"),
    "flux2": ("Flux2", _flux(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None,
                                context_in_dim=15360, hidden_size=6144, mlp_ratio=3.0, num_heads=48,
                                axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1, qkv_bias=False,
                                txt_ids_dims=[3], global_modulation=True, mlp_silu_act=True, ops_bias=False),
              "flux2"),
    "chroma": ("Chroma", _chroma(), "chroma"),
    "chroma_radiance": ("ChromaRadiance", _chroma(image_model="chroma_radiance", in_channels=3, out_channels=3,
                                                  patch_size=16, nerf_hidden_size=64, nerf_mlp_ratio=4,
                                                  nerf_depth=4, nerf_max_freqs=8, nerf_tile_size=512,
                                                  nerf_final_head_type="conv", nerf_embedder_dtype=torch.float32,
                                                  use_x0=False, use_sequential_txt_ids=False),
                        "chroma_radiance"),
    "hunyuan_video": ("HunyuanVideo", _hunyuan(), "hunyuan"),
    "hunyuan_video_15": ("HunyuanVideo15", _hunyuan(in_channels=65, out_channels=32, vec_in_dim=None,
                                                    hidden_size=2048, num_heads=16, guidance_embed=False,
                                                    use_cond_type_embedding=True, vision_in_dim=1152,
                                                    byt5=True, context_in_dim=3584), "hunyuan"),
}


UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False, in_channels=4,
            model_channels=320, use_temporal_attention=False, use_temporal_resblock=False)
FAMILIES |= {
    "sd35": ("SD3", dict(in_channels=16, patch_size=2, out_channels=16, depth=24, input_size=None, adm_in_channels=2048,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
        num_patches=147456, pos_embed_max_size=384, qk_norm="rms", pos_embed_scaling_factor=None, x_block_self_attn_layers=[0, 1]), "sd3"),
    "ltxv": ("LTXV", dict(image_model="ltxv", num_layers=2, attention_head_dim=64, cross_attention_dim=2048), "ltxv"),
    "ltxav": ("LTXAV", dict(image_model="ltxav", num_layers=2, attention_head_dim=128, cross_attention_dim=4096), "ltxv2"),
    "lumina2": ("Lumina2", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=2304, cap_feat_dim=2304, n_layers=2, qk_norm=True,
        n_heads=24, n_kv_heads=8, axes_dims=[32,32,32], axes_lens=[300,512,512], rope_theta=10000.0, ffn_dim_multiplier=4.0), "lumina2"),
    "zimage": ("ZImage", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=2560, n_layers=2, qk_norm=True,
        n_heads=30, n_kv_heads=30, axes_dims=[32,48,48], axes_lens=[1536,512,512], rope_theta=256.0, ffn_dim_multiplier=8.0/3.0,
        z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32), "zimage"),
    "wan21_t2v": ("WAN21_T2V", dict(image_model="wan2.1", dim=1536, out_dim=16, num_heads=12, ffn_dim=8960, num_layers=2, patch_size=(1,2,2),
        freq_dim=256, window_size=(-1,-1), qk_norm=True, cross_attn_norm=True, eps=1e-6, in_dim=16, model_type="t2v"), "wan"),
    "wan21_i2v": ("WAN21_I2V", dict(image_model="wan2.1", dim=1536, out_dim=16, num_heads=12, ffn_dim=8960, num_layers=2, patch_size=(1,2,2),
        freq_dim=256, window_size=(-1,-1), qk_norm=True, cross_attn_norm=True, eps=1e-6, in_dim=36, model_type="i2v"), "wan"),
    "qwen_image": ("QwenImage", dict(image_model="qwen_image", num_layers=2), "qwen"),
    "hidream": ("HiDream", dict(image_model="hidream", attention_head_dim=128, axes_dims_rope=[64, 32, 32], caption_channels=[4096, 4096],
        max_resolution=[128, 128], in_channels=16, llama_layers=[0, 1, 2, 3], num_attention_heads=20, num_routed_experts=4,
        num_activated_experts=2, num_layers=2, num_single_layers=2, out_channels=16, patch_size=2, text_emb_dim=2048), "hidream"),
    "auraflow": ("AuraFlow", dict(cond_seq_dim=2048, max_seq=1024, n_double_layers=2, n_layers=4), "auraflow"),
    "pixart_sigma": ("PixArtSigma", dict(image_model="pixart_sigma", num_heads=16, patch_size=2, hidden_size=1152, in_channels=4, depth=2, micro_condition=False, model_max_length=300), "pixart"),
    "pixart_alpha": ("PixArtAlpha", dict(image_model="pixart_alpha", num_heads=16, patch_size=2, hidden_size=1152, in_channels=4, depth=2, micro_condition=True), "pixart"),
    "hunyuan_dit": ("HunyuanDiT", dict(image_model="hydit", depth=2, hidden_size=1408), "hunyuan_dit"),
    "mochi": ("GenmoMochi", dict(image_model="mochi_preview", depth=2, patch_size=2, num_heads=24, hidden_size_x=3072, hidden_size_y=1536, mlp_ratio_x=4.0, mlp_ratio_y=4.0,
        learn_sigma=False, in_channels=12, qk_norm=True, qkv_bias=False, out_bias=True, attn_drop=0.0, patch_embed_bias=True, posenc_preserve_area=True,
        timestep_mlp_bias=True, attend_to_padding=False, timestep_scale=1000.0, use_t5=True, t5_feat_dim=4096, t5_token_length=256, rope_theta=10000.0), "mochi"),
    "cosmos_predict2": ("CosmosT2IPredict2", dict(image_model="cosmos_predict2", max_img_h=240, max_img_w=240, max_frames=128, in_channels=16, out_channels=16,
        patch_spatial=2, patch_temporal=1, model_channels=2048, concat_padding_mask=True, crossattn_emb_channels=1024, pos_emb_cls="rope3d",
        pos_emb_learnable=True, pos_emb_interpolation="crop", min_fps=1, max_fps=30, use_adaln_lora=True, adaln_lora_dim=256, num_blocks=2,
        num_heads=16, extra_per_block_abs_pos_emb=False, rope_h_extrapolation_ratio=4.0, rope_w_extrapolation_ratio=4.0, rope_t_extrapolation_ratio=1.0), "cosmos_predict2"),
    "sdxl": ("SDXL", UNET | dict(num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10],
        channel_mult=[1, 2, 4], transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10]), "sdxl"),
    "sd15": ("SD15", UNET | dict(adm_in_channels=None, num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        channel_mult=[1, 2, 4, 4], transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768, num_heads=8,
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]), "sd15"),
}

FAMILIES |= {
    "anima": ("Anima", dict(image_model="anima", max_img_h=240, max_img_w=240, max_frames=128, in_channels=16, out_channels=16,
        patch_spatial=2, patch_temporal=1, model_channels=2048, concat_padding_mask=True, crossattn_emb_channels=1024, pos_emb_cls="rope3d",
        pos_emb_learnable=True, pos_emb_interpolation="crop", min_fps=1, max_fps=30, use_adaln_lora=True, adaln_lora_dim=256, num_blocks=2,
        num_heads=16, extra_per_block_abs_pos_emb=False, rope_h_extrapolation_ratio=4.0, rope_w_extrapolation_ratio=4.0, rope_t_extrapolation_ratio=1.0), "anima"),
    "kandinsky5": ("Kandinsky5", dict(image_model="kandinsky5", model_dim=1792, axes_dims=(16, 24, 24), time_dim=512, ff_dim=7168,
        visual_embed_dim=132, num_text_blocks=2, num_visual_blocks=2), "kandinsky5"),
    "omnigen2": ("Omnigen2", dict(image_model="omnigen2", axes_dim_rope=[40, 40, 40], axes_lens=[1024, 1664, 1664], ffn_dim_multiplier=None,
        hidden_size=2520, in_channels=16, multiple_of=256, norm_eps=1e-05, num_attention_heads=21, num_kv_heads=7, num_layers=2,
        num_refiner_layers=2, out_channels=None, patch_size=2, text_feat_dim=2048, timestep_scale=1000.0), "omnigen2"),
    "cogvideox": ("CogVideoX_T2V", dict(image_model="cogvideox", num_attention_heads=30, attention_head_dim=64, time_embed_dim=512,
        num_layers=2, in_channels=16, patch_size=2, text_embed_dim=4096, use_learned_positional_embeddings=False,
        use_rotary_positional_embeddings=True), "cogvideox"),
    "stable_cascade_c": ("Stable_Cascade_C", dict(stable_cascade_stage="c"), "stable_cascade"),
    "hunyuan3d_21": ("Hunyuan3Dv2_1", dict(image_model="hunyuan3d2_1"), "hunyuan3d"),
    "hunyuan_image_21": ("HunyuanImage21", dict(image_model="hunyuan_video", in_channels=64, out_channels=64, vec_in_dim=None, context_in_dim=3584,
        hidden_size=3584, mlp_ratio=4.0, num_heads=28, depth=2, depth_single_blocks=2, axes_dim=[64, 64], theta=256, patch_size=[1, 1],
        qkv_bias=True, guidance_embed=False, byt5=True, meanflow=False, use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False), "hunyuan"),

    "lens": ("Lens", dict(image_model="lens"), "lens"),
    "krea2": ("Krea2", dict(image_model="krea2"), "krea2"),
    "ideogram4": ("Ideogram4", dict(image_model="ideogram4"), "ideogram4"),
    "ernie": ("ErnieImage", dict(image_model="ernie"), "ernie"),
    "ace": ("ACEStep", dict(audio_model="ace", attention_head_dim=128, in_channels=8, inner_dim=2560, max_height=16, max_position=32768,
        max_width=32768, mlp_ratio=2.5, num_attention_heads=20, num_layers=2, out_channels=8, patch_size=[16, 1], rope_theta=1000000.0,
        speaker_embedding_dim=512, text_embedding_dim=768, ssl_encoder_depths=[8, 8], ssl_latent_dims=[1024, 768],
        ssl_names=["mert", "m-hubert"], lyric_encoder_vocab_size=6693, lyric_hidden_size=1024), "ace"),
    "wan22_5b": ("WAN22_T2V", dict(image_model="wan2.1", dim=3072, out_dim=48, num_heads=24, ffn_dim=14336, num_layers=2, patch_size=(1,2,2),
        freq_dim=256, window_size=(-1,-1), qk_norm=True, cross_attn_norm=True, eps=1e-6, in_dim=48, model_type="t2v"), "wan"),
    "hunyuan3d_20": ("Hunyuan3Dv2", dict(image_model="hunyuan3d2"), "hunyuan3d"),
}
FAMILIES |= {
    "boogu": ("Boogu", dict(image_model="boogu"), "boogu"),
    "seedvr2_3b": ("SeedVR2", dict(image_model="seedvr2", vid_dim=2560, heads=20, num_layers=32, norm_eps=1e-5, mlp_type="swiglu", vid_out_norm=True), "seedvr2"),
    "triposplat": ("TripoSplat", dict(image_model="triposplat"), "triposplat"),
    "hidream_o1": ("HiDreamO1", dict(image_model="hidream_o1"), "hidream_o1"),
    "joyimage": ("JoyImage", dict(image_model="joyimage", in_channels=16, hidden_size=3072, patch_size=[1, 2, 2], num_layers=2, num_attention_heads=24, text_dim=4096), "joyimage"),
    "pixeldit": ("PixelDiTT2I", dict(image_model="pixeldit_t2i"), "pixeldit"),
    "minimax_h3": ("MiniMaxH3", dict(image_model="minimax_h3", num_layers=2, token_refiner_num_layers=1, hidden_size=1024, latents_dim=16, audio_latents_dim=64,
        attention_head_dim=128, num_attention_heads=8, ffn_hidden_size=4096, text_dim=2048, timestep_input_dim=256, time_embed_hidden_size=1024, time_embed_dim=1024, rope_inv_freq_len=32), "minimax_h3"),
}

def comfyui_keys(family: str) -> list[str]:
    """The diffusion model's tensor names as ComfyUI builds (and saves) it, from its own class on meta."""
    comfy = comfyui.import_comfyui()
    cls, config, _ = FAMILIES[family]
    model_config = getattr(comfy.supported_models, cls)(dict(config))
    model = model_config.get_model({}, device=torch.device("meta"))
    return list(model.diffusion_model.state_dict())


# -- namings ------------------------------------------------------------------------------------

def release_flux(key: str) -> str:
    """FLUX.1/FLUX.2 releases: RMSNorm scales as ``.scale`` (ComfyUI's Flux renames ``_norm.scale``)."""
    return re.sub(r"_norm\.weight$", "_norm.scale", key)


def release_chroma(key: str) -> str:
    """Chroma releases: every RMSNorm as ``.scale`` (ComfyUI's Chroma renames any ``.scale``)."""
    return re.sub(r"(_norm|norms\.\d+|\.norm)\.weight$", r"\1.scale", key)


#: ComfyUI's HunyuanVideo.process_unet_state_dict, undone (most specific first).
_HUNYUAN_RELEASE = (
    ("txt_in.t_embedder.in_layer.", "txt_in.t_embedder.mlp.0."), ("txt_in.t_embedder.out_layer.", "txt_in.t_embedder.mlp.2."),
    ("txt_in.c_embedder.in_layer.", "txt_in.c_embedder.linear_1."),
    ("txt_in.c_embedder.out_layer.", "txt_in.c_embedder.linear_2."),
    ("_attn.norm.query_norm.weight", "_attn_q_norm.weight"), ("_attn.norm.key_norm.weight", "_attn_k_norm.weight"),
    (".norm.query_norm.weight", ".q_norm.weight"), (".norm.key_norm.weight", ".k_norm.weight"),
    ("_mod.lin.", "_mod.linear."), ("_attn.qkv.", "_attn_qkv."), ("_attn.proj.", "_attn_proj."),
    (".modulation.lin.", ".modulation.linear."), ("_in.in_layer.", "_in.mlp.0."), ("_in.out_layer.", "_in.mlp.2."),
    ("_mlp.0.", "_mlp.fc1."), ("_mlp.2.", "_mlp.fc2."),
)


def release_hunyuan(key: str) -> str:
    for comfy_name, release_name in _HUNYUAN_RELEASE:
        key = key.replace(comfy_name, release_name)
    return key


RELEASE: dict[str, Callable[[str], str]] = {
    "flux1_dev": release_flux, "flux1_schnell": release_flux, "flux2": release_flux,
    "chroma": release_chroma, "chroma_radiance": release_chroma,
    "hunyuan_video": release_hunyuan, "hunyuan_video_15": release_hunyuan, "hunyuan_image_21": release_hunyuan,
    "hunyuan3d_20": release_flux,
    "pixeldit": lambda key: "core." + key,  # ComfyUI's PixelDiT strips the release's core. wrapper
}

PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")


def namings(family: str) -> dict[str, list[str]]:
    keys = comfyui_keys(family)
    release = RELEASE.get(family, lambda k: k)
    return {"comfyui": keys, "release": [release(k) for k in keys]}


@pytest.fixture(scope="module")
def keysets():
    return {family: namings(family) for family in FAMILIES}


CASES = [(family, naming) for family in sorted(FAMILIES) for naming in ("comfyui", "release")
         if naming == "comfyui" or family in RELEASE]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(("family", "naming"), CASES)
def test_every_family_is_detected_in_every_naming(keysets, family, naming, prefix):
    keys = [prefix + k for k in keysets[family][naming]]
    detection = detect(keys)
    expected = FAMILIES[family][2]
    assert detection is not None and detection.preset == expected, (family, naming, detection)
    assert detection.prefix == prefix


def test_the_release_naming_really_differs_where_comfyui_renames(keysets):
    """The namings test something: where ComfyUI renames on load, the release keys are not ComfyUI's."""
    for family in RELEASE:
        assert set(keysets[family]["release"]) != set(keysets[family]["comfyui"]), family


# -- text encoders ------------------------------------------------------------------------------

#: name under text_encoders. -> (module in comfy.text_encoders, class, the preset detection must pick)
TEXT_ENCODERS: dict[str, tuple[str, str, str]] = {
    "t5xxl": ("sd3_clip", "T5XXLModel", "t5xxl"),
    "umt5xxl": ("wan", "UMT5XXlModel", "umt5"),
    "mt5xl": ("hydit", "MT5XLModel", "t5xxl"),
    "byt5": ("hunyuan_image", "ByT5SmallModel", "t5xxl"),
    "clip_h": ("sd2_clip", "SD2ClipHModel", "clip"),
    "llama": ("hunyuan_video", "LLAMAModel", "generic_text"),
    "qwen25_7b": ("qwen_image", "Qwen25_7BVLIModel", "generic_text"),
    "qwen3_4b": ("z_image", "Qwen3_4BModel", "generic_text"),
    "gemma2_2b": ("lumina2", "Gemma2_2BModel", "generic_text"),
    "gemma3_12b": ("lt", "Gemma3_12BModel", "generic_text"),
    "mistral3_24b": ("flux", "Mistral3_24BModel", "generic_text"),
    "qwen35": ("qwen35", "Qwen35ClipModel", "qwen35"),
}


def text_encoder_keys(name: str) -> list[str]:
    """A text encoder's tensor names as ComfyUI builds it (``transformer.`` wrapper included), on meta."""
    import importlib

    comfyui.import_comfyui()
    module, cls, _ = TEXT_ENCODERS[name]
    if module == "sd1_clip":
        model_class = importlib.import_module("comfy.sd1_clip").SDClipModel
    else:
        model_class = getattr(importlib.import_module(f"comfy.text_encoders.{module}"), cls)
    return list(model_class(device="meta").state_dict())


TEXT_ENCODERS["clip_l"] = ("sd1_clip", "SDClipModel", "clip")


@pytest.mark.parametrize("name", sorted(TEXT_ENCODERS))
def test_every_text_encoder_is_detected_alone_and_in_an_all_in_one_file(name):
    keys = text_encoder_keys(name)
    expected = TEXT_ENCODERS[name][2]
    for prefix in ("", f"text_encoders.{name}.", "cond_stage_model."):
        components = detect_components([prefix + k for k in keys])
        assert [(c.preset, c.prefix) for c in components] == [(expected, prefix)], (name, prefix, components)


def test_an_all_in_one_file_from_comfyui_classes_gets_one_component_each():
    diffusion = ["model.diffusion_model." + k for k in comfyui_keys("flux1_dev")]
    encoders = [f"text_encoders.{n}." + k for n in ("clip_l", "t5xxl") for k in text_encoder_keys(n)]
    vae = ["vae.decoder.conv_in.weight", "vae.encoder.conv_in.weight", "vae.decoder.mid.attn_1.q.weight"]
    components = detect_components(diffusion + encoders + vae)
    assert [(c.preset, c.prefix) for c in components] == [
        ("flux", "model.diffusion_model."), ("t5xxl", "text_encoders.t5xxl."), ("clip", "text_encoders.clip_l."),
        ("vae", "vae.")]


def test_an_sdxl_and_an_sd15_all_in_one_file_get_one_component_each():
    """SD checkpoints: the UNet under model.diffusion_model., CLIP under conditioner.embedders.N. (SDXL, the second
    in OpenCLIP naming) or cond_stage_model. (SD 1.x), the VAE under first_stage_model."""
    clip_l = text_encoder_keys("clip_l")  # transformer.text_model....
    open_clip_g = ["model.token_embedding.weight", "model.positional_embedding", "model.text_projection",
                   "model.ln_final.weight", *(f"model.transformer.resblocks.{i}.{name}" for i in range(2) for name in (
                       "attn.in_proj_weight", "attn.out_proj.weight", "ln_1.weight", "mlp.c_fc.weight"))]
    vae = ["first_stage_model.decoder.conv_in.weight", "first_stage_model.encoder.conv_in.weight"]
    sdxl = (["model.diffusion_model." + k for k in comfyui_keys("sdxl")] + ["conditioner.embedders.0." + k for k in clip_l]
            + ["conditioner.embedders.1." + k for k in open_clip_g] + vae)
    assert [(c.preset, c.prefix) for c in detect_components(sdxl)] == [
        ("sdxl", "model.diffusion_model."), ("clip", "conditioner.embedders.0."), ("clip", "conditioner.embedders.1.model."),
        ("vae", "first_stage_model.")]
    sd15 = ["model.diffusion_model." + k for k in comfyui_keys("sd15")] + ["cond_stage_model." + k for k in clip_l] + vae
    assert [(c.preset, c.prefix) for c in detect_components(sd15)] == [
        ("sd15", "model.diffusion_model."), ("clip", "cond_stage_model."), ("vae", "first_stage_model.")]


#: Presets that keep Linear layers inside repeated blocks on purpose, and the patterns that do it.
PER_BLOCK_KEEPS = {
    "chroma": ("distilled_guidance_layer",), "chroma_radiance": ("distilled_guidance_layer", "nerf_blocks"),
    "krea2": ("txtfusion",), "triposplat": ("repo_layers",), "zimage": ("adaLN_modulation",),
    "lens": ("img_mod.1", "txt_mod.1"), "hidream": (".gate.",), "anima": ("llm_adapter",),
    "ltxv2": ("transformer_blocks.0.", "transformer_blocks.1."),  # the first two and last two, from the depth
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_no_preset_keeps_every_block_by_accident(family):
    """A substring that also names a layer inside every block (``out.`` in ``to_out.0``, a block's own
    ``out_layer``) would keep most of the model in high precision; only listed patterns may."""
    comfy = comfyui.import_comfyui()
    cls, config, preset_name = FAMILIES[family]
    state = getattr(comfy.supported_models, cls)(dict(config)).get_model({}, device=torch.device("meta"))
    keys = {k: v for k, v in state.diffusion_model.state_dict().items() if k.endswith(".weight") and v.dim() == 2}
    preset = next(p for p in PRESETS if p.name == preset_name).for_checkpoint(list(keys))
    allowed = PER_BLOCK_KEEPS.get(preset_name, ())
    in_block = re.compile(r"(?:^|\.)[a-z_]*(?:blocks|layers)\.[1-9]\d*\.")
    for key in keys:
        rule = preset.rule_for(key)
        if rule is not None and in_block.search(key) and not any(p in key for p in allowed):
            pytest.fail(f"{preset_name} keeps {key} through {rule[1]!r}")
