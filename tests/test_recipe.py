"""One recipe per conversion: built from flags or a file, recorded in the output, repeated from it."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import cq_core
from cq_core import Recipe, UsageError
from cq_core.engine.recipe import RECIPE_KEY, RECIPE_VERSION, RecipeRecord, recipe_from
from tests.cli_runner import run_cq
from tests.helpers import small_model, write_checkpoint

FLAGS = (
    "-f", "int8_blockwise", "-O", "block_size=32",
    "--layer", r"blocks\.0\.mlp\.fc2=float8_e4m3fn",
    "-x", "attn", "--fallback", "float8_e5m2", "--model", "none",
)


def header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 : 8 + length]


def record_of(path: Path) -> dict:
    header, _ = header_of(path)
    return json.loads(header["__metadata__"][RECIPE_KEY])


@pytest.fixture
def two_models(tmp_path):
    """The same architecture twice (think: a model and its fine-tune)."""
    first = write_checkpoint(tmp_path / "base.safetensors", small_model(torch.float32, seed=0))
    second = write_checkpoint(tmp_path / "tuned.safetensors", small_model(torch.float32, seed=1))
    return first, second


def test_the_output_records_the_recipe_versions_and_source_hash(capsys, tmp_path, two_models):
    source, _ = two_models
    out = tmp_path / "out.safetensors"
    assert run_cq(capsys, "convert", source, "-o", out, *FLAGS).code == 0
    record = record_of(out)
    assert record["recipe_version"] == RECIPE_VERSION
    recipe = record["recipe"]
    assert recipe["format"] == "int8_blockwise" and recipe["preset"] == "none"
    assert recipe["format_options"]["block_size"] == 32  # typed, every option resolved
    assert set(recipe["format_options"]) == {o.name for o in cq_core.get_registry().format("int8_blockwise").options}
    assert recipe["layers"] == {r"blocks\.0\.mlp\.fc2": "float8_e4m3fn"}
    assert recipe["exclude"] == ["attn"] and recipe["fallback"] == "float8_e5m2"
    assert "calibration" not in recipe
    # Versions of cq and of the plugins whose formats were used: int8 and fp8 (rule, fallback).
    assert set(record["versions"]) == {"cq-core", "cq-int8", "cq-fp8"}
    assert record["source_header_sha256"] == hashlib.sha256(header_of(source)[1]).hexdigest()
    # No paths, no user names: nothing of the folder the files live in.
    text = header_of(out)[0]["__metadata__"][RECIPE_KEY]
    assert str(tmp_path) not in text and "base.safetensors" not in text and "/" not in text.replace("\\/", "")


def test_recipe_from_an_old_output_repeats_the_conversion_on_new_weights(capsys, tmp_path, two_models):
    base, tuned = two_models
    old = tmp_path / "base-q.safetensors"
    assert run_cq(capsys, "convert", base, "-o", old, *FLAGS).code == 0
    by_flags, by_recipe = tmp_path / "flags.safetensors", tmp_path / "recipe.safetensors"
    assert run_cq(capsys, "convert", tuned, "-o", by_flags, *FLAGS).code == 0
    assert run_cq(capsys, "convert", tuned, "-o", by_recipe, "--recipe-from", old).code == 0
    assert by_recipe.read_bytes() == by_flags.read_bytes()


def test_inspect_shows_the_recipe_and_writes_a_file_convert_reads(capsys, tmp_path, two_models):
    base, tuned = two_models
    old = tmp_path / "old.safetensors"
    assert run_cq(capsys, "convert", base, "-o", old, *FLAGS).code == 0
    shown = run_cq(capsys, "inspect", old)
    assert shown.code == 0 and "recipe (made with cq-core" in shown.out and 'format = "int8_blockwise"' in shown.out
    as_json = json.loads(run_cq(capsys, "inspect", old, "--json").out)
    assert as_json["recipe"]["recipe"]["format"] == "int8_blockwise"
    toml = run_cq(capsys, "inspect", old, "--recipe")
    assert toml.code == 0
    recipe_file = tmp_path / "recipe.toml"
    recipe_file.write_text(toml.out)
    again, direct = tmp_path / "again.safetensors", tmp_path / "direct.safetensors"
    assert run_cq(capsys, "convert", tuned, "-o", again, "--recipe", recipe_file).code == 0
    assert run_cq(capsys, "convert", tuned, "-o", direct, *FLAGS).code == 0
    assert again.read_bytes() == direct.read_bytes()
    # The JSON record as inspect prints it is a recipe file too.
    record_file = tmp_path / "record.json"
    record_file.write_text(json.dumps(as_json["recipe"]))
    assert Recipe.load(record_file) == Recipe.load(recipe_file)


def test_a_file_without_a_recipe_says_so(capsys, two_models):
    base, tuned = two_models
    assert "recipe: none recorded" in run_cq(capsys, "inspect", base).out
    result = run_cq(capsys, "convert", tuned, "--recipe-from", base)
    assert result.code == 1 and "records no cq recipe" in result.err and str(base) in result.err
    assert run_cq(capsys, "inspect", base, "--recipe").code == 1


def test_flags_beside_a_recipe_override_its_fields(tmp_path, two_models):
    base, _ = two_models
    recipe = Recipe().with_options(format="int8_blockwise", format_options={"block_size": 64},
                                 layer=["fc1=skip"], exclude=["attn"])
    # Same format: options merge. Another format: the old format's options go.
    assert recipe.override(format_options={"block_size": 32}).format_options == {"block_size": 32}
    assert recipe.override(format="nvfp4").format_options == {}
    # Rules given win over the recipe's (first match); excludes add up.
    changed = recipe.override(layers=Recipe().with_options(layer=["fc1=float8_e4m3fn"]).layers, exclude=["conv"])
    assert [s.spec for s in changed.layers] == ["float8_e4m3fn", "skip"]
    assert changed.exclude == ("attn", "conv")


def test_the_python_api_takes_a_recipe(tmp_path, two_models):
    base, _ = two_models
    recipe = Recipe(format="nvfp4", preset="none", layers=Recipe().with_options(layer=["fc2=skip"]).layers)
    a = cq_core.convert(base, tmp_path / "a.safetensors", recipe=recipe)
    b = cq_core.convert(base, tmp_path / "b.safetensors", format="nvfp4", model="none", layer=["fc2=skip"])
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert a.recipe == b.recipe and a.recipe["recipe"]["format"] == "nvfp4"
    # A keyword beside the recipe overrides it.
    c = cq_core.convert(base, tmp_path / "c.safetensors", recipe=recipe, format="float8_e4m3fn")
    assert c.recipe["recipe"]["format"] == "float8_e4m3fn"
    assert c.recipe["recipe"]["layers"] == {"fc2": "skip"}


@pytest.mark.parametrize(
    "text, message",
    [
        ('formt = "nvfp4"\n', "unknown recipe field 'formt' (did you mean 'format'?)"),
        ('format = 3\n', "recipe field 'format' must be a non-empty string"),
        ('exclude = "attn"\n', "recipe field 'exclude' must be a list of regex strings"),
        ('heuristic = "yes"\n', "recipe field 'heuristic' must be true or false"),
        ('nonfinite = "ignore"\n', "recipe field 'nonfinite' must be one of error, keep"),
        ('exclude = ["("]\n', "recipe field 'exclude' '(' is not a valid regular expression"),
        ('[layers]\n"(" = "skip"\n', "r.toml: recipe rule '(' is not a valid regular expression"),
        ('exclude = [""]\n', "recipe field 'exclude' '' is an empty pattern, which matches every tensor"),
        ('[layers]\n"" = "skip"\n', "r.toml: recipe rule '' is an empty pattern"),
        ('[layers]\n"x" = 3\n', "must be a format name"),
        ('format = "nvfp4\n', "is not valid TOML"),
        ('format = "nope"\n', "Unknown format 'nope'"),
        ('format = "int8_blockwise"\n[format_options]\nblock_size = 0\n', "block_size of format 'int8_blockwise' must be positive"),
        ('preset = "nope"\n', "Unknown model preset 'nope'"),
        ('calibration = "md5:1"\n', "recipe field 'calibration' must be 'sha256:' and 64 hex digits"),
    ],
)
def test_a_bad_recipe_is_one_sentence_and_writes_nothing(capsys, tmp_path, two_models, text, message):
    base, _ = two_models
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(text)
    result = run_cq(capsys, "convert", base, "--recipe", recipe_file, "-o", tmp_path / "out.safetensors")
    assert result.code == 2, result.err
    assert message in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_recipe_and_recipe_from_together_is_a_usage_error(capsys, tmp_path, two_models):
    base, _ = two_models
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text('format = "nvfp4"\n')
    result = run_cq(capsys, "convert", base, "--recipe", recipe_file, "--recipe-from", base)
    assert result.code == 2 and "pass one of them" in result.err
    missing = run_cq(capsys, "convert", base, "--recipe", tmp_path / "missing.toml")
    assert missing.code == 2 and "missing.toml: cannot be read" in missing.err


def test_calibration_is_recorded_by_fingerprint_and_needed_again(capsys, tmp_path, two_models):
    base, tuned = two_models
    stats = tmp_path / "stats.safetensors"
    layers = {"blocks.0.mlp.fc1": 32, "blocks.0.mlp.fc2": 128, "blocks.0.attn.qkv": 32}
    tensors = {}
    for layer, k in layers.items():
        x = torch.randn(256, k)
        tensors[f"{layer}.H"] = x.T @ x / 256
        tensors[f"{layer}.absmax"] = x.abs().amax(0)
    save_file(tensors, str(stats))
    old = tmp_path / "old.safetensors"
    # int8_tensorwise quantizes these layers, so gptq reads the statistics (int8_blockwise's
    # 128-wide tiles fit none of them: statistics nothing reads are not recorded)
    args = ("-f", "int8_tensorwise", "--optimizer", "gptq", "--model", "none")
    assert run_cq(capsys, "convert", base, "-o", old, *args, "--calibration", stats).code == 0
    digest = "sha256:" + hashlib.sha256(stats.read_bytes()).hexdigest()
    assert record_of(old)["recipe"]["calibration"] == digest
    refused = run_cq(capsys, "convert", tuned, "--recipe-from", old, "-o", tmp_path / "x.safetensors")
    assert refused.code == 2 and "made with calibration statistics" in refused.err and "--calibration" in refused.err
    assert not (tmp_path / "x.safetensors").exists()
    again = run_cq(capsys, "convert", tuned, "--recipe-from", old, "--calibration", stats, "-o", tmp_path / "y.safetensors")
    assert again.code == 0


def test_a_newer_record_is_refused_by_name(tmp_path, two_models):
    base, _ = two_models
    record = {"recipe_version": RECIPE_VERSION + 1, "recipe": {"format": "nvfp4"}}
    newer = write_checkpoint(tmp_path / "newer.safetensors", small_model(), {RECIPE_KEY: json.dumps(record)})
    with pytest.raises(cq_core.CqError, match="upgrade cq"):
        recipe_from(newer)
    broken = write_checkpoint(tmp_path / "broken.safetensors", small_model(), {RECIPE_KEY: "{"})
    with pytest.raises(cq_core.CqError, match="not valid JSON"):
        recipe_from(broken)


def test_every_shard_of_a_sharded_output_carries_the_record(tmp_path, two_models):
    base, _ = two_models
    report = cq_core.convert(base, tmp_path / "out.safetensors", model="none", max_shard_size="20KB")
    index = Path(report.output)
    shards = sorted(index.parent.glob("out-*-of-*.safetensors"))
    assert len(shards) > 1
    for shard in shards:
        with safe_open(str(shard), "pt") as handle:
            assert json.loads(handle.metadata()[RECIPE_KEY]) == report.recipe
    assert recipe_from(index) == Recipe.from_mapping(report.recipe["recipe"], "x")


def test_a_dry_run_reports_the_recipe_without_reading_calibration_twice(tmp_path, two_models):
    base, _ = two_models
    report = cq_core.convert(base, dry_run=True, format="nvfp4", model="none")
    assert report.recipe["recipe"]["format"] == "nvfp4"
    assert RecipeRecord.from_json(report.recipe, "x").recipe.format == "nvfp4"


def test_recipe_fields_are_checked_before_any_plugin_runs():
    with pytest.raises(UsageError, match="--nonfinite must be one of"):
        Recipe().with_options(nonfinite="sometimes")


def test_inspect_recipe_keeps_the_rules_in_their_order(capsys, tmp_path, two_models):
    """A table rule before a string rule must stay first: the first match wins."""
    base, tuned = two_models
    recipe_file = tmp_path / "ordered.toml"
    recipe_file.write_text(
        'preset = "none"\n[layers]\n"fc" = { format = "int8_tensorwise", full_precision_matrix_mult = true }\n'
        '"fc2" = "nvfp4"\n'
    )
    first = tmp_path / "first.safetensors"
    assert run_cq(capsys, "convert", base, "--recipe", recipe_file, "-o", first).code == 0
    printed = tmp_path / "printed.toml"
    printed.write_text(run_cq(capsys, "inspect", first, "--recipe").out)
    assert [spec.pattern for spec in Recipe.load(printed).layers] == ["fc", "fc2"]
    again, direct = tmp_path / "again.safetensors", tmp_path / "direct.safetensors"
    assert run_cq(capsys, "convert", tuned, "--recipe", printed, "-o", again).code == 0
    assert run_cq(capsys, "convert", tuned, "--recipe", recipe_file, "-o", direct).code == 0
    assert again.read_bytes() == direct.read_bytes()


@pytest.mark.parametrize(
    "args, message",
    [
        (("--recipe-from", "nosuch.safetensors"), "--recipe-from nosuch.safetensors: no such file or folder"),
        (("-O", "input_scale=1e39"), "must lie within float32's range"),
        (("-O", "input_scale=1e-50"), "must lie within float32's range"),
        (("--target-size", "9999999999999999999"), "is larger than any file can be"),
        (("-O", "input_scale=2", "--input-scale", "calibrated"), "both set the activation scale"),
    ],
)
def test_more_bad_flags_are_one_sentence(capsys, tmp_path, two_models, monkeypatch, args, message):
    base, _ = two_models
    monkeypatch.chdir(tmp_path)
    result = run_cq(capsys, "convert", base, "-o", tmp_path / "out.safetensors", *args)
    assert result.code == 2 and message in result.err and len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_a_recipe_files_own_mistake_names_the_file(capsys, tmp_path, two_models):
    base, _ = two_models
    recipe_file = tmp_path / "bad.toml"
    recipe_file.write_text('[format_options]\ninput_scale = -1.0\n')
    result = run_cq(capsys, "convert", base, "--recipe", recipe_file, "-o", tmp_path / "o.safetensors")
    assert result.code == 2 and f"--recipe {recipe_file}: Option 'input_scale'" in result.err
    as_recipe = run_cq(capsys, "convert", base, "--recipe-from", recipe_file)
    assert as_recipe.code == 2 and "pass a recipe file with --recipe" in as_recipe.err


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("dup.json", '{"format": "nvfp4", "format": "mxfp8"}', "the key 'format' is written twice"),
        ("newer.toml", 'recipe_version = 99\nformat = "nvfp4"\n', "upgrade cq"),
        ("emb.toml", 'embeddings = "int4"\n', "valid: int8, int8_tensorwise, none"),
    ],
)
def test_recipe_files_that_say_too_much(capsys, tmp_path, two_models, name, text, message):
    base, _ = two_models
    recipe_file = tmp_path / name
    recipe_file.write_text(text)
    result = run_cq(capsys, "convert", base, "--recipe", recipe_file, "-o", tmp_path / "o.safetensors")
    assert result.code != 0 and message in result.err and str(recipe_file) in result.err
    assert not (tmp_path / "o.safetensors").exists()


def test_a_recipe_built_in_python_is_checked_when_built():
    """Not only when a conversion starts: the constructor refuses what check_syntax refuses."""
    with pytest.raises(UsageError, match="must be one of error, keep, not 'bad'"):
        Recipe(nonfinite="bad")
    with pytest.raises(UsageError, match="is an empty pattern"):
        Recipe(exclude=("",))
    with pytest.raises(UsageError, match="r.toml: recipe field 'gpu' must be one of"):
        Recipe(target_size=10, gpu="tpu", where="r.toml")
    assert "where" not in Recipe().to_json() and Recipe(format="nvfp4").format == "nvfp4"


def test_python_callers_may_give_one_pattern_as_a_string_and_rules_as_a_table(tmp_path):
    """A string is one pattern, not its characters; rules as a table or pairs, order kept."""
    assert Recipe(exclude="blocks").exclude == ("blocks",)
    with pytest.raises(UsageError, match="must be regex strings"):
        Recipe(exclude=[1])
    table = Recipe(layers={"fc2": "skip", "fc1": "nvfp4"})
    assert [(s.pattern, s.spec) for s in table.layers] == [("fc2", "skip"), ("fc1", "nvfp4")]
    assert Recipe(layers=[("fc2", "skip"), ("fc1", "nvfp4")]).layers == table.layers
    assert Recipe(formats="nvfp4, bf16", target_size=1000).formats == ("nvfp4", "bf16")
    assert Recipe(target_size="3MB").target_size == 3_000_000
    with pytest.raises(UsageError, match="must be a number of bits"):
        Recipe(bits_per_weight="5")
    for bad, message in (("fc1", "not .fc1."), (5, "not 5"), ([1], "not an item 1"), ({"(": "nvfp4"}, "not a valid regular")):
        with pytest.raises(UsageError, match=message):
            Recipe(layers=bad)
    model = write_checkpoint(tmp_path / "m.safetensors", small_model())
    report = cq_core.convert(model, tmp_path / "o.safetensors", model="none", exclude="fc1", layer="fc2=nvfp4")
    assert {t.name for t in report.quantized if "fc1" in t.name} == set()
    assert {t.format for t in report.quantized if "fc2" in t.name} == {"nvfp4"}
    with pytest.raises(UsageError, match="--formats '' must be format names"):
        cq_core.convert(model, tmp_path / "p.safetensors", formats="", target_size=1 << 20)


@pytest.mark.parametrize(("fmt", "options", "says"), [
    ("int8_blockwise", {"block_size": True}, "Option 'block_size' of format 'int8_blockwise' takes an int, not True."),
    ("int8_tensorwise", {"convrot": 1}, "Option 'convrot' of format 'int8_tensorwise' takes a bool, not 1."),
    ("float8_e4m3fn", {"input_scale": True}, "takes a float, not True"),
    ("nvfp4", {"global_scale": 2}, "takes a str, not 2"),
])
def test_a_recipe_file_or_the_api_gives_an_option_of_its_own_type_or_is_refused(capsys, tmp_path, fmt, options, says):
    # A bool where an int belongs was recorded as given ("group_size": true) and broke the layer
    # ComfyUI reads; the flags always parsed the type, a recipe file and the API did not.
    src = write_checkpoint(tmp_path / "m.safetensors", small_model())
    with pytest.raises(UsageError, match=says.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        cq_core.convert(src, tmp_path / "api.safetensors", recipe=Recipe(format=fmt, format_options=options))
    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    (tmp_path / "r.toml").write_text(f'format = "{fmt}"\n[format_options]\n{table}\n')
    r = run_cq(capsys, "convert", src, "-o", tmp_path / "cli.safetensors", "--recipe", tmp_path / "r.toml")
    assert r.code == 2 and says in r.err and r.err.count("\n") == 1, r.err
    assert not (tmp_path / "api.safetensors").exists() and not (tmp_path / "cli.safetensors").exists()


def test_an_int_is_a_float_option_and_none_stays_the_default(tmp_path):
    src = write_checkpoint(tmp_path / "m.safetensors", small_model())
    report = cq_core.convert(src, tmp_path / "o.safetensors", format="float8_e4m3fn", format_options={"input_scale": 2})
    assert report.recipe["recipe"]["format_options"]["input_scale"] == 2.0
    assert isinstance(report.recipe["recipe"]["format_options"]["input_scale"], float)


@pytest.mark.parametrize("optimizer", ["rtn", "learned", "gptq"])
def test_statistics_nothing_reads_are_a_warning_and_not_recorded(capsys, tmp_path, optimizer):
    # Recorded, a later --recipe-from asked for a statistics file the conversion never read.
    from tests.helpers import calibration_for

    model = small_model()
    src = write_checkpoint(tmp_path / "m.safetensors", model)
    stats = calibration_for(model, tmp_path)
    out = tmp_path / "o.safetensors"
    extra = ["--optimizer-option", "steps=2"] if optimizer == "learned" else []
    r = run_cq(capsys, "convert", src, "-o", out, "-f", "nvfp4", "--optimizer", optimizer, *extra,
               "--calibration", stats)
    assert r.code == 0, r.err
    recorded = json.loads(safe_open(str(out), "pt").metadata()[RECIPE_KEY])["recipe"]
    unused = optimizer == "rtn"
    assert ("nothing in this conversion reads the calibration statistics" in r.err) == unused, r.err
    assert ("calibration" in recorded) == (not unused), recorded
    if unused:  # the recipe repeats without a statistics file
        again = run_cq(capsys, "convert", src, "-o", tmp_path / "again.safetensors", "--recipe-from", out)
        assert again.code == 0, again.err


@pytest.mark.parametrize(("keywords", "says"), [
    ({"format_options": 5}, "--option must be a mapping of option names to values"),
    ({"format_options": "block_size=1"}, "--option must be a mapping of option names to values"),
    ({"optimizer_options": 5}, "--optimizer-option must be a mapping of option names to values"),
    ({"heuristic": "no"}, "--heur must be True or False, not 'no'"),
    ({"preset": 5}, "--model must be a string, not 5"),
])
def test_a_python_value_of_the_wrong_kind_is_one_sentence(tmp_path, keywords, says):
    # TypeError / ValueError / AttributeError tracebacks before; heuristic="no" was recorded as given
    src = write_checkpoint(tmp_path / "m.safetensors", small_model())
    with pytest.raises(UsageError, match=says):
        cq_core.convert(src, tmp_path / "o.safetensors", format="float8_e4m3fn", **keywords)
    assert not (tmp_path / "o.safetensors").exists()


def test_a_recorded_calibration_is_needed_only_where_the_overridden_recipe_reads_it(capsys, tmp_path):
    from tests.helpers import calibration_for

    model = small_model()
    src = write_checkpoint(tmp_path / "m.safetensors", model)
    stats = calibration_for(model, tmp_path)
    made = tmp_path / "gptq.safetensors"
    assert run_cq(capsys, "convert", src, "-o", made, "-f", "nvfp4", "--optimizer", "gptq", "--calibration", stats).code == 0
    asked = run_cq(capsys, "convert", src, "--recipe-from", made, "-o", tmp_path / "a.safetensors")
    assert asked.code == 2 and "made with calibration statistics" in asked.err
    rtn = run_cq(capsys, "convert", src, "--recipe-from", made, "--optimizer", "rtn", "-o", tmp_path / "b.safetensors")
    assert rtn.code == 0, rtn.err
    assert "calibration" not in record_of(tmp_path / "b.safetensors")["recipe"]
