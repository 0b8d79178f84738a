"""cq migrate: legacy files built by hand, migrated, and decoded with comfy-kitchen.

The expected values come from the legacy tensors themselves (``q * scale_weight``,
tile-wise for blocks), never from cq's decode of its own output.
"""

from __future__ import annotations

import json

import pytest
import torch
from comfy_kitchen.tensor import TensorCoreFP8Layout, TensorWiseINT8Layout

from cq_core import hookimpl
from cq_core.errors import CqError, UsageError
from cq_core.commands.migrate import migrate
from cq_core import Migration
from tests.cli_runner import run_cq
from tests.comfy import comfy_dequantize
from tests.helpers import build_registry, carriers, fp8_codes, legacy_fp8_file, load, write_checkpoint

torch.set_num_threads(2)
N, K = 32, 64


def int8_codes(seed: int, shape=(N, K)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)


def test_scaled_fp8_migrates_and_decodes_in_comfy_kitchen(tmp_path):
    src = tmp_path / "legacy.safetensors"
    legacy = legacy_fp8_file(src)
    report = migrate(src, tmp_path / "out.safetensors")
    out, metadata = load(tmp_path / "out.safetensors")

    assert "scaled_fp8" not in out and not any("scale_weight" in k or "scale_input" in k for k in out)
    header, per_layer = carriers(out, metadata)
    assert header == per_layer == {
        "blocks.0.attn.qkv": {"format": "float8_e4m3fn"},
        "blocks.0.mlp.fc1": {"format": "float8_e4m3fn"},
        "blocks.0.mlp.fc2": {"format": "float8_e5m2"},
    }
    assert report.layers == {layer: cfg["format"] for layer, cfg in header.items()}
    for layer in header:
        q, scale = legacy[f"{layer}.weight"], legacy[f"{layer}.scale_weight"]
        assert out[f"{layer}.weight"].dtype == q.dtype and torch.equal(out[f"{layer}.weight"], q)
        stored_scale = out[f"{layer}.weight_scale"]
        assert stored_scale.dtype == torch.float32 and stored_scale.shape == ()
        expected = q.float() * scale.float().reshape(())
        decoded = comfy_dequantize(TensorCoreFP8Layout, out[f"{layer}.weight"], (N, K), scale=stored_scale)
        torch.testing.assert_close(decoded, expected, rtol=0, atol=0)
    # scale_input is renamed; where the legacy writer left it out (1.0), it becomes explicit.
    assert out["blocks.0.attn.qkv.input_scale"].item() == 0.5
    for layer in ("blocks.0.mlp.fc1", "blocks.0.mlp.fc2"):
        assert out[f"{layer}.input_scale"].shape == () and out[f"{layer}.input_scale"].item() == 1.0
    # Everything else is carried over untouched.
    assert torch.equal(out["blocks.0.attn.qkv.bias"], legacy["blocks.0.attn.qkv.bias"])
    assert torch.equal(out["blocks.0.norm.weight"], legacy["blocks.0.norm.weight"])


def test_marker_with_two_elements_means_full_precision_matmul(tmp_path):
    src = tmp_path / "legacy.safetensors"
    legacy_fp8_file(src, marker_elements=2)
    migrate(src, tmp_path / "out.safetensors")
    header, per_layer = carriers(*load(tmp_path / "out.safetensors"))
    assert header == per_layer
    assert all(cfg["full_precision_matrix_mult"] is True for cfg in header.values())


def test_scaled_int8_per_tensor_per_row_and_blocks(tmp_path, registry):
    q = {name: int8_codes(i) for i, name in enumerate(("tensor", "row", "row1", "block"))}
    g = torch.Generator().manual_seed(9)
    scales = {
        "tensor": torch.tensor(0.01),
        "row": torch.rand(N, generator=g) / 100 + 1e-3,  # (N,): ComfyUI needs (N, 1)
        "row1": torch.rand(N, 1, generator=g) / 100 + 1e-3,
        "block": torch.rand(N // 16, K // 16, generator=g) / 100 + 1e-3,
    }
    tensors = {}
    for name in q:
        tensors[f"{name}.weight"] = q[name]
        tensors[f"{name}.scale_weight"] = scales[name].to(torch.bfloat16)
    write_checkpoint(tmp_path / "int8.safetensors", tensors)  # no marker: scaled INT8 files lack it

    report = migrate(tmp_path / "int8.safetensors", tmp_path / "out.safetensors")
    out, metadata = load(tmp_path / "out.safetensors")
    header, per_layer = carriers(out, metadata)
    assert header == per_layer == {
        "tensor": {"format": "int8_tensorwise"},
        "row": {"format": "int8_tensorwise"},
        "row1": {"format": "int8_tensorwise"},
        "block": {"format": "int8_blockwise", "group_size": 16},
    }
    assert out["tensor.weight_scale"].shape == ()
    assert out["row.weight_scale"].shape == (N, 1) and out["row1.weight_scale"].shape == (N, 1)
    assert not any(k.endswith("input_scale") for k in out)  # INT8 quantizes activations per row itself
    for name in ("tensor", "row", "row1"):
        legacy_scale = scales[name].to(torch.bfloat16).float()
        expected = q[name].float() * (legacy_scale if name == "tensor" else legacy_scale.reshape(N, 1))
        decoded = comfy_dequantize(
            TensorWiseINT8Layout, out[f"{name}.weight"], (N, K), scale=out[f"{name}.weight_scale"]
        )
        torch.testing.assert_close(decoded, expected, rtol=0, atol=0)
    # Blocks: no comfy-kitchen layout exists (stock ComfyUI does not load it); compare the
    # int8 plugin's decode with the tile-wise product of the legacy tensors.
    tile = scales["block"].to(torch.bfloat16).float().repeat_interleave(16, 0).repeat_interleave(16, 1)
    blockwise = registry.format("int8_blockwise")(block_size=16)
    decoded = blockwise.decode({"weight": out["block.weight"], "weight_scale": out["block.weight_scale"]})
    torch.testing.assert_close(decoded, q["block"].float() * tile, rtol=0, atol=0)
    assert report.not_loadable == ["block"]


def test_nested_params_are_flattened_in_both_carriers(tmp_path):
    q = int8_codes(0)
    config = {"format": "int8_blockwise", "params": {"group_size": 16}}
    raw = json.dumps(config).encode()
    tensors = {
        "a.weight": q,
        "a.weight_scale": torch.rand(N // 16, K // 16),
        "a.comfy_quant": torch.tensor(list(raw), dtype=torch.uint8),
    }
    header = json.dumps({"format_version": "1.0", "layers": {"a": config}})
    write_checkpoint(tmp_path / "nested.safetensors", tensors, {"_quantization_metadata": header})
    report = migrate(tmp_path / "nested.safetensors", tmp_path / "out.safetensors")
    assert [name for name, _ in report.applied] == ["nested_params"]
    out, metadata = load(tmp_path / "out.safetensors")
    header_layers, per_layer = carriers(out, metadata)
    assert header_layers == per_layer == {"a": {"format": "int8_blockwise", "group_size": 16}}
    assert torch.equal(out["a.weight"], q) and torch.equal(out["a.weight_scale"], tensors["a.weight_scale"])


def test_contradicting_nested_params_are_an_error(tmp_path):
    config = {"format": "int8_blockwise", "group_size": 8, "params": {"group_size": 16}}
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {"a": config}})}
    write_checkpoint(tmp_path / "x.safetensors", {"a.weight": int8_codes(0), "a.weight_scale": torch.rand(2, 4)}, meta)
    with pytest.raises(CqError, match="'a'.*group_size"):
        migrate(tmp_path / "x.safetensors", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_orphan_scales_are_dropped_and_reported(tmp_path):
    q, s = fp8_codes(0)
    tensors = {
        "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
        "q.weight": q,
        "q.scale_weight": s,
        "plain.weight": torch.randn(N, K, dtype=torch.bfloat16),
        "plain.scale_weight": torch.tensor(1.0),  # legacy writers scaled layers they did not quantize
        "plain.scale_input": torch.tensor(1.0),
        "other.weight": torch.randn(4, 4),
        "other.weight_scale": torch.tensor(2.0),  # current-layout name, but no quantized layer
        "gone.input_scale": torch.tensor(1.0),  # no weight at all
    }
    write_checkpoint(tmp_path / "o.safetensors", tensors)
    report = migrate(tmp_path / "o.safetensors", tmp_path / "out.safetensors")
    dropped = {n.subject for n in report.notes if n.kind == "drop"}
    orphans = {"plain.scale_weight", "plain.scale_input", "other.weight_scale", "gone.input_scale"}
    assert orphans <= dropped
    out, _ = load(tmp_path / "out.safetensors")
    assert not orphans & set(out)
    assert torch.equal(out["plain.weight"], tensors["plain.weight"]) and "q.weight_scale" in out


def test_scales_without_metadata_get_their_format_inferred(tmp_path):
    """Some writers used the current names but wrote no metadata: ComfyUI would not know the format."""
    q, s = fp8_codes(0)
    qi, si = int8_codes(1), torch.rand(N, 1) / 50 + 1e-3
    write_checkpoint(tmp_path / "x.safetensors", {"f.weight": q, "f.weight_scale": s, "i.weight": qi, "i.weight_scale": si})
    report = migrate(tmp_path / "x.safetensors", tmp_path / "out.safetensors")
    assert report.layers == {"f": "float8_e4m3fn", "i": "int8_tensorwise"}
    out, metadata = load(tmp_path / "out.safetensors")
    assert carriers(out, metadata)[0] == {"f": {"format": "float8_e4m3fn"}, "i": {"format": "int8_tensorwise"}}
    # Codes and scales are copied as they are: ComfyUI takes them so (no input_scale means 1.0).
    assert torch.equal(out["f.weight_scale"], s) and "f.input_scale" not in out
    decoded = comfy_dequantize(TensorWiseINT8Layout, out["i.weight"], (N, K), scale=out["i.weight_scale"])
    torch.testing.assert_close(decoded, qi.float() * si, rtol=0, atol=0)


def test_tensors_that_fit_several_formats_are_named_not_guessed(tmp_path):
    """An I8 weight with an (N,) scale is a per-row INT8 layer stored flat, or packed convrot_w4a4."""
    write_checkpoint(tmp_path / "x.safetensors", {"i.weight": int8_codes(1), "i.weight_scale": torch.rand(N)})
    report = migrate(tmp_path / "x.safetensors", check=True)
    assert [n.subject for n in report.refused] == ["i"]
    assert "int8_tensorwise and convrot_w4a4" in report.refused[0].message
    with pytest.raises(CqError, match="'?i'? .*int8_tensorwise and convrot_w4a4"):
        migrate(tmp_path / "x.safetensors", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("marker", [True, False])
def test_a_quantized_weight_without_a_scale_is_an_error_naming_the_layer(tmp_path, marker):
    q, s = fp8_codes(0)
    tensors = {"a.weight": q, "a.scale_weight": s, "b.weight": int8_codes(1)}
    if marker:
        tensors["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    write_checkpoint(tmp_path / "x.safetensors", tensors)
    with pytest.raises(CqError, match="'b'.*no b.scale_weight"):
        migrate(tmp_path / "x.safetensors", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_current_layer_without_weight_scale_is_an_error(tmp_path):
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {"a": {"format": "float8_e4m3fn"}}})}
    write_checkpoint(tmp_path / "x.safetensors", {"a.weight": fp8_codes(0)[0]}, meta)
    with pytest.raises(CqError, match="'a'.*a.weight_scale"):
        migrate(tmp_path / "x.safetensors", check=True)


def test_fp8_with_per_row_scales_is_refused_by_name(tmp_path):
    q, _ = fp8_codes(0)
    q2, s2 = fp8_codes(1)
    write_checkpoint(
        tmp_path / "x.safetensors",
        {"rowwise.weight": q, "rowwise.scale_weight": torch.rand(N), "fine.weight": q2, "fine.scale_weight": s2},
    )
    report = migrate(tmp_path / "x.safetensors", check=True)
    assert [n.subject for n in report.refused] == ["rowwise"]
    with pytest.raises(CqError, match="rowwise.*one scale per tensor"):
        migrate(tmp_path / "x.safetensors", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_migrating_twice_changes_nothing(tmp_path):
    src = tmp_path / "legacy.safetensors"
    legacy_fp8_file(src)
    migrate(src, tmp_path / "once.safetensors")
    again = migrate(tmp_path / "once.safetensors", tmp_path / "twice.safetensors")
    assert not again.changed and not again.applied and again.written
    assert (tmp_path / "once.safetensors").read_bytes() == (tmp_path / "twice.safetensors").read_bytes()
    assert not migrate(tmp_path / "once.safetensors", check=True).changed


def test_disagreeing_carriers_are_rebuilt_from_the_header(tmp_path):
    """ComfyUI prefers the header, so a migration keeps what ComfyUI loaded."""
    q, s = fp8_codes(0)
    stale = json.dumps({"format": "float8_e5m2"}).encode()
    tensors = {"a.weight": q, "a.weight_scale": s, "a.input_scale": torch.tensor(1.0),
               "a.comfy_quant": torch.tensor(list(stale), dtype=torch.uint8)}
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {"a": {"format": "float8_e4m3fn"}}}),
            "modelspec.title": "kept"}
    write_checkpoint(tmp_path / "x.safetensors", tensors, meta)
    report = migrate(tmp_path / "x.safetensors", tmp_path / "out.safetensors")
    assert report.changed
    out, metadata = load(tmp_path / "out.safetensors")
    assert carriers(out, metadata) == ({"a": {"format": "float8_e4m3fn"}},) * 2
    assert metadata["modelspec.title"] == "kept"


def test_check_only_reports_and_refuses_to_clobber(tmp_path, capsys):
    src = tmp_path / "legacy.safetensors"
    legacy_fp8_file(src)
    result = run_cq(capsys, "migrate", src, "--check")
    assert result.code == 1 and "scaled_fp8" in result.out and "nothing written" in result.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["legacy.safetensors"]

    out = tmp_path / "out.safetensors"
    assert run_cq(capsys, "migrate", src, "-o", out).code == 0
    assert run_cq(capsys, "migrate", out, "--check").code == 0
    clobber = run_cq(capsys, "migrate", src, "-o", out)
    assert clobber.code == 1 and "--overwrite" in clobber.err
    assert run_cq(capsys, "migrate", src, "-o", out, "--overwrite").code == 0
    with pytest.raises(UsageError):
        migrate(src)
    as_json = json.loads(run_cq(capsys, "migrate", src, "--check", "--json").out)
    assert as_json["changed"] and as_json["applied"][0]["migration"] == "scaled_fp8"


# -- the hook: a plugin teaches cq another legacy layout -------------------------------


class RowScaledInt8(Migration):
    """A made-up older layout: ``L.qweight`` int8 and ``L.row_scale`` (N,), flagged in the header."""

    name = "row_scaled_int8"
    description = "Toy legacy layout for the hook test."

    def detect(self, draft):
        return "header says legacy_int8=1" if draft.metadata.get("legacy_int8") == "1" else None

    def apply(self, draft):
        del draft.metadata["legacy_int8"]
        for name in draft.names_ending(".qweight"):
            layer = name.removesuffix(".qweight")
            rows = draft.spec(name).shape[0]
            draft.replace(name, new_name=f"{layer}.weight")
            draft.replace(f"{layer}.row_scale", new_name=f"{layer}.weight_scale", dtype=torch.float32, shape=(rows, 1))
            draft.layers[layer] = {"format": "int8_tensorwise"}
            draft.note(layer, "qweight/row_scale -> weight/weight_scale")


class ToyMigrationPlugin:
    __name__ = "toy_migration"

    @hookimpl
    def cq_register_migrations(self, register):
        register(RowScaledInt8)


def test_register_migrations_hook_teaches_a_new_layout(tmp_path):
    registry = build_registry(ToyMigrationPlugin())
    assert registry.owners[("migration", "row_scaled_int8")] == "toy_migration"
    assert registry.owners[("migration", "scaled_fp8")] == "cq_core.builtin.legacy_scaled"
    q, scale = int8_codes(3), torch.rand(N) / 50 + 1e-3
    write_checkpoint(tmp_path / "toy.safetensors", {"x.qweight": q, "x.row_scale": scale}, {"legacy_int8": "1"})

    report = migrate(tmp_path / "toy.safetensors", tmp_path / "out.safetensors", registry=registry)
    assert report.applied == [("row_scaled_int8", "header says legacy_int8=1")]
    out, metadata = load(tmp_path / "out.safetensors")
    assert "legacy_int8" not in metadata and set(out) == {"x.weight", "x.weight_scale", "x.comfy_quant"}
    assert carriers(out, metadata) == ({"x": {"format": "int8_tensorwise"}},) * 2
    decoded = comfy_dequantize(TensorWiseINT8Layout, out["x.weight"], (N, K), scale=out["x.weight_scale"])
    torch.testing.assert_close(decoded, q.float() * scale[:, None], rtol=0, atol=0)
    # Without the plugin the same file is just an unquantized checkpoint: nothing applies.
    assert not migrate(tmp_path / "toy.safetensors", check=True).applied
