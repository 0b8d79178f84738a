"""Bad input is one clear sentence, a non-zero exit and no output: legacy scales,
per-layer JSON, and (in test_header_fuzz.py) headers generated field by field."""

from __future__ import annotations

import json

import pytest
import torch

import cq_core
from cq_core.errors import CqError
from cq_core.commands.migrate import migrate
from tests.cli_runner import run_cq
from tests.helpers import write_checkpoint

N, K = 32, 64


def _fp8_layer(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, K, generator=g) * 50).to(torch.float8_e4m3fn)


@pytest.mark.parametrize(
    "value,what", [(float("nan"), "NaN"), (-0.01, "a negative value"), (0.0, "zero"), (float("inf"), "Inf")]
)
@pytest.mark.parametrize("suffix", ["scale_weight", "scale_input"])
def test_a_legacy_scale_that_is_not_positive_and_finite_is_refused_by_name(capsys, tmp_path, value, what, suffix):
    tensors = {
        "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
        "a.weight": _fp8_layer(),
        "a.scale_weight": torch.tensor(0.01),
        "a.scale_input": torch.tensor(2.0),
    }
    tensors[f"a.{suffix}"] = torch.tensor(value)
    source = write_checkpoint(tmp_path / "legacy.safetensors", tensors)
    out = tmp_path / "out.safetensors"
    with pytest.raises(CqError, match=f"'a.{suffix}' holds {what}"):
        migrate(source, out)
    result = run_cq(capsys, "migrate", source, "-o", out)
    assert result.code == 1 and result.err.count("\n") == 1 and f"'a.{suffix}'" in result.err
    assert not out.exists()


def test_a_per_row_legacy_scale_with_one_bad_row_is_refused(tmp_path):
    scale = torch.full((N,), 0.01)
    scale[5] = float("nan")
    codes = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    source = write_checkpoint(tmp_path / "legacy.safetensors", {"a.weight": codes, "a.scale_weight": scale})
    with pytest.raises(CqError, match="'a.scale_weight' holds NaN"):
        migrate(source, tmp_path / "out.safetensors")


# -- per-layer JSON: one parser, one sentence, and a repair that works ---------------------------

LAYER = "blocks.0.mlp.fc1"
HEADER_KEY = "_quantization_metadata"


@pytest.fixture
def quantized(capsys, tmp_path, model_file):
    out = tmp_path / "q.safetensors"
    assert run_cq(capsys, "convert", model_file, "-o", out).code == 0
    return out


def _rewrite(path, out, *, tensor_json: bytes | None = None, header_layer=None, header_raw: str | None = None,
             comfy_quant: torch.Tensor | None = None):
    """A copy of ``path`` with LAYER's carriers replaced (by the reference writer)."""
    from safetensors.torch import load_file
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
    if tensor_json is not None:
        tensors[f"{LAYER}.comfy_quant"] = torch.frombuffer(bytearray(tensor_json), dtype=torch.uint8)
    if comfy_quant is not None:
        tensors[f"{LAYER}.comfy_quant"] = comfy_quant
    if header_layer is not None:
        body = json.loads(metadata[HEADER_KEY])
        body["layers"][LAYER] = header_layer
        metadata[HEADER_KEY] = json.dumps(body)
    if header_raw is not None:
        metadata[HEADER_KEY] = header_raw
    write_checkpoint(out, tensors, metadata)
    return out


BAD_JSON = {
    "not JSON": b'{"format": "float8_e4m3fn"',
    "5000-digit integer": b'{"format": "float8_e4m3fn", "group_size": ' + b"9" * 5000 + b"}",
    "not an object": b"[1, 2]",
    "no format": b'{"full_precision_matrix_mult": true}',
    "format not a string": b'{"format": ["float8_e4m3fn"]}',
    "flag not a bool": b'{"format": "float8_e4m3fn", "full_precision_matrix_mult": "yes"}',
    "lone surrogate": b'{"format": "float8_e4m3fn", "note": "\\ud800"}',
    "not UTF-8": b'{"format": "\xff"}',
    "deep nesting": b'{"format": "float8_e4m3fn", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
}
#: The commands that only read a quantized file: (path, its source) -> arguments.
READERS = (
    lambda path, source: ("inspect", path),
    lambda path, source: ("meta", "show", path),
    lambda path, source: ("verify", source, path),
    lambda path, source: ("migrate", path, "--check"),
)
VERIFY = READERS[2]


def _suggested_command(err: str, output) -> list[str]:
    """The cq command an error message suggests, with OUTPUT filled in."""
    import shlex

    command = err.split("with: cq ", 1)[1].strip()
    return [arg.replace("OUTPUT", str(output)) for arg in shlex.split(command)]


def _run_reader(capsys, command, path, source):
    return run_cq(capsys, *command(path, source))


def _assert_one_line_error(result, *needles):
    assert result.code != 0
    assert result.err.count("\n") == 1 and result.err.startswith("cq: error: "), result.err
    assert "Traceback" not in result.err
    for needle in needles:
        assert needle in result.err, (needle, result.err)


@pytest.mark.parametrize("kind", list(BAD_JSON))
def test_a_bad_comfy_quant_tensor_is_one_sentence_everywhere_and_meta_sync_repairs_it(
    capsys, tmp_path, model_file, quantized, kind
):
    bad = _rewrite(quantized, tmp_path / "bad.safetensors", tensor_json=BAD_JSON[kind])
    for command in READERS:
        _assert_one_line_error(_run_reader(capsys, command, bad, model_file), f"'{LAYER}.comfy_quant'")
    refused = run_cq(capsys, "migrate", bad, "-o", tmp_path / "m.safetensors")
    _assert_one_line_error(refused, "--from header")
    assert not (tmp_path / "m.safetensors").exists()
    repaired = tmp_path / "repaired.safetensors"
    fixed = run_cq(capsys, *_suggested_command(refused.err, repaired))
    assert fixed.code == 0, fixed.err
    for command in READERS:
        assert _run_reader(capsys, command, repaired, model_file).code == 0


@pytest.mark.parametrize("kind", ["not an object", "no format", "format not a string", "lone surrogate"])
def test_a_bad_header_entry_is_repaired_from_the_tensors(capsys, tmp_path, model_file, quantized, kind):
    config = json.loads(BAD_JSON[kind].decode())
    bad = _rewrite(quantized, tmp_path / "bad.safetensors", header_layer=config)
    for command in READERS:
        _assert_one_line_error(_run_reader(capsys, command, bad, model_file), f"layer '{LAYER}'")
    refused = run_cq(capsys, "migrate", bad, "-o", tmp_path / "m.safetensors")
    _assert_one_line_error(refused, "--from tensors")
    repaired = tmp_path / "repaired.safetensors"
    assert run_cq(capsys, *_suggested_command(refused.err, repaired)).code == 0
    assert _run_reader(capsys, VERIFY, repaired, model_file).code == 0


@pytest.mark.parametrize("raw", ["{not json", "[]", '{"layers": []}', '{"layers": {}, "x": ' + "9" * 5000 + "}"])
def test_a_bad_header_carrier_is_rebuilt_from_the_tensors(capsys, tmp_path, model_file, quantized, raw):
    bad = _rewrite(quantized, tmp_path / "bad.safetensors", header_raw=raw)
    for command in READERS:
        _assert_one_line_error(_run_reader(capsys, command, bad, model_file), HEADER_KEY)
    refused = run_cq(capsys, "migrate", bad, "-o", tmp_path / "m.safetensors")
    repaired = tmp_path / "repaired.safetensors"
    assert run_cq(capsys, *_suggested_command(refused.err, repaired)).code == 0
    assert _run_reader(capsys, VERIFY, repaired, model_file).code == 0


def test_both_carriers_bad_is_repaired_with_meta_set(capsys, tmp_path, model_file, quantized):
    bad = _rewrite(quantized, tmp_path / "bad.safetensors", tensor_json=b"{", header_layer=[1])
    refused = run_cq(capsys, "migrate", bad, "-o", tmp_path / "m.safetensors")
    _assert_one_line_error(refused, "cq meta set")
    repaired = tmp_path / "repaired.safetensors"
    command = [a.replace("FORMAT", "float8_e4m3fn") for a in _suggested_command(refused.err, repaired)]
    fixed = run_cq(capsys, *command)
    assert fixed.code == 0, fixed.err
    assert _run_reader(capsys, VERIFY, repaired, model_file).code == 0
    # Syncing from a carrier that is itself bad says so, and what to do instead.
    failed = run_cq(capsys, "meta", "sync", bad, "-o", tmp_path / "s.safetensors")
    _assert_one_line_error(failed, "cq meta set")
    assert not (tmp_path / "s.safetensors").exists()


def test_a_comfy_quant_tensor_of_another_dtype_is_named(capsys, tmp_path, model_file, quantized):
    bad = _rewrite(quantized, tmp_path / "bad.safetensors", comfy_quant=torch.tensor([1.5, 1e9]))
    _assert_one_line_error(run_cq(capsys, "inspect", bad), f"'{LAYER}.comfy_quant' is F32[2]")


@pytest.mark.parametrize(
    "header", ['{"format_version": "1.0", "layers": {"blocks.0.mlp.fc1": {"format": "nvfp4"}}}', "{nope"]
)
def test_convert_never_copies_the_inputs_quantization_header(capsys, tmp_path, header):
    from tests.helpers import small_model

    source = write_checkpoint(tmp_path / "src.safetensors", small_model(), {HEADER_KEY: header, "kept": "yes"})
    out = tmp_path / "out.safetensors"
    # Every layer kept in high precision: a copied header would label F32 weights nvfp4.
    assert run_cq(capsys, "convert", source, "-o", out, "-x", ".", "-q").code == 0
    info = json.loads(run_cq(capsys, "inspect", out, "--json").out)
    assert info["quantized_layers"] == 0 and not info["carriers"]["header"] and "kept" in info["metadata_keys"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1"])
@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "nvfp4"])
def test_an_activation_scale_option_that_cannot_scale_is_a_usage_error(capsys, tmp_path, model_file, fmt, value):
    out = tmp_path / "x.safetensors"
    result = run_cq(capsys, "convert", model_file, "-f", fmt, "-O", f"input_scale={value}", "-o", out)
    assert result.code == 2 and "input_scale" in result.err and len(result.err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("value", [float("nan"), 0.0, -1.0, float("inf")])
def test_verify_and_migrate_refuse_a_stored_activation_scale_that_cannot_scale(tmp_path, model_file, value):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from cq_core.commands.migrate import migrate
    from cq_core.commands.verify import verify

    out = tmp_path / "q.safetensors"
    cq_core.convert(model_file, out, format="float8_e4m3fn")
    with safe_open(str(out), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    layer = "blocks.0.attn.qkv"
    tensors[f"{layer}.input_scale"] = torch.tensor(value)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    check = next(c for c in verify(model_file, bad).layers if c.layer == layer)
    assert not check.ok and any("activation scale must be positive and finite" in p for p in check.problems)
    report = migrate(bad, check=True)
    assert any(n.kind == "refused" and n.subject == layer for n in report.notes)
