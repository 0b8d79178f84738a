"""Outputs that told a user something untrue or unhelpful (issue 27, items 7-9): each case says
what is so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cq_core
from cq_core.commands.inspect import inspect_checkpoint
from tests.cli_runner import run_cq
from tests.helpers import legacy_fp8_file, load, rewrite_metadata, small_model, write_checkpoint


# -- cq inspect ---------------------------------------------------------------------------------


@pytest.fixture
def fp8_file(tmp_path, model_file) -> Path:
    out = tmp_path / "fp8.safetensors"
    cq_core.convert(model_file, out, model="none")
    return out


def header_of(path: Path) -> dict:
    return json.loads(load(path)[1]["_quantization_metadata"])["layers"]


@pytest.mark.parametrize("renamed", ["all", "one"])
def test_inspect_never_says_agree_when_header_names_are_not_weights_of_the_file(capsys, tmp_path, fp8_file, renamed):
    """A prefix mismatch: the header names layers the file does not have, so ComfyUI finds no
    metadata for the weights there are and uses their FP8 codes unscaled."""
    layers = header_of(fp8_file)
    first = sorted(layers)[0]
    moved = {(f"model.diffusion_model.{k}" if renamed == "all" or k == first else k): v for k, v in layers.items()}
    bad = rewrite_metadata(fp8_file, tmp_path / "bad.safetensors", header=moved, tensors=None)
    info = inspect_checkpoint(bad)
    wrong = sorted(k for k in moved if k.startswith("model.diffusion_model."))
    assert info["carriers"]["agree"] is False
    assert info["carriers"]["layers_without_weight"] == wrong
    r = run_cq(capsys, "inspect", bad)
    assert r.code == 0, r.err
    metadata_line = next(line for line in r.out.splitlines() if line.startswith("metadata:"))
    assert "agree" not in metadata_line, metadata_line
    count = "none of the header's 3 layer names" if renamed == "all" else "1 of the header's 3 layer names"
    assert count in metadata_line and repr(wrong[0]) in metadata_line, metadata_line
    says = "is a weight in this file" if renamed == "all" else "name no weight in this file"  # never "1 ... is a weight"
    assert says in metadata_line and (renamed == "all" or "is a weight" not in metadata_line), metadata_line
    # a file whose header matches still agrees
    good = run_cq(capsys, "inspect", fp8_file)
    assert "; agree" in good.out


def test_inspect_of_a_legacy_scaled_fp8_file_names_the_layout_and_cq_migrate(capsys, tmp_path):
    legacy = tmp_path / "legacy.safetensors"
    legacy_fp8_file(legacy)
    r = run_cq(capsys, "inspect", legacy)
    assert r.code == 0, r.err
    assert "quantized layers: none" not in r.out, r.out
    line = next(line for line in r.out.splitlines() if line.startswith("quantized layers"))
    assert "legacy" in line and "scaled_fp8" in line and "cq migrate" in line, line
    assert inspect_checkpoint(legacy)["legacy_layouts"] == {"scaled_fp8": "marker tensor 'scaled_fp8'"}


def test_inspect_of_cqs_own_calibration_file_says_what_it_is(capsys, tmp_path):
    from cq_core.engine.capture import StatisticsCapture, run_batches

    capture = StatisticsCapture()
    run_batches(capture, torch.nn.Sequential(torch.nn.Linear(8, 4)), [torch.randn(3, 8)])
    path = capture.save(tmp_path / "stats.safetensors")
    r = run_cq(capsys, "inspect", path)
    assert r.code == 0, r.err
    assert "another tool" not in r.out, r.out
    assert "calibration statistics of 1 Linear layer" in r.out and "cq calibrate" in r.out, r.out
    assert inspect_checkpoint(path)["calibration"] == {"layers": 1, "rows": {"0": 3}}


# -- item 8 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "NaN", "-nan"])
def test_verify_refuses_a_min_sqnr_that_is_not_a_number(capsys, fp8_file, model_file, value):
    r = run_cq(capsys, "verify", model_file, fp8_file, "--min-sqnr", value)
    assert r.code == 2 and "--min-sqnr" in r.err and r.err.count("\n") == 1, r.err


USER_CODE = """
import sys, torch

def build_exits():
    sys.exit(0)

def build():
    return torch.nn.Sequential(torch.nn.Linear(4, 2))

def data_exits():
    raise SystemExit(0)

def batches_exit():
    yield torch.randn(2, 4)
    sys.exit(0)

class Exits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)
    def forward(self, x):
        self.fc(x)
        sys.exit(3)

def build_forward_exits():
    return Exits()

def data():
    return [torch.randn(2, 4)]
"""


@pytest.mark.parametrize("model, data, what", [
    ("build_exits", "data", "--model"), ("build", "data_exits", "--data"), ("build", "batches_exit", "batch 2"),
    ("build_forward_exits", "data", "batch 1"),
])
def test_user_code_calling_sys_exit_in_calibrate_is_an_error_not_a_silent_success(capsys, tmp_path, model, data,
                                                                                  what):
    code = tmp_path / "usercode.py"
    code.write_text(USER_CODE)
    out = tmp_path / "stats.safetensors"
    r = run_cq(capsys, "calibrate", "--model", f"{code}:{model}", "--data", f"{code}:{data}", "-o", out)
    assert r.code == 1, (r.code, r.err)
    assert "sys.exit" in r.err and what in r.err and r.err.count("\n") == 1, r.err
    assert not out.exists()


def test_verify_with_source_and_quant_swapped_suggests_the_swap(capsys, fp8_file, model_file):
    r = run_cq(capsys, "verify", fp8_file, model_file)
    assert r.code == 1 and "swap" in r.err and r.err.count("\n") == 1, r.err
    assert f"cq verify {model_file} {fp8_file}" in r.err, r.err


def test_an_index_whose_shard_is_another_index_says_so(capsys, tmp_path):
    (tmp_path / "outer.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a.weight": "inner.safetensors.index.json"}}))
    (tmp_path / "inner.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a.weight": "x.safetensors"}}))
    r = run_cq(capsys, "inspect", tmp_path / "outer.safetensors.index.json")
    assert r.code == 1 and "byte header" not in r.err and "7017841271895827067" not in r.err, r.err
    assert "inner.safetensors.index.json" in r.err and "index" in r.err and r.err.count("\n") == 1, r.err
    # a text file given as a checkpoint says it is text, not a huge header
    (tmp_path / "notes.safetensors").write_text('{"hello": "world"}\n' * 10)
    r = run_cq(capsys, "inspect", tmp_path / "notes.safetensors")
    assert r.code == 1 and "byte header" not in r.err and "text" in r.err, r.err


# -- item 9 ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_forged_20mb_format_string_is_cut_in_every_message(capsys, tmp_path, fp8_file, model_file):
    layers = header_of(fp8_file)
    huge = "x" * 20_000_000
    forged = {k: {**v, "format": huge} for k, v in layers.items()}
    bad = rewrite_metadata(fp8_file, tmp_path / "bad.safetensors", header=forged, tensors=forged)
    for args in (("inspect", bad), ("verify", model_file, bad), ("migrate", bad, "--check"), ("meta", "show", bad),
                 ("convert", bad, "--dry-run"), ("meta", "set", bad, "full_precision_matrix_mult=true", "-o",
                                                 tmp_path / "m.safetensors")):
        r = run_cq(capsys, *args)
        longest = max(map(len, (r.out + r.err).splitlines()), default=0)
        assert longest < 5000, (args, longest, r.err[:300])
    r = run_cq(capsys, "convert", model_file, "--dry-run", "-f", "y" * 1_000_000)
    assert r.code == 2 and len(r.err) < 1000, len(r.err)
    r = run_cq(capsys, "convert", model_file, "--dry-run", "--layer", "z" * 1_000_000 + "=skip", "-q")
    assert len(r.err) < 1000 and len(r.out) < 1000, (len(r.err), len(r.out))


DIGITS = "9" * 5000


def test_pythons_advice_never_reaches_a_message(capsys, tmp_path, model_file, fp8_file):
    import struct

    header = ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,' + DIGITS + ']}}').encode()
    big = tmp_path / "bigint.safetensors"
    big.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'format = "int8_blockwise"\n[format_options]\nblock_size = {DIGITS}\n')
    config = tmp_path / "layers.toml"
    config.write_text(f'[layers]\n"fc" = {{ format = "int8_blockwise", block_size = {DIGITS} }}\n')
    runs = [
        ("inspect", big),
        ("convert", model_file, "--dry-run", "--recipe", recipe),
        ("convert", model_file, "--dry-run", "--layer-config", config),
        ("convert", model_file, "--dry-run", "-f", "int8_blockwise", "-O", f"block_size={DIGITS}"),
        ("convert", model_file, "--dry-run", "--max-shard-size", f"{DIGITS}KB"),
        ("convert", model_file, "--dry-run", "--target-size", DIGITS),
        ("meta", "set", fp8_file, f"group_size={DIGITS}", "-o", tmp_path / "m.safetensors"),
    ]
    for args in runs:
        r = run_cq(capsys, *args)
        assert r.code in (1, 2), (args[:2], r.code, r.err[:300])
        assert "set_int_max_str_digits" not in r.err and "Traceback" not in r.err, (args[:2], r.err[:500])
        assert r.err.count("\n") == 1 and len(r.err) < 1000, (args[:2], r.err[:500])


@pytest.mark.parametrize("value", ["99999999999999999999", "9223372036854775808", "-99999999999999999999"])
def test_an_absurd_integer_option_is_refused_naming_it(capsys, model_file, value):
    r = run_cq(capsys, "convert", model_file, "--dry-run", "-f", "int8_blockwise", "-O", f"block_size={value}")
    assert r.code == 2 and "block_size" in r.err and "preset" not in r.err and r.err.count("\n") == 1, r.err


def budget_model(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    return write_checkpoint(tmp_path / "model.safetensors", {
        f"blocks.{i}.fc.weight": torch.randn(128, 256, generator=g).to(torch.bfloat16) for i in range(6)})


def test_a_budgets_output_is_named_after_the_budget_and_records_no_format_it_did_not_use(capsys, tmp_path):
    src = budget_model(tmp_path)
    r = run_cq(capsys, "convert", src, "--bits-per-weight", "5", "--formats", "nvfp4,float8_e4m3fn,bf16",
               "--model", "none", "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    out = Path(report["output"])
    assert out.name == "model-5bpw.safetensors", out
    chosen = set(report["budget"]["choices"].values())
    assert "nvfp4" in chosen
    assert "format" not in report["recipe"]["recipe"], report["recipe"]["recipe"]
    again = run_cq(capsys, "convert", src, "--recipe-from", out, "-o", tmp_path / "again.safetensors", "--model",
                   "none")
    assert again.code == 0 and (tmp_path / "again.safetensors").read_bytes() == out.read_bytes(), again.err
    sized = run_cq(capsys, "convert", src, "--target-size", "200KB", "--formats", "nvfp4,bf16", "--model", "none",
                   "--dry-run")
    assert "model-200KB.safetensors" in sized.out, sized.out
    # --format given by the user is theirs to record
    named = run_cq(capsys, "convert", src, "-f", "nvfp4", "--bits-per-weight", "5", "--formats", "nvfp4,bf16",
                   "--model", "none", "--json", "-o", tmp_path / "n.safetensors")
    assert json.loads(named.out)["recipe"]["recipe"]["format"] == "nvfp4"


def test_gptq_on_fewer_calibration_rows_than_inputs_says_it_overfits(capsys, tmp_path):
    from cq_core.engine.capture import StatisticsCapture, run_batches

    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(512, 64)
    src = write_checkpoint(tmp_path / "model.safetensors", {"0.weight": layer.weight.detach().clone()})
    capture = StatisticsCapture()
    run_batches(capture, torch.nn.Sequential(layer), [torch.randn(32, 512, generator=g)])
    stats = capture.save(tmp_path / "stats.safetensors")
    r = run_cq(capsys, "convert", src, "-o", tmp_path / "o.safetensors", "-f", "nvfp4", "--optimizer", "gptq",
               "--calibration", stats, "--model", "none")
    assert r.code == 0, r.err
    row = next(line for line in r.out.splitlines() if line.startswith("0.weight"))
    assert "32 calibration rows for 512 inputs" in row and "overfit" in row, row
    enough = StatisticsCapture()
    run_batches(enough, torch.nn.Sequential(layer), [torch.randn(1024, 512, generator=g)])
    r = run_cq(capsys, "convert", src, "-o", tmp_path / "p.safetensors", "-f", "nvfp4", "--optimizer", "gptq",
               "--calibration", enough.save(tmp_path / "enough.safetensors"), "--model", "none")
    assert "overfit" not in r.out, r.out


def test_cq_version(capsys):
    r = run_cq(capsys, "--version")
    assert r.code == 0 and r.out.startswith("cq ") and "cq-core 0.1.0" in r.out, (r.out, r.err)


def test_a_dry_run_names_the_output_it_would_write(capsys, model_file, tmp_path):
    r = run_cq(capsys, "convert", model_file, "--dry-run")
    assert r.code == 0 and f"would write {tmp_path / 'model-float8_e4m3fn.safetensors'}" in r.out, r.out
    q = run_cq(capsys, "convert", model_file, "--dry-run", "-q", "-o", tmp_path / "x.safetensors")
    assert f"would write {tmp_path / 'x.safetensors'}" in q.out, q.out
    assert json.loads(run_cq(capsys, "convert", model_file, "--dry-run", "--json").out)["would_write"] == \
        str(tmp_path / "model-float8_e4m3fn.safetensors")


@pytest.mark.parametrize("threads", ["100000", "1025"])
def test_threads_are_bounded(capsys, model_file, threads):
    r = run_cq(capsys, "convert", model_file, "--dry-run", "--threads", threads)
    assert r.code == 2 and "--threads" in r.err and "1024" in r.err, r.err


def test_docs_link_only_inside_the_repository():
    root = Path(__file__).resolve().parents[1]
    import re

    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)", text) + re.findall(r"`(\.\./[^`]+)`", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            resolved = (doc.parent / target).resolve()
            assert resolved.is_relative_to(root), f"{doc.name} links outside the repository: {target}"
            assert resolved.exists(), f"{doc.name} links to a missing file: {target}"
