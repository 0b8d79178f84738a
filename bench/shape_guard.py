"""What the shape guard costs: layers kept per family, and output size vs no guard and vs the old nvfp4 list.

Full-size models (FLUX.1-dev, LTX-Video 2B, WAN 2.1 14B, Qwen-Image, HunyuanVideo,
SD3.5 Large, SDXL) are built with ComfyUI's own classes on the meta device, so
only names and shapes exist; cq plans each conversion from that header alone
(no file, no data) and ComfyUI's detection is run on the planned output header.

    python bench/shape_guard.py            # needs the vendored ComfyUI (python -m tests.comfyui fetch)

Prints a Markdown table: per family and format, the layers the guard keeps,
the output size with the guard, without it, and with the hand list nvfp4 had
before (top-level names only), and whether ComfyUI detects each output as the input.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cq_core.engine.plan import QUANTIZE, plan_tensors  # noqa: E402
from cq_core.plugin.manager import get_registry  # noqa: E402
from cq_core.io.safetensors_io import TensorInfo  # noqa: E402
from cq_core.plugin.types import TensorSpec  # noqa: E402
from cq_models.shape_reads import shape_read_layers  # noqa: E402
from tests.comfyui import import_comfyui  # noqa: E402

FORMATS = ("nvfp4", "convrot_w4a4", "mxfp8")

#: What cq_nvfp4/detection.py refused before the guard (first name part, after a container prefix).
OLD_NVFP4_ROOTS = frozenset({
    "img_in", "txt_in", "vector_in", "time_in", "guidance_in", "final_layer", "distilled_guidance_layer",
    "time_text_embed", "norm_out", "proj_out", "x_embedder", "context_embedder", "t_embedder", "y_embedder",
    "cap_embedder", "pos_embed", "register_tokens", "init_x_linear", "cond_seq_linear", "patch_embedding",
    "text_embedding", "time_embedding", "time_projection", "img_emb", "head", "patchify_proj", "adaln_single",
    "caption_projection",
})  # fmt: skip


def old_nvfp4_list(names):
    return {n: "old list" for n in names if n.split(".", 1)[0] in OLD_NVFP4_ROOTS}


def families(comfy):
    ops = comfy.ops.disable_weight_init
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.hunyuan_video.model import HunyuanVideo
    from comfy.ldm.lightricks.model import LTXVModel
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
    from comfy.ldm.wan.model import WanModel

    return {
        "FLUX.1-dev": lambda: Flux(
            image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
            hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
            theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[], operations=ops),
        "LTX-Video 2B": lambda: LTXVModel(
            in_channels=128, cross_attention_dim=2048, attention_head_dim=64, num_attention_heads=32,
            caption_channels=4096, num_layers=28, operations=ops),
        "WAN 2.1 14B": lambda: WanModel(
            model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=5120, ffn_dim=13824,
            freq_dim=256, text_dim=4096, out_dim=16, num_heads=40, num_layers=40, operations=ops),
        "Qwen-Image": lambda: QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=3584, pooled_projection_dim=768,
            axes_dims_rope=(16, 56, 56), operations=ops),
        "HunyuanVideo": lambda: HunyuanVideo(
            image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
            hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=20, depth_single_blocks=40, axes_dim=[16, 56, 56],
            theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False,
            use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False, operations=ops),
        "SD3.5 Large": lambda: MMDiT(
            input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=38, adm_in_channels=2048,
            context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096,
                                                                             "out_features": 2432}},
            num_patches=36864, pos_embed_max_size=192, pos_embed_scaling_factor=None, qk_norm="rms",
            x_block_self_attn_layers=[], operations=ops),
        "SDXL": lambda: UNetModel(
            image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[2, 2, 2],
            channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
            transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
            context_dim=2048, num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=2816,
            num_classes="sequential", use_spatial_transformer=True, use_temporal_resblock=False,
            use_temporal_attention=False, operations=ops),
    }


@dataclass
class HeaderOnly:
    """What the planner reads of a safetensors file: names, dtypes and shapes."""

    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)


def header(shapes, dtype=torch.bfloat16):
    tensors, offset = {}, 0
    for name, shape in shapes.items():
        size = int(torch.Size(shape).numel()) * dtype.itemsize
        tensors[name] = TensorInfo(name, dtype, tuple(shape), offset, offset + size)
        offset += size
    return HeaderOnly("<meta>", tensors)


def plan(source, fmt, shape_reads):
    registry = get_registry()
    return plan_tensors(source, registry.format(fmt)(), registry.metadata_writer("comfyui")(), shape_reads=shape_reads)


def detect(comfy, entries):
    return comfy.model_detection.detect_unet_config(
        {name: torch.empty(spec.shape, device="meta") for name, spec in entries}, "")


def source_entries(shapes):
    return [(name, TensorSpec(torch.bfloat16, shape)) for name, shape in shapes.items()]


def gib(n):
    return f"{n / 2**30:.3f}"


def main():
    comfy = import_comfyui()
    print("| family | format | layers guarded | of which the old nvfp4 list missed | output GiB (guard) | no guard | "
          "old nvfp4 list | guard cost vs no guard | detected as input: guard / no guard |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for family, build in families(comfy).items():
        with torch.device("meta"):
            model = build()
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        source = header(shapes)
        reads = shape_read_layers(list(shapes))
        want = detect(comfy, source_entries(shapes))
        for fmt in FORMATS:
            guarded = plan(source, fmt, reads)
            bare = plan(source, fmt, None)
            old = plan(source, fmt, old_nvfp4_list(shapes) if fmt == "nvfp4" else None)
            kept = [i.name for i in guarded.items if "to detect the model" in i.reason]
            inner = [n for n in kept if n not in old_nvfp4_list([n])]
            same = detect(comfy, guarded.entries) == want
            same_bare = detect(comfy, bare.entries) == want
            same_old = detect(comfy, old.entries) == want
            cost = guarded.output_bytes - bare.output_bytes
            print(f"| {family} | {fmt} | {len(kept)} | {len(inner)} | {gib(guarded.output_bytes)} | "
                  f"{gib(bare.output_bytes)} | {gib(old.output_bytes) if fmt == 'nvfp4' else '-'}"
                  f"{'' if fmt != 'nvfp4' else (' (ok)' if same_old else ' (wrong model)')} | "
                  f"+{cost / 2**20:.1f} MiB ({100 * cost / bare.output_bytes:.2f} %) | "
                  f"{'yes' if same else 'NO'} / {'yes' if same_bare else 'no'} |")
            assert all(i.action != QUANTIZE for i in guarded.items if i.name in kept)


if __name__ == "__main__":
    main()
