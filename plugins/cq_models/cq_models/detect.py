"""Recognise the components of a checkpoint, and each one's model family, from tensor names alone.

A checkpoint can hold several components, each under its own key prefix: an
all-in-one file has the diffusion model under ``model.diffusion_model.``, text
encoders under ``text_encoders.<name>.`` (or ``cond_stage_model.``,
``conditioner.embedders.N.``) and the VAE under ``vae.`` (or
``first_stage_model.``). :func:`detect_components` names each component and
the preset that fits it; a preset then acts only inside its own prefix.

Each family has a *signature*: an anchor (a tensor name the family's ComfyUI
detection keys on), names that must sit beside it, and names that must be
absent. The anchor also reveals the component's prefix; the other names are
looked up under that same prefix. Signatures are written in ComfyUI's own
naming (what its model-save nodes write); a family whose original release
spells names differently says how to turn a release name into ComfyUI's
(``canonical``: the renames of the family's ``process_unet_state_dict``, e.g.
``.scale`` QK norms -> ``.weight``, HunyuanVideo's ``img_attn_qkv`` ->
``img_attn.qkv``), so both namings match.

Families sharing detection keys are told apart the way ComfyUI tells them
apart: its ``detect_unet_config`` tries them in a fixed order, and
:data:`SIGNATURES` follows that order (diffusion models first, then text
encoders). At one prefix the first signature that matches wins; a match
inside an already claimed prefix (an adapter inside a DiT that looks like an
LLM) is part of that component, not a component of its own. VAE prefixes
are components whose preset keeps everything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache

from cq_core import Detection

# ---------------------------------------------------------------------------
# Namings: release names -> ComfyUI's names (each family's process_unet_state_dict)
# ---------------------------------------------------------------------------

Canonical = Callable[[str], str]


def scale_to_weight(key: str) -> str:
    """FLUX, Chroma, Hunyuan3D releases store RMSNorm scales as ``.scale``; ComfyUI loads them as ``.weight``."""
    return key[: -len(".scale")] + ".weight" if key.endswith(".scale") else key


#: HunyuanVideo (and HunyuanImage 2.1, HunyuanVideo 1.5): ComfyUI's HunyuanVideo.process_unet_state_dict.
_HUNYUAN_RENAMES = (
    ("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer."), ("txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer."),
    ("txt_in.c_embedder.linear_1.", "txt_in.c_embedder.in_layer."),
    ("txt_in.c_embedder.linear_2.", "txt_in.c_embedder.out_layer."),
    ("_mod.linear.", "_mod.lin."), ("_attn_qkv.", "_attn.qkv."), ("mlp.fc1.", "mlp.0."), ("mlp.fc2.", "mlp.2."),
    ("_attn_q_norm.weight", "_attn.norm.query_norm.weight"), ("_attn_k_norm.weight", "_attn.norm.key_norm.weight"),
    (".q_norm.weight", ".norm.query_norm.weight"), (".k_norm.weight", ".norm.key_norm.weight"),
    ("_attn_proj.", "_attn.proj."), (".modulation.linear.", ".modulation.lin."),
    ("_in.mlp.2.", "_in.out_layer."), ("_in.mlp.0.", "_in.in_layer."),
)


def hunyuan_video_names(key: str) -> str:
    for old, new in _HUNYUAN_RENAMES:
        key = key.replace(old, new)
    return scale_to_weight(key)


# ---------------------------------------------------------------------------
# Signatures
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """How one family shows in a key set (names in ComfyUI's naming)."""

    preset: str
    family: str
    anchor: str
    requires: tuple[str, ...] = ()
    #: any one of these must be present too (variants spell a layer differently)
    requires_any: tuple[str, ...] = ()
    forbids: tuple[str, ...] = ()
    #: a finer name for the report (dev vs schnell, depth), from the names under the prefix
    variant: Callable[[set[str], str], str] | None = field(default=None, compare=False)
    #: turns a name of any naming this family is published in into ComfyUI's
    canonical: Canonical = field(default=scale_to_weight, compare=False)
    #: paths between the component's root and the anchor's prefix: an LLM's decoder layers sit under
    #: ``model.`` beside its ``lm_head``, and both belong to the component
    inner: tuple[str, ...] = ()
    #: top-level prefixes of an all-in-one file that belong to this model beside its main prefix
    #: (LTX-2 keeps its text projection outside ``model.diffusion_model.``)
    companions: tuple[str, ...] = ()

    def root(self, prefix: str) -> str:
        """The component's prefix, given the anchor's."""
        for path in self.inner:
            if prefix.endswith(path) and (len(prefix) == len(path) or prefix[-len(path) - 1] == "."):
                return prefix[: -len(path)]
        return prefix

    def matches(self, keys: set[str], candidates: Iterable[str],
                original: Mapping[str, str] | None = None) -> Iterable[tuple[str, str]]:
        """``(prefix, reason)`` for every anchor key in ``candidates`` whose neighbours fit;
        ``original`` maps a key in :attr:`canonical` naming back to the file's, for the reason."""
        for key in candidates:
            prefix = key[: -len(self.anchor)]
            if not all(prefix + name in keys for name in self.requires):
                continue
            if self.requires_any and not any(prefix + name in keys for name in self.requires_any):
                continue
            if any(prefix + name in keys for name in self.forbids):
                continue
            family = self.family + (f" ({self.variant(keys, prefix)})" if self.variant else "")
            where = f" under prefix {prefix!r}" if prefix else ""
            found = (original or {}).get(key, key)
            found = found[len(prefix):] if found.startswith(prefix) else found
            yield self.root(prefix), f"{family}: found {found!r}{where}"


def count_blocks(keys: Iterable[str], prefix: str) -> int:
    """Number of distinct ``prefixN.`` blocks (the depth)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for key in keys for m in [pattern.match(key)] if m})


def _flux1_variant(keys: set[str], prefix: str) -> str:
    kind = "dev" if prefix + "guidance_in.in_layer.weight" in keys else "schnell"
    return f"{kind}, {count_blocks(keys, prefix + 'double_blocks.')} double + " \
           f"{count_blocks(keys, prefix + 'single_blocks.')} single blocks"


def _depth(container: str, noun: str = "blocks") -> Callable[[set[str], str], str]:
    return lambda keys, prefix: f"{count_blocks(keys, prefix + container)} {noun}"


def _t5_variant(keys: set[str], prefix: str) -> str:
    depth = count_blocks(keys, prefix + "encoder.block.")
    size = "XXL" if depth == 24 else f"{depth} blocks"
    gated = prefix + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in keys
    return f"{size}{', v1.1 gated FFN' if gated else ''}"


#: FLUX.1's QK norm, in ComfyUI's naming (the release writes ``.scale``); FLUX.2 and Chroma share it.
FLUX_QK_NORM = "double_blocks.0.img_attn.norm.key_norm.weight"
CHROMA_GUIDANCE = ("distilled_guidance_layer.norms.0.weight", "distilled_guidance_layer.0.norms.0.weight")
#: Where Hugging Face LLMs keep their decoder layers, beside ``lm_head`` (and Qwen3.5's ``mtp``, ``visual``).
LLM_INNER = tuple(f"{wrapper}{path}" for wrapper in ("transformer.", "") for path in (
    "model.language_model.", "language_model.model.", "model.", "language_model.", ""))[:-1]
#: ComfyUI wraps every text encoder's model in ``transformer.`` (beside its ``logit_scale``).
TE_INNER = ("transformer.",)
UMT5_BIAS = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"

#: ComfyUI's detection order (``detect_unet_config``), diffusion models first, then text encoders.
#: At one prefix the first match wins, as in ComfyUI.
SIGNATURES: tuple[Signature, ...] = (
    # -- diffusion models, in detect_unet_config's order ------------------------------------
    Signature("sd3", "Stable Diffusion 3 / 3.5 (MMDiT)", "joint_blocks.0.context_block.attn.qkv.weight",
              requires=("x_embedder.proj.weight",), variant=_depth("joint_blocks.", "joint blocks")),
    Signature("stable_cascade", "Stable Cascade", "clf.1.weight"),
    Signature("stable_audio", "Stable Audio (DiT)", "transformer.rotary_pos_emb.inv_freq",
              requires=("to_timestep_embed.0.weight",)),
    Signature("auraflow", "AuraFlow", "double_layers.0.attn.w1q.weight", requires=("cond_seq_linear.weight",)),
    Signature("hunyuan_dit", "Hunyuan-DiT", "mlp_t5.0.weight", requires=("x_embedder.proj.weight",)),
    Signature("hunyuan", "HunyuanVideo / HunyuanImage 2.1 / HunyuanVideo 1.5",
              "txt_in.individual_token_refiner.blocks.0.norm1.weight",
              requires=("img_in.proj.weight",), requires_any=("double_blocks.0.img_attn.qkv.weight",),
              variant=_depth("double_blocks.", "double blocks"), canonical=hunyuan_video_names),
    Signature("flux2", "FLUX.2", FLUX_QK_NORM,
              requires=("double_stream_modulation_img.lin.weight", "img_in.weight"),
              variant=_depth("double_blocks.", "double blocks")),
    Signature("chroma_radiance", "Chroma Radiance (pixel space)", FLUX_QK_NORM,
              requires_any=CHROMA_GUIDANCE, requires=("nerf_blocks.0.norm.weight",)),
    Signature("chroma", "Chroma", FLUX_QK_NORM, requires=("img_in.weight",), requires_any=CHROMA_GUIDANCE,
              variant=_depth("double_blocks.", "double blocks")),
    Signature("flux", "FLUX.1", FLUX_QK_NORM, requires=("img_in.weight", "txt_in.weight"),
              variant=_flux1_variant),
    Signature("mochi", "Genmo Mochi", "t5_yproj.weight"),
    Signature("minimax_h3", "MiniMax H3 (audio+video)", "video_patch_proj.weight",
              requires=("audio_patch_proj.weight",)),
    Signature("ltxv2", "LTX-Video 2 (audio+video)", "audio_adaln_single.linear.weight",
              requires=("adaln_single.emb.timestep_embedder.linear_1.bias",),
              variant=_depth("transformer_blocks.", "transformer blocks"),
              companions=("text_embedding_projection.",)),
    # ComfyUI reads PixArt's diffusers layout from the same adaln_single name, and the patch
    # embedding's bias tells them apart.
    Signature("ltxv", "LTX-Video", "adaln_single.emb.timestep_embedder.linear_1.bias",
              requires=("transformer_blocks.0.attn2.to_k.weight",), forbids=("pos_embed.proj.bias",),
              variant=_depth("transformer_blocks.", "transformer blocks")),
    Signature("ace", "ACE-Step", "genre_embedder.weight"),
    Signature("pixart", "PixArt-α / Σ", "t_block.1.weight", requires=("x_embedder.proj.weight",)),
    Signature("cosmos", "Cosmos 1.0", "blocks.block0.blocks.0.block.attn.to_q.0.weight"),
    Signature("pixeldit", "PixelDiT / PiD", "lq_proj.latent_proj.0.weight"),
    # ComfyUI detects the release's ``core.`` wrapper and strips it on load (its own naming has none).
    Signature("pixeldit", "PixelDiT", "pixel_embedder.proj.weight", inner=("core.",)),
    Signature("zimage_pixel", "Z-Image (pixel space)", "noise_refiner.0.attention.k_norm.weight",
              requires=("cap_embedder.1.weight", "dec_net.cond_embed.weight")),
    Signature("zimage", "Z-Image", "noise_refiner.0.attention.k_norm.weight",
              requires=("cap_embedder.1.weight",),
              requires_any=("cap_pad_token", "layers.0.adaLN_modulation.0.weight"), variant=_depth("layers.", "layers")),
    Signature("lumina2", "Lumina 2 (NextDiT)", "noise_refiner.0.attention.k_norm.weight",
              requires=("cap_embedder.1.weight",), variant=_depth("layers.", "layers")),
    Signature("cogvideox", "CogVideoX", "blocks.0.norm1.linear.weight", requires=("patch_embed.proj.weight",)),
    Signature("seedvr2", "SeedVR2", "blocks.31.mlp.all.proj_in_gate.weight"),
    Signature("seedvr2", "SeedVR2", "blocks.35.mlp.vid.proj_out.weight"),
    Signature("wan", "WAN 2.x", "head.modulation", requires=("patch_embedding.weight",),
              variant=_depth("blocks.", "blocks")),
    Signature("hunyuan3d", "Hunyuan3D 2.0", "latent_in.weight"),
    Signature("hunyuan3d", "Hunyuan3D 2.1", "blocks.0.attn1.k_norm.weight", requires=("t_embedder.mlp.2.weight",)),
    Signature("triposplat", "TripoSplat", "cam_out_layer.weight", requires=("repo_layers.0.final_map.weight",)),
    Signature("hidream_o1", "HiDream-O1", "t_embedder1.mlp.0.weight", requires=("x_embedder.proj1.weight",)),
    Signature("hidream", "HiDream-I1", "caption_projection.0.linear.weight"),
    Signature("anima", "Anima (Cosmos Predict2 + LLM adapter)", "blocks.0.mlp.layer1.weight",
              requires=("llm_adapter.blocks.0.cross_attn.q_proj.weight",)),
    Signature("cosmos_predict2", "Cosmos Predict2", "blocks.0.mlp.layer1.weight"),
    Signature("boogu", "Boogu-Image", "double_stream_layers.0.img_instruct_attn.processor.img_to_q.weight"),
    Signature("omnigen2", "OmniGen2", "time_caption_embed.timestep_embedder.linear_1.bias"),
    Signature("lens", "Lens", "transformer_blocks.0.attn.norm_added_q.weight",
              requires=("transformer_blocks.0.img_mlp.w1.weight",)),
    # Mage-Flow shares Qwen-Image's names (ComfyUI tells them apart by shape only) and its preset.
    Signature("qwen", "Qwen-Image", "txt_norm.weight", requires=("img_in.weight", "txt_in.weight"),
              variant=_depth("transformer_blocks.", "transformer blocks")),
    Signature("ideogram4", "Ideogram 4", "embed_image_indicator.weight"),
    Signature("krea2", "Krea 2", "txtfusion.projector.weight"),
    Signature("kandinsky5", "Kandinsky 5", "visual_transformer_blocks.0.cross_attention.key_norm.weight"),
    Signature("ace", "ACE-Step 1.5", "encoder.lyric_encoder.layers.0.input_layernorm.weight"),
    Signature("rt_detr", "RT-DETR v4", "encoder.pan_blocks.1.cv4.conv.weight"),
    Signature("depth_anything3", "Depth Anything 3", "backbone.embeddings.patch_embeddings.projection.weight"),
    Signature("ernie", "ERNIE-Image", "layers.0.mlp.linear_fc2.weight"),
    Signature("sam3", "SAM 3", "detector.backbone.vision_backbone.trunk.blocks.0.attn.qkv.weight"),
    Signature("joyimage", "JoyImage", "double_blocks.0.attn.img_attn_qkv.weight",
              requires=("condition_embedder.time_embedder.linear_1.weight", "img_in.weight")),
    # UNets (SD 1.x/2.x, SDXL, SVD and their relatives): ComfyUI matches them by config, keyed on input_blocks.0.0.
    Signature("svd", "Stable Video Diffusion (UNet)", "input_blocks.0.0.weight",
              requires_any=("input_blocks.1.0.time_stack.in_layers.2.weight", "input_blocks.1.1.time_stack.0.attn1.to_q.weight",
                            "input_blocks.1.1.time_mixer.mix_factor")),
    Signature("sdxl", "SDXL-style UNet (label embedding)", "input_blocks.0.0.weight", requires=("label_emb.0.0.weight",)),
    Signature("sd15", "SD 1.x / 2.x UNet", "input_blocks.0.0.weight", requires=("time_embed.0.weight",)),
    # -- text encoders --------------------------------------------------------------------------
    Signature("umt5", "UMT5 encoder", "encoder.block.0.layer.0.SelfAttention.q.weight",
              requires=("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", UMT5_BIAS),
              variant=_t5_variant, inner=TE_INNER),
    Signature("t5xxl", "T5 encoder", "encoder.block.0.layer.0.SelfAttention.q.weight",
              requires=("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
              variant=_t5_variant, inner=TE_INNER),
    Signature("clip", "CLIP text encoder", "text_model.encoder.layers.0.self_attn.q_proj.weight",
              variant=_depth("text_model.encoder.layers.", "layers"), inner=TE_INNER),
    Signature("clip", "CLIP text encoder (OpenCLIP naming)", "transformer.resblocks.0.attn.in_proj_weight",
              requires=("token_embedding.weight",), inner=TE_INNER),
    Signature("qwen35", "Qwen3.5 (hybrid linear attention)", "layers.0.linear_attn.in_proj_a.weight",
              variant=_depth("layers.", "layers"), inner=LLM_INNER),
    Signature("gemma4", "Gemma (per-layer inputs)", "layers.0.per_layer_input_gate.weight",
              requires=("layers.0.per_layer_projection.weight",), inner=LLM_INNER),
    Signature("generic_text", "Llama/Mistral/Qwen/Gemma-style LLM", "layers.0.self_attn.q_proj.weight",
              requires=("layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.weight",
                        "embed_tokens.weight"),
              requires_any=("layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight"),
              variant=_depth("layers.", "layers"), inner=LLM_INNER),
)

#: Where ComfyUI's all-in-one checkpoints keep their autoencoders (``vae_key_prefix``), and LTX-2's
#: audio VAE and vocoder. Kept whole: ComfyUI builds them without quantized layers.
VAE_PREFIXES = ("vae.", "first_stage_model.", "audio_vae.", "vocoder.")
#: A bare SD/FLUX/SD3-style VAE file.
VAE_FILE_ANCHORS = ("decoder.conv_in.weight", "encoder.conv_in.weight")


# ---------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------


@cache
def _anchors(signatures: tuple[Signature, ...]) -> frozenset[str]:
    return frozenset(s.anchor for s in signatures)


def _overlaps(prefix: str, claimed: Iterable[str]) -> bool:
    return any(prefix.startswith(c) or c.startswith(prefix) for c in claimed)


def detect_components(keys: Sequence[str], signatures: Sequence[Signature] = SIGNATURES) -> list[Detection]:
    """Every component of the key set with the preset that fits it: model components first, then VAEs."""
    original = set(keys)
    namings: dict[Canonical, set[str]] = {}
    originals: dict[Canonical, dict[str, str]] = {}
    anchor_hits: dict[tuple[Canonical, str], list[str]] = {}
    found: list[Detection] = []
    claimed: list[str] = []
    for signature in signatures:
        canonical = signature.canonical
        if canonical not in namings:
            originals[canonical] = {canonical(k): k for k in sorted(original, reverse=True)}
            names = set(originals[canonical])
            namings[canonical] = names
            for anchor, hits in anchor_index(names, _anchors(tuple(signatures))).items():
                anchor_hits[(canonical, anchor)] = sorted(hits, key=len)  # the outermost prefix first
        names = namings[canonical]
        hits = anchor_hits.get((canonical, signature.anchor), ())
        for prefix, reason in signature.matches(names, hits, originals[canonical]):
            if not _overlaps(prefix, claimed):
                found.append(Detection(signature.preset, reason, prefix))
                claimed.append(prefix)
                for companion in signature.companions:
                    if prefix and any(k.startswith(companion) for k in original) and not _overlaps(companion, claimed):
                        found.append(Detection(signature.preset, f"{signature.family}: {companion!r} beside "
                                               f"{prefix!r} belongs to it", companion))
                        claimed.append(companion)
    found += _vae_components(original, claimed)
    return found


def _vae_components(keys: set[str], claimed: Sequence[str]) -> list[Detection]:
    vaes = []
    for prefix in VAE_PREFIXES:
        count = sum(k.startswith(prefix) for k in keys)
        if count and not any(prefix.startswith(c) for c in claimed if c):
            vaes.append(Detection("vae", f"autoencoder: {count} tensors under {prefix!r}", prefix))
    if not claimed and not vaes and all(anchor in keys for anchor in VAE_FILE_ANCHORS):
        vaes.append(Detection("vae", f"autoencoder file: found {VAE_FILE_ANCHORS[0]!r}", ""))
    return vaes


def detect(keys: Sequence[str], signatures: Sequence[Signature] = SIGNATURES) -> Detection | None:
    """The main component (the first model found), or None."""
    return next((c for c in detect_components(keys, signatures) if c.preset != "vae"), None)


def anchor_index(keys: Iterable[str], anchors: Iterable[str]) -> Mapping[str, list[str]]:
    """For each anchor, the keys that end with it at a name boundary (any prefix)."""
    anchors = frozenset(anchors)
    found: dict[str, list[str]] = {}
    for key in keys:
        parts = key.split(".")
        for i in range(len(parts)):
            tail = ".".join(parts[i:])
            if tail in anchors:
                found.setdefault(tail, []).append(key)
    return found
