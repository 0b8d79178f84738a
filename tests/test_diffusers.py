"""Diffusers-format transformers become ComfyUI-native files (cq_models.diffusers, cq_core.plugin.layouts).

The diffusers inputs are made from tiny models built with ComfyUI's own
classes, split into diffusers keys by ComfyUI's own key maps
(``comfy.utils.flux_to_diffusers`` / ``mmdit_to_diffusers``): so cq's rules
are checked against ComfyUI's facts, and the outputs against its loader.
"""

from __future__ import annotations

import pytest
import torch

import cq_core
from cq_core.errors import CqError
from cq_core.engine.native_layout import to_native_layout
from cq_core.plugin.layouts import TensorAssembly, swap_halves
from cq_core.io.safetensors_io import SafetensorsFile
from tests.comfyui import load_diffusion_model
from tests.conftest import write_checkpoint

FORMATS = ("float8_e4m3fn", "nvfp4", "int8_tensorwise")


def _seeded(model) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = model.state_dict()  # parameters and buffers (ComfyUI's ops leave both uninitialized)
    return {k: (torch.randn(v.shape) * 0.05).to(torch.bfloat16) if v.is_floating_point() else v.contiguous()
            for k, v in state.items()}


def tiny_flux(comfy) -> dict[str, torch.Tensor]:
    from comfy.ldm.flux.model import Flux

    return _seeded(Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                        hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=2, depth_single_blocks=2,
                        axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                        txt_ids_dims=[], operations=comfy.ops.manual_cast, dtype=torch.float32))


def tiny_sd3(comfy) -> dict[str, torch.Tensor]:
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    return _seeded(MMDiT(in_channels=16, out_channels=16, patch_size=2, depth=2, adm_in_channels=32,
                         context_embedder_config={"target": "torch.nn.Linear",
                                                  "params": {"in_features": 32, "out_features": 128}},
                         num_patches=64, pos_embed_max_size=8, pos_embed_scaling_factor=None, qk_norm="rms",
                         x_block_self_attn_layers=[0], dtype=torch.float32, operations=comfy.ops.manual_cast))


def to_diffusers(native: dict[str, torch.Tensor], key_map: dict) -> dict[str, torch.Tensor]:
    """Split a native state dict into diffusers keys with ComfyUI's own map (diffusers key -> target).

    The map also lists aliases (LyCORIS, FLUX.2 names) for the same target; the first name wins.
    """
    out, taken, whole = {}, set(), set()
    for theirs, target in key_map.items():
        name, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
        if name not in native or (name, offset) in taken or name in whole:
            continue
        if offset is None and any(t == name for t, _ in taken):
            continue  # an alias for the whole of a tensor already split into parts
        taken.add((name, offset))
        if offset is None:
            whole.add(name)
        if isinstance(target, str):
            out[theirs] = native[target].clone()
            continue
        tensor = native[name]
        if offset is not None:
            dim, start, length = offset
            tensor = tensor.narrow(dim, start, length)
        if len(target) > 2:
            tensor = swap_halves(tensor)  # ComfyUI's only transform here, and its own inverse
        out[theirs] = tensor.clone().contiguous()
    return out


CASES = {
    "flux": (tiny_flux, lambda comfy, sd: comfy.utils.flux_to_diffusers(
        {"depth": 2, "depth_single_blocks": 2, "hidden_size": 128})),
    "sd3": (tiny_sd3, lambda comfy, sd: comfy.utils.mmdit_to_diffusers({"depth": 2, "num_blocks": 2})),
}


def synthetic_native(key_map: dict, hidden: int) -> dict[str, torch.Tensor]:
    """Random tensors under every native name of ComfyUI's map, sized so each split fits."""
    rows: dict[str, int] = {}
    for target in key_map.values():
        name, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
        need = offset[1] + offset[2] if offset is not None else 2 * hidden
        rows[name] = max(rows.get(name, 0), need)
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn((n,) if name.endswith("bias") else (n, 8), generator=g).to(torch.bfloat16)
            for name, n in rows.items()}


#: ComfyUI's map of each layout it converts, at a small size: (cq converter, map).
COMFYUI_MAPS = {
    "flux": ("diffusers-flux", lambda u: u.flux_to_diffusers({"depth": 2, "depth_single_blocks": 3, "hidden_size": 16})),
    "sd3": ("diffusers-sd3", lambda u: u.mmdit_to_diffusers({"depth": 3, "num_blocks": 3})),
    "auraflow": ("diffusers-auraflow", lambda u: u.auraflow_to_diffusers({"n_double_layers": 2, "n_layers": 5})),
    "pixart": ("diffusers-pixart", lambda u: u.pixart_to_diffusers({"depth": 2, "hidden_size": 16})),
    "z-image": ("diffusers-z-image", lambda u: u.z_image_to_diffusers({"n_layers": 2, "dim": 16})),
}


@pytest.mark.parametrize("family", sorted(COMFYUI_MAPS))
def test_every_layout_comfyui_converts_maps_back_to_its_names_bit_for_bit(tmp_path, comfyui, registry, family):
    converter, make_map = COMFYUI_MAPS[family]
    key_map = make_map(comfyui.utils)
    native = synthetic_native(key_map, 16)
    diffusers = to_diffusers(native, key_map)
    path = write_checkpoint(tmp_path / "diffusers.safetensors", diffusers)
    with SafetensorsFile(path) as raw:
        view = to_native_layout(raw, registry.layout_converters.values())
        assert view.layout.converter == converter
        assert set(view.tensors) == set(native)
        for name, tensor in native.items():
            assert torch.equal(view.read(name), tensor), name


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, comfyui, tmp_path_factory):
    build, key_map = CASES[request.param]
    native = build(comfyui)
    diffusers = to_diffusers(native, key_map(comfyui, native))
    folder = tmp_path_factory.mktemp(request.param)
    return (request.param, write_checkpoint(folder / "native.safetensors", native),
            write_checkpoint(folder / "diffusers.safetensors", diffusers), native)


def test_the_native_view_of_a_diffusers_file_is_comfyuis_layout_bit_for_bit(pair, registry):
    family, _, diffusers_path, native = pair
    with SafetensorsFile(diffusers_path) as raw:
        view = to_native_layout(raw, registry.layout_converters.values())
        assert view is not raw
        assert set(view.tensors) == set(native)
        for name, tensor in native.items():
            got = view.read(name)
            assert got.shape == tensor.shape and torch.equal(got, tensor), name
            assert view.tensors[name].shape == tensor.shape


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_quantized_diffusers_file_loads_in_comfyui_like_the_native_one(tmp_path, pair, fmt):
    family, native_path, diffusers_path, _ = pair
    out = tmp_path / f"{family}-{fmt}.safetensors"
    report = cq_core.convert(diffusers_path, out, format=fmt)
    assert report.layout and report.layout.startswith(f"diffusers-{family}")
    reference, _ = load_diffusion_model(native_path)
    patcher, log = load_diffusion_model(out)
    assert patcher.model.model_config.unet_config == reference.model.model_config.unet_config
    assert log.problems() == []
    native_quantized = tmp_path / f"native-{fmt}.safetensors"
    cq_core.convert(native_path, native_quantized, format=fmt)
    with SafetensorsFile(out) as a, SafetensorsFile(native_quantized) as b:
        assert set(a.tensors) == set(b.tensors)
        for name in a.tensors:  # the same bytes as quantizing the native file
            assert torch.equal(a.read(name).reshape(-1).view(torch.uint8), b.read(name).reshape(-1).view(torch.uint8)), name


def test_a_diffusers_layout_comfyui_cannot_load_is_refused_in_one_sentence(tmp_path):
    path = write_checkpoint(tmp_path / "wan-diffusers.safetensors", {
        "condition_embedder.time_embedder.linear_1.weight": torch.randn(64, 32, dtype=torch.bfloat16),
        "blocks.0.attn1.to_q.weight": torch.randn(64, 64, dtype=torch.bfloat16),
    })
    with pytest.raises(CqError, match=r"diffusers-format WAN.*ComfyUI does not load") as info:
        cq_core.convert(path, tmp_path / "out.safetensors", format="float8_e4m3fn")
    assert "\n" not in str(info.value) and str(info.value).startswith(str(path))
    assert not (tmp_path / "out.safetensors").exists()


def test_joyimage_in_comfyuis_naming_is_not_taken_for_a_diffusers_wan(tmp_path):
    """JoyImage (ComfyUI's own keys) carries WAN's diffusers-named condition_embedder beside its double_blocks."""
    path = write_checkpoint(tmp_path / "joyimage.safetensors", {
        "condition_embedder.time_embedder.linear_1.weight": torch.randn(64, 32, dtype=torch.bfloat16),
        "double_blocks.0.attn.img_attn_qkv.weight": torch.randn(192, 64, dtype=torch.bfloat16),
    })
    report = cq_core.convert(path, tmp_path / "out.safetensors", format="float8_e4m3fn")
    assert report.layout is None
    assert "double_blocks.0.attn.img_attn_qkv.weight" in {t.name for t in report.quantized}


def test_register_layout_converters_hook(registry):
    from cq_core import LayoutConverter

    assert {"diffusers-flux", "diffusers-sd3"} <= set(registry.layout_converters)
    assert all(isinstance(c, LayoutConverter) for c in registry.layout_converters.values())


def test_a_fused_tensor_with_a_missing_part_is_refused(tmp_path, registry):
    path = write_checkpoint(tmp_path / "half.safetensors", {
        "x_embedder.weight": torch.randn(128, 64, dtype=torch.bfloat16),
        "transformer_blocks.0.attn.add_q_proj.weight": torch.randn(128, 128, dtype=torch.bfloat16),
        "transformer_blocks.0.attn.to_q.weight": torch.randn(128, 128, dtype=torch.bfloat16),
        "transformer_blocks.0.attn.to_k.weight": torch.randn(128, 128, dtype=torch.bfloat16),
    })
    with SafetensorsFile(path) as raw, pytest.raises(CqError, match="to_v.weight' is missing"):
        to_native_layout(raw, registry.layout_converters.values())


def test_assembly_rejects_unknown_transforms():
    with pytest.raises(ValueError, match="unknown transform"):
        TensorAssembly("a", ("b",), "transpose")


def test_verify_reads_a_diffusers_source_under_the_names_cq_wrote(tmp_path, pair):
    from cq_core.commands.verify import verify

    family, _, diffusers_path, _ = pair
    out = tmp_path / "out.safetensors"
    cq_core.convert(diffusers_path, out, format="float8_e4m3fn")
    report = verify(diffusers_path, out)
    assert report.layers and all(check.ok for check in report.layers)


def test_dry_run_names_the_layout(capsys, pair):
    from tests.cli_runner import run_cq

    family, _, diffusers_path, _ = pair
    result = run_cq(capsys, "convert", diffusers_path, "--dry-run")
    assert result.code == 0, result.err
    assert f"layout: diffusers-{family}" in result.out
    fused = {"flux": "double_blocks.0.img_attn.qkv.weight", "sd3": "joint_blocks.0.x_block.attn.qkv.weight"}
    assert fused[family] in result.out


def test_a_sharded_diffusers_transformer_converts_with_fused_parts_across_shards(tmp_path, pair):
    import json

    family, _, diffusers_path, _ = pair
    with SafetensorsFile(diffusers_path) as raw:
        names = list(raw.tensors)
        tensors = {name: raw.read(name).clone() for name in names}
    # Split inside the first block's q/k/v, so one fused tensor takes parts from both shards.
    cut = next(i for i, n in enumerate(names) if n.endswith("attn.to_k.weight"))
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[:cut],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[cut:]}
    folder = tmp_path / "transformer"
    folder.mkdir()
    for file, members in shards.items():
        write_checkpoint(folder / file, {n: tensors[n] for n in members})
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {n: f for f, ms in shards.items() for n in ms}}))

    single = tmp_path / "single.safetensors"
    cq_core.convert(diffusers_path, single, format="nvfp4")
    joined = tmp_path / "joined.safetensors"
    cq_core.convert(index, joined, format="nvfp4", single_file=True)
    with SafetensorsFile(single) as a, SafetensorsFile(joined) as b:
        assert set(a.tensors) == set(b.tensors)
        for name in a.tensors:
            assert torch.equal(a.read(name).reshape(-1).view(torch.uint8), b.read(name).reshape(-1).view(torch.uint8))
    patcher, log = load_diffusion_model(joined)
    assert log.problems() == []

    from cq_core.io.shards import open_source

    mirrored = cq_core.convert(index, tmp_path / "mirrored", format="nvfp4")  # one output shard per input shard
    with SafetensorsFile(single) as a, open_source(mirrored.output) as b:
        assert set(a.tensors) == set(b.tensors) and len(b.shards) == 2
        for name in a.tensors:
            assert torch.equal(a.read(name).reshape(-1).view(torch.uint8), b.read(name).reshape(-1).view(torch.uint8))
