"""Model-family presets: the layers of each family that must not be quantized.

Patterns are substrings of tensor names (see :class:`cq_core.plugin.types.ModelFilter`).
The lists are the facts users of existing converters rely on; where a family
hard-codes block indices (first and last blocks), the indices are derived from
the checkpoint's depth instead, so a 36-block variant keeps its own last block.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from cq_core import ModelFilter

#: Text-encoder, norm and embedding names shared by several families.
COMMON = (
    "norm", "bias", "embed_tokens", "lm_head", "shared", "patch_embedding",
    "audio_model.patch_embedding", "ref_conv", "control_adapter", "motion_encoder.enc.net_app",
    "face_encoder.conv", "pose_patch_embedding", "motion_encoder.enc.fc", "img_emb.proj",
    "k_norm", "q_norm", "motion_encoder.dec", "head.modulation", "casual_audio_encoder",
    "cond_encoder", "frame_packer", "norm_k", "norm_q", "tekken_model", "multi_modal_projector",
    "patch_conv", "ln_pre", "input_layernorm", "attention_norm", "post_attention_layernorm",
    "mm_input_projection_weight",
)

MLP_PROJECTIONS = ("mlp.down_proj", "mlp.up_proj", "mlp.gate_proj")

ZIMAGE_EXCLUDE = (
    "cap_embedder.0", "cap_pad_token", "attention_norm1", "attention_norm2", "ffn_norm1",
    "ffn_norm2", "k_norm", "q_norm", "x_pad_token",
)
ZIMAGE_HIGH_PRECISION = (
    "x_embedder", "clip_text_pooled_proj", "final_layer", "cap_embedder.1", "adaLN_modulation",
    "t_embedder", "time_text_embed",
)


def block_indices(keys: Sequence[str], container: str) -> list[int]:
    """Sorted distinct ``N`` of every ``<container>.N.`` in the tensor names."""
    pattern = re.compile(rf"(?:^|\.){re.escape(container)}\.(\d+)\.")
    return sorted({int(m.group(1)) for key in keys for m in [pattern.search(key)] if m})


def edge_blocks(container: str, first: int, last: int, *, leading_dot: bool) -> Callable[[Sequence[str]], tuple[str, ...]]:
    """A ``derive_keep`` hook: the first ``first`` and last ``last`` blocks of ``container``.

    The depth comes from the checkpoint's own names, so the same preset fits
    every depth of a family. A checkpoint without such blocks adds nothing.
    """

    def derive(keys: Sequence[str]) -> tuple[str, ...]:
        indices = block_indices(keys, container)
        chosen = sorted(set(indices[:first] + indices[len(indices) - last :] if indices else []))
        dot = "." if leading_dot else ""
        return tuple(f"{dot}{container}.{i}." for i in chosen)

    derive.__doc__ = f"first {first} and last {last} '{container}.N.' blocks, from the checkpoint's depth"
    return derive


#: The token-table default of the text-encoder presets whose families ComfyUI loads with a
#: quantized Embedding (tests/test_embeddings.py): row-wise INT8 costs all-MiniLM-L6-v2's
#: sentence embeddings 46 dB SQNR on its own (docs/int8.md), ~20 dB below FP8 linears' error.
TOKEN_TABLE_INT8 = "int8"
#: HF T5 files carry the token table twice, tied: ``shared`` and ``encoder.embed_tokens``. ComfyUI
#: builds its Embedding from ``shared`` and never reads the copy (it reports it unexpected).
T5_TIED_TABLE = "encoder.embed_tokens"


def _preset(name: str, category: str, help: str, embeddings: str | None = None, **patterns) -> ModelFilter:
    derive = patterns.pop("derive_keep", None)
    return ModelFilter(
        name=name,
        category=category,
        help=help,
        derive_keep=derive,
        derive_help=derive.__doc__ if derive else "",
        embeddings=embeddings,
        **{k: tuple(v) for k, v in patterns.items()},
    )


PRESETS: tuple[ModelFilter, ...] = (
    # -- text encoders and LLMs --------------------------------------------------
    _preset(
        "gemma4", "text", "Gemma 4: audio and vision towers and per-layer input gates stay high precision.",
        exclude=("audio", "per_layer_input_gate", "per_layer_projection", "vision", "multi_modal_projector"),
    ),
    _preset(
        "qwen35", "text",
        "Qwen3.5: first and last decoder layer (from the depth), linear-attention a/b projections, "
        "vision patch embedding, merger and MTP input stay high precision.",
        exclude=("lm_head", "embed_tokens", "in_proj_a", "in_proj_b", "visual.pos_embed",
                 "visual.patch_embed", "merger", "mtp.fc", "visual.blocks.0."),
        derive_keep=edge_blocks("layers", 1, 1, leading_dot=True),
    ),
    _preset(
        "t5xxl", "text", "T5 v1.1 / mT5 / ByT5 text encoder: drops the decoder (ComfyUI uses only the encoder) and the "
        "tied encoder.embed_tokens copy, keeps norms and relative-attention biases; the token table in row-wise INT8.",
        exclude=COMMON, remove=("decoder", "lm_head", T5_TIED_TABLE), embeddings=TOKEN_TABLE_INT8,
    ),
    _preset(
        "umt5", "text", "UMT5 text encoder (WAN): as t5xxl, with a relative-attention bias per block; drops the "
        "decoder, keeps norms; the token table in row-wise INT8.",
        exclude=COMMON, remove=("decoder", "lm_head", T5_TIED_TABLE), embeddings=TOKEN_TABLE_INT8,
    ),
    # ComfyUI 0.30 builds CLIP (load_clip, and the CLIP of an all-in-one checkpoint) with plain manual-cast
    # ops and passes it no quantization metadata: quantized CLIP weights load unscaled or mis-shaped.
    ModelFilter(
        name="clip", category="text", keep_all=True,
        help="CLIP text encoders (CLIP-L, CLIP-G, OpenCLIP), alone or inside an all-in-one checkpoint: kept "
        "exactly as they are; ComfyUI 0.30 builds CLIP without quantized layers.",
    ),
    _preset("mistral", "text", "Mistral-style LLM used as a text encoder: norms, lm_head and vision-tower inputs "
            "stay high precision; attention and MLP are quantized, the token table in row-wise INT8.",
            exclude=COMMON, embeddings=TOKEN_TABLE_INT8),
    _preset("visual", "text", "Vision towers: MLP projections stay high precision.", exclude=MLP_PROJECTIONS),
    _preset(
        "generic_text", "text",
        "Any Llama/Mistral/Qwen-style LLM or text encoder, conservatively: norms, lm_head and the MLP "
        "projections (gate/up/down_proj) stay high precision; attention is quantized, the token table in "
        "row-wise INT8. Use 'mistral' to quantize the MLPs too.",
        exclude=(*COMMON, *MLP_PROJECTIONS), embeddings=TOKEN_TABLE_INT8,
    ),
    # -- diffusion transformers ---------------------------------------------------
    _preset(
        "anima", "diffusion", "Anima: first block, block 1 modulation, adapters and embedders stay high precision.",
        high_precision=("net.blocks.0.", "net.blocks.1.adaln_modulation", "final_layer", "llm_adapter",
                        "t_embedder", "x_embedder"),
    ),
    _preset(
        "lens", "diffusion", "Lens: embedders, input/output projections and the first modulations stay high precision.",
        high_precision=("time_text_embed", "img_in", "norm_out", "proj_out", "img_mod.1", "txt_mod.1", "txt_in"),
    ),
    _preset(
        "flux", "diffusion",
        "FLUX.1 dev/schnell: input embedders and the final layer stay high precision (ComfyUI reads their "
        "shapes to detect FLUX).",
        high_precision=("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer"),
    ),
    _preset(
        "flux2", "diffusion", "FLUX.2: shared stream modulations, embedders and final layer stay high precision.",
        high_precision=("stream_modulation", "guidance_in", "time_in", "final_layer", "img_in", "txt_in"),
    ),
    _preset(
        "chroma", "diffusion",
        "Chroma (FLUX.1 blocks, modulation from a distilled guidance network; what detection picks): the guidance "
        "network, input embedders and final layer stay high precision, as distillation_large.",
        high_precision=("distilled_guidance_layer", "final_layer", "img_in", "txt_in"),
    ),
    _preset(
        "chroma_radiance", "diffusion",
        "Chroma Radiance (pixel space): guidance network, NeRF head, patch input, txt_in and final conv stay high "
        "precision.",
        high_precision=("distilled_guidance_layer", "nerf_blocks", "nerf_image_embedder", "nerf_final_layer_conv",
                        "img_in_patch", "txt_in", "__x0__"),
    ),
    _preset(
        "sd3", "diffusion", "Stable Diffusion 3 / 3.5 (MMDiT): patch, context, time and pooled-text embedders, "
        "positional embedding and final layer stay high precision.",
        high_precision=("x_embedder", "context_embedder", "t_embedder", "y_embedder", "pos_embed", "final_layer"),
    ),
    _preset(
        "auraflow", "diffusion", "AuraFlow: input/condition projections, time embedder, final layers, registers.",
        high_precision=("init_x_linear", "cond_seq_linear", "t_embedder", "final_linear", "modF", "positional_encoding",
                        "register_tokens"),
    ),
    _preset(
        "pixart", "diffusion", "PixArt-α/Σ: patch, time, caption and micro-condition embedders, t_block, final layer.",
        high_precision=("x_embedder", "t_embedder", "t_block", "y_embedder", "ar_embedder", "csize_embedder",
                        "final_layer"),
    ),
    _preset(
        "hunyuan_dit", "diffusion", "Hunyuan-DiT: embedders, T5 projection, pooler and final layer.",
        high_precision=("x_embedder", "t_embedder", "extra_embedder", "mlp_t5", "pooler", "style_embedder",
                        "final_layer"),
    ),
    _preset(
        "hidream", "diffusion", "HiDream-I1: embedders, caption projections, MoE gates and final layer.",
        high_precision=("x_embedder", "t_embedder", "p_embedder", "caption_projection", "final_layer", ".gate."),
    ),
    _preset(
        "hidream_o1", "diffusion", "HiDream-O1: embedders and final layers.",
        high_precision=("x_embedder", "t_embedder", "final_layer", "visual.merger"),
    ),
    _preset(
        "omnigen2", "diffusion", "OmniGen2: embedders, time-caption embedding and output norm.",
        high_precision=("x_embedder", "ref_image_patch_embedder", "time_caption_embed", "image_index_embedding",
                        "norm_out"),
    ),
    _preset(
        "cosmos", "diffusion", "Cosmos 1.0: patch and time embedders, final layer.",
        high_precision=("x_embedder", "t_embedder", "final_layer", "extra_pos_embedder", "affline_norm"),
    ),
    _preset(
        "cosmos_predict2", "diffusion", "Cosmos Predict2: patch and time embedders, final layer.",
        high_precision=("x_embedder", "t_embedder", "t_embedding_norm", "final_layer"),
    ),
    _preset(
        "pixeldit", "diffusion", "PixelDiT / PiD: pixel and latent embedders, time embedder, final layers.",
        high_precision=("pixel_embedder", "x_embedder", "t_embedder", "lq_proj", "final_layer"),
    ),
    _preset(
        "ernie", "diffusion", "ERNIE-Image: patch, text and time embeddings, final layer.",
        high_precision=("x_embedder", "text_proj", "time_embedding", "final_linear", "final_norm", "adaLN_modulation"),
    ),
    _preset(
        "joyimage", "diffusion", "JoyImage: input, condition embedders and final layer.",
        high_precision=("img_in", "txt_in", "condition_embedder", "final_layer", "proj_out", "norm_out"),
    ),
    _preset(
        "hunyuan3d", "diffusion", "Hunyuan3D 2.x: latent/condition inputs, time embedders, final layer.",
        high_precision=("latent_in", "cond_in", "time_in", "guidance_in", "t_embedder", "x_embedder", "final_layer"),
    ),
    _preset(
        "triposplat", "diffusion", "TripoSplat: camera and output heads stay high precision.",
        high_precision=("cam_out_layer", "repo_layers", "final_map", "in_proj", "t_embedder"),
    ),
    _preset(
        "stable_cascade", "diffusion", "Stable Cascade (Würstchen): condition mappers, embeddings and classifier head.",
        high_precision=("clip_txt_mapper", "clip_txt_pooled_mapper", "clip_img_mapper", "clip_mapper", "effnet_mapper",
                        "pixels_mapper", "embedding", "clf"),
    ),
    _preset(
        "sd15", "diffusion", "SD 1.x / 2.x UNets (and Zero123, unCLIP, instruct-pix2pix, x4 upscaler, Lotus): the time "
        "embedding stays high precision (convolutions and norms are never quantized); attention and feed-forward "
        "Linear layers are.",
        high_precision=("time_embed", "label_emb"),
    ),
    _preset(
        "sdxl", "diffusion", "SDXL-style UNets (SDXL, refiner, SSD-1B, Vega, KOALA): time and label embeddings stay "
        "high precision.",
        high_precision=("time_embed", "label_emb"),
    ),
    _preset(
        "distillation_large", "diffusion",
        "Distilled-guidance FLUX variants (Chroma), conservative: guidance network, embedders, final layer.",
        high_precision=("distilled_guidance_layer", "final_layer", "img_in", "txt_in"),
    ),
    _preset("distillation_small", "diffusion",
            "Distilled-guidance FLUX variants (Chroma), smallest file: only the guidance network stays high precision.",
            high_precision=("distilled_guidance_layer",)),
    _preset(
        "nerf_large", "diffusion", "Pixel-space (NeRF head) Chroma, conservative: guidance, NeRF head, txt_in, "
        "attention output projections.",
        high_precision=("distilled_guidance_layer", "nerf_blocks", "nerf_image_embedder", "txt_in", "_attn.proj"),
    ),
    _preset("nerf_small", "diffusion", "Pixel-space (NeRF head) Chroma: guidance network and NeRF head.",
            high_precision=("distilled_guidance_layer", "nerf_blocks", "nerf_image_embedder")),
    _preset("radiance", "diffusion", "Chroma Radiance: patch input, NeRF final conv and x0 marker stay high precision.",
            high_precision=("img_in_patch", "nerf_final_layer_conv", "__x0__")),
    _preset("krea2", "diffusion", "Krea 2: first/last layers, text fusion and modulation stay high precision.",
            high_precision=("firs", "las", "tml", "txtfusion", "last.modulatio", "tpro")),
    _preset(
        "ideogram4", "diffusion", "Ideogram 4: embeddings, conditioning projections and final layer stay high precision.",
        high_precision=("embed_image_indicator", "t_embedding", "llm_cond_proj", "adaln_proj", "final_layer",
                        "input_proj"),
    ),
    # -- video --------------------------------------------------------------------
    _preset(
        "wan", "video", "WAN 2.1/2.2 (and Animate, S2V, VACE): text/time embeddings, head and audio/face "
        "adapters stay high precision, plus the common norms and embeddings.",
        exclude=COMMON,
        high_precision=("text_embedding", "time_embedding", "audio_model.text_embedding", "casual_audio_encoder",
                        "frame_packer", "trainable_cond_mask", "cond_encoder", "audio_model.time_embedding",
                        "time_projection", "video_model.time_projection", "head.head", "face_encoder.out_proj",
                        "face_adapter", "audio_injector"),
    ),
    _preset(
        "ltxv", "video", "LTX-Video (video only): patchify/out projections, adaLN, caption projection and "
        "scale-shift tables stay high precision.",
        high_precision=("patchify_proj", "proj_out", "adaln_single", "caption_projection", "scale_shift_table"),
    ),
    _preset(
        "mochi", "video", "Genmo Mochi: embedders, T5 projections and final layer.",
        high_precision=("x_embedder", "t_embedder", "t5_y_embedder", "t5_yproj", "pos_frequencies", "final_layer"),
    ),
    _preset(
        "cogvideox", "video", "CogVideoX: patch and time embeddings, output norm and projection.",
        high_precision=("patch_embed", "time_embedding", "ofs_embedding", "norm_out", "proj_out", "norm_final"),
    ),
    _preset(
        "kandinsky5", "video", "Kandinsky 5: time, text and visual embeddings and the output layer (with its "
        "modulation).",
        high_precision=("time_embeddings", "text_embeddings", "pooled_text_embeddings", "visual_embeddings",
                        "out_layer.out_layer", "out_layer.modulation"),
    ),
    _preset(
        "minimax_h3", "video", "MiniMax H3 (audio+video): patch projections, condition and time embedders, final layer.",
        high_precision=("video_patch_proj", "audio_patch_proj", "condition_proj", "time_embedder", "final_layer"),
    ),
    _preset(
        "seedvr2", "video", "SeedVR2: video/text/time inputs and video output.",
        high_precision=("vid_in", "txt_in", "emb_in", "vid_out"),
    ),
    _preset(
        "svd", "video", "Stable Video Diffusion UNet: time and label embeddings stay high precision.",
        high_precision=("time_embed", "label_emb"),
    ),
    # -- audio --------------------------------------------------------------------
    _preset(
        "stable_audio", "audio", "Stable Audio DiT: condition and timestep embedders, input/output projections.",
        high_precision=("to_global_embed", "to_cond_embed", "to_timestep_embed", "timestep_features", "project_in",
                        "project_out", "preprocess_conv", "postprocess_conv"),
    ),
    _preset(
        "ace", "audio", "ACE-Step: genre/speaker/lyric embedders, timestep embedding, projections and final layer.",
        high_precision=("genre_embedder", "speaker_embedder", "lyric_embs", "lyric_proj", "timestep_embedder",
                        "t_block", "proj_in", "final_layer"),
    ),
    # -- vision (detection, depth, segmentation) ----------------------------------
    _preset(
        "rt_detr", "vision", "RT-DETR v4: keeps the detection heads and query embeddings in high precision.",
        high_precision=("enc_score_head", "enc_bbox_head", "dec_score_head", "dec_bbox_head", "query_pos_head",
                        "denoising_class_embed"),
    ),
    _preset(
        "depth_anything3", "vision", "Depth Anything 3: patch embedding and the DPT head stay high precision.",
        high_precision=("patch_embeddings", "head.", "cam_enc", "cam_dec", "camera_token"),
    ),
    _preset(
        "sam3", "vision", "SAM 3 / 3.1: patch embedding, prompt/language inputs and mask/box heads stay high precision.",
        high_precision=("patch_embed", "language_backbone", "prompt", "mask_head", "bbox_embed", "class_embed",
                        "query_embed", "dot_prod_scoring"),
    ),
    # -- autoencoders -------------------------------------------------------------
    ModelFilter(
        name="vae", category="vae", keep_all=True,
        help="Autoencoders (a VAE, LTX-2's audio VAE and vocoder), alone or inside an all-in-one checkpoint: kept "
        "exactly as they are; ComfyUI builds them without quantized layers.",
    ),
    _preset(
        "hunyuan", "video", "HunyuanVideo 1.x/1.5: norms, q/k norms and vision/image input projections.",
        exclude=("layernorm", "img_attn_k_norm", "img_attn_q_norm", "txt_attn_k_norm", "txt_attn_q_norm",
                 "norm1", "norm2", "vision_in.proj.0", "vision_in.proj.4", "img_in.proj", "cond_type_embedding"),
    ),
    _preset(
        "ltxv2", "video",
        "LTX-Video 2 (audio+video): adaLN, connectors, patchify/out projections, audio VAE and vocoder, and the "
        "first two and last two transformer blocks (from the depth) stay high precision.",
        high_precision=("scale_shift_table", "text_embedding_projection", "audio_vae", "audio_embeddings_connector",
                        "adaln_single", "audio_adaln_single", "audio_patchify_proj", "audio_proj_out",
                        "audio_prompt_adaln_single", "av_ca_a2v_gate_adaln_single",
                        "av_ca_audio_scale_shift_adaln_single", "av_ca_v2a_gate_adaln_single",
                        "av_ca_video_scale_shift_adaln_single", "patchify_proj", "proj_out", "prompt_adaln_single",
                        "video_embeddings_connector", "vae.decoder", "vae.encoder", "vocoder", "to_gate_logits"),
        derive_keep=edge_blocks("transformer_blocks", 2, 2, leading_dot=False),
    ),
    # -- image --------------------------------------------------------------------
    _preset(
        "qwen", "image", "Qwen-Image: q/k norms, embedders, output projections and the first block's "
        "image modulation stay high precision.",
        exclude=("norm_added_k", "norm_added_q", "norm_k", "norm_q", "txt_norm"),
        high_precision=("time_text_embed", "img_in", "norm_out", "proj_out", "transformer_blocks.0.img_mod.1",
                        "txt_in"),
    ),
    # Not Z-Image's per-block adaLN_modulation: Lumina 2's takes the full width (9216x1024 a block, 9 % of the
    # model, against Z-Image's 256-wide 2 %); the final layer's own modulation stays with final_layer.
    _preset("lumina2", "image", "Lumina 2 (NextDiT, also NewBie): as zimage (Z-Image is a Lumina 2 derivative), "
            "except the per-block adaLN modulation, which is quantized.",
            exclude=ZIMAGE_EXCLUDE, high_precision=tuple(p for p in ZIMAGE_HIGH_PRECISION if p != "adaLN_modulation")),
    _preset("zimage_pixel", "image", "Z-Image pixel space: as zimage, plus the pixel decoder.",
            exclude=ZIMAGE_EXCLUDE, high_precision=(*ZIMAGE_HIGH_PRECISION, "dec_net", "__x0__")),
    _preset("zimage", "image", "Z-Image: pad tokens, norms, embedders, adaLN modulation and final layer.",
            exclude=ZIMAGE_EXCLUDE, high_precision=ZIMAGE_HIGH_PRECISION),
    _preset("zimage_refiner", "image", "Z-Image, refiners too: as zimage, plus the context and noise refiners.",
            exclude=ZIMAGE_EXCLUDE, high_precision=("context_refiner", "noise_refiner")),
    _preset(
        "boogu", "image", "Boogu: index/time-caption embeddings, patch embedders and output norm.",
        high_precision=("image_index_embedding", "ref_image_patch_embedder", "time_caption_embed", "x_embedder",
                        "norm_out.linear_1", "norm_out.linear_2"),
    ),
)
