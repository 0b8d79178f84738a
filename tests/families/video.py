"""Video diffusion transformers ComfyUI 0.30 detects (``comfy/model_detection.py``, ``supported_models.py``).

As in ``image.py``: each tiny model is the ``unet_config`` detection returns
for the real checkpoint with small widths; comments say which shapes
detection reads. Families whose detection hard-codes full widths are in
``IMPOSSIBLE``.
"""

from __future__ import annotations

import json

import torch

from tests.families import Family, Impossible
from tests.families._dit import builder, comfyui, prefixed, rand, run
from tests.families.image import COSMOS_PREDICT2_CONFIG, HUNYUAN_RELEASE, cosmos_forward


def _t(value: float = 0.5) -> torch.Tensor:
    return torch.tensor([value])


# --- WAN 2.1 / 2.2 -----------------------------------------------------------
# Detection: dim from head.modulation (heads = dim / 128), out_dim, ffn_dim, in_dim from
# patch_embedding, block count; the variant from marker layers (img_emb, vace_*, ...).

WAN_CONFIG = dict(image_model="wan2.1", dim=128, out_dim=16, num_heads=1, ffn_dim=256, num_layers=1,
                  patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True,
                  eps=1e-6, in_dim=16, model_type="t2v")


def _wan_forward(in_dim: int, clip: bool = False, vace_in_dim: int | None = None):
    def forward(model, seed):
        g = torch.Generator().manual_seed(seed)
        x, context = rand(g, 1, in_dim, 2, 8, 8), rand(g, 1, 7, 4096)
        extra = {}
        if clip:
            extra["clip_fea"] = rand(g, 1, 257, 1280)
        if vace_in_dim is not None:
            extra["vace_context"] = rand(g, 1, 1, vace_in_dim, 2, 8, 8)  # (contexts, B, C, T, H, W)
            extra["vace_strength"] = [1.0]
        return run(lambda: model(x, _t(), context, **extra))

    return forward


# --- LTX-Video (v1) ------------------------------------------------------------
# Detection: attention_head_dim = attn2.to_k rows / 32 (the class's 32 heads), cross_attention_dim,
# block count. Head dim 4 gives width 128.
LTXV_CONFIG = dict(image_model="ltxv", num_layers=1, attention_head_dim=4, cross_attention_dim=128)


def _ltxv_forward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, context = rand(g, 1, 128, 2, 4, 4), rand(g, 1, 7, 4096)
    return run(lambda: model(x, _t(), context, attention_mask=None, frame_rate=25))


# --- LTX-2 (audio + video) -------------------------------------------------------
# Detection reads what LTXV reads, then merges the file's `config` metadata ("transformer"),
# as the real LTX-2 files carry it; the tiny one shrinks the audio side and connectors there.
LTXAV_TRANSFORMER = dict(audio_cross_attention_dim=64, audio_attention_head_dim=2, audio_num_attention_heads=32,
                         caption_channels=64, connector_attention_head_dim=2, connector_num_attention_heads=32,
                         connector_num_layers=1)
LTXAV_CONFIG = dict(image_model="ltxav", num_layers=1, attention_head_dim=4, cross_attention_dim=128,
                    **LTXAV_TRANSFORMER)
LTXAV_METADATA = {"config": json.dumps({"transformer": LTXAV_TRANSFORMER})}


def _ltxav_forward(model, seed):
    g = torch.Generator().manual_seed(seed)
    video, audio = rand(g, 1, 128, 2, 4, 4), rand(g, 1, 8, 5, 16)  # audio: (B, 8 channels, length, 16 bins)
    context = rand(g, 1, 7, 2 * 64)  # video and audio caption features, side by side
    return run(lambda: model([video, audio], _t(), context, attention_mask=None, frame_rate=25))


# --- HunyuanVideo 1 / 1.5 --------------------------------------------------------
# Detection: img_in (in_channels, 3-D patch, hidden; heads = hidden / 128), txt_in, final_layer,
# block counts, marker layers (guidance_in, byt5_in, cond_type_embedding, vision_in).
HUNYUAN_VIDEO_CONFIG = dict(image_model="hunyuan_video", in_channels=16, patch_size=[1, 2, 2], out_channels=16,
                            vec_in_dim=768, axes_dim=[16, 56, 56], meanflow=False, context_in_dim=32,
                            hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1, theta=256,
                            qkv_bias=True, byt5=False, guidance_embed=True, use_cond_type_embedding=False,
                            vision_in_dim=None, meanflow_sum=False)
HUNYUAN_VIDEO15_CONFIG = {**HUNYUAN_VIDEO_CONFIG, "in_channels": 65, "patch_size": [1, 1, 1], "out_channels": 32,
                          "vec_in_dim": None, "depth_single_blocks": 0, "byt5": True, "guidance_embed": False,
                          "use_cond_type_embedding": True, "vision_in_dim": 1152, "meanflow_sum": True}


def _hunyuan_video_forward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, context, y = rand(g, 1, 16, 2, 8, 8), rand(g, 1, 7, 32), rand(g, 1, 768)
    return run(lambda: model(x, _t(), context, y=y, guidance=torch.tensor([3.5])))


def _hunyuan_video15_forward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, context = rand(g, 1, 65, 2, 4, 4), rand(g, 1, 7, 32)
    return run(lambda: model(x, _t(), context))


# --- CogVideoX -------------------------------------------------------------------
# Detection: dim = norm1 rows / 6 (heads = dim / 64), time_embed_dim, patch_embed, text_proj.
COGVIDEOX_CONFIG = dict(image_model="cogvideox", num_attention_heads=2, attention_head_dim=64, time_embed_dim=64,
                        num_layers=1, in_channels=16, patch_size=2, text_embed_dim=64,
                        use_learned_positional_embeddings=False, use_rotary_positional_embeddings=True)


def _cogvideox_forward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, context = rand(g, 1, 16, 2, 8, 8), rand(g, 1, 7, 64)
    return run(lambda: model(x, _t(500.0), context))


# --- Kandinsky 5 (video) ---------------------------------------------------------
# Detection: model_dim, time_dim, ff_dim, visual_embed_dim, block counts; axes (16, 24, 24) give
# heads of 64, so model_dim 128 is two heads.
KANDINSKY5_CONFIG = dict(image_model="kandinsky5", model_dim=128, time_dim=64, ff_dim=256, visual_embed_dim=132,
                         num_text_blocks=1, num_visual_blocks=1)


def _kandinsky5_forward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, context, y = rand(g, 1, 33, 2, 8, 8), rand(g, 1, 7, 3584), rand(g, 1, 768)  # 16 latent + 16 cond + mask
    return run(lambda: model(x, _t(), context, y))


# --- Cosmos-Predict2 (image to video) ---------------------------------------------
COSMOS_PREDICT2_I2V_CONFIG = {**COSMOS_PREDICT2_CONFIG, "in_channels": 17, "rope_h_extrapolation_ratio": 3.0,
                              "rope_w_extrapolation_ratio": 3.0}

WAN_NAMINGS = {"comfyui": comfyui, "prefixed": prefixed}

FAMILIES = [
    Family("wan21_t2v", builder(WAN_CONFIG, "WAN21_T2V"), preset="wan", forward=_wan_forward(16),
           namings=WAN_NAMINGS, notes="WAN's release names are ComfyUI's."),
    Family("wan21_i2v", builder({**WAN_CONFIG, "in_dim": 36, "model_type": "i2v"}, "WAN21_I2V"), preset="wan",
           forward=_wan_forward(36, clip=True), namings=WAN_NAMINGS),
    Family("wan21_vace", builder({**WAN_CONFIG, "num_layers": 2, "model_type": "vace", "vace_in_dim": 96,
                                  "vace_layers": 1}, "WAN21_Vace"),
           preset="wan", forward=_wan_forward(16, vace_in_dim=96), namings=WAN_NAMINGS),
    Family("wan22_ti2v", builder({**WAN_CONFIG, "in_dim": 48, "out_dim": 48}, "WAN22_T2V"), preset="wan",
           forward=_wan_forward(48), namings=WAN_NAMINGS, notes="WAN 2.2 TI2V 5B layout (48-channel VAE)."),
    Family("ltxv", builder(LTXV_CONFIG, "LTXV"), preset="ltxv", forward=_ltxv_forward,
           namings={"comfyui": comfyui, "prefixed": prefixed}),
    Family("ltxav", builder(LTXAV_CONFIG, "LTXAV"), preset="ltxv2", forward=_ltxav_forward, metadata=LTXAV_METADATA,
           namings={"comfyui": comfyui, "prefixed": prefixed},
           notes="LTX-2: the file's `config` metadata carries the small audio/connector widths, as real "
                 "LTX-2 files carry theirs; the forward returns video and audio, flattened into one tensor."),
    Family("hunyuan_video", builder(HUNYUAN_VIDEO_CONFIG, "HunyuanVideo"), preset="hunyuan",
           forward=_hunyuan_video_forward,
           namings={"comfyui": comfyui, "prefixed": prefixed, "release": HUNYUAN_RELEASE}),
    Family("hunyuan_video15", builder(HUNYUAN_VIDEO15_CONFIG, "HunyuanVideo15"), preset="hunyuan",
           forward=_hunyuan_video15_forward,
           namings={"comfyui": comfyui, "prefixed": prefixed, "release": HUNYUAN_RELEASE},
           notes="byT5 and SigLIP projections keep their fixed widths (~10M parameters)."),
    Family("cogvideox", builder(COGVIDEOX_CONFIG, "CogVideoX_T2V"), preset="cogvideox", forward=_cogvideox_forward,
           namings={"comfyui": comfyui, "prefixed": prefixed}),
    Family("kandinsky5", builder(KANDINSKY5_CONFIG, "Kandinsky5"), preset="kandinsky5", forward=_kandinsky5_forward,
           namings={"comfyui": comfyui, "prefixed": prefixed}),
    Family("cosmos_predict2_i2v", builder(COSMOS_PREDICT2_I2V_CONFIG, "CosmosI2VPredict2"), preset="cosmos_predict2",
           forward=cosmos_forward(17), namings={"comfyui": comfyui},
           notes="Cosmos-Predict2 video2world: in_channels 17 (the conditioning mask); ten blocks as in t2i."),
]

IMPOSSIBLE = [
    Impossible("mochi", "detection returns a fixed full-size config (48 blocks, hidden 3072)"),
    Impossible("cosmos (1.0)", "detection hard-codes 28 or 36 blocks and the heads for widths 4096 / 5120"),
    Impossible("hunyuan_video_i2v/skyreels_i2v", "HunyuanVideo with in_channels 33 / 32: same class and preset as "
                                                 "hunyuan_video; not built separately"),
    Impossible("hunyuan_video15_sr_distilled", "HunyuanVideo 1.5 super-resolution variant; not built separately"),
    Impossible("wan21_camera/wan22_camera/s2v/humo/animate/scail/flowrvs/wandancer/causal_ar",
               "WAN 2.x variants recognised by extra marker layers whose widths are fixed (audio/pose encoders); "
               "not built yet: t2v, i2v, VACE and TI2V cover the shared blocks"),
    Impossible("minimax_h3", "video+audio DiT; not built yet"),
    Impossible("seedvr2", "detection keys on block 31/35 existing and hard-codes widths 2560/3072"),
    Impossible("kandinsky5_pro", "as kandinsky5 with model_dim 4096; the tiny kandinsky5 covers the class"),
]
