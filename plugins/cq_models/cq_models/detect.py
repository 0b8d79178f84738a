"""Recognise a model family from its tensor names alone.

Each family has an *anchor* (one tensor name only that family has, the kind
ComfyUI's own model detection keys on), further names that must sit beside
it, and names that must be absent (they mark a close relative: FLUX.2 and
Chroma share FLUX.1's blocks). The anchor also reveals the checkpoint's
prefix (``model.diffusion_model.``, ``diffusion_model.``, ...), and every
other name is looked up under that same prefix. Families are tried from the
most specific to the most generic; a key set that fits none gets None.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cq_core.types import Detection


@dataclass(frozen=True)
class Signature:
    """How one family shows in a key set."""

    preset: str
    family: str
    anchor: str
    requires: tuple[str, ...] = ()
    #: any one of these must be present too (variants spell a layer differently)
    requires_any: tuple[str, ...] = ()
    forbids: tuple[str, ...] = ()
    #: a finer name for the report (dev vs schnell, depth), from the names under the prefix
    variant: Callable[[set[str], str], str] | None = field(default=None, compare=False)

    def match(self, keys: set[str], by_anchor: Mapping[str, list[str]]) -> Detection | None:
        for key in by_anchor.get(self.anchor, ()):
            prefix = key[: -len(self.anchor)]
            if not all(prefix + name in keys for name in self.requires):
                continue
            if self.requires_any and not any(prefix + name in keys for name in self.requires_any):
                continue
            if any(prefix + name in keys for name in self.forbids):
                continue
            family = self.family + (f" ({self.variant(keys, prefix)})" if self.variant else "")
            where = f" under prefix {prefix!r}" if prefix else ""
            return Detection(self.preset, f"{family}: found {self.anchor!r}{where}")
        return None


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
    umt5 = prefix + "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in keys
    return f"{'UMT5' if umt5 else 'T5'} {size}{', v1.1 gated FFN' if gated else ''}"


FLUX_QK_NORM = "double_blocks.0.img_attn.norm.key_norm.scale"

#: Most specific first: the first signature that matches wins.
SIGNATURES: tuple[Signature, ...] = (
    Signature(
        "flux2", "FLUX.2", "double_stream_modulation_img.lin.weight",
        requires=(FLUX_QK_NORM, "single_stream_modulation.lin.weight", "img_in.weight"),
        variant=_depth("double_blocks.", "double blocks"),
    ),
    Signature(
        "flux", "FLUX.1", FLUX_QK_NORM,
        requires=("img_in.weight", "txt_in.weight", "double_blocks.0.img_mod.lin.weight", "vector_in.in_layer.weight"),
        # FLUX.2 shares the blocks but has global modulation; Chroma replaces it with a guidance network.
        forbids=("double_stream_modulation_img.lin.weight", "distilled_guidance_layer.in_proj.weight"),
        variant=_flux1_variant,
    ),
    Signature(
        "hunyuan", "HunyuanVideo", "txt_in.individual_token_refiner.blocks.0.norm1.weight",
        requires=("double_blocks.0.img_attn_qkv.weight",),
        variant=_depth("double_blocks.", "double blocks"),
    ),
    Signature(
        "ltxv2", "LTX-Video 2 (audio+video)", "audio_adaln_single.linear.weight",
        requires=("adaln_single.emb.timestep_embedder.linear_1.weight", "patchify_proj.weight",
                  "audio_patchify_proj.weight"),
        variant=_depth("transformer_blocks.", "transformer blocks"),
    ),
    Signature(
        "qwen", "Qwen-Image", "txt_norm.weight",
        requires=("img_in.weight", "txt_in.weight", "transformer_blocks.0.img_mod.1.weight",
                  "transformer_blocks.0.attn.add_q_proj.weight"),
        variant=_depth("transformer_blocks.", "transformer blocks"),
    ),
    Signature(
        "zimage", "Z-Image", "cap_pad_token",
        requires=("x_pad_token", "cap_embedder.1.weight", "noise_refiner.0.adaLN_modulation.0.weight"),
        variant=_depth("layers.", "layers"),
    ),
    Signature(
        "wan", "WAN 2.x", "head.modulation",
        requires=("patch_embedding.weight", "blocks.0.self_attn.q.weight", "blocks.0.cross_attn.k.weight"),
        variant=_depth("blocks.", "blocks"),
    ),
    Signature(
        "t5xxl", "T5 encoder", "encoder.block.0.layer.0.SelfAttention.q.weight",
        requires=("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
        variant=_t5_variant,
    ),
    Signature(
        "qwen35", "Qwen3.5 (hybrid linear attention)", "layers.0.linear_attn.in_proj_a.weight",
        variant=_depth("layers.", "layers"),
    ),
    Signature(
        "gemma4", "Gemma (per-layer inputs)", "layers.0.per_layer_input_gate.weight",
        requires=("layers.0.per_layer_projection.weight",),
    ),
    Signature(
        "generic_text", "Llama/Mistral/Qwen-style LLM", "layers.0.self_attn.q_proj.weight",
        requires=("layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.weight",
                  "embed_tokens.weight"),
        requires_any=("layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight"),
        variant=_depth("layers.", "layers"),
    ),
)


def anchor_index(keys: Iterable[str], anchors: Iterable[str]) -> dict[str, list[str]]:
    """For each anchor, the keys that end with it at a name boundary (any prefix)."""
    anchors = set(anchors)
    found: dict[str, list[str]] = {}
    for key in keys:
        for anchor in anchors:
            if key == anchor or key.endswith("." + anchor):
                found.setdefault(anchor, []).append(key)
    return found


def detect(keys: Sequence[str], signatures: Sequence[Signature] = SIGNATURES) -> Detection | None:
    """The first family whose signature the key set carries, or None."""
    key_set = set(keys)
    by_anchor = anchor_index(key_set, (s.anchor for s in signatures))
    for key_list in by_anchor.values():
        key_list.sort(key=len)  # the shortest prefix first: the main model, not a nested copy
    for signature in signatures:
        detection = signature.match(key_set, by_anchor)
        if detection is not None:
            return detection
    return None
