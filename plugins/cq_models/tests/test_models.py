"""Presets applied to each family's real tensor names: what is kept, removed and quantized."""

from __future__ import annotations

import json

import pytest

from cq_core.commands.convert import convert
from cq_models.presets import PRESETS, block_indices
from tests import key_layouts as fam
from tests.cli_runner import run_cq


def plan_of(tmp_path, keys, **kwargs) -> dict[str, tuple[str, str]]:
    """tensor name -> (action, reason), from a header-only dry run."""
    path = fam.write_keys(tmp_path / "model.safetensors", keys)
    report = convert(path, dry_run=True, **kwargs)
    return {t.name: (t.action, t.reason) for t in report.tensors}


def assert_plan(plan, *, keep=(), drop=(), quantize=(), preset=None):
    for name in keep:
        assert plan[name][0] == "keep", (name, plan[name])
        if preset is not None:
            reason = plan[name][1]
            structural = ("kept by default", "-D tensor", "not a .weight tensor")
            assert f"preset {preset!r}" in reason or any(s in reason for s in structural), (name, reason)
    for name in drop:
        assert plan[name][0] == "drop", (name, plan[name])
    for name in quantize:
        assert plan[name][0] == "quantize", (name, plan[name])


@pytest.mark.needs_plugins("cq_fp8.plugin")
def test_flux(tmp_path):
    plan = plan_of(tmp_path, fam.prefixed(fam.flux1(), "model.diffusion_model."))
    p = "model.diffusion_model."
    assert_plan(
        plan, preset="flux",
        keep=[p + k for k in ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight",
                              "guidance_in.in_layer.weight", "final_layer.linear.weight",
                              "final_layer.adaLN_modulation.1.weight")],
        quantize=[p + k for k in ("double_blocks.0.img_attn.qkv.weight", "double_blocks.1.img_mod.lin.weight",
                                  "single_blocks.0.linear1.weight", "single_blocks.1.modulation.lin.weight")],
    )
    assert plan[p + "img_in.weight"][1] == "preset 'flux' keeps 'img_in' in high precision"


@pytest.mark.needs_plugins("cq_fp8.plugin")
def test_flux2(tmp_path):
    plan = plan_of(tmp_path, fam.flux2())
    assert_plan(
        plan, preset="flux2",
        keep=["double_stream_modulation_img.lin.weight", "single_stream_modulation.lin.weight", "img_in.weight",
              "txt_in.weight", "time_in.in_layer.weight", "guidance_in.in_layer.weight", "final_layer.linear.weight"],
        quantize=["double_blocks.0.img_attn.qkv.weight", "double_blocks.1.txt_mlp.2.weight",
                  "single_blocks.1.linear2.weight"],
    )


@pytest.mark.needs_plugins("cq_fp8.plugin")
def test_qwen_image_keeps_only_the_first_blocks_modulation(tmp_path):
    plan = plan_of(tmp_path, fam.qwen_image())
    assert_plan(
        plan, preset="qwen",
        keep=["img_in.weight", "txt_in.weight", "time_text_embed.timestep_embedder.linear_1.weight",
              "norm_out.linear.weight", "proj_out.weight", "transformer_blocks.0.img_mod.1.weight",
              "txt_norm.weight", "transformer_blocks.1.attn.norm_added_q.weight"],
        quantize=["transformer_blocks.1.img_mod.1.weight", "transformer_blocks.0.txt_mod.1.weight",
                  "transformer_blocks.0.attn.to_q.weight", "transformer_blocks.2.attn.add_k_proj.weight",
                  "transformer_blocks.2.img_mlp.net.0.proj.weight"],
    )


@pytest.mark.needs_plugins("cq_fp8.plugin")
def test_wan(tmp_path):
    plan = plan_of(tmp_path, fam.wan(i2v=True))
    assert_plan(
        plan, preset="wan",
        keep=["text_embedding.0.weight", "time_embedding.0.weight", "time_projection.1.weight", "head.head.weight",
              "img_emb.proj.1.weight", "head.modulation", "blocks.0.modulation", "patch_embedding.weight"],
        quantize=["blocks.0.self_attn.q.weight", "blocks.2.cross_attn.o.weight", "blocks.1.ffn.0.weight",
                  "blocks.1.cross_attn.k_img.weight"],
    )


@pytest.mark.needs_plugins("cq_fp8.plugin")
def test_hunyuan_video(tmp_path):
    plan = plan_of(tmp_path, fam.hunyuan_video())
    assert_plan(
        plan, preset="hunyuan",
        keep=["double_blocks.0.img_attn_q_norm.weight", "txt_in.individual_token_refiner.blocks.0.norm1.weight",
              "img_in.proj.weight"],
        quantize=["double_blocks.0.img_attn_qkv.weight", "double_blocks.1.txt_mlp.fc2.weight",
                  "single_blocks.0.linear1.weight", "double_blocks.0.img_mod.linear.weight"],
    )


@pytest.mark.needs_plugins("cq_fp8.plugin")
def test_zimage(tmp_path):
    plan = plan_of(tmp_path, fam.zimage())
    assert_plan(
        plan, preset="zimage",
        keep=["x_embedder.weight", "cap_embedder.1.weight", "t_embedder.mlp.0.weight", "final_layer.linear.weight",
              "layers.0.adaLN_modulation.0.weight", "noise_refiner.1.adaLN_modulation.0.weight", "x_pad_token",
              "layers.2.attention_norm1.weight"],
        quantize=["layers.0.attention.qkv.weight", "layers.2.feed_forward.w3.weight",
                  "noise_refiner.0.attention.out.weight", "context_refiner.1.feed_forward.w1.weight"],
    )


@pytest.mark.needs_plugins("cq_fp8.plugin")
def test_zimage_refiner_keeps_the_refiners(tmp_path):
    plan = plan_of(tmp_path, fam.zimage(), model="zimage_refiner")
    assert_plan(plan, preset="zimage_refiner",
                keep=["noise_refiner.0.attention.out.weight", "context_refiner.1.feed_forward.w1.weight"],
                quantize=["layers.0.attention.qkv.weight"])


@pytest.mark.needs_plugins("cq_fp8.plugin")
def test_ltxv2_keeps_the_first_two_and_last_two_blocks_of_its_own_depth(tmp_path):
    plan = plan_of(tmp_path, fam.ltx_video(depth=7))
    assert_plan(
        plan, preset="ltxv2",
        keep=["patchify_proj.weight", "audio_patchify_proj.weight", "adaln_single.linear.weight",
              "audio_adaln_single.linear.weight", "proj_out.weight", "av_ca_a2v_gate_adaln_single.linear.weight",
              "video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.weight",
              *(f"transformer_blocks.{i}.attn1.to_q.weight" for i in (0, 1, 5, 6))],
        quantize=[*(f"transformer_blocks.{i}.attn1.to_q.weight" for i in (2, 3, 4)),
                  "transformer_blocks.3.audio_to_video_attn.to_q.weight", "transformer_blocks.2.ff.net.0.proj.weight"],
    )
    assert plan["transformer_blocks.6.attn1.to_q.weight"][1] == (
        "preset 'ltxv2' keeps 'transformer_blocks.6.' in high precision"
    )


@pytest.mark.needs_plugins("cq_fp8.plugin", "cq_int8.plugin")  # the default format; int8 token tables
def test_t5xxl_drops_the_decoder(tmp_path):
    plan = plan_of(tmp_path, fam.t5(depth=3))
    assert_plan(
        plan, preset="t5xxl",
        drop=["decoder.block.0.layer.0.SelfAttention.q.weight", "decoder.final_layer_norm.weight", "lm_head.weight"],
        keep=["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
              "encoder.final_layer_norm.weight"],
        quantize=["encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.2.layer.1.DenseReluDense.wo.weight",
                  "shared.weight"],
    )
    assert plan["shared.weight"][1] == "token-embedding table (preset 't5xxl' int8)"
    assert plan["lm_head.weight"][1] == "preset 't5xxl' removes tensors matching 'lm_head'"


@pytest.mark.needs_plugins("cq_fp8.plugin", "cq_int8.plugin")  # the default format; int8 token tables
def test_generic_text_quantizes_attention_and_keeps_mlp(tmp_path):
    plan = plan_of(tmp_path, fam.llm())
    assert_plan(
        plan, preset="generic_text",
        keep=["lm_head.weight", "model.layers.0.mlp.gate_proj.weight",
              "model.layers.3.mlp.down_proj.weight", "model.layers.1.input_layernorm.weight"],
        quantize=["model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.o_proj.weight",
                  "model.embed_tokens.weight"],
    )
    assert plan_of(tmp_path, fam.llm(), embeddings="none")["model.embed_tokens.weight"][0] == "keep"
    # mistral: the same checkpoint with its MLPs quantized too
    plan = plan_of(tmp_path, fam.llm(), model="mistral")
    assert_plan(plan, keep=["lm_head.weight"], quantize=["model.layers.0.mlp.gate_proj.weight"])


@pytest.mark.needs_plugins("cq_fp8.plugin")
def test_qwen35_keeps_the_first_and_last_layer_of_its_own_depth(tmp_path):
    plan = plan_of(tmp_path, fam.qwen35(depth=12))
    layers = "model.language_model.layers."
    assert_plan(
        plan, preset="qwen35",
        keep=[layers + "0.linear_attn.in_proj_qkv.weight", layers + "11.self_attn.q_proj.weight",
              layers + "11.mlp.gate_proj.weight", layers + "1.linear_attn.in_proj_a.weight",
              layers + "2.linear_attn.in_proj_b.weight", "mtp.fc.weight", "lm_head.weight",
              "model.visual.blocks.0.attn.qkv.weight", "model.visual.merger.linear_fc1.weight"],
        quantize=[layers + "1.linear_attn.in_proj_qkv.weight", layers + "3.self_attn.q_proj.weight",
                  layers + "10.mlp.down_proj.weight", "model.visual.blocks.1.attn.qkv.weight"],
    )
    # The table's indices (0 and 63) are those of a 64-layer model; this one has 12.
    assert layers + "63." not in "".join(plan)


def test_block_indices_come_from_the_names():
    keys = ["a.layers.3.x", "a.layers.10.y", "mtp.layers.0.z", "a.sublayers.99.w", "layers.7.q"]
    assert block_indices(keys, "layers") == [0, 3, 7, 10]


@pytest.mark.needs_plugins("cq_fp8.plugin", "cq_int8.plugin")  # the default format; int8 token tables
@pytest.mark.parametrize("preset", [p for p in PRESETS if not p.keep_all], ids=lambda p: p.name)
def test_every_pattern_of_every_preset_does_what_it_says(tmp_path, preset):
    """Each keep pattern keeps a Linear weight that carries it; each remove pattern drops it."""
    keep = [*preset.exclude, *preset.high_precision]
    keys = {f"model.{p}.proj.weight": (64, 64) for p in (*keep, *preset.remove)}
    keys["blocks.7.attn.qkv.weight"] = (64, 64)  # a name no preset mentions
    plan = plan_of(tmp_path, keys, model=preset.name)
    for pattern in preset.remove:
        assert plan[f"model.{pattern}.proj.weight"][0] == "drop", pattern
    for pattern in keep:
        if pattern in preset.remove:
            continue
        action, reason = plan[f"model.{pattern}.proj.weight"]
        assert action == "keep" and reason.startswith(f"preset {preset.name!r} keeps"), (pattern, reason)
    assert plan["blocks.7.attn.qkv.weight"][0] == "quantize"


def test_every_preset_has_a_category_and_help():
    names = [p.name for p in PRESETS]
    assert len(names) == len(set(names))
    for preset in PRESETS:
        assert preset.category in {"text", "image", "diffusion", "video", "audio", "vision", "vae"} and len(preset.help) > 20


def test_cq_models_lists_by_category_and_shows_patterns(capsys):
    r = run_cq(capsys, "models")
    assert r.code == 0, r.err
    text_at, video_at = r.out.index("text:"), r.out.index("video:")
    assert text_at < r.out.index("t5xxl") < r.out.index("image:") < r.out.index("qwen ") < video_at
    assert r.out.index("wan ") > video_at and "drops the decoder" in " ".join(r.out.split())

    r = run_cq(capsys, "models", "show", "t5xxl")
    assert r.code == 0
    remove = r.out.split("remove (dropped from the output):")[1]
    assert "decoder" in remove and "lm_head" in remove

    r = run_cq(capsys, "models", "show", "qwen35", "--json")
    data = json.loads(r.out)
    assert data["category"] == "text" and ".layers.63." not in data["exclude"] and "depth" in data["derived"]

    r = run_cq(capsys, "models", "show", "nope")
    assert r.code != 0 and "Unknown model preset 'nope'" in r.err and "flux2" in r.err


def test_cq_models_detect(capsys, tmp_path):
    path = fam.write_keys(tmp_path / "w.safetensors", fam.prefixed(fam.wan(), "model.diffusion_model."))
    r = run_cq(capsys, "models", "detect", path)
    assert r.code == 0 and r.out.startswith("wan: WAN 2.x (3 blocks)")
    path = fam.write_keys(tmp_path / "u.safetensors", fam.diffusers_flux())
    assert run_cq(capsys, "models", "detect", path).out.strip() == "no preset detected"
