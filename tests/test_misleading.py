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
from tests.conftest import small_model, write_checkpoint
from tests.test_meta import rewrite_metadata
from tests.test_migrate import legacy_fp8_file, load


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
