"""Per-layer rules: precedence, the layer config file, --fallback, --heur, per-layer options, mixed formats."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from cq_core.commands.convert import convert
from cq_core.errors import UsageError
from cq_core.engine.rules import HEUR_MIN_DIM, HEUR_MIN_PARAMS, heuristic_skip
from cq_core.engine.recipe import Recipe, layer_flag_specs
from tests import test_detect as fam
from tests.cli_runner import run_cq
from tests.comfy import LAYOUTS, comfy_dequantize
from tests.conftest import write_checkpoint

from cq_core.plugin.manager import get_registry


def plan_of(path, **kwargs) -> dict[str, tuple[str, str | None, str]]:
    """tensor name -> (action, format, reason) from a header-only dry run."""
    report = convert(path, dry_run=True, **kwargs)
    return {t.name: (t.action, t.format, t.reason) for t in report.tensors}


@pytest.fixture
def flux_file(tmp_path):
    return fam.write_keys(tmp_path / "flux.safetensors", fam.flux1())


def write_config(tmp_path, text: str, name: str = "layers.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# -- precedence ----------------------------------------------------------------------


def test_each_level_beats_the_ones_below_it(tmp_path, flux_file):
    """config file > --layer > --exclude > preset > --format, one layer per boundary."""
    config = write_config(tmp_path, '[layers]\n"double_blocks\\\\.0\\\\.img_attn\\\\.qkv" = "float8_e5m2"\n')
    plan = plan_of(
        flux_file,
        layer_config=config,
        layer=[r"double_blocks\.\d\.img_attn\.qkv=int8_tensorwise", "img_in=int8_tensorwise"],
        exclude=[r"double_blocks\.1\.img_attn\.qkv", r"img_in", r"single_blocks\.0\.linear1"],
    )
    # config beats --layer
    assert plan["double_blocks.0.img_attn.qkv.weight"][:2] == ("quantize", "float8_e5m2")
    assert plan["double_blocks.0.img_attn.qkv.weight"][2] == (
        "layers.toml rule 'double_blocks\\.0\\.img_attn\\.qkv' -> float8_e5m2"
    )
    # --layer beats --exclude (block 1 is both excluded and named by --layer)
    assert plan["double_blocks.1.img_attn.qkv.weight"][:2] == ("quantize", "int8_tensorwise")
    assert plan["double_blocks.1.img_attn.qkv.weight"][2].startswith("--layer rule")
    # --layer beats the preset (img_in is kept by 'flux', also excluded)
    assert plan["img_in.weight"][:2] == ("quantize", "int8_tensorwise")
    # --exclude beats the global format
    assert plan["single_blocks.0.linear1.weight"][0] == "keep"
    assert "excluded by --exclude" in plan["single_blocks.0.linear1.weight"][2]
    # the preset beats the global format
    assert plan["txt_in.weight"][0] == "keep" and "preset 'flux'" in plan["txt_in.weight"][2]
    # and the rest gets the global format
    assert plan["single_blocks.1.linear1.weight"] == ("quantize", "float8_e4m3fn", "--format float8_e4m3fn")


def test_first_matching_rule_wins_within_a_level(tmp_path, flux_file):
    plan = plan_of(flux_file, layer=["img_attn=float8_e5m2", r"img_attn\.qkv=int8_tensorwise"], model="none")
    assert plan["double_blocks.0.img_attn.qkv.weight"][1] == "float8_e5m2"


def test_an_explicit_rule_beats_a_preset_removal(tmp_path):
    path = fam.write_keys(tmp_path / "t5.safetensors", fam.t5(depth=1))
    plan = plan_of(path, layer=["decoder=skip"])
    assert plan["decoder.block.0.layer.0.SelfAttention.q.weight"][0] == "keep"
    assert plan["lm_head.weight"][0] == "drop"
    plan = plan_of(path, exclude=["lm_head"])
    assert plan["lm_head.weight"][0] == "keep"


def test_rules_never_quantize_what_comfyui_cannot_load(tmp_path, flux_file):
    plan = plan_of(flux_file, layer=[".*=int8_tensorwise"])
    assert plan["double_blocks.0.img_attn.norm.key_norm.scale"][0] == "keep"  # not a .weight
    assert plan["img_in.bias"][0] == "keep"
    path = fam.write_keys(tmp_path / "llm.safetensors", fam.llm(depth=1))
    plan = plan_of(path, layer=[".*=int8_tensorwise"], embeddings="none")
    assert plan["model.embed_tokens.weight"][:2] == ("keep", None)  # an embedding table, not a Linear
    assert "does not apply" in plan["model.embed_tokens.weight"][2]
    plan = plan_of(path, fallback="float8_e4m3fn", embeddings="none")  # the preset names it; the fallback must not take it
    assert plan["model.embed_tokens.weight"][:2] == ("keep", None)
    assert plan["model.embed_tokens.weight"][2] == "preset 'generic_text' keeps 'embed_tokens' in high precision"
    assert plan["lm_head.weight"][:2] == ("quantize", "float8_e4m3fn")  # a Linear: the fallback takes it


def test_skip_keeps_high_precision_even_with_fallback(tmp_path, flux_file):
    config = write_config(tmp_path, '[layers]\n"linear2" = "skip"\n')
    plan = plan_of(flux_file, layer_config=config, fallback="float8_e5m2")
    assert plan["single_blocks.0.linear2.weight"] == ("keep", None, "layers.toml rule 'linear2' -> skip")


# -- --fallback ------------------------------------------------------------------------


def test_fallback_takes_excluded_preset_kept_and_refused_layers(tmp_path):
    keys = {"a.proj.weight": (256, 256), "b.odd.weight": (256, 200), "img_in.weight": (256, 64),
            "c.kept.weight": (256, 256)}
    path = fam.write_keys(tmp_path / "m.safetensors", keys)
    opts = dict(format="int8_blockwise", format_options={"block_size": 128}, model="flux", exclude=["kept"])
    plan = plan_of(path, **opts)
    assert plan["a.proj.weight"][:2] == ("quantize", "int8_blockwise")
    assert plan["b.odd.weight"][0] == "keep" and "multiples of block_size 128" in plan["b.odd.weight"][2]
    plan = plan_of(path, fallback="float8_e4m3fn", **opts)
    assert plan["b.odd.weight"][:2] == ("quantize", "float8_e4m3fn")
    assert plan["b.odd.weight"][2].endswith("; --fallback float8_e4m3fn")
    assert plan["img_in.weight"][:2] == ("quantize", "float8_e4m3fn")
    assert "preset 'flux' keeps 'img_in'" in plan["img_in.weight"][2]
    assert plan["c.kept.weight"][:2] == ("quantize", "float8_e4m3fn")
    assert plan["a.proj.weight"][:2] == ("quantize", "int8_blockwise")


def test_a_fallback_that_refuses_too_keeps_the_layer_and_says_both(tmp_path):
    path = fam.write_keys(tmp_path / "m.safetensors", {"x.weight": (256, 200)})
    plan = plan_of(path, format="int8_blockwise", fallback="int8_blockwise")
    action, fmt, reason = plan["x.weight"]
    assert action == "keep" and "--fallback int8_blockwise refuses too" in reason


# -- --heur ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "why"),
    [
        ((512, 512), f"fewer than {HEUR_MIN_PARAMS:,} weights"),
        ((8192, 128), f"a dimension below {HEUR_MIN_DIM}"),
        ((2048, 1000), "not a multiple of 16"),
        ((256, 16384), "aspect ratio above 32:1"),
        ((1024, 1024), None),
        ((4096, 1024), None),
    ],
)
def test_heuristic_thresholds(shape, why):
    reason = heuristic_skip(shape)
    assert (reason is None) if why is None else (why in reason and reason.startswith("--heur: "))


def test_heur_names_itself_as_the_reason_in_the_plan(tmp_path):
    keys = {"small.weight": (64, 64), "wide.weight": (256, 16384), "big.weight": (1024, 1024)}
    path = fam.write_keys(tmp_path / "m.safetensors", keys)
    assert {n: a for n, (a, _, _) in plan_of(path, model="none").items()} == dict.fromkeys(keys, "quantize")
    plan = plan_of(path, model="none", heuristic=True)
    assert plan["small.weight"][0] == "keep" and plan["small.weight"][2].startswith("--heur: 64x64")
    assert plan["wide.weight"][0] == "keep" and "aspect ratio" in plan["wide.weight"][2]
    assert plan["big.weight"][0] == "quantize"
    # An explicit rule is more specific than the heuristic.
    plan = plan_of(path, model="none", heuristic=True, layer=["small=float8_e4m3fn"])
    assert plan["small.weight"][0] == "quantize"


# -- the layer config file ---------------------------------------------------------------


def test_toml_and_json_configs_mean_the_same(tmp_path, flux_file):
    toml = write_config(tmp_path, """
[layers]
"img_attn\\\\.qkv" = { format = "int8_blockwise", block_size = 64, full_precision_matrix_mult = true }
"txt_attn" = { options = { input_scale = 0.5 } }
"linear2" = "skip"
""")
    data = {"layers": {r"img_attn\.qkv": {"format": "int8_blockwise", "options": {"block_size": 64},
                                          "full_precision_matrix_mult": True},
                       "txt_attn": {"options": {"input_scale": 0.5}}, "linear2": "skip"}}
    json_path = write_config(tmp_path, json.dumps(data), "layers.json")
    results = []
    for config in (toml, json_path):
        report = convert(flux_file, dry_run=True, layer_config=config)
        results.append({t.name: (t.action, t.format) for t in report.tensors})
    assert results[0] == results[1]
    assert results[0]["double_blocks.0.img_attn.qkv.weight"] == ("quantize", "int8_blockwise")
    assert results[0]["single_blocks.0.linear2.weight"] == ("keep", None)


@pytest.mark.parametrize(
    ("text", "name", "message"),
    [
        ("[layers\n", "bad.toml", "is not valid TOML"),
        ("{", "bad.json", "is not valid JSON"),
        ('x = 1\n', "nolayers.toml", "needs a 'layers' table"),
        ('[layers]\n"(" = "skip"\n', "regex.toml", "rule '(' is not a valid regular expression"),
        ('[layers]\n"x" = 3\n', "value.toml", "rule 'x': must be a format name"),
        ('[layers]\n"x" = { skip = "yes" }\n', "skip.toml", "skip must be true or false"),
        ('[layers]\n"x" = "float9"\n', "fmt.toml", "Unknown format 'float9'"),
        ('[layers]\n"x" = { format = "int8_blockwise", blok_size = 3 }\n', "opt.toml", "no option 'blok_size'"),
        ('[layers]\n"x" = { optimizer = "magic" }\n', "optim.toml", "Unknown optimizer 'magic'"),
    ],
)
def test_config_errors_name_the_file_and_rule(tmp_path, flux_file, text, name, message):
    config = write_config(tmp_path, text, name)
    with pytest.raises(UsageError) as info:
        convert(flux_file, dry_run=True, layer_config=config)
    assert message in str(info.value)
    assert name in str(info.value)


def test_bad_flags_are_usage_errors(flux_file):
    with pytest.raises(UsageError, match="--layer 'img_in' must look like REGEX=FORMAT"):
        layer_flag_specs(["img_in"])
    with pytest.raises(UsageError, match=r"--layer rule 'x' -> nope: Unknown format 'nope'"):
        convert(flux_file, dry_run=True, layer=["x=nope"])
    with pytest.raises(UsageError, match="--fallback: Unknown format 'nope'"):
        convert(flux_file, dry_run=True, fallback="nope")
    with pytest.raises(UsageError, match="--layer-config .*missing.toml: cannot be read"):
        convert(flux_file, dry_run=True, layer_config=flux_file.parent / "missing.toml")


def test_cli_flags_reach_the_plan(capsys, tmp_path, flux_file):
    config = write_config(tmp_path, '[layers]\n"linear1" = "float8_e5m2"\n')
    r = run_cq(capsys, "convert", flux_file, "--dry-run", "--json", "--layer-config", config,
               "--layer", "linear2=int8_tensorwise", "--fallback", "float8_e5m2", "--heur")
    assert r.code == 0, r.err
    tensors = {t["name"]: t for t in json.loads(r.out)["tensors"]}
    assert tensors["single_blocks.0.linear1.weight"]["format"] == "float8_e5m2"
    assert tensors["single_blocks.0.linear2.weight"]["format"] == "int8_tensorwise"
    assert tensors["img_in.weight"]["format"] == "float8_e5m2"  # preset-kept -> fallback
    assert tensors["double_blocks.0.img_attn.proj.weight"]["reason"].startswith("--heur: 64x64")
    r = run_cq(capsys, "convert", flux_file, "--dry-run", "--layer", "linear2=int8_tensorwise")
    assert "26 layers would be quantized to float8_e4m3fn (24), int8_tensorwise (2);" in r.out
    assert "preset: flux (detected: FLUX.1" in r.out
    r = run_cq(capsys, "convert", flux_file, "--dry-run", "--layer", "img_in")
    assert r.code != 0 and "REGEX=FORMAT" in r.err


# -- written files: mixed formats, per-layer options and optimizer --------------------------


def read_output(path):
    with safe_open(str(path), "pt") as f:  # the reference reader ComfyUI uses
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_mixed_formats_in_one_file_each_decode_in_comfy_kitchen(tmp_path):
    g = torch.Generator().manual_seed(0)
    weights = {f"blocks.{i}.{n}.weight": torch.randn(128, 256, generator=g).to(torch.bfloat16)
               for i in range(2) for n in ("qkv", "mlp")}
    src = write_checkpoint(tmp_path / "m.safetensors", {**weights, "blocks.0.norm.weight": torch.ones(256)})
    config = write_config(tmp_path, """
[layers]
"blocks\\\\.0\\\\.qkv" = { format = "float8_e4m3fn", input_scale = 0.25, full_precision_matrix_mult = true }
"blocks\\\\.1\\\\.mlp" = { format = "int8_tensorwise", scaling = "tensor" }
""")
    out = tmp_path / "o.safetensors"
    report = convert(src, out, format="float8_e5m2", layer=[r"blocks\.0\.mlp=int8_tensorwise"],
                     layer_config=config, model="none")
    expected = {
        "blocks.0.qkv": {"format": "float8_e4m3fn", "full_precision_matrix_mult": True},
        "blocks.0.mlp": {"format": "int8_tensorwise"},
        "blocks.1.mlp": {"format": "int8_tensorwise"},
        "blocks.1.qkv": {"format": "float8_e5m2"},
    }
    assert {t.name.removesuffix(".weight"): t.format for t in report.quantized} == {
        k: v["format"] for k, v in expected.items()}
    tensors, metadata = read_output(out)
    header = json.loads(metadata["_quantization_metadata"])["layers"]
    assert header == expected
    registry = get_registry()
    for layer, config_json in expected.items():
        assert json.loads(bytes(tensors[f"{layer}.comfy_quant"].tolist())) == config_json
        stored = {k.removeprefix(layer + "."): v for k, v in tensors.items() if k.startswith(layer + ".")}
        fmt = registry.format(config_json["format"])()
        ours = fmt.decode(stored)
        theirs = comfy_dequantize(LAYOUTS[config_json["format"]], stored["weight"], (128, 256),
                                  scale=stored["weight_scale"])
        torch.testing.assert_close(theirs.float(), ours, rtol=0, atol=0)
        original = weights[f"{layer}.weight"].float()
        sqnr = 10 * torch.log10(original.pow(2).sum() / (original - theirs.float()).pow(2).sum())
        assert sqnr > 20, (layer, float(sqnr))
    # per-layer options: the input scale and the per-tensor INT8 scale are this layer's own
    assert float(tensors["blocks.0.qkv.input_scale"]) == 0.25
    assert float(tensors["blocks.1.qkv.input_scale"]) == 1.0
    assert tensors["blocks.1.mlp.weight_scale"].shape == ()
    assert tensors["blocks.0.mlp.weight_scale"].shape == (128, 1)  # the default: per row
    assert tensors["blocks.0.qkv.weight"].dtype == torch.float8_e4m3fn
    assert tensors["blocks.1.qkv.weight"].dtype == torch.float8_e5m2


def test_global_full_precision_mm_marks_every_layer(tmp_path):
    src = write_checkpoint(tmp_path / "m.safetensors", {"a.weight": torch.randn(64, 64), "b.weight": torch.randn(64, 64)})
    config = write_config(tmp_path, '[layers]\n"b" = { full_precision_matrix_mult = false }\n')
    out = tmp_path / "o.safetensors"
    convert(src, out, full_precision_mm=True, layer_config=config, model="none")
    _, metadata = read_output(out)
    layers = json.loads(metadata["_quantization_metadata"])["layers"]
    assert layers == {"a": {"format": "float8_e4m3fn", "full_precision_matrix_mult": True},
                      "b": {"format": "float8_e4m3fn"}}


def test_per_layer_optimizer(tmp_path):
    g = torch.Generator().manual_seed(1)
    src = write_checkpoint(tmp_path / "m.safetensors",
                           {"a.weight": torch.randn(64, 128, generator=g), "b.weight": torch.randn(64, 128, generator=g)})
    config = write_config(tmp_path, '[layers]\n"a" = { optimizer = "learned", optimizer_options = { steps = 3 } }\n')
    report = convert(src, dry_run=True, layer_config=config, model="none")
    assert report.tensors[0].reason == "layers.toml rule 'a' -> the global format (optimizer learned)"
    out = tmp_path / "o.safetensors"
    report = convert(src, out, layer_config=config, model="none")
    notes = {t.name: t.note for t in report.quantized}
    rtn = convert(src, tmp_path / "rtn.safetensors", model="none")
    assert {t.name: t.note for t in rtn.quantized}["a.weight"] == notes["b.weight"]  # b: the global rtn
    tensors, _ = read_output(out)
    reference, _ = read_output(tmp_path / "rtn.safetensors")
    assert torch.equal(tensors["b.weight"].view(torch.uint8), reference["b.weight"].view(torch.uint8))
    assert notes["a.weight"] != notes["b.weight"]  # the learned optimizer reports what it did


def test_format_instances_are_shared_per_format_and_options(tmp_path, flux_file):
    from cq_core.engine.plan import build_plan
    from cq_core.engine.plan import InstanceCache
    from cq_core.io.safetensors_io import SafetensorsFile

    registry = get_registry()
    fmt = registry.format("float8_e4m3fn")()
    rules = Recipe().with_options(layer=["img_attn=float8_e5m2", "txt_attn=float8_e5m2", "linear1=float8_e4m3fn"]).rules()
    with SafetensorsFile(flux_file) as source:
        plan = build_plan(source, registry, fmt, registry.metadata_writer("comfyui")(), model="none",
                          rules=rules, instances=InstanceCache(registry, fmt))
    formats = {item.name: item.format for item in plan.items if item.format is not None}
    assert formats["double_blocks.0.img_attn.qkv.weight"] is formats["double_blocks.1.txt_attn.proj.weight"]
    assert formats["single_blocks.0.linear1.weight"] is fmt  # the global instance, with its -O options


def test_per_layer_block_size_reaches_the_stored_scales_and_the_layer_json(tmp_path):
    g = torch.Generator().manual_seed(2)
    src = write_checkpoint(tmp_path / "m.safetensors", {"a.weight": torch.randn(128, 256, generator=g),
                                                        "b.weight": torch.randn(128, 256, generator=g)})
    config = write_config(tmp_path, '[layers]\n"^a" = { format = "int8_blockwise", block_size = 64 }\n')
    out = tmp_path / "o.safetensors"
    convert(src, out, format="int8_blockwise", layer_config=config, model="none")
    tensors, metadata = read_output(out)
    layers = json.loads(metadata["_quantization_metadata"])["layers"]
    assert tensors["a.weight_scale"].shape == (2, 4) and layers["a"]["group_size"] == 64
    assert tensors["b.weight_scale"].shape == (1, 2) and layers["b"]["group_size"] == 128
