"""Evidence for the presets' keep lists: output error and size with and without keeping a layer set.

For each family: a tiny model built with ComfyUI's own class (seeded random weights, bf16),
converted by cq to float8_e4m3fn under each variant (a preset, no preset, the preset with its
embedders quantized), loaded back with ComfyUI's own loader, and run forward on fixed inputs.
The error is the relative L2 distance of the output to the bf16 model's output through the
same loader. The size column is the tiny file's; ``real share`` is what the kept layers weigh in
the full-size model (built by ComfyUI on the meta device), i.e. what keeping them costs there.

    python -m bench.preset_choices            # all families
    python -m bench.preset_choices chroma     # one
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import cq_core
from cq_core.plugin.hookspecs import hookimpl
from cq_core.plugin.manager import Registry, make_plugin_manager, set_registry
from tests import comfyui
from tests.helpers import PROJECT_PLUGINS, write_checkpoint


@dataclass
class Case:
    family: str
    model_class: str
    tiny: dict
    full: dict
    forward: Callable
    #: variant label -> (preset name or "none", and for a bench-made preset: the preset it copies and
    #: the embedders it quantizes)
    variants: dict[str, tuple[str, tuple[str, tuple[str, ...]] | None]]
    #: the layer names the decision is about (for the real-size share)
    layers: tuple[str, ...]


def _flux_like(hidden, **extra):
    return dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                hidden_size=hidden, mlp_ratio=4.0, num_heads=hidden // 128, depth=1, depth_single_blocks=1,
                axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                txt_ids_dims=[]) | extra


def _chroma(hidden, depth, single):
    return dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=64, hidden_size=hidden,
                mlp_ratio=4.0, num_heads=hidden // 128, depth=depth, depth_single_blocks=single,
                axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, in_dim=64, out_dim=3072,
                hidden_dim=5120, n_layers=5, txt_ids_dims=[], vec_in_dim=None)


def _sd3(depth, adm, context, patches):
    return dict(in_channels=16, patch_size=2, out_channels=16, depth=depth, input_size=None, adm_in_channels=adm,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": context, "out_features": 64 * depth}},
                num_patches=patches, pos_embed_max_size=int(patches ** 0.5), qk_norm="rms",
                pos_embed_scaling_factor=None, x_block_self_attn_layers=[])


def _hunyuan(hidden, depth, single, context):
    return dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=context,
                hidden_size=hidden, mlp_ratio=4.0, num_heads=hidden // 128, depth=depth, depth_single_blocks=single,
                axes_dim=[16, 56, 56], theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True,
                byt5=False, meanflow=False, use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False)


def _inputs(seed, *shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def fwd_flux(dm, seed):
    x, ctx, y = _inputs(seed, (1, 16, 8, 8), (1, 7, 32), (1, 32))
    return dm(x, torch.tensor([0.5]), context=ctx, y=y, guidance=torch.tensor([3.5]))


def fwd_chroma(dm, seed):
    x, ctx = _inputs(seed, (1, 16, 8, 8), (1, 7, 64))
    return dm(x, torch.tensor([0.5]), context=ctx, guidance=torch.tensor([0.0]))


def fwd_sd3(dm, seed):
    x, ctx, y = _inputs(seed, (1, 16, 8, 8), (1, 7, 64), (1, 32))
    return dm(x, torch.tensor([0.5]), context=ctx, y=y)


def fwd_hunyuan(dm, seed):
    x, ctx, y = _inputs(seed, (1, 16, 1, 8, 8), (1, 7, 64), (1, 768))
    return dm(x, torch.tensor([0.5]), context=ctx, y=y, guidance=torch.tensor([3.5]))


CASES = {
    "flux": Case("flux", "Flux", _flux_like(256), _flux_like(3072, depth=19, depth_single_blocks=38, vec_in_dim=768,
                                                               context_in_dim=4096), fwd_flux,
                 {"flux preset": ("flux", None), "no preset": ("none", None)},
                 ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")),
    "chroma": Case("chroma", "Chroma", _chroma(3072, 1, 1), _chroma(3072, 19, 38), fwd_chroma,
                   {"chroma (auto-detected)": ("chroma", None), "distillation_small": ("distillation_small", None),
                    "no preset (before: no detection)": ("none", None)},
                   ("distilled_guidance_layer", "final_layer", "img_in", "txt_in")),
    "sd3": Case("sd3", "SD3", _sd3(4, 32, 64, 256), _sd3(38, 2048, 4096, 36864), fwd_sd3,
                {"sd3 preset": ("sd3", None),
                 "sd3, context_embedder quantized": ("sd3_q", ("sd3_noctx", ("context_embedder",))),
                 "no preset (default keeps context_embedder)": ("none", None)},
                ("context_embedder",)),
    "hunyuan": Case("hunyuan", "HunyuanVideo", _hunyuan(256, 1, 1, 64), _hunyuan(3072, 20, 40, 4096), fwd_hunyuan,
                    {"hunyuan preset (default keeps input_embedder)": ("hunyuan", None),
                     "hunyuan, input_embedder quantized": ("hunyuan_q", ("hunyuan", ("input_embedder",))),
                     "no preset": ("none", None)},
                    ("txt_in.input_embedder",)),
}


def tiny_state(comfy, case: Case) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = getattr(comfy.supported_models, case.model_class)(dict(case.tiny)).get_model({}, device=torch.device("cpu"))
    state = {}
    for name, tensor in model.diffusion_model.state_dict().items():
        if tensor.dim() <= 1 and ("norm" in name or name.endswith(".scale")):
            state[name] = (1 + 0.05 * torch.randn(tensor.shape)).to(torch.bfloat16)
        elif tensor.is_floating_point():
            fan_in = tensor.shape[1] if tensor.dim() >= 2 else 1
            state[name] = (torch.randn(tensor.shape) / max(fan_in, 1) ** 0.5).to(torch.bfloat16)
        else:
            state[name] = tensor
    return state


def real_share(comfy, case: Case) -> float:
    model = getattr(comfy.supported_models, case.model_class)(dict(case.full)).get_model({}, device=torch.device("meta"))
    sizes = {k: v.numel() for k, v in model.diffusion_model.state_dict().items()}
    kept = sum(n for k, n in sizes.items() if any(p in k for p in case.layers))
    return kept / sum(sizes.values())


class Variants:
    """Registers the bench's extra presets: a copy of a preset that quantizes some embedders."""

    def __init__(self, base: Registry, case: Case):
        self.__name__ = "bench_variants"
        self.presets = []
        for name, made in case.variants.values():
            if made is not None:
                copied, patterns = made
                original = SD3_NO_CONTEXT if copied == "sd3_noctx" else base.model_filter(copied)
                self.presets.append(replace(original, name=name, quantize=patterns))

    @hookimpl
    def cq_register_model_filters(self, register):
        for preset in self.presets:
            register(preset)


#: sd3 without context_embedder among its keeps, so that ``quantize`` decides it.
SD3_NO_CONTEXT = None


def run(case: Case) -> list[tuple[str, float, int]]:
    global SD3_NO_CONTEXT
    comfy = comfyui.import_comfyui()
    base = Registry.from_plugin_manager(make_plugin_manager(load_entry_points=False, extra_plugins=PROJECT_PLUGINS))
    sd3 = base.model_filter("sd3")
    # 't_embedder' is also a substring of 'context_embedder': narrow it to the time embedder's MLP.
    SD3_NO_CONTEXT = replace(sd3, high_precision=tuple(
        "t_embedder.mlp" if p == "t_embedder" else p for p in sd3.high_precision if p != "context_embedder"))
    registry = Registry.from_plugin_manager(make_plugin_manager(
        load_entry_points=False, extra_plugins=(*PROJECT_PLUGINS, Variants(base, case))))
    set_registry(registry)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = write_checkpoint(Path(tmp) / f"{case.family}.safetensors", tiny_state(comfy, case))
        patcher, _ = comfyui.load_diffusion_model(source)
        with torch.no_grad():
            reference = case.forward(patcher.model.diffusion_model, 1).float()
        for label, (preset, _) in case.variants.items():
            out = Path(tmp) / f"out-{preset}.safetensors"
            cq_core.convert(source, out, format="float8_e4m3fn", model=preset, measure=False)
            patcher, log = comfyui.load_diffusion_model(out)
            with torch.no_grad():
                result = case.forward(patcher.model.diffusion_model, 1).float()
            error = float((result - reference).norm() / reference.norm())
            rows.append((label, error, out.stat().st_size))
    set_registry(None)
    return rows


def main(names: list[str]) -> None:
    comfy = comfyui.import_comfyui()
    for name in names or list(CASES):
        case = CASES[name]
        share = real_share(comfy, case)
        print(f"## {name}: layers {', '.join(case.layers)} are {share:.2%} of the full-size model's parameters")
        for label, error, size in run(case):
            print(f"  {label:45s} rel. L2 {error:.5f}   tiny file {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
