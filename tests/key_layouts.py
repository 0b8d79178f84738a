"""Synthetic checkpoints of each model family: real tensor names (as ComfyUI's and the reference
implementations' checkpoints spell them) with small shapes, as {name: shape}; ``write_keys`` writes one.
Used by cq-models' detection tests and by the preset, plan and component tests."""

from __future__ import annotations

import torch

from tests.helpers import write_checkpoint

D = 64  # hidden size of every synthetic model
W = (D, D)  # a plain 2-D Linear weight
V = (D,)  # a norm scale, bias or token


def blocks(n: int, template: dict[str, tuple[int, ...]], container: str) -> dict[str, tuple[int, ...]]:
    """``n`` copies of ``template``, as ``{container}.{i}.{name}``."""
    return {f"{container}.{i}.{name}": shape for i in range(n) for name, shape in template.items()}


FLUX_DOUBLE = {
    "img_attn.qkv.weight": (3 * D, D), "img_attn.qkv.bias": (3 * D,), "img_attn.proj.weight": W,
    "img_attn.norm.query_norm.scale": V, "img_attn.norm.key_norm.scale": V,
    "img_mlp.0.weight": (4 * D, D), "img_mlp.2.weight": (D, 4 * D),
    "txt_attn.qkv.weight": (3 * D, D), "txt_attn.proj.weight": W, "txt_attn.norm.key_norm.scale": V,
    "txt_mlp.0.weight": (4 * D, D), "txt_mlp.2.weight": (D, 4 * D),
}
FLUX_SINGLE = {"linear1.weight": (7 * D, D), "linear2.weight": (D, 5 * D), "norm.key_norm.scale": V,
               "norm.query_norm.scale": V}


def flux1(dev: bool = True) -> dict[str, tuple[int, ...]]:
    keys = {
        "img_in.weight": (D, 64), "img_in.bias": V, "txt_in.weight": (D, 128),
        "time_in.in_layer.weight": (D, 256), "time_in.out_layer.weight": W,
        "vector_in.in_layer.weight": (D, 96), "vector_in.out_layer.weight": W,
        "final_layer.linear.weight": (64, D), "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        **blocks(2, {**FLUX_DOUBLE, "img_mod.lin.weight": (6 * D, D), "txt_mod.lin.weight": (6 * D, D)},
                  "double_blocks"),
        **blocks(2, {**FLUX_SINGLE, "modulation.lin.weight": (3 * D, D)}, "single_blocks"),
    }
    if dev:
        keys |= {"guidance_in.in_layer.weight": (D, 256), "guidance_in.out_layer.weight": W}
    return keys


def flux2() -> dict[str, tuple[int, ...]]:
    return {
        "img_in.weight": (D, 128), "txt_in.weight": (D, 192),
        "time_in.in_layer.weight": (D, 256), "time_in.out_layer.weight": W,
        "guidance_in.in_layer.weight": (D, 256), "guidance_in.out_layer.weight": W,
        "double_stream_modulation_img.lin.weight": (12 * D, D),
        "double_stream_modulation_txt.lin.weight": (12 * D, D),
        "single_stream_modulation.lin.weight": (6 * D, D),
        "final_layer.linear.weight": (128, D), "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        **blocks(2, FLUX_DOUBLE, "double_blocks"), **blocks(2, FLUX_SINGLE, "single_blocks"),
    }


def chroma() -> dict[str, tuple[int, ...]]:
    """FLUX.1's blocks without per-block modulation: a distilled guidance network instead."""
    return {
        "img_in.weight": (D, 64), "txt_in.weight": (D, 128), "final_layer.linear.weight": (64, D),
        "distilled_guidance_layer.in_proj.weight": (D, 64), "distilled_guidance_layer.out_proj.weight": W,
        "distilled_guidance_layer.layers.0.in_layer.weight": W, "distilled_guidance_layer.norms.0.scale": V,
        **blocks(2, FLUX_DOUBLE, "double_blocks"), **blocks(2, FLUX_SINGLE, "single_blocks"),
    }


def hunyuan_video() -> dict[str, tuple[int, ...]]:
    double = {
        "img_mod.linear.weight": (6 * D, D), "img_attn_qkv.weight": (3 * D, D), "img_attn_proj.weight": W,
        "img_attn_q_norm.weight": V, "img_attn_k_norm.weight": V, "img_mlp.fc1.weight": (4 * D, D),
        "img_mlp.fc2.weight": (D, 4 * D), "txt_mod.linear.weight": (6 * D, D), "txt_attn_qkv.weight": (3 * D, D),
        "txt_attn_q_norm.weight": V, "txt_attn_k_norm.weight": V, "txt_attn_proj.weight": W,
        "txt_mlp.fc1.weight": (4 * D, D), "txt_mlp.fc2.weight": (D, 4 * D),
    }
    single = {"linear1.weight": (7 * D, D), "linear2.weight": (D, 5 * D), "q_norm.weight": V, "k_norm.weight": V,
              "modulation.linear.weight": (3 * D, D)}
    return {
        "img_in.proj.weight": (D, 16, 1, 2, 2), "txt_in.input_embedder.weight": (D, 128),
        "txt_in.t_embedder.mlp.0.weight": (D, 256), "txt_in.c_embedder.linear_1.weight": (D, 128),
        "txt_in.individual_token_refiner.blocks.0.norm1.weight": V,
        "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight": (3 * D, D),
        "txt_in.individual_token_refiner.blocks.0.norm2.weight": V,
        "time_in.mlp.0.weight": (D, 256), "vector_in.in_layer.weight": (D, 96), "guidance_in.mlp.0.weight": (D, 256),
        "final_layer.linear.weight": (64, D), "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        **blocks(2, double, "double_blocks"), **blocks(2, single, "single_blocks"),
    }


def wan(i2v: bool = False) -> dict[str, tuple[int, ...]]:
    block = {
        "self_attn.q.weight": W, "self_attn.k.weight": W, "self_attn.v.weight": W, "self_attn.o.weight": W,
        "self_attn.norm_q.weight": V, "self_attn.norm_k.weight": V, "cross_attn.q.weight": W,
        "cross_attn.k.weight": W, "cross_attn.v.weight": W, "cross_attn.o.weight": W, "norm3.weight": V,
        "ffn.0.weight": (4 * D, D), "ffn.2.weight": (D, 4 * D), "modulation": (1, 6, D),
    }
    keys = {
        "patch_embedding.weight": (D, 16, 1, 2, 2), "text_embedding.0.weight": (D, 128),
        "text_embedding.2.weight": W, "time_embedding.0.weight": (D, 256), "time_embedding.2.weight": W,
        "time_projection.1.weight": (6 * D, D), "head.head.weight": (64, D), "head.modulation": (1, 2, D),
        **blocks(3, block, "blocks"),
    }
    if i2v:
        keys |= {"img_emb.proj.1.weight": (D, 128), "img_emb.proj.3.weight": W,
                 **blocks(3, {"cross_attn.k_img.weight": W, "cross_attn.v_img.weight": W}, "blocks")}
    return keys


def qwen_image() -> dict[str, tuple[int, ...]]:
    block = {
        "img_mod.1.weight": (6 * D, D), "txt_mod.1.weight": (6 * D, D), "attn.to_q.weight": W,
        "attn.to_k.weight": W, "attn.to_v.weight": W, "attn.add_q_proj.weight": W, "attn.add_k_proj.weight": W,
        "attn.add_v_proj.weight": W, "attn.to_out.0.weight": W, "attn.to_add_out.weight": W,
        "attn.norm_q.weight": V, "attn.norm_k.weight": V, "attn.norm_added_q.weight": V,
        "attn.norm_added_k.weight": V, "img_mlp.net.0.proj.weight": (4 * D, D), "img_mlp.net.2.weight": (D, 4 * D),
        "txt_mlp.net.0.proj.weight": (4 * D, D), "txt_mlp.net.2.weight": (D, 4 * D),
    }
    return {
        "img_in.weight": (D, 64), "txt_norm.weight": (128,), "txt_in.weight": (D, 128),
        "time_text_embed.timestep_embedder.linear_1.weight": (D, 256),
        "time_text_embed.timestep_embedder.linear_2.weight": W,
        "norm_out.linear.weight": (2 * D, D), "proj_out.weight": (64, D), **blocks(3, block, "transformer_blocks"),
    }


def diffusers_flux() -> dict[str, tuple[int, ...]]:
    """FLUX.1 in diffusers naming: shares Qwen-Image's attention names but has no txt_norm."""
    block = {"attn.to_q.weight": W, "attn.add_q_proj.weight": W, "norm1.linear.weight": (6 * D, D),
             "norm1_context.linear.weight": (6 * D, D), "ff.net.0.proj.weight": (4 * D, D)}
    return {"x_embedder.weight": (D, 64), "context_embedder.weight": (D, 128),
            "time_text_embed.timestep_embedder.linear_1.weight": (D, 256), "proj_out.weight": (64, D),
            **blocks(2, block, "transformer_blocks")}


ZIMAGE_BLOCK = {
    "attention.qkv.weight": (3 * D, D), "attention.out.weight": W, "attention.q_norm.weight": V,
    "attention.k_norm.weight": V, "attention_norm1.weight": V, "attention_norm2.weight": V,
    "ffn_norm1.weight": V, "ffn_norm2.weight": V, "feed_forward.w1.weight": (4 * D, D),
    "feed_forward.w2.weight": (D, 4 * D), "feed_forward.w3.weight": (4 * D, D),
}


def zimage(pad_tokens: bool = True) -> dict[str, tuple[int, ...]]:
    modulated = {**ZIMAGE_BLOCK, "adaLN_modulation.0.weight": (4 * D, 256)}
    keys = {
        "x_embedder.weight": (D, 64), "cap_embedder.0.weight": (128,), "cap_embedder.1.weight": (D, 128),
        "t_embedder.mlp.0.weight": (256, 256), "t_embedder.mlp.2.weight": (256, 256),
        "final_layer.linear.weight": (64, D), "final_layer.adaLN_modulation.1.weight": (D, 256),
        **blocks(2, modulated, "noise_refiner"), **blocks(2, ZIMAGE_BLOCK, "context_refiner"),
        **blocks(3, modulated, "layers"),
    }
    if pad_tokens:
        keys |= {"x_pad_token": (1, D), "cap_pad_token": (1, D)}
    else:
        keys |= {"pad_token": (1, D)}
    return keys


def ltx_video(audio: bool = True, depth: int = 6) -> dict[str, tuple[int, ...]]:
    block = {"attn1.to_q.weight": W, "attn1.to_k.weight": W, "attn1.to_out.0.weight": W, "attn1.q_norm.weight": V,
             "attn2.to_q.weight": W, "attn2.to_k.weight": W, "ff.net.0.proj.weight": (4 * D, D), "ff.net.2.weight": (D, 4 * D),
             "scale_shift_table": (6, D)}
    keys = {
        "patchify_proj.weight": (D, 128), "proj_out.weight": (128, D), "scale_shift_table": (2, D),
        "adaln_single.emb.timestep_embedder.linear_1.weight": (D, 256),
        "adaln_single.emb.timestep_embedder.linear_1.bias": V, "adaln_single.linear.weight": (6 * D, D),
    }
    if audio:
        block |= {"audio_attn1.to_q.weight": W, "audio_to_video_attn.to_q.weight": W,
                  "video_to_audio_attn.to_q.weight": W, "audio_ff.net.0.proj.weight": (4 * D, D)}
        keys |= {
            "audio_patchify_proj.weight": (D, 128), "audio_proj_out.weight": (128, D),
            "audio_adaln_single.linear.weight": (6 * D, D), "prompt_adaln_single.linear.weight": (2 * D, D),
            "av_ca_a2v_gate_adaln_single.linear.weight": (D, D),
            "video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.weight": W,
            "audio_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.weight": W,
        }
    else:
        keys |= {"caption_projection.linear_1.weight": (D, 128)}
    return {**keys, **blocks(depth, block, "transformer_blocks")}


def t5(depth: int = 24, decoder: bool = True) -> dict[str, tuple[int, ...]]:
    block = {"layer.0.SelfAttention.q.weight": W, "layer.0.SelfAttention.k.weight": W,
             "layer.0.SelfAttention.v.weight": W, "layer.0.SelfAttention.o.weight": W,
             "layer.0.layer_norm.weight": V, "layer.1.DenseReluDense.wi_0.weight": (4 * D, D),
             "layer.1.DenseReluDense.wi_1.weight": (4 * D, D), "layer.1.DenseReluDense.wo.weight": (D, 4 * D),
             "layer.1.layer_norm.weight": V}
    keys = {"shared.weight": (128, D), "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 8),
            "encoder.final_layer_norm.weight": V, **blocks(depth, block, "encoder.block")}
    if decoder:
        keys |= {"decoder.block.0.layer.0.SelfAttention.q.weight": W,
                 "decoder.block.0.layer.1.EncDecAttention.q.weight": W,
                 "decoder.final_layer_norm.weight": V, "lm_head.weight": (128, D)}
    return keys


LLM_BLOCK = {
    "self_attn.q_proj.weight": W, "self_attn.k_proj.weight": (D // 2, D), "self_attn.v_proj.weight": (D // 2, D),
    "self_attn.o_proj.weight": W, "mlp.gate_proj.weight": (4 * D, D), "mlp.up_proj.weight": (4 * D, D),
    "mlp.down_proj.weight": (D, 4 * D), "input_layernorm.weight": V, "post_attention_layernorm.weight": V,
}


def llm(depth: int = 4) -> dict[str, tuple[int, ...]]:
    return {"model.embed_tokens.weight": (128, D), "model.norm.weight": V, "lm_head.weight": (128, D),
            **blocks(depth, LLM_BLOCK, "model.layers")}


def qwen35(depth: int = 8) -> dict[str, tuple[int, ...]]:
    """Hybrid model: three linear-attention layers, then one full-attention layer, repeated."""
    linear = {"linear_attn.in_proj_qkv.weight": (3 * D, D), "linear_attn.in_proj_z.weight": W,
              "linear_attn.in_proj_a.weight": (8, D), "linear_attn.in_proj_b.weight": (8, D),
              "linear_attn.out_proj.weight": W, "linear_attn.conv1d.weight": (3 * D, 1, 4),
              "linear_attn.norm.weight": V}
    shared = {k: v for k, v in LLM_BLOCK.items() if not k.startswith("self_attn")}
    full = {k: v for k, v in LLM_BLOCK.items() if k.startswith("self_attn")}
    keys = {"model.language_model.embed_tokens.weight": (128, D), "model.language_model.norm.weight": V,
            "lm_head.weight": (128, D), "mtp.fc.weight": (D, 2 * D),
            "model.visual.patch_embed.proj.weight": (D, 3, 2, 16, 16),
            "model.visual.merger.linear_fc1.weight": (4 * D, 4 * D),
            **blocks(3, {"attn.qkv.weight": (3 * D, D), "mlp.linear_fc1.weight": (4 * D, D)}, "model.visual.blocks")}
    for i in range(depth):
        layer = {**shared, **(full if i % 4 == 3 else linear)}
        keys |= {f"model.language_model.layers.{i}.{k}": v for k, v in layer.items()}
    return keys


def sdxl_unet() -> dict[str, tuple[int, ...]]:
    return {"input_blocks.0.0.weight": (D, 4, 3, 3), "input_blocks.1.1.proj_in.weight": W,
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": W, "label_emb.0.0.weight": (D, 256),
            "middle_block.1.proj_in.weight": W, "out.2.weight": (4, D, 3, 3), "time_embed.0.weight": (D, 128)}


def prefixed(keys: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    return {prefix + k: v for k, v in keys.items()}


def write_keys(path, keys: dict[str, tuple[int, ...]]):
    """A checkpoint with these names and shapes (zeros: the plan reads headers only)."""
    return write_checkpoint(path, {k: torch.zeros(shape, dtype=torch.bfloat16) for k, shape in keys.items()})


FAMILIES = {
    "flux": flux1,
    "flux2": flux2,
    "hunyuan": hunyuan_video,
    "wan": wan,
    "qwen": qwen_image,
    "zimage": zimage,
    "ltxv2": ltx_video,
    "t5xxl": t5,
    "generic_text": llm,
    "qwen35": qwen35,
}
