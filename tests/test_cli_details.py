"""Small things a user trips on: quiet output, terminal width, parameter counts,
sharded -o, free-space units, what calibrate runs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import cq_core
from cq_core.errors import CqError
from cq_core.commands.inspect import inspect_checkpoint
from tests.cli_runner import run_cq
from tests.helpers import small_model, write_checkpoint


def test_quiet_prints_one_summary_line(capsys, model_file, tmp_path):
    out = tmp_path / "o.safetensors"
    result = run_cq(capsys, "convert", model_file, "-o", out, "-q")
    assert result.code == 0, result.err
    [line] = result.out.splitlines()
    assert line.startswith(f"wrote {out}: 3 layers quantized to float8_e4m3fn, mean SQNR ")
    dry = run_cq(capsys, "convert", model_file, "--dry-run", "-q")
    assert dry.code == 0 and len(dry.out.splitlines()) == 1 and "would be quantized" in dry.out


def test_models_fits_the_terminal_and_json_keeps_the_full_text(capsys, monkeypatch, registry):
    monkeypatch.setenv("COLUMNS", "80")
    text = run_cq(capsys, "models").out
    assert max(len(line) for line in text.splitlines()) <= 80
    longest = max(registry.model_filters.values(), key=lambda p: len(p.help))
    assert len(longest.help) > 80  # the case this guards: a help text longer than the terminal
    assert " ".join(longest.help.split()[:4]) in text
    rows = json.loads(run_cq(capsys, "models", "--json").out)
    assert {r["name"]: r["help"] for r in rows}[longest.name] == longest.help


def _unpadded_model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "blocks.0.mlp.fc1.weight": torch.randn(256, 128, generator=g).to(torch.bfloat16),
        "blocks.0.mlp.fc1.bias": torch.randn(256, generator=g).to(torch.bfloat16),
        "blocks.0.mlp.fc2.weight": torch.randn(128, 256, generator=g).to(torch.bfloat16),
        "blocks.0.norm.weight": torch.ones(128, dtype=torch.bfloat16),
    }


@pytest.mark.parametrize("fmt", ["nvfp4", "convrot_w4a4", "float8_e4m3fn", "int8_blockwise"])
def test_inspect_counts_logical_parameters_not_packed_bytes(tmp_path, fmt):
    source = write_checkpoint(tmp_path / "m.safetensors", _unpadded_model())
    out = tmp_path / "q.safetensors"
    report = cq_core.convert(source, out, format=fmt, model="none")
    assert len(report.quantized) == 2
    expected = sum(t.numel() for t in _unpadded_model().values())
    assert inspect_checkpoint(source)["params"] == expected
    assert inspect_checkpoint(out)["params"] == expected


def test_sharded_output_says_where_o_went(capsys, model_file, tmp_path):
    result = run_cq(capsys, "convert", model_file, "-o", tmp_path / "o.safetensors", "--max-shard-size", "30KB",
                    "-q", "--model", "none")
    assert result.code == 0, result.err
    index = tmp_path / "o.safetensors.index.json"
    assert index.exists()
    assert f"-o {tmp_path / 'o.safetensors'} was written as {index}" in result.err
    named = run_cq(capsys, "convert", model_file, "-o", tmp_path / "p.safetensors.index.json",
                   "--max-shard-size", "30KB", "-q", "--model", "none")
    assert named.code == 0 and named.err == ""


def test_free_space_refusal_shows_the_real_difference(tmp_path, monkeypatch):
    source = write_checkpoint(tmp_path / "m.safetensors", small_model())
    free = 10 * 2**20  # 10 MiB free: less than the 16 MiB margin, far more than the output
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - free, free))
    with pytest.raises(CqError) as caught:
        cq_core.convert(source, tmp_path / "out.safetensors")
    message = str(caught.value)
    assert "0.00" not in message
    assert " KB (and 16.78 MB to spare) but only 10.49 MB is free" in message


def test_calibrate_help_says_it_runs_the_code_it_is_given(capsys):
    help_text = " ".join(run_cq(capsys, "calibrate", "--help").out.split())
    assert "imports the modules or files that --model and --data name and runs their code" in help_text
    assert "only code you trust" in help_text


def test_a_run_that_quantizes_nothing_says_so_with_the_reason(capsys, tmp_path, model_file):
    out = tmp_path / "x.safetensors"
    result = run_cq(capsys, "convert", model_file, "-f", "int8_blockwise", "-O", "block_size=100", "-o", out, "-q")
    assert result.code == 0 and out.exists()
    warnings = [line for line in result.err.splitlines() if "no layer was quantized" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: no layer was quantized to int8_blockwise (e.g. ")
    assert "multiples of block_size 100" in warnings[0]
    # A budget with room for everything in bf16 says that, not a layer's reason.
    roomy = run_cq(capsys, "convert", model_file, "-f", "nvfp4", "--target-size", "1GB", "-o", tmp_path / "y.safetensors", "-q")
    assert roomy.code == 0, roomy.err
    assert "warning: the size budget (1.00 GB) holds every layer it chooses for in bf16" in roomy.err
    assert "wrote " in roomy.out and "no layer quantized, mean SQNR n/a, " in roomy.out
    # The dry run, where a user checks, says the same, and -q keeps its one line.
    dry = run_cq(capsys, "convert", model_file, "-f", "nvfp4", "--target-size", "1GB", "--dry-run", "-q")
    assert dry.code == 0 and dry.out.startswith("no layer would be quantized; ") and len(dry.out.splitlines()) == 1
    assert "so none would be quantized and the output would hold the input's tensors unchanged" in dry.err


def test_output_bytes_are_the_file_on_disk_predicted_exactly_by_a_dry_run(tmp_path, model_file):
    """Header included, as the input's size is: the dry run's figure is the written file's."""
    planned = cq_core.convert(model_file, tmp_path / "o.safetensors", format="nvfp4", dry_run=True)
    written = cq_core.convert(model_file, tmp_path / "o.safetensors", format="nvfp4")
    size = (tmp_path / "o.safetensors").stat().st_size
    assert planned.output_bytes == written.output_bytes == size
    planned = cq_core.convert(model_file, tmp_path / "s.safetensors", format="nvfp4", max_shard_size=4096, dry_run=True)
    sharded = cq_core.convert(model_file, tmp_path / "s.safetensors", format="nvfp4", max_shard_size=4096)
    shards = [p for p in tmp_path.iterdir() if p.name.startswith("s-")]
    assert len(shards) > 1 and planned.output_bytes == sharded.output_bytes == sum(p.stat().st_size for p in shards)
