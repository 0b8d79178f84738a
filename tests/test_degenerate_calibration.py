"""Calibration statistics of degenerate but real shapes, which pass the one checker
(:func:`cq_core.io.calibration_file.check_statistics`), through every reader (the size budget,
gptq, learned, --awq, --input-scale calibrated, verify): never a traceback.

- A dead layer (every input zero: H, absmax, absmean and sample all zero) converts; with
  ``--input-scale calibrated`` it keeps the unit ``input_scale`` 1.0 (FP8's default) and its
  report line says why.
- A sample of no rows, (0, K) (what ``cq calibrate`` keeps for a layer that saw no input), is a
  missing sample: the readers that need one refuse in one sentence naming the layer, the others
  do without it.
- A bounded form of rank 0 (``H_lowrank`` (0, K) beside ``H_diag``) is a diagonal H.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import cq_core
from tests.cli_runner import run_cq
from tests.helpers import write_checkpoint
from tests.calibration_cases import BAD, COMMANDS, calibration_file, model


def dead_layer(s):
    for key in s:
        s[key] = torch.zeros_like(s[key])


def empty_sample(s):
    s["sample"] = s["sample"][:0].clone()


def rank_zero(s):
    s["H_diag"] = s.pop("H").diagonal().clone()
    s["H_lowrank"] = torch.zeros(0, s["H_diag"].shape[0])


ACTIVATION_COMMANDS = {
    "fp8 input_scale": ("-f", "float8_e4m3fn", "--input-scale", "calibrated"),
    "nvfp4 input_scale": ("-f", "nvfp4", "--input-scale", "calibrated"),
    "nvfp4 awq input_scale": ("-f", "nvfp4", "--awq", "--input-scale", "calibrated"),
}
ALL_COMMANDS = {**COMMANDS, **ACTIVATION_COMMANDS}


def convert(capsys, tmp_path, change, args):
    source = write_checkpoint(tmp_path / "model.safetensors", model())
    calib = calibration_file(tmp_path / "calib.safetensors", change)
    out = tmp_path / "out.safetensors"
    return run_cq(capsys, "convert", source, "-o", out, "--model", "none", "--calibration", calib, *args), out


@pytest.mark.parametrize("command", list(ALL_COMMANDS))
def test_a_dead_layer_converts(capsys, tmp_path, command):
    r, out = convert(capsys, tmp_path, dead_layer, ALL_COMMANDS[command])
    assert r.code == 0 and "Traceback" not in r.err, (r.out, r.err)
    if "--input-scale" in ALL_COMMANDS[command]:
        with safe_open(str(out), framework="pt") as f:
            assert float(f.get_tensor(f"{BAD}.input_scale")) == 1.0
            assert 0 < float(f.get_tensor("blocks.1.fc1.input_scale")) < 1  # a live layer is calibrated
        line = next(line for line in r.out.splitlines() if line.startswith(f"{BAD}.weight"))
        assert "input_scale 1 (no nonzero input in calibration" in line and "nan" not in line, line


@pytest.mark.parametrize("command", list(ALL_COMMANDS))
def test_an_empty_sample_is_a_missing_sample(capsys, tmp_path, command):
    args = ALL_COMMANDS[command]
    r, out = convert(capsys, tmp_path, empty_sample, args)
    assert "Traceback" not in r.err, r.err
    if "--awq" in args or "--input-scale" in args:
        assert r.code == 2 and r.err.count("\n") == 1, (r.code, r.err)
        assert f"Layer {BAD!r}" in r.err and f"'{BAD}.sample' with at least one row" in r.err, r.err
        assert not out.exists()
    else:
        assert r.code == 0, (r.out, r.err)


def test_verify_takes_an_empty_sample_as_none(capsys, tmp_path):
    source = write_checkpoint(tmp_path / "model.safetensors", model())
    out = tmp_path / "out.safetensors"
    cq_core.convert(source, out, model="none", format="nvfp4")
    calib = calibration_file(tmp_path / "calib.safetensors", empty_sample)
    r = run_cq(capsys, "verify", source, out, "--calibration", calib)
    assert r.code == 0 and "Traceback" not in r.err, (r.out, r.err)


@pytest.mark.parametrize("command", ["budget", "gptq", "learned"])
def test_a_rank_zero_bounded_form_converts(capsys, tmp_path, command):
    r, _ = convert(capsys, tmp_path, rank_zero, COMMANDS[command])
    assert r.code == 0 and "Traceback" not in r.err, (r.out, r.err)


def tiny_inputs(s):  # inputs so small that every candidate scale is below float32's normal range
    for key in ("H", "absmax", "absmean", "sample"):
        s[key] = s[key] * 1e-44 if key != "H" else s[key] * 0


@pytest.mark.parametrize("command", list(ACTIVATION_COMMANDS))
def test_inputs_below_float32s_normal_range_keep_the_unit_scale_never_zero(capsys, tmp_path, command):
    # absmax 1e-45 gave input_scale 0.0 (ComfyUI divides activations by it)
    r, out = convert(capsys, tmp_path, tiny_inputs, ACTIVATION_COMMANDS[command])
    assert r.code == 0 and "Traceback" not in r.err, (r.out, r.err)
    with safe_open(str(out), framework="pt") as f:
        assert float(f.get_tensor(f"{BAD}.input_scale")) == 1.0
