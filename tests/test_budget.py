"""The size budget: exact knapsack, candidate errors, the recipe fields and `cq convert --target-size`."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch
from safetensors import safe_open

from cq_core.commands.convert import convert
from cq_core.engine.budget import (
    allowed_format_names,
    capacity_bytes,
    QUERY_KEY_WEIGHT,
    depth_weights,
    error_energies,
    importance_weights,
    is_query_key_projection,
    predicted_error,
    solve_knapsack,
)
from cq_core.engine.recipe import Recipe
from cq_core.errors import UsageError
from tests.cli_runner import run_cq
from tests.conftest import write_checkpoint

ALLOWED = "nvfp4,float8_e4m3fn,bf16"


def brute_force(sizes, errors, capacity):
    best = None
    for choice in itertools.product(*[range(len(s)) for s in sizes]):
        size = sum(s[k] for s, k in zip(sizes, choice, strict=True))
        if size > capacity:
            continue
        error = sum(e[k] for e, k in zip(errors, choice, strict=True))
        if best is None or error < best[0] - 1e-12 or (abs(error - best[0]) <= 1e-12 and size < best[1]):
            best = (error, size)
    return best


@pytest.mark.parametrize("seed", range(60))
def test_the_knapsack_is_exact_against_brute_force(seed):
    rng = random.Random(seed)
    classes = rng.randint(1, 7)
    sizes = [[rng.randint(1, 40) for _ in range(rng.randint(1, 4))] for _ in range(classes)]
    # Errors rounded to a coarse grid make ties; some classes carry a zero-error candidate.
    errors = [[round(rng.uniform(0, 5), 1) * rng.choice((1, 1, 0)) for _ in s] for s in sizes]
    capacity = rng.randint(sum(min(s) for s in sizes) - 3, sum(max(s) for s in sizes) + 3)
    expected = brute_force(sizes, errors, capacity)
    picked = solve_knapsack(sizes, errors, capacity)
    if expected is None:
        assert picked is None
        return
    error = sum(e[k] for e, k in zip(errors, picked, strict=True))
    size = sum(s[k] for s, k in zip(sizes, picked, strict=True))
    assert size <= capacity
    assert error == pytest.approx(expected[0], abs=1e-9)


def test_the_knapsack_spends_the_budget_where_error_falls_most():
    # Two layers, each 4-bit (size 1) or 8-bit (size 2); room for one 8-bit layer: the worse one gets it.
    assert solve_knapsack([[1, 2], [1, 2]], [[1.0, 0.1], [5.0, 0.5]], 3) == [0, 1]
    assert solve_knapsack([[1, 2], [1, 2]], [[1.0, 0.1], [5.0, 0.5]], 1) is None


def test_tr_EHE_is_the_expected_output_error():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 16, generator=g)
    decoded = weight + 0.01 * torch.randn(8, 16, generator=g)
    x = torch.randn(1000, 16, generator=g)
    h = x.T @ x / x.shape[0]
    energies = error_energies(weight, lambda a, b: decoded[a:b], h)
    output_error = float(((x @ (decoded - weight).T) ** 2).sum(1).mean())
    output_energy = float(((x @ weight.T) ** 2).sum(1).mean())
    assert energies.output_noise == pytest.approx(output_error, rel=1e-4)
    assert energies.output_relative == pytest.approx(output_error / output_energy, rel=1e-4)
    relative = float((decoded - weight).square().sum() / weight.square().sum())
    assert energies.relative == pytest.approx(relative, rel=1e-5)
    # With H: the geometric mean of the weight's and the output's relative error, x weights x importance.
    assert predicted_error(energies, 128, 0.5) == pytest.approx(
        math.sqrt(relative * output_error / output_energy) * 128 * 0.5, rel=1e-4)
    # Data-free: the relative weight error x weights x importance.
    data_free = error_energies(weight, lambda a, b: decoded[a:b])
    assert data_free.output_noise is None and data_free.output_relative is None
    assert predicted_error(data_free, 128, 0.5) == pytest.approx(relative * 128 * 0.5, rel=1e-5)


def test_an_exact_layer_predicts_no_error_and_a_zero_weight_an_infinite_one():
    weight = torch.zeros(4, 8)
    assert predicted_error(error_energies(weight, lambda a, b: weight[a:b].clone()), 32) == 0.0
    noisy = weight + 1.0
    assert predicted_error(error_energies(weight, lambda a, b: noisy[a:b]), 32) == math.inf
    assert predicted_error(error_energies(weight, lambda a, b: noisy[a:b], torch.eye(8)), 32) == math.inf


def test_query_and_key_projections_weigh_less_across_naming_schemes():
    query_key = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.key.weight",
                 "model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
                 "encoder.block.0.layer.0.SelfAttention.q.weight", "blocks.0.cross_attn.k.weight",
                 "transformer_blocks.0.attn1.to_q.weight", "transformer_blocks.0.attn.add_k_proj.weight",
                 "layers.0.attention.wq.weight", "k.weight"]
    others = ["encoder.layer.0.attention.self.value.weight", "model.layers.3.self_attn.v_proj.weight",
              "model.layers.3.self_attn.o_proj.weight", "double_blocks.0.img_attn.qkv.weight",
              "blocks.0.self_attn.o.weight", "transformer_blocks.0.attn1.to_out.0.weight",
              "model.layers.3.mlp.down_proj.weight", "blocks.0.k_norm.weight", "kq.weight",
              "encoder.layer.0.attention.self.query.bias"]
    assert all(is_query_key_projection(name) for name in query_key)
    assert not any(is_query_key_projection(name) for name in others)
    weights = importance_weights(["blocks.0.attn.q_proj.weight", "blocks.0.attn.v_proj.weight",
                                  "blocks.3.attn.q_proj.weight", "blocks.3.attn.v_proj.weight"])
    assert weights["blocks.3.attn.v_proj.weight"] == 1.0
    assert weights["blocks.0.attn.v_proj.weight"] == pytest.approx(math.sqrt(0.25))
    assert weights["blocks.3.attn.q_proj.weight"] == pytest.approx(QUERY_KEY_WEIGHT)
    assert weights["blocks.0.attn.q_proj.weight"] == pytest.approx(QUERY_KEY_WEIGHT * 0.5)


def test_depth_weights_follow_each_stack_of_blocks():
    names = ["img_in.weight", "double_blocks.0.qkv.weight", "double_blocks.1.qkv.weight",
             "single_blocks.0.linear.weight", "single_blocks.3.linear.weight", "final_layer.linear.weight"]
    depths = depth_weights(names)
    assert depths["double_blocks.0.qkv.weight"] == 0.5 and depths["double_blocks.1.qkv.weight"] == 1.0
    assert depths["single_blocks.0.linear.weight"] == 0.25 and depths["single_blocks.3.linear.weight"] == 1.0
    assert depths["img_in.weight"] == depths["final_layer.linear.weight"] == 1.0


def test_capacity_and_allowed_formats(registry):
    assert capacity_bytes(None, 4.0, 1000) == 500
    assert capacity_bytes(1234, None, 1000) == 1234
    assert allowed_format_names(["nvfp4", "bf16"], None, "x", {}) == ("nvfp4", "bf16")
    fp8_only = {"float8_e4m3fn": registry.formats["float8_e4m3fn"]}
    assert allowed_format_names([], "hopper", "x", fp8_only) == ("float8_e4m3fn", "bf16")
    assert allowed_format_names([], None, "nvfp4", {}) == ("nvfp4", "bf16")
    blackwell = allowed_format_names([], "blackwell", "x", registry.formats)
    assert "nvfp4" in blackwell and "nvfp4" not in allowed_format_names([], "ada", "x", registry.formats)


def test_recipe_fields_round_trip_and_check():
    recipe = Recipe.from_mapping({"target_size": "2MB", "formats": ["nvfp4", "bf16"]}, "r.toml")
    assert recipe.target_size == 2_000_000 and recipe.has_budget
    assert Recipe.from_mapping(recipe.to_json(), "again") == recipe
    assert Recipe.from_mapping({"bits_per_weight": 5.5, "gpu": "ada"}, "r").to_json()["gpu"] == "ada"
    assert "target_size" not in Recipe().to_json() and "formats" not in Recipe().to_json()
    for bad, words in (
        ({"target_size": 10, "bits_per_weight": 4}, "r.toml: recipe fields 'target_size' and 'bits_per_weight' both set"),
        ({"formats": ["nvfp4"]}, "r.toml: recipe field 'formats' chooses formats for a size budget: give recipe field 'target_size' or"),
        ({"target_size": 10, "gpu": "volta"}, "blackwell, hopper, ada, older"),
        ({"target_size": "ten"}, "not a size"),
        ({"bits_per_weight": -1}, "above 0 and below 1024"),
    ):
        with pytest.raises(UsageError, match=words):
            Recipe.from_mapping(bad, "r.toml")
    # A flag replaces the recipe's other way of giving the same thing.
    assert recipe.override(bits_per_weight=6.0).target_size is None
    assert recipe.override(gpu="hopper").formats == ()


def budget_model(path, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(3):
        for name, scale in (("attn.qkv", 1.0), ("mlp.fc1", 1.0 + i)):
            weight = torch.randn(128, 128, generator=g) * scale
            if name == "attn.qkv":  # heavy tails: nvfp4 hurts this one most
                weight[:, :4] *= 40
            tensors[f"blocks.{i}.{name}.weight"] = weight.to(torch.bfloat16)
    tensors["blocks.0.norm.weight"] = torch.ones(128, dtype=torch.bfloat16)
    return write_checkpoint(path, tensors)


def layer_formats(path):
    with safe_open(str(path), "pt") as f:
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
    return {name: config["format"] for name, config in layers.items()}


def sizes_of(src, tmp_path):
    nvfp4 = convert(src, tmp_path / "n.safetensors", format="nvfp4")
    fp8 = convert(src, tmp_path / "f.safetensors", format="float8_e4m3fn")
    return (tmp_path / "n.safetensors").stat().st_size, (tmp_path / "f.safetensors").stat().st_size, nvfp4, fp8


def test_convert_fits_the_target_and_mixes_formats(tmp_path):
    src = budget_model(tmp_path / "m.safetensors")
    nvfp4_bytes, fp8_bytes, _, _ = sizes_of(src, tmp_path)
    target = (nvfp4_bytes + fp8_bytes) // 2
    out = tmp_path / "b.safetensors"
    report = convert(src, out, format="nvfp4", target_size=target, formats=ALLOWED)
    achieved = out.stat().st_size
    assert achieved <= target
    assert report.budget["achieved_bytes"] == achieved == report.budget["predicted_bytes"]
    chosen = set(layer_formats(out).values())
    assert chosen == {"nvfp4", "float8_e4m3fn"} or len(report.quantized) < 6
    # More room never gives a worse predicted error.
    more = convert(src, tmp_path / "c.safetensors", format="nvfp4", target_size=fp8_bytes + 4096, formats=ALLOWED)
    assert more.budget["predicted_error"] <= report.budget["predicted_error"]
    assert json.loads(
        safe_open(str(out), "pt").metadata()["cq_recipe"]
    )["recipe"]["target_size"] == target


def test_rules_and_excludes_hold_and_are_charged(tmp_path):
    src = budget_model(tmp_path / "m.safetensors")
    nvfp4_bytes, fp8_bytes, _, _ = sizes_of(src, tmp_path)
    out = tmp_path / "b.safetensors"
    report = convert(src, out, format="nvfp4", target_size=fp8_bytes, formats=ALLOWED,
                     layer=[r"blocks\.0\.mlp=int8_tensorwise"], exclude=[r"blocks\.1\.mlp"])
    formats = layer_formats(out)
    assert formats["blocks.0.mlp.fc1"] == "int8_tensorwise"
    assert "blocks.1.mlp.fc1" not in formats
    assert "blocks.0.mlp.fc1.weight" not in report.budget["choices"]
    assert out.stat().st_size <= fp8_bytes


def test_an_impossible_budget_names_the_smallest_size(capsys, tmp_path):
    src = budget_model(tmp_path / "m.safetensors")
    result = run_cq(capsys, "convert", src, "-o", tmp_path / "x.safetensors", "--target-size", "10KB",
                    "--formats", "float8_e4m3fn,bf16")
    assert result.code == 2
    assert "below the smallest size the allowed formats (float8_e4m3fn, bf16) reach" in result.err
    assert not (tmp_path / "x.safetensors").exists()
    # The smallest size named is reachable.
    smallest = int(result.err.split("reach: ")[1].split("(")[1].split(" bytes")[0])
    report = convert(src, tmp_path / "y.safetensors", target_size=smallest, formats="float8_e4m3fn,bf16")
    assert (tmp_path / "y.safetensors").stat().st_size == smallest == report.budget["predicted_bytes"]


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_nan_weight_under_a_budget_is_named_not_an_impossible_budget(capsys, tmp_path, dry_run):
    """The error pass reads every free weight: a NaN there is the NaN error, with file and tensor."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 128, generator=g)
    weight[3, 5] = float("nan")
    src = write_checkpoint(tmp_path / "m.safetensors", {"blocks.0.fc.weight": weight.to(torch.bfloat16),
                                                        "blocks.1.fc.weight": torch.randn(128, 128, generator=g)})
    out = tmp_path / "x.safetensors"
    result = run_cq(capsys, "convert", src, "-o", out, "--target-size", "1MB", "--formats", ALLOWED,
                    *(["--dry-run"] if dry_run else []))
    assert result.code == 1, result.err
    assert result.err.strip() == (f"cq: error: {src}: tensor 'blocks.0.fc.weight' contains NaN or Inf values; fix the "
                                  "source checkpoint, or pass --nonfinite keep to keep such tensors in high precision.")
    assert not out.exists()
    kept = convert(src, out, target_size=1 << 20, formats=ALLOWED, nonfinite="keep", dry_run=dry_run)
    assert "blocks.0.fc.weight" not in kept.budget["choices"]


def test_dry_run_shows_each_choice_and_the_predicted_size(capsys, tmp_path):
    src = budget_model(tmp_path / "m.safetensors")
    result = run_cq(capsys, "convert", src, "--dry-run", "--bits-per-weight", "6", "--gpu", "blackwell")
    assert result.code == 0, result.err
    assert "size budget" in result.out and "predicted" in result.out
    assert "size budget: " in result.out  # each free layer's reason
    result = run_cq(capsys, "convert", src, "--dry-run", "--bits-per-weight", "9", "--gpu", "ada", "--json")
    choices = json.loads(result.out)["budget"]["choices"]
    assert set(choices.values()) <= {"float8_e4m3fn", "int8_tensorwise", "bf16"}
    assert run_cq(capsys, "convert", src, "--formats", "nvfp4").code == 2
    empty = run_cq(capsys, "convert", src, "--formats", "", "--target-size", "1MB")
    assert empty.code == 2 and "--formats '' must be format names separated by commas" in empty.err
    assert "unknown" in run_cq(capsys, "convert", src, "--target-size", "1MB", "--formats", "nvfp5").err.lower()


def test_recipe_from_repeats_the_same_bytes(capsys, tmp_path):
    src = budget_model(tmp_path / "m.safetensors")
    first = tmp_path / "a.safetensors"
    assert run_cq(capsys, "convert", src, "-o", first, "--target-size", "60KB", "--formats", ALLOWED,
                  "-f", "nvfp4").code == 0
    again = tmp_path / "b.safetensors"
    assert run_cq(capsys, "convert", src, "-o", again, "--recipe-from", first).code == 0
    assert first.read_bytes() == again.read_bytes()


def test_calibration_errors_and_shards(tmp_path):
    from cq_core.io.calibration_file import save_statistics

    src = budget_model(tmp_path / "m.safetensors")
    g = torch.Generator().manual_seed(1)
    stats = {}
    for i in range(3):
        for name in ("attn.qkv", "mlp.fc1"):
            x = torch.randn(256, 128, generator=g)
            stats[f"blocks.{i}.{name}"] = {"H": x.T @ x / 256, "absmax": x.abs().amax(0)}
    calib = tmp_path / "calib.safetensors"
    save_statistics(stats, calib)
    index = tmp_path / "out.safetensors.index.json"
    report = convert(src, index, format="nvfp4", target_size="80KB", formats=ALLOWED, calibration=calib,
                     max_shard_size="30KB")
    assert "tr(E H E^T)/tr(W H W^T)" in report.budget["error_measure"]
    files = set(json.loads(index.read_text())["weight_map"].values())
    assert len(files) > 1
    assert report.budget["achieved_bytes"] == sum((tmp_path / f).stat().st_size for f in files)
    del stats["blocks.2.mlp.fc1"]
    save_statistics(stats, calib)
    with pytest.raises(UsageError, match="no statistics for layer 'blocks.2.mlp.fc1'"):
        convert(src, tmp_path / "z.safetensors", target_size="80KB", formats=ALLOWED, calibration=calib)


def test_optimizer_applies_to_the_chosen_format(tmp_path):
    src = budget_model(tmp_path / "m.safetensors")
    _, fp8_bytes, _, _ = sizes_of(src, tmp_path)
    report = convert(src, tmp_path / "o.safetensors", format="nvfp4", optimizer="learned", target_size=fp8_bytes,
                     formats=ALLOWED)
    assert report.optimizer == "learned"
    assert all(math.isfinite(t.sqnr_db) for t in report.quantized)


def test_a_sharded_output_over_the_target_is_warned_about(capsys, tmp_path):
    """The budget counts one file's header; each extra shard repeats the metadata."""
    src = budget_model(tmp_path / "m.safetensors")
    dry = run_cq(capsys, "convert", src, "--target-size", "10MB", "--formats", ALLOWED, "--dry-run", "--json")
    smallest = json.loads(dry.out)["budget"]["smallest_bytes"]
    out = tmp_path / "s.safetensors"
    result = run_cq(capsys, "convert", src, "-o", out, "--target-size", str(smallest), "--formats", ALLOWED,
                    "--max-shard-size", "40KB", "-q")
    assert result.code == 0, result.err
    shards = sorted(tmp_path.glob("s-*.safetensors"))
    over = sum(p.stat().st_size for p in shards) - smallest
    assert len(shards) > 1 and over > 0
    assert f"warning: the sharded output is {over} bytes over the size budget" in result.err
    dry = run_cq(capsys, "convert", src, "-o", out, "--target-size", str(smallest), "--formats", ALLOWED,
                 "--max-shard-size", "40KB", "--dry-run", "-q", "--overwrite")
    assert f"warning: the sharded output would be {over} bytes over the size budget" in dry.err, dry.err
    single = run_cq(capsys, "convert", src, "-o", tmp_path / "one.safetensors", "--target-size", str(smallest),
                    "--formats", ALLOWED, "-q")
    assert single.code == 0 and "over the size budget" not in single.err
    assert (tmp_path / "one.safetensors").stat().st_size <= smallest  # its recipe record names a shorter target
