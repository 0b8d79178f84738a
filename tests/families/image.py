"""Image diffusion transformers ComfyUI 0.30 detects (``comfy/model_detection.py``, ``supported_models.py``).

Each tiny model is the ``unet_config`` detection returns for the real
checkpoint with small widths (see ``_dit.tiny``); the comment on each says
which shapes detection reads, since only those may shrink. Families whose
detection hard-codes full widths are in ``IMPOSSIBLE``.
"""

from __future__ import annotations

import torch

from tests.families import Family, Impossible
from tests.families._dit import builder, comfyui, from_diffusers_map, prefixed, rand, renamed, run, with_prefix

# FLUX.1 and FLUX.2 releases (BFL's own files) name the QK-norm weights `.scale`;
# ComfyUI's Flux.process_unet_state_dict renames `_norm.scale` to `_norm.weight`.
FLUX_RELEASE = renamed(("_norm.weight", "_norm.scale"))


def _flux_diffusers(comfy, state):
    from comfy.model_detection import count_blocks

    return comfy.utils.flux_to_diffusers({
        "depth": count_blocks(state, "double_blocks.{}."),
        "depth_single_blocks": count_blocks(state, "single_blocks.{}."),
        "hidden_size": state["img_in.weight"].shape[0],
    })


def _sd3_diffusers(comfy, state):
    from comfy.model_detection import count_blocks

    return comfy.utils.mmdit_to_diffusers({
        "depth": state["x_embedder.proj.weight"].shape[0] // 64,
        "num_blocks": count_blocks(state, "joint_blocks.{}."),
    })


# HunyuanVideo / HunyuanImage release names; HunyuanVideo.process_unet_state_dict maps them to ComfyUI's.
HUNYUAN_RELEASE = renamed(
    ("mlp.0.", "mlp.fc1."),
    ("mlp.2.", "mlp.fc2."),
    ("txt_in.t_embedder.in_layer.", "txt_in.t_embedder.mlp.0."),
    ("txt_in.t_embedder.out_layer.", "txt_in.t_embedder.mlp.2."),
    ("txt_in.c_embedder.in_layer.", "txt_in.c_embedder.linear_1."),
    ("txt_in.c_embedder.out_layer.", "txt_in.c_embedder.linear_2."),
    ("_mod.lin.", "_mod.linear."),
    ("_attn.qkv.", "_attn_qkv."),
    ("_attn.proj.", "_attn_proj."),
    ("_attn.norm.query_norm.weight", "_attn_q_norm.weight"),
    ("_attn.norm.key_norm.weight", "_attn_k_norm.weight"),
    (".norm.query_norm.weight", ".q_norm.weight"),
    (".norm.key_norm.weight", ".k_norm.weight"),
    (".modulation.lin.", ".modulation.linear."),
    ("_in.in_layer.", "_in.mlp.0."),
    ("_in.out_layer.", "_in.mlp.2."),
)


def _t(value: float = 0.5) -> torch.Tensor:
    return torch.tensor([value])


# --- FLUX.1 / FLUX.2 -------------------------------------------------------
# Detection reads img_in (in_channels, hidden), txt_in (context), vector_in, the
# block counts; num_heads = hidden / sum(axes_dim) = 128 / 128.

FLUX_CONFIG = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                   hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1,
                   axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                   txt_ids_dims=[], yak_mlp=False, txt_norm=False)


def _flux_forward(guidance: bool):
    def forward(model, seed):
        g = torch.Generator().manual_seed(seed)
        x, context, y = rand(g, 1, 16, 8, 8), rand(g, 1, 7, 32), rand(g, 1, 32)
        extra = {"guidance": torch.tensor([3.5])} if guidance else {}
        return run(lambda: model(x, _t(), context=context, y=y, **extra))

    return forward


def _longcat_forward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, context = rand(g, 1, 16, 8, 8), rand(g, 1, 7, 3584)
    return run(lambda: model(x, _t(), context=context))


FLUX2_CONFIG = dict(image_model="flux2", axes_dim=[32, 32, 32, 32], num_heads=1, mlp_ratio=3.0, theta=2000,
                    out_channels=128, global_modulation=True, mlp_silu_act=True, qkv_bias=False, ops_bias=False,
                    default_ref_method="index", ref_index_scale=10.0, txt_ids_dims=[3], patch_size=1,
                    in_channels=128, hidden_size=128, context_in_dim=64, vec_in_dim=None, depth=1,
                    depth_single_blocks=1, guidance_embed=True, yak_mlp=False, txt_norm=False)


def _flux2_forward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, context = rand(g, 1, 128, 4, 4), rand(g, 1, 7, 64)
    return run(lambda: model(x, _t(), context=context, guidance=torch.tensor([3.5])))


# --- SD3 / SD3.5 (MMDiT) ---------------------------------------------------
# Detection: depth = x_embedder width / 64 (so hidden 64, one head), context_embedder,
# y_embedder, pos_embed, ln_q (3.5's RMS QK norm).

SD3_CONFIG = dict(in_channels=16, patch_size=2, out_channels=16, depth=1, input_size=None, adm_in_channels=64,
                  context_embedder_config={"target": "torch.nn.Linear",
                                           "params": {"in_features": 32, "out_features": 64}},
                  num_patches=1024, pos_embed_max_size=32, qk_norm="rms", pos_embed_scaling_factor=None,
                  x_block_self_attn_layers=[])


def _sd3_forward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, context, y = rand(g, 1, 16, 8, 8), rand(g, 1, 7, 32), rand(g, 1, 64)
    return run(lambda: model(x, _t(), context=context, y=y))


# --- HunyuanDiT ------------------------------------------------------------
# Detection reads x_embedder (hidden) and the block count; the text widths (CLIP 1024,
# mT5 2048, pooler) are the class's fixed defaults, so this tiny one is ~42M parameters.

def _hydit_forward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x = rand(g, 1, 4, 8, 8)
    context, context_t5 = rand(g, 1, 77, 1024), rand(g, 1, 256, 2048)
    return run(lambda: model(x, _t(500.0), context=context, text_embedding_mask=torch.ones(1, 77),
                             encoder_hidden_states_t5=context_t5, text_embedding_mask_t5=torch.ones(1, 256),
                             image_meta_size=None, style=None))


# --- HunyuanImage 2.1 (HunyuanVideo architecture, 2-D patches) --------------
# Detection: num_heads = hidden / 128; byT5 projection omitted (its widths are fixed, 7M).

HUNYUAN_IMAGE21_CONFIG = dict(image_model="hunyuan_video", in_channels=64, patch_size=[1, 1], out_channels=64,
                              vec_in_dim=None, axes_dim=[64, 64], meanflow=False, context_in_dim=32,
                              hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1,
                              theta=256, qkv_bias=True, byt5=False, guidance_embed=False,
                              use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False)


def _hunyuan_image_forward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, context = rand(g, 1, 64, 8, 8), rand(g, 1, 7, 32)
    return run(lambda: model(x, _t(), context=context))


# --- Krea 2 ----------------------------------------------------------------
# Detection: features from `first`, heads = wq / 128, kvheads, txtlayers, txtdim.
KREA2_CONFIG = dict(image_model="krea2", features=128, channels=16, patch=2, layers=1, heads=1, kvheads=1,
                    txtlayers=2, txtdim=40)


def _krea2_forward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, context = rand(g, 1, 16, 8, 8), rand(g, 1, 7, 2 * 40)  # (B, seq, txtlayers * txtdim)
    return run(lambda: model(x, _t(), context))


# --- Lens ------------------------------------------------------------------
# Detection: in/out channels, heads = img_in / 64, enc_hidden_dim from txt_norm.
LENS_CONFIG = dict(image_model="lens", in_channels=64, out_channels=16, num_layers=1, num_attention_heads=1,
                   enc_hidden_dim=48, multi_layer_encoder_feature=False, selected_layer_index=(0,))


def _lens_forward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, context = rand(g, 1, 64, 4, 4), rand(g, 1, 7, 48)  # latents arrive patchified (4 x 16 channels)
    return run(lambda: model(x, _t(), context))


# --- JoyImage --------------------------------------------------------------
# Detection: img_in (Conv3d) gives in_channels, hidden, patch; heads = hidden / q_norm width.
JOYIMAGE_CONFIG = dict(image_model="joyimage", in_channels=16, hidden_size=128, patch_size=[1, 2, 2], num_layers=1,
                       num_attention_heads=1, text_dim=4096)


def _joyimage_forward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, context = rand(g, 1, 16, 1, 8, 8), rand(g, 1, 7, 4096)
    return run(lambda: model(x, _t(), context))


# --- Cosmos-Predict2 (text to image) ----------------------------------------
# Detection reads model_channels; block count and heads are the class defaults (10, 16)
# unless the width is 2048 or 5120, so the tiny one has 10 blocks of width 256 (~23M).
COSMOS_PREDICT2_CONFIG = dict(
    image_model="cosmos_predict2", max_img_h=240, max_img_w=240, max_frames=128, in_channels=16, out_channels=16,
    patch_spatial=2, patch_temporal=1, model_channels=256, concat_padding_mask=True, crossattn_emb_channels=1024,
    pos_emb_cls="rope3d", pos_emb_learnable=True, pos_emb_interpolation="crop", min_fps=1, max_fps=30,
    use_adaln_lora=True, adaln_lora_dim=256, extra_per_block_abs_pos_emb=False, rope_h_extrapolation_ratio=4.0,
    rope_w_extrapolation_ratio=4.0, rope_t_extrapolation_ratio=1.0, extra_h_extrapolation_ratio=1.0,
    extra_w_extrapolation_ratio=1.0, extra_t_extrapolation_ratio=1.0, rope_enable_fps_modulation=False)


def cosmos_forward(in_channels: int):
    def forward(model, seed):
        g = torch.Generator().manual_seed(seed)
        x, context = rand(g, 1, in_channels, 1, 8, 8), rand(g, 1, 7, 1024)
        return run(lambda: model(x, _t(), context))

    return forward


FAMILIES = [
    Family("flux", builder(FLUX_CONFIG, "Flux"), preset="flux", forward=_flux_forward(True),
           namings={"comfyui": comfyui, "prefixed": prefixed, "release": FLUX_RELEASE,
                    "diffusers": from_diffusers_map(_flux_diffusers)},
           notes="FLUX.1 dev (guidance_in)."),
    Family("flux_schnell", builder({**FLUX_CONFIG, "guidance_embed": False}, "FluxSchnell"), preset="flux",
           forward=_flux_forward(False), namings={"comfyui": comfyui, "prefixed": prefixed, "release": FLUX_RELEASE},
           notes="FLUX.1 schnell (no guidance_in)."),
    Family("longcat_image", builder({**FLUX_CONFIG, "guidance_embed": False, "vec_in_dim": None,
                                     "context_in_dim": 3584, "txt_ids_dims": [1, 2]}, "LongCatImage"),
           preset="flux", forward=_longcat_forward, namings={"comfyui": comfyui, "prefixed": prefixed},
           notes="A FLUX.1 variant recognised by context_in_dim 3584 and no vector_in."),
    Family("flux2", builder(FLUX2_CONFIG, "Flux2"), preset="flux2", forward=_flux2_forward,
           namings={"comfyui": comfyui, "prefixed": prefixed, "release": FLUX_RELEASE}),
    Family("sd3", builder(SD3_CONFIG, "SD3"), preset="sd3", forward=_sd3_forward,
           namings={"comfyui": comfyui, "prefixed": prefixed, "diffusers": from_diffusers_map(_sd3_diffusers)},
           notes="SD3.5-style MMDiT (RMS QK norm, ln_q)."),
    Family("hunyuan_dit", builder({"image_model": "hydit", "depth": 2, "hidden_size": 128}, "HunyuanDiT"),
           preset="hunyuan_dit", forward=_hydit_forward, namings={"comfyui": comfyui, "prefixed": prefixed},
           notes="Text projections keep their fixed full widths (~42M parameters)."),
    Family("hunyuan_image21", builder(HUNYUAN_IMAGE21_CONFIG, "HunyuanImage21"), preset="hunyuan",
           forward=_hunyuan_image_forward,
           namings={"comfyui": comfyui, "prefixed": prefixed, "release": HUNYUAN_RELEASE},
           notes="HunyuanImage 2.1 is HunyuanVideo's class with 2-D patches: the hunyuan preset."),
    Family("krea2", builder(KREA2_CONFIG, "Krea2"), preset="krea2", forward=_krea2_forward,
           namings={"comfyui": comfyui, "prefixed": prefixed}),
    Family("lens", builder(LENS_CONFIG, "Lens"), preset="lens", forward=_lens_forward,
           namings={"comfyui": comfyui, "prefixed": prefixed}),
    Family("joyimage", builder(JOYIMAGE_CONFIG, "JoyImage"), preset="joyimage", forward=_joyimage_forward,
           namings={"comfyui": comfyui, "prefixed": prefixed}),
    Family("cosmos_predict2_t2i", builder(COSMOS_PREDICT2_CONFIG, "CosmosT2IPredict2"), preset="cosmos_predict2",
           forward=cosmos_forward(16),
           namings={"comfyui": comfyui, "prefixed": prefixed, "release": with_prefix("net.")},
           notes="Cosmos releases keep the `net.` prefix. Ten blocks: detection keeps the class's block count below width 2048."),
]

IMPOSSIBLE = [
    Impossible("chroma", "detection hard-codes the distilled-guidance approximator (in 64, hidden 5120, out 3072, "
                         "5 layers: ~260M parameters) and its out_dim must equal the hidden size 3072"),
    Impossible("chroma_radiance", "as chroma: the approximator widths are hard-coded (hidden 5120, out 3072)"),
    Impossible("aura_flow", "detection reads max_seq, cond_seq_dim and depth only; width 3072 is the class default"),
    Impossible("pixart_alpha/pixart_sigma", "detection hard-codes hidden 1152 and 16 heads"),
    Impossible("qwen_image", "detection reads in_channels and depth only; width 3072 (24 x 128) is the class default"),
    Impossible("mage_flow", "detection keys on txt_norm width 2560 and hard-codes the rest"),
    Impossible("lumina2", "detection sets heads and axes only for dim 2304 (Lumina 2) or 3840 (Z-Image); other "
                          "widths get the class's 32 heads and 128-wide axes, which cannot fit a small dim"),
    Impossible("z_image/z_image_pixel", "as lumina2: Z-Image is recognised by dim == 3840 exactly"),
    Impossible("hidream", "detection returns a fixed full-size config (16 + 32 layers, 20 x 128 heads)"),
    Impossible("hidream_o1", "detection returns only image_model; every width is the class default"),
    Impossible("omnigen2", "detection returns a fixed full-size config (hidden 2520, 32 layers)"),
    Impossible("boogu", "heads (28), kv heads and rope axes (3 x 40) are class defaults: hidden must be 3360"),
    Impossible("ideogram4", "detection reads in_channels and depth only; 18 x 256 heads are class defaults"),
    Impossible("ernie_image", "detection returns only image_model; every width is the class default"),
    Impossible("kandinsky5_image", "supported_models.Kandinsky5Image requires model_dim 2560"),
    Impossible("anima", "Cosmos-Predict2 plus an LLM adapter whose widths are hard-coded (~135M parameters)"),
    Impossible("pixeldit_t2i/pid", "detection returns fixed configs (pixel-space DiTs); not built yet"),
    Impossible("flux_inpaint/flux_fill", "FLUX.1 with in_channels 96 and 384: same class and preset as flux; "
                                         "not built separately"),
]
