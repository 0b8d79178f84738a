"""Layers whose weight shape ComfyUI reads to recognise a model.

NVFP4 halves the stored width and pads both dimensions, so quantizing one of
these layers makes ComfyUI misdetect the model (wrong channel counts, wrong
family). They are the top-level input embedders and output layers of the
diffusion models ComfyUI knows; inner blocks are never read for detection.
"""

from __future__ import annotations

#: Top-level module names (the first name part after any ``model.diffusion_model.``-style prefix).
SHAPE_DETECTION_LAYERS = frozenset(
    {
        # Flux, Chroma, HunyuanVideo, Qwen-Image
        "img_in", "txt_in", "vector_in", "time_in", "guidance_in", "final_layer",
        "distilled_guidance_layer", "time_text_embed", "norm_out", "proj_out",
        # SD3 / MMDiT, PixArt, Lumina, AuraFlow
        "x_embedder", "context_embedder", "t_embedder", "y_embedder", "cap_embedder",
        "pos_embed", "register_tokens", "init_x_linear", "cond_seq_linear",
        # Wan
        "patch_embedding", "text_embedding", "time_embedding", "time_projection", "img_emb", "head",
        # LTX-Video
        "patchify_proj", "adaln_single", "caption_projection",
    }
)  # fmt: skip

#: Prefixes checkpoints put in front of the model's own module names.
CONTAINER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.")


def detection_root(layer: str) -> str | None:
    """The top-level module of ``layer`` when ComfyUI reads its shape for detection, else None."""
    for prefix in CONTAINER_PREFIXES:
        if layer.startswith(prefix):
            layer = layer[len(prefix) :]
            break
    root = layer.split(".", 1)[0]
    return root if root in SHAPE_DETECTION_LAYERS else None
