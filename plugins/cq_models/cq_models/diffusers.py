"""Diffusers-format transformers, converted to the layout ComfyUI builds.

ComfyUI 0.30 loads a diffusers-format FLUX.1, SD3, AuraFlow, PixArt or
Z-Image transformer by renaming its keys on load and fusing separate q/k/v
projections into one tensor (``comfy/model_detection.py``
``convert_diffusers_mmdit``; the key maps are ``comfy/utils.py``
``flux_to_diffusers``, ``mmdit_to_diffusers``, ``auraflow_to_diffusers``,
``pixart_to_diffusers``, ``z_image_to_diffusers``). Quantization tensors
under the diffusers names would be dropped as "left over", so cq converts
first. The maps below restate those facts as rules; ``tests/test_diffusers.py``
checks each against ComfyUI's own map at several depths.

Diffusers layouts that ComfyUI 0.30 does not load at all (FLUX.2, WAN,
HunyuanVideo, LTX-Video) are refused in one sentence rather than written in a
form no loader reads. Qwen-Image's diffusers naming is ComfyUI's own already.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cq_core import CqError, LayoutConverter, TensorAssembly, TensorInfo

ENDS = ("weight", "bias")


@dataclass(frozen=True)
class Rule:
    """``target`` made of ``parts`` (concatenated along dim 0), per block and per weight/bias.

    Patterns may hold ``{i}`` (the block index, over ``blocks``' indices) and
    ``{end}`` (``weight`` and ``bias``). ``only_last`` limits ``{i}`` to the
    last block. A rule whose parts are all absent is skipped; one with some
    parts absent is an error (a fused tensor must not be built half).
    """

    target: str
    parts: tuple[str, ...]
    blocks: str | None = None
    transform: str | None = None
    only_last: bool = False


def rename(target: str, source: str, blocks: str | None = None, transform: str | None = None) -> Rule:
    return Rule(target, (source,), blocks, transform)


def fuse(target: str, *parts: str, blocks: str | None = None) -> Rule:
    return Rule(target, parts, blocks)


def block_indices(keys: Sequence[str], container: str) -> list[int]:
    """Sorted distinct ``N`` of every ``<container>.N.`` at the start of a key."""
    pattern = re.compile(re.escape(container) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for key in keys for m in [pattern.match(key)] if m})


class DiffusersLayout(LayoutConverter):
    """One diffusers layout: how to recognise it, and its rules."""

    def __init__(self, name: str, description: str, anchors: tuple[str, ...], rules: Sequence[Rule],
                 forbids: tuple[str, ...] = ()) -> None:
        self.name = name
        self.description = description
        self.anchors = anchors
        self.forbids = forbids
        self.rules = tuple(rules)

    def detect(self, keys: Sequence[str]) -> bool:
        present = set(keys)
        return all(a in present for a in self.anchors) and not any(f in present for f in self.forbids)

    def assemblies(self, tensors: Mapping[str, TensorInfo]) -> list[TensorAssembly]:
        keys = list(tensors)
        present = set(keys)
        out: list[TensorAssembly] = []
        for rule in self.rules:
            indices = block_indices(keys, rule.blocks) if rule.blocks else [None]
            if rule.only_last:
                indices = indices[-1:]
            ends = ENDS if "{end}" in rule.target else (None,)
            for i in indices:
                for end in ends:
                    fill = {"i": i, "end": end}
                    parts = tuple(p.format(**fill) for p in rule.parts)
                    found = [p in present for p in parts]
                    if not any(found):
                        continue
                    if not all(found):
                        missing = parts[found.index(False)]
                        raise CqError(
                            f"{self.description}: {rule.target.format(**fill)!r} is fused from {len(parts)} "
                            f"tensors but {missing!r} is missing."
                        )
                    out.append(TensorAssembly(rule.target.format(**fill), parts, rule.transform))
        # A later rule (the last block's swapped adaLN) overrides an earlier plain rename of the same input.
        by_parts: dict[tuple[str, ...], TensorAssembly] = {}
        for a in out:
            by_parts[a.parts] = a
        return list(by_parts.values())


class UnloadableDiffusers(LayoutConverter):
    """A diffusers layout ComfyUI 0.30 has no loader for: refuse instead of writing a file nobody loads."""

    def __init__(self, name: str, family: str, anchors: tuple[str, ...]) -> None:
        self.name = name
        self.family = family
        self.description = f"diffusers-format {family}"
        self.anchors = anchors

    def detect(self, keys: Sequence[str]) -> bool:
        present = set(keys)
        return all(a in present for a in self.anchors)

    def assemblies(self, tensors: Mapping[str, TensorInfo]) -> list[TensorAssembly]:
        raise CqError(
            f"This is a diffusers-format {self.family} transformer (it holds {self.anchors[0]!r}); ComfyUI "
            f"does not load that layout and cq has no map to ComfyUI's, so a quantized copy would not load: "
            f"convert it with the {self.family} release's own (ComfyUI-format) weights instead."
        )


D = "transformer_blocks"
S = "single_transformer_blocks"

FLUX = DiffusersLayout(
    "diffusers-flux",
    "diffusers-format FLUX.1",
    anchors=("x_embedder.weight", f"{D}.0.attn.add_q_proj.weight"),
    forbids=("pos_embed.proj.weight",),
    rules=[
        fuse("double_blocks.{i}.img_attn.qkv.{end}", *(f"{D}.{{i}}.attn.to_{x}.{{end}}" for x in "qkv"), blocks=D),
        fuse("double_blocks.{i}.txt_attn.qkv.{end}", *(f"{D}.{{i}}.attn.add_{x}_proj.{{end}}" for x in "qkv"),
             blocks=D),
        *(rename(f"double_blocks.{{i}}.{ours}.{{end}}", f"{D}.{{i}}.{theirs}.{{end}}", D) for ours, theirs in (
            ("img_attn.proj", "attn.to_out.0"), ("img_mod.lin", "norm1.linear"),
            ("txt_mod.lin", "norm1_context.linear"), ("txt_attn.proj", "attn.to_add_out"),
            ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
            ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
        )),
        *(rename(f"double_blocks.{{i}}.{ours}.weight", f"{D}.{{i}}.{theirs}.weight", D) for ours, theirs in (
            ("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"),
            ("txt_attn.norm.query_norm", "attn.norm_added_q"), ("txt_attn.norm.key_norm", "attn.norm_added_k"),
        )),
        fuse("single_blocks.{i}.linear1.{end}", *(f"{S}.{{i}}.attn.to_{x}.{{end}}" for x in "qkv"),
             f"{S}.{{i}}.proj_mlp.{{end}}", blocks=S),
        rename("single_blocks.{i}.modulation.lin.{end}", f"{S}.{{i}}.norm.linear.{{end}}", S),
        rename("single_blocks.{i}.linear2.{end}", f"{S}.{{i}}.proj_out.{{end}}", S),
        rename("single_blocks.{i}.norm.query_norm.weight", f"{S}.{{i}}.attn.norm_q.weight", S),
        rename("single_blocks.{i}.norm.key_norm.weight", f"{S}.{{i}}.attn.norm_k.weight", S),
        rename("final_layer.linear.{end}", "proj_out.{end}"),
        rename("img_in.{end}", "x_embedder.{end}"),
        rename("txt_in.{end}", "context_embedder.{end}"),
        *(rename(f"{ours}.{layer}.{{end}}", f"time_text_embed.{theirs}.{lin}.{{end}}")
          for ours, theirs in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                               ("guidance_in", "guidance_embedder"))
          for layer, lin in (("in_layer", "linear_1"), ("out_layer", "linear_2"))),
        rename("final_layer.adaLN_modulation.1.{end}", "norm_out.linear.{end}", transform="swap_halves"),
        rename("pos_embed_input.{end}", "controlnet_x_embedder.{end}"),  # FLUX ControlNets
    ],
)

SD3 = DiffusersLayout(
    "diffusers-sd3",
    "diffusers-format SD3/SD3.5 (MMDiT)",
    anchors=("pos_embed.proj.weight", f"{D}.0.attn.add_q_proj.weight"),
    rules=[
        fuse("joint_blocks.{i}.x_block.attn.qkv.{end}", *(f"{D}.{{i}}.attn.to_{x}.{{end}}" for x in "qkv"), blocks=D),
        fuse("joint_blocks.{i}.context_block.attn.qkv.{end}",
             *(f"{D}.{{i}}.attn.add_{x}_proj.{{end}}" for x in "qkv"), blocks=D),
        fuse("joint_blocks.{i}.x_block.attn2.qkv.{end}", *(f"{D}.{{i}}.attn2.to_{x}.{{end}}" for x in "qkv"),
             blocks=D),
        *(rename(f"joint_blocks.{{i}}.{ours}.{{end}}", f"{D}.{{i}}.{theirs}.{{end}}", D) for ours, theirs in (
            ("context_block.adaLN_modulation.1", "norm1_context.linear"),
            ("context_block.attn.proj", "attn.to_add_out"),
            ("context_block.mlp.fc1", "ff_context.net.0.proj"), ("context_block.mlp.fc2", "ff_context.net.2"),
            ("x_block.adaLN_modulation.1", "norm1.linear"), ("x_block.attn.proj", "attn.to_out.0"),
            ("x_block.attn2.proj", "attn2.to_out.0"),
            ("x_block.mlp.fc1", "ff.net.0.proj"), ("x_block.mlp.fc2", "ff.net.2"),
        )),
        *(rename(f"joint_blocks.{{i}}.{ours}.weight", f"{D}.{{i}}.{theirs}.weight", D) for ours, theirs in (
            ("context_block.attn.ln_q", "attn.norm_added_q"), ("context_block.attn.ln_k", "attn.norm_added_k"),
            ("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
            ("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k"),
        )),
        # The last block's context modulation is stored (shift, scale) by diffusers, (scale, shift) by ComfyUI.
        Rule("joint_blocks.{i}.context_block.adaLN_modulation.1.{end}", (f"{D}.{{i}}.norm1_context.linear.{{end}}",),
             D, "swap_halves", only_last=True),
        rename("context_embedder.{end}", "context_embedder.{end}"),
        rename("t_embedder.mlp.0.{end}", "time_text_embed.timestep_embedder.linear_1.{end}"),
        rename("t_embedder.mlp.2.{end}", "time_text_embed.timestep_embedder.linear_2.{end}"),
        rename("x_embedder.proj.{end}", "pos_embed.proj.{end}"),
        rename("y_embedder.mlp.0.{end}", "time_text_embed.text_embedder.linear_1.{end}"),
        rename("y_embedder.mlp.2.{end}", "time_text_embed.text_embedder.linear_2.{end}"),
        rename("pos_embed", "pos_embed.pos_embed"),
        rename("final_layer.adaLN_modulation.1.{end}", "norm_out.linear.{end}", transform="swap_halves"),
        rename("final_layer.linear.{end}", "proj_out.{end}"),
    ],
)

J = "joint_transformer_blocks"

AURAFLOW = DiffusersLayout(
    "diffusers-auraflow",
    "diffusers-format AuraFlow",
    anchors=(f"{J}.0.attn.add_k_proj.weight",),
    rules=[
        *(rename(f"double_layers.{{i}}.{ours}.weight", f"{J}.{{i}}.{theirs}.weight", J) for ours, theirs in (
            ("attn.w2q", "attn.to_q"), ("attn.w2k", "attn.to_k"), ("attn.w2v", "attn.to_v"),
            ("attn.w2o", "attn.to_out.0"), ("attn.w1q", "attn.add_q_proj"), ("attn.w1k", "attn.add_k_proj"),
            ("attn.w1v", "attn.add_v_proj"), ("attn.w1o", "attn.to_add_out"),
            ("mlpX.c_fc1", "ff.linear_1"), ("mlpX.c_fc2", "ff.linear_2"), ("mlpX.c_proj", "ff.out_projection"),
            ("mlpC.c_fc1", "ff_context.linear_1"), ("mlpC.c_fc2", "ff_context.linear_2"),
            ("mlpC.c_proj", "ff_context.out_projection"),
            ("modX.1", "norm1.linear"), ("modC.1", "norm1_context.linear"),
        )),
        *(rename(f"single_layers.{{i}}.{ours}.weight", f"{S}.{{i}}.{theirs}.weight", S) for ours, theirs in (
            ("attn.w1q", "attn.to_q"), ("attn.w1k", "attn.to_k"), ("attn.w1v", "attn.to_v"),
            ("attn.w1o", "attn.to_out.0"), ("modCX.1", "norm1.linear"),
            ("mlp.c_fc1", "ff.linear_1"), ("mlp.c_fc2", "ff.linear_2"), ("mlp.c_proj", "ff.out_projection"),
        )),
        rename("positional_encoding", "pos_embed.pos_embed"),
        rename("register_tokens", "register_tokens"),
        rename("t_embedder.mlp.0.{end}", "time_step_proj.linear_1.{end}"),
        rename("t_embedder.mlp.2.{end}", "time_step_proj.linear_2.{end}"),
        rename("cond_seq_linear.weight", "context_embedder.weight"),
        rename("init_x_linear.{end}", "pos_embed.proj.{end}"),
        rename("final_linear.weight", "proj_out.weight"),
        rename("modF.1.weight", "norm_out.linear.weight", transform="swap_halves"),
    ],
)

PIXART = DiffusersLayout(
    "diffusers-pixart",
    "diffusers-format PixArt",
    anchors=("adaln_single.emb.timestep_embedder.linear_1.bias", "pos_embed.proj.bias"),
    rules=[
        fuse("blocks.{i}.attn.qkv.{end}", *(f"{D}.{{i}}.attn1.to_{x}.{{end}}" for x in "qkv"), blocks=D),
        rename("blocks.{i}.cross_attn.q_linear.{end}", f"{D}.{{i}}.attn2.to_q.{{end}}", D),
        fuse("blocks.{i}.cross_attn.kv_linear.{end}", *(f"{D}.{{i}}.attn2.to_{x}.{{end}}" for x in "kv"), blocks=D),
        rename("blocks.{i}.scale_shift_table", f"{D}.{{i}}.scale_shift_table", D),
        *(rename(f"blocks.{{i}}.{ours}.{{end}}", f"{D}.{{i}}.{theirs}.{{end}}", D) for ours, theirs in (
            ("attn.proj", "attn1.to_out.0"), ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2"),
            ("cross_attn.proj", "attn2.to_out.0"),
        )),
        *(rename(f"{ours}.{{end}}", f"{theirs}.{{end}}") for ours, theirs in (
            ("csize_embedder.mlp.0", "adaln_single.emb.resolution_embedder.linear_1"),
            ("csize_embedder.mlp.2", "adaln_single.emb.resolution_embedder.linear_2"),
            ("ar_embedder.mlp.0", "adaln_single.emb.aspect_ratio_embedder.linear_1"),
            ("ar_embedder.mlp.2", "adaln_single.emb.aspect_ratio_embedder.linear_2"),
            ("x_embedder.proj", "pos_embed.proj"),
            ("y_embedder.y_proj.fc1", "caption_projection.linear_1"),
            ("y_embedder.y_proj.fc2", "caption_projection.linear_2"),
            ("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1"),
            ("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2"),
            ("t_block.1", "adaln_single.linear"),
            ("final_layer.linear", "proj_out"),
        )),
        rename("y_embedder.y_embedding", "caption_projection.y_embedding"),
        rename("final_layer.scale_shift_table", "scale_shift_table"),
    ],
)


def _z_image_block(container: str) -> list[Rule]:
    return [
        fuse(f"{container}.{{i}}.attention.qkv.{{end}}",
             *(f"{container}.{{i}}.attention.to_{x}.{{end}}" for x in "qkv"), blocks=container),
        rename(f"{container}.{{i}}.attention.q_norm.weight", f"{container}.{{i}}.attention.norm_q.weight", container),
        rename(f"{container}.{{i}}.attention.k_norm.weight", f"{container}.{{i}}.attention.norm_k.weight", container),
        rename(f"{container}.{{i}}.attention.out.{{end}}", f"{container}.{{i}}.attention.to_out.0.{{end}}", container),
    ]


Z_IMAGE = DiffusersLayout(
    "diffusers-z-image",
    "diffusers-format Z-Image (Lumina 2 family)",
    anchors=("noise_refiner.0.attention.norm_k.weight",),
    rules=[
        *_z_image_block("layers"), *_z_image_block("context_refiner"), *_z_image_block("noise_refiner"),
        # Everything else keeps its name, as ComfyUI keeps it (norms, feed-forward, adaLN, embedders).
        rename("final_layer.linear.{end}", "all_final_layer.2-1.linear.{end}"),
        rename("final_layer.adaLN_modulation.1.{end}", "all_final_layer.2-1.adaLN_modulation.1.{end}"),
        rename("x_embedder.{end}", "all_x_embedder.2-1.{end}"),
    ],
)

#: Layouts ComfyUI 0.30 cannot load in diffusers form (their native names differ and no converter exists).
UNLOADABLE = (
    # ComfyUI's FLUX branch reads x_embedder.bias, which FLUX.2 (no biases) lacks.
    UnloadableDiffusers("diffusers-flux2", "FLUX.2", ("single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight",)),
    # JoyImage's own (ComfyUI) naming has WAN's condition_embedder beside double_blocks: the block name tells.
    UnloadableDiffusers("diffusers-wan", "WAN", ("condition_embedder.time_embedder.linear_1.weight",
                                                 "blocks.0.attn1.to_q.weight")),
    UnloadableDiffusers("diffusers-hunyuanvideo", "HunyuanVideo",
                        ("x_embedder.proj.weight", "context_embedder.token_refiner.refiner_blocks.0.norm1.weight")),
    UnloadableDiffusers("diffusers-ltxvideo", "LTX-Video", ("proj_in.weight", "time_embed.linear.weight",
                                                           f"{D}.0.attn2.to_k.weight")),
)

#: In ComfyUI's order of trial (``convert_diffusers_mmdit``); the refusals first, so FLUX.2 is not taken for FLUX.1.
LAYOUTS: tuple[LayoutConverter, ...] = (*UNLOADABLE, AURAFLOW, PIXART, Z_IMAGE, FLUX, SD3)
