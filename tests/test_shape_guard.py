"""The shape guard: layers whose shape ComfyUI reads to detect a model keep their stored shape.

The list of those layers is generated from ComfyUI (cq_models/comfyui_shape_reads.json);
these tests regenerate it from the pinned ComfyUI, and run ComfyUI's own detection on the
output header of every format that changes a stored shape.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

import cq_core
from cq_core import hookimpl
from cq_core.engine.plan import build_plan
from cq_core.engine.plan import KEEP, QUANTIZE
from cq_core.plugin.manager import get_registry, set_registry
from cq_core.io.safetensors_io import SafetensorsFile, dtype_name
from cq_core.plugin.types import ShapeRead
from cq_models import generate_shape_reads as generator
from cq_models.shape_reads import TABLE_PATH, load_table, shape_read_layers
from tests.comfyui import COMFYUI_VERSION, comfyui_root, load_diffusion_model
from tests.conftest import build_registry, write_checkpoint

#: Formats whose stored weight can differ from (N, K); the others never trigger the guard.
SHAPE_CHANGING = ("nvfp4", "mxfp8", "convrot_w4a4")
ALL_FORMATS = ("float8_e4m3fn", "float8_e5m2", "int8_tensorwise", "int8_blockwise", *SHAPE_CHANGING)


def header_only_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], dtype=torch.bfloat16) -> Path:
    """A safetensors file with the given names and shapes whose data is all zeros (a sparse file):
    enough for everything cq does before reading data (the plan)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = max(1, int(torch.Size(shape).numel())) * dtype.itemsize
        header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def planned_output(path: Path, fmt: str, **plan_options):
    """The plan and the output header's (name -> shape) for converting ``path`` with ``fmt``."""
    registry = get_registry()
    with SafetensorsFile(path) as source:
        plan = build_plan(source, registry, registry.format(fmt)(), registry.metadata_writer("comfyui")(),
                          **plan_options)
    return plan, {name: spec.shape for name, spec in plan.entries}


# -- the hook and the plan ---------------------------------------------------------------


class ShapeReadsPlugin:
    __name__ = "toy_shape_reads"  # the plugin's name in the plugin manager

    @hookimpl
    def cq_shape_read_layers(self, keys, metadata):
        return {k: "the toy loader reads this shape" for k in keys if k.startswith("patch_in.")}


def _toy(tmp_path: Path, shape: tuple[int, int] = (64, 48)) -> Path:
    g = torch.Generator().manual_seed(0)
    return write_checkpoint(tmp_path / "toy.safetensors", {
        "patch_in.weight": torch.randn(*shape, generator=g).bfloat16(),
        "blocks.0.fc.weight": torch.randn(64, 64, generator=g).bfloat16(),
    })  # fmt: skip


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_shape_read_layers_hook_keeps_the_stored_shape(tmp_path, fmt):
    """A weight the hook names is never stored in another shape; formats that keep (N, K) still take it."""
    registry = build_registry(ShapeReadsPlugin())
    set_registry(registry)
    assert registry.shape_read_layers(["patch_in.weight", "x.weight"], {}) == {
        "patch_in.weight": ShapeRead("the toy loader reads this shape")}
    # Shapes each format takes (whole 128-blocks, K a multiple of 64); mxfp8 pads K=48 to 64.
    shape = {"int8_blockwise": (128, 256), "convrot_w4a4": (64, 128)}.get(fmt, (64, 48))
    plan, output = planned_output(_toy(tmp_path, shape), fmt, model="none")
    item = next(i for i in plan.items if i.name == "patch_in.weight")
    changes = tuple(registry.format(fmt)().stored_specs(shape)["weight"].shape) != shape
    if changes:
        assert item.action == KEEP and "the toy loader reads this shape" in item.reason, item.reason
        assert f"{fmt} would store it as" in item.reason
    else:
        assert item.action == QUANTIZE
    assert output["patch_in.weight"] == shape


def test_a_guarded_layer_takes_a_fallback_that_keeps_its_shape(tmp_path):
    set_registry(build_registry(ShapeReadsPlugin()))
    from cq_core.engine.rules import Rules

    plan, output = planned_output(_toy(tmp_path), "nvfp4", model="none", rules=Rules(fallback="float8_e4m3fn"))
    item = next(i for i in plan.items if i.name == "patch_in.weight")
    assert item.action == QUANTIZE and item.format.name == "float8_e4m3fn" and "--fallback" in item.reason
    # mxfp8 pads K=48 to 64: no fallback for it, the layer stays in high precision.
    plan, output = planned_output(_toy(tmp_path), "nvfp4", model="none", rules=Rules(fallback="mxfp8"))
    item = next(i for i in plan.items if i.name == "patch_in.weight")
    assert item.action == KEEP and "--fallback mxfp8 refuses too" in item.reason
    assert output["patch_in.weight"] == (64, 48)


class AxisReadsPlugin:
    __name__ = "toy_axis_reads"

    @hookimpl
    def cq_shape_read_layers(self, keys, metadata):
        return {"patch_in.weight": ShapeRead("the toy loader reads N", axes=(0,)),
                "blocks.0.fc.weight": ShapeRead("the toy loader reads K", axes=(-1,))}


def test_only_the_dimensions_read_count(tmp_path):
    """nvfp4 keeps N=64 (a multiple of 16) and halves K: a layer read for N is taken, one read for K is not."""
    set_registry(build_registry(AxisReadsPlugin()))
    plan, output = planned_output(_toy(tmp_path), "nvfp4", model="none")
    actions = {i.name: (i.action, i.reason) for i in plan.items}
    assert actions["patch_in.weight"][0] == QUANTIZE
    assert actions["blocks.0.fc.weight"][0] == KEEP and "the toy loader reads K" in actions["blocks.0.fc.weight"][1]
    assert output["blocks.0.fc.weight"] == (64, 64)


@pytest.mark.parametrize(
    ("axes", "shape", "stored", "changed"),
    [(None, (64, 48), (64, 24), True), (None, (64, 48), (64, 48), False), ((0,), (64, 48), (64, 24), False),
     ((1,), (64, 48), (64, 24), True), ((-1,), (64, 48), (64, 24), True), ((), (64, 48), (64, 24), False),
     ((0,), (64, 48), (64,), True)],
)  # fmt: skip
def test_shape_read_changed_by(axes, shape, stored, changed):
    assert ShapeRead("r", axes).changed_by(shape, stored) is changed


def test_an_explicit_layer_rule_does_not_override_the_guard(tmp_path):
    set_registry(build_registry(ShapeReadsPlugin()))
    from cq_core.engine.recipe import Recipe

    plan, _ = planned_output(_toy(tmp_path, (64, 128)), "float8_e4m3fn", model="none",
                             rules=Recipe().with_options(layer=["patch_in=convrot_w4a4"]).rules())
    item = next(i for i in plan.items if i.name == "patch_in.weight")
    assert item.action == KEEP and "convrot_w4a4 would store it as 64x64" in item.reason


# -- the table: where ComfyUI reads shapes ------------------------------------------------


FLUX_ANCHORS = ["double_blocks.0.img_attn.norm.key_norm.scale", "img_in.weight", "txt_in.weight",
                "vector_in.in_layer.weight", "double_blocks.0.img_attn.qkv.weight", "final_layer.linear.weight"]
LTXV_ANCHORS = ["adaln_single.emb.timestep_embedder.linear_1.bias", "transformer_blocks.0.attn2.to_k.weight",
                "transformer_blocks.1.attn2.to_k.weight", "patchify_proj.weight"]
WAN_ANCHORS = ["head.modulation", "head.head.weight", "patch_embedding.weight", "blocks.0.ffn.0.weight",
               "blocks.1.ffn.0.weight", "blocks.0.self_attn.q.weight"]
SDXL_ANCHORS = ["input_blocks.0.0.weight", "input_blocks.4.0.in_layers.0.weight",
                "input_blocks.4.0.out_layers.3.weight", "input_blocks.4.1.proj_in.weight", "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
                "input_blocks.4.1.transformer_blocks.0.attn2.to_q.weight", "label_emb.0.0.weight"]


@pytest.mark.parametrize(
    ("keys", "read"),
    [
        (FLUX_ANCHORS, {"img_in.weight", "txt_in.weight", "vector_in.in_layer.weight"}),
        (LTXV_ANCHORS, {"transformer_blocks.0.attn2.to_k.weight"}),
        (WAN_ANCHORS, {"head.modulation", "head.head.weight", "patch_embedding.weight", "blocks.0.ffn.0.weight"}),
        (SDXL_ANCHORS, {"input_blocks.0.0.weight", "input_blocks.4.0.out_layers.3.weight", "label_emb.0.0.weight",
                        "input_blocks.4.1.proj_in.weight", "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"}),
    ],
    ids=["flux", "ltxv", "wan", "sdxl"],
)  # fmt: skip
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "net."])
def test_the_table_names_what_comfyui_reads_in_that_family(keys, read, prefix):
    found = shape_read_layers([prefix + k for k in keys] + ["text_encoders.t5xxl.img_in.weight"])
    assert set(found) == {prefix + k for k in read}
    assert all("to detect the model" in read.reason for read in found.values())


def test_the_table_names_what_comfyui_reads_to_size_a_text_encoder():
    """sd.detect_te_model reads N of T5's first attention key: a padded N would pick another T5."""
    keys = ["encoder.block.0.layer.0.SelfAttention.k.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"]
    found = shape_read_layers(keys)
    assert set(found) == {keys[0]} and found[keys[0]].axes == (0,)


@pytest.mark.parametrize(
    "keys",
    [
        # the names alone, without the family's branch: another model's layers
        ["proj_out.weight", "blocks.0.mlp.fc1.weight", "first.weight", "transformer_blocks.0.attn2.to_k.weight"],
        # FLUX names under a prefix ComfyUI does not strip
        ["foo." + k for k in FLUX_ANCHORS],
        # the branch's names under one prefix, the layer under another
        ["model.diffusion_model.head.modulation", "blocks.0.ffn.0.weight", "patch_embedding.weight"],
    ],
)
def test_the_table_does_not_name_other_layers(keys):
    assert set(shape_read_layers(keys)) <= {"model.diffusion_model.head.modulation"}


def test_the_shipped_table_is_what_comfyui_generates(comfyui):
    """Fails when ComfyUI's pin moves and the table was not regenerated (or the generator changed).
    The table names the pin's release; another judge (``--comfyui 0.33.0``) must read the same shapes."""
    table = generator.build_table(comfyui_root(), comfyui)
    table["comfyui_version"] = COMFYUI_VERSION
    fresh = generator.render(table)
    assert TABLE_PATH.read_text(encoding="utf-8") == fresh, (
        "comfyui_shape_reads.json is stale: run python -m cq_models.generate_shape_reads "
        f"{comfyui_root()}")


@pytest.mark.parametrize("probe", generator.PROBES, ids=lambda p: p.family)
def test_the_table_names_every_read_detection_makes_on_a_probed_family(comfyui, probe):
    """ComfyUI's detection, run through a recording state dict, reads nothing the table misses."""
    state_dict = generator.meta_state_dict(probe.shapes(comfyui))
    assert comfyui.model_detection.detect_unet_config(state_dict, "") is not None
    assert state_dict.read
    assert state_dict.read <= set(shape_read_layers(list(state_dict)))


def test_the_static_pass_alone_covers_the_probes():
    """Every entry comes from the static pass: the probes found nothing it missed."""
    static, _ = generator.all_static_reads(comfyui_root())
    assert set(static) == set(load_table()["reads"])


def test_the_static_pass_reads_every_spelling():
    source = '''
def count(prefix, state_dict):
    return state_dict['{}0.attn2.to_k.weight'.format(prefix + "1.blocks.")].shape[1]

def detect_unet_config(state_dict, key_prefix):
    a = state_dict['{}a.weight'.format(key_prefix)].shape
    b = state_dict[f"{key_prefix}b.weight"].shape
    in_key = "{}c.weight".format(key_prefix)
    w = state_dict[in_key]
    d = state_dict.get('{}d.weight'.format(key_prefix), None)
    for i in range(3):
        e = state_dict['{}e.{}.weight'.format(key_prefix, i)]
        prefix = '{}layers.{}.'.format(key_prefix, i)
        count(prefix, state_dict)
    f = state_dict[some_function()]
'''
    reads, unresolved = generator.static_reads(source)
    assert set(reads) == {"a.weight", "b.weight", "c.weight", "d.weight", "e.{N}.weight",
                          "layers.{N}.1.blocks.0.attn2.to_k.weight"}
    assert [u.source for u in unresolved] == ["some_function()"]


# -- ComfyUI's detection on the output header, family by family ---------------------------


@pytest.fixture(scope="module")
def probe_shapes(comfyui):
    return {probe.family: probe.shapes(comfyui) for probe in generator.PROBES}


def _detect(comfyui, shapes, prefix):
    state_dict = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    return comfyui.model_detection.detect_unet_config(state_dict, prefix)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("fmt", SHAPE_CHANGING)
@pytest.mark.parametrize("family", [p.family for p in generator.PROBES])
def test_comfyui_detects_the_output_header_as_the_input(tmp_path, comfyui, probe_shapes, family, fmt, prefix):
    shapes = {prefix + k: v for k, v in probe_shapes[family].items()}
    src = header_only_checkpoint(tmp_path / f"{family}.safetensors", shapes)
    plan, output = planned_output(src, fmt, model="none")  # the guard alone, no preset
    want = _detect(comfyui, shapes, prefix)
    assert want is not None
    assert _detect(comfyui, output, prefix) == want
    assert any(i.action == QUANTIZE for i in plan.items)


@pytest.mark.parametrize(
    ("family", "fmt"),
    [(f, "nvfp4") for f in ("flux", "ltxv", "qwen_image", "sd3", "sdxl_unet")]
    + [(f, "convrot_w4a4") for f in ("flux", "ltxv", "qwen_image")],  # K of the others: not a multiple of 64
)
def test_without_the_guard_comfyui_detects_another_model(tmp_path, monkeypatch, comfyui, probe_shapes, family, fmt):
    """The check above has teeth: with cq-models (and so the table) blocked, the same plans misdetect."""
    monkeypatch.setenv("CQ_DISABLE_PLUGINS", "cq_models.plugin")
    set_registry(build_registry())
    shapes = probe_shapes[family]
    src = header_only_checkpoint(tmp_path / f"{family}.safetensors", shapes)
    _, output = planned_output(src, fmt, model="none")
    assert _detect(comfyui, output, "") != _detect(comfyui, shapes, "")


# -- ComfyUI's loader on the bug reports --------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ltxv(comfyui, tmp_path_factory):
    """LTX-Video with ComfyUI's class: inner dim 256 (32 heads of 8), cross-attention dim 256
    (ComfyUI fixes caption_channels at 4096)."""
    from comfy.ldm.lightricks.model import LTXVModel

    torch.manual_seed(0)
    model = LTXVModel(in_channels=128, cross_attention_dim=256, attention_head_dim=8, num_attention_heads=32,
                      caption_channels=4096, num_layers=2, operations=comfyui.ops.manual_cast, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    return write_checkpoint(tmp_path_factory.mktemp("ltxv") / "ltxv.safetensors", state)


def _ltxv_forward(patcher) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 128, 2, 4, 4, generator=g)
    context = torch.randn(1, 7, 4096, generator=g)
    with torch.no_grad():
        return patcher.model.diffusion_model(x, torch.tensor([0.5]), context=context,
                                             attention_mask=None, frame_rate=25).float()


@pytest.mark.parametrize("model", [None, "none"])
def test_tiny_ltxv_in_nvfp4_loads_in_comfyui_with_the_source_config(tmp_path, tiny_ltxv, model):
    reference, _ = load_diffusion_model(tiny_ltxv)
    out = tmp_path / "ltxv-nvfp4.safetensors"
    report = cq_core.convert(tiny_ltxv, out, format="nvfp4", model=model)
    kept = {t.name: t.reason for t in report.tensors if t.action == "keep" and "detect the model" in t.reason}
    assert "transformer_blocks.0.attn2.to_k.weight" in kept
    patcher, log = load_diffusion_model(out)
    assert patcher.model.model_config.unet_config == reference.model.model_config.unet_config
    assert log.problems() == []
    want, got = _ltxv_forward(reference), _ltxv_forward(patcher)
    assert torch.isfinite(got).all()
    rel = (got - want).norm() / want.norm()
    assert rel < 0.5, f"relative output error {rel:.3f}"
