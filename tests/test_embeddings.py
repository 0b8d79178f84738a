"""``--embeddings int8``: token-embedding tables of text encoders in row-wise INT8, loaded by
ComfyUI's own ``Embedding`` modules (``comfy/ops.py`` ``MixedPrecisionOps.Embedding``), recorded
in the recipe, and refused in one sentence where ComfyUI's Embedding could not load the format."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import cq_core
from cq_core.engine.recipe import Recipe
from cq_core.errors import UsageError
from cq_int8.tensorwise import Int8TensorwiseFormat
from tests.cli_runner import run_cq
from tests.helpers import write_checkpoint
from tests.families.text import encoder_of
from tests.te_matrix import BY_NAME, REL_ERROR_BOUND, load_in_comfyui, sources  # noqa: F401 (a fixture)


def text_encoder(tmp_path, vocab=500, hidden=64):
    g = torch.Generator().manual_seed(0)
    return write_checkpoint(tmp_path / "te.safetensors", {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(hidden, hidden, generator=g).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        "visual.pos_embed.weight": torch.randn(16, hidden, generator=g).to(torch.bfloat16),
    })


def test_token_tables_are_kept_unless_asked(tmp_path):
    src = text_encoder(tmp_path)
    kept = {t.name: t for t in cq_core.convert(src, format="int8_tensorwise", model="none", dry_run=True).tensors}
    assert kept["model.embed_tokens.weight"].action == "keep"
    asked = {t.name: t for t in cq_core.convert(src, format="float8_e4m3fn", model="none", embeddings="int8",
                                                dry_run=True).tensors}
    table = asked["model.embed_tokens.weight"]
    assert (table.action, table.format, table.reason) == (
        "quantize", "int8_tensorwise", "token-embedding table (--embeddings int8)")
    assert asked["visual.pos_embed.weight"].action == "keep"  # not a token table
    assert asked["model.norm.weight"].action == "keep"


def test_int8_table_is_row_wise_and_round_to_nearest_whatever_the_global_choices(tmp_path):
    src = text_encoder(tmp_path)
    out = tmp_path / "q.safetensors"
    report = cq_core.convert(src, out, format="int8_tensorwise", format_options={"convrot": True, "clip_search": True},
                             optimizer="learned", model="none", embeddings="int8")
    with safe_open(str(out), "pt") as f:
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
        stored = {"weight": f.get_tensor("model.embed_tokens.weight"),
                  "weight_scale": f.get_tensor("model.embed_tokens.weight_scale")}
        source = safe_open(str(src), "pt").get_tensor("model.embed_tokens.weight")
    assert layers["model.embed_tokens"] == {"format": "int8_tensorwise"}
    assert stored["weight"].dtype == torch.int8 and stored["weight_scale"].shape == (500, 1)
    expected = Int8TensorwiseFormat().encode(source)
    assert torch.equal(stored["weight"], expected["weight"])
    table = next(t for t in report.tensors if t.name == "model.embed_tokens.weight")
    assert table.sqnr_db > 40 and table.note is None  # rtn: no optimizer note


def test_exclude_and_skip_still_keep_a_table(tmp_path):
    src = text_encoder(tmp_path)
    for kwargs in ({"exclude": ["embed_tokens"]}, {"layer": ["embed_tokens=skip"]}):
        plan = {t.name: t for t in cq_core.convert(src, model="none", embeddings="int8", dry_run=True,
                                                    **kwargs).tensors}
        assert plan["model.embed_tokens.weight"].action == "keep", kwargs


def test_the_choice_is_recorded_and_round_trips(tmp_path, capsys):
    src = text_encoder(tmp_path)
    first = tmp_path / "a.safetensors"
    cq_core.convert(src, first, format="float8_e4m3fn", model="none", embeddings="int8")
    result = run_cq(capsys, "inspect", first, "--recipe")
    assert 'embeddings = "int8"' in result.out
    again = tmp_path / "b.safetensors"
    assert run_cq(capsys, "convert", src, "-o", again, "--recipe-from", first, "-q").code == 0
    assert first.read_bytes() == again.read_bytes()
    # "none" overrides it (and a preset's default)
    plan = cq_core.convert(src, model="none", recipe=Recipe(embeddings="int8"), embeddings="none", dry_run=True)
    assert next(t for t in plan.tensors if t.name == "model.embed_tokens.weight").action == "keep"
    assert Recipe.from_mapping({"embeddings": "int8"}, "r.toml").to_json()["embeddings"] == "int8"
    assert "embeddings" not in Recipe().to_json()


def test_formats_comfyuis_embedding_cannot_load_are_refused_in_one_sentence(tmp_path, registry, capsys):
    src = text_encoder(tmp_path)
    result = run_cq(capsys, "convert", src, "--embeddings", "fp8", "--dry-run")
    assert result.code == 2
    assert "--embeddings: ComfyUI's Embedding modules cannot load 'float8_e4m3fn'" in result.err
    result = run_cq(capsys, "convert", src, "--embeddings", "int4", "--dry-run")
    assert result.code == 2 and "--embeddings 'int4' is not a format for token tables" in result.err
    with pytest.raises(UsageError, match="--embeddings"):
        Recipe(embeddings="nvfp4").validate(registry)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen25vl_7b", "t5xxl", "gemma3_4b"])
def test_comfyuis_embedding_loads_the_int8_table(sources, tmp_path, name):  # noqa: F811 (the fixture)
    from comfy.quant_ops import QuantizedTensor

    src, reference = sources(name, "comfyui")
    family = BY_NAME[name]
    out = tmp_path / f"{name}.safetensors"
    cq_core.convert(src, out, format="int8_tensorwise", embeddings="int8")
    got = load_in_comfyui(family, out)
    assert got.identity == reference.identity
    assert not got.problem_keys - reference.problem_keys
    rel = ((got.output - reference.output).norm() / reference.output.norm()).item()
    assert rel < REL_ERROR_BOUND["int8_tensorwise"], rel

    clip, _ = __import__("tests.comfyui", fromlist=["load_clip"]).load_clip([out], family.clip_type,
                                                                              **family.loader_options)
    clip.load_model()
    table = encoder_of(clip).transformer.get_input_embeddings()
    assert isinstance(table.weight, QuantizedTensor) and table.quant_format == "int8_tensorwise"
    ids = torch.tensor([[3, 7, 100, 200]])
    with safe_open(str(out), "pt") as f:
        key = next(k for k in f.keys() if k.endswith((".embed_tokens.weight", "shared.weight")))
        decoded = Int8TensorwiseFormat().decode({"weight": f.get_tensor(key), "weight_scale": f.get_tensor(
            key[: -len("weight")] + "weight_scale")})
    with torch.no_grad():
        rows = table(ids, out_dtype=torch.float32)[0]
    expected = decoded[ids[0]].to(rows.dtype)
    if type(table).__name__ == "ScaledEmbedding":  # Gemma multiplies its rows by one constant (sqrt(hidden))
        expected = expected * ((rows * expected).sum() / expected.square().sum())
    torch.testing.assert_close(rows, expected, rtol=1e-2, atol=1e-2)
