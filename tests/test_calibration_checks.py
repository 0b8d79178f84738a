"""One checker for a calibration file, used by every reader (the optimizers, the size budget,
--awq, --input-scale calibrated, verify): non-finite values, an H that is not positive
semi-definite, statistics whose lengths disagree are one sentence naming the layer and the file,
never a silent wrong choice or a traceback. And ``cq calibrate`` never saves such statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import cq_core
from cq_core.errors import CqError
from cq_core.io.calibration_file import CalibrationFile
try:
    from cq_core.io.calibration_file import check_statistics
except ImportError:  # before the checker existed
    check_statistics = None
from tests.cli_runner import run_cq
from tests.calibration_cases import BAD, COMMANDS, LAYERS, calibration_file, model, statistics  # noqa: F401
from tests.helpers import write_checkpoint

def nan_h(s):
    s["H"][:] = float("nan")


def negated_h(s):
    s["H"] = -s["H"]


def indefinite_h(s):  # a positive diagonal, but two channels "correlated" beyond 1
    h = torch.eye(128)
    h[0, 1] = h[1, 0] = 5.0
    s["H"] = h


def short_absmax(s):
    s["absmax"] = torch.ones(7)


def nan_absmax(s):
    s["absmax"][:] = float("nan")


def inf_sample(s):
    s["sample"][3, 5] = float("inf")


BROKEN = {
    "nan H": (nan_h, "NaN or Inf in H"),
    "negated H": (negated_h, "not positive semi-definite"),
    "indefinite H": (indefinite_h, "not positive semi-definite"),
    "short absmax": (short_absmax, "'absmax' has shape [7]"),
    "nan absmax": (nan_absmax, "NaN or Inf in absmax"),
    "inf sample": (inf_sample, "NaN or Inf in sample"),
}



@pytest.mark.parametrize("broken", list(BROKEN))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_convert_reader_refuses_broken_statistics_naming_the_layer(capsys, tmp_path, broken, command):
    change, words = BROKEN[broken]
    source = write_checkpoint(tmp_path / "model.safetensors", model())
    calib = calibration_file(tmp_path / "calib.safetensors", change)
    out = tmp_path / "out.safetensors"
    r = run_cq(capsys, "convert", source, "-o", out, "--model", "none", "--calibration", calib,
               *COMMANDS[command])
    assert r.code == 1, (r.code, r.out, r.err)
    assert r.err.startswith("cq: error: ") and r.err.count("\n") == 1, r.err
    assert "Traceback" not in r.err and f"Layer {BAD!r}" in r.err and str(calib) in r.err and words in r.err, r.err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_good_statistics_still_convert(capsys, tmp_path):
    source = write_checkpoint(tmp_path / "model.safetensors", model())
    calib = calibration_file(tmp_path / "calib.safetensors")
    for n, args in enumerate(COMMANDS.values()):
        r = run_cq(capsys, "convert", source, "-o", tmp_path / f"o{n}.safetensors", "--model", "none",
                   "--calibration", calib, "-q", *args)
        assert r.code == 0, (args, r.err)


@pytest.mark.parametrize("broken", ["nan H", "short absmax", "inf sample"])
def test_verify_refuses_broken_statistics_naming_the_layer(capsys, tmp_path, broken):
    change, words = BROKEN[broken]
    source = write_checkpoint(tmp_path / "model.safetensors", model())
    out = tmp_path / "out.safetensors"
    cq_core.convert(source, out, model="none")
    calib = calibration_file(tmp_path / "calib.safetensors", change)
    r = run_cq(capsys, "verify", source, out, "--calibration", calib)
    assert r.code == 1 and f"Layer {BAD!r}" in r.err and words in r.err and r.err.count("\n") == 1, r.err


def test_the_checker_takes_the_bounded_form_and_refuses_a_negative_diagonal(tmp_path):
    low = torch.randn(8, 32)
    good = {"H_lowrank": low, "H_diag": low.square().sum(0) * 1.5, "absmax": torch.ones(32)}
    check_statistics(good, "fc", "stats.safetensors")
    # a bfloat16 sketch that absorbed many runs has a diagonal a few percent below its own: accepted
    check_statistics({**good, "H_diag": low.square().sum(0) * 0.9}, "fc", "stats.safetensors")
    with pytest.raises(CqError, match="not positive semi-definite"):
        check_statistics({**good, "H_diag": -low.square().sum(0)}, "fc", "stats.safetensors")
    with pytest.raises(CqError, match="H_lowrank without H_diag"):
        check_statistics({"H_lowrank": low}, "fc", "stats.safetensors")
    with pytest.raises(CqError, match=r"weight has 64 input features"):
        check_statistics(good, "fc", "stats.safetensors", features=64)


@pytest.mark.slow
def test_a_budget_reads_the_bounded_form(capsys, tmp_path):
    """A size budget with statistics from 'cq calibrate --rank' (H_lowrank + H_diag, no H)."""
    source = write_checkpoint(tmp_path / "model.safetensors", model())
    tensors = {}
    for n, layer in enumerate(LAYERS):
        x = torch.randn(512, 128, generator=torch.Generator().manual_seed(n))
        low = torch.linalg.svd(x / 512 ** 0.5, full_matrices=False)[2][:16] * 1.0
        tensors[f"{layer}.H_lowrank"] = low.contiguous()
        tensors[f"{layer}.H_diag"] = (x.square().mean(0) + low.square().sum(0)).contiguous()
        tensors[f"{layer}.absmax"] = x.abs().amax(0)
    calib = tmp_path / "bounded.safetensors"
    save_file(tensors, str(calib))
    r = run_cq(capsys, "convert", source, "-o", tmp_path / "o.safetensors", "--model", "none",
               "--calibration", calib, "-q", *COMMANDS["budget"])
    assert r.code == 0, r.err


def test_calibration_file_get_checks_each_layer(tmp_path):
    calib = CalibrationFile(calibration_file(tmp_path / "calib.safetensors", nan_h))
    assert calib.get("blocks.1.fc1") is not None
    with pytest.raises(CqError, match=rf"Layer '{BAD}'.*NaN or Inf in H"):
        calib.get(BAD)


# -- cq calibrate never saves what a reader would refuse ------------------------------------------


BUILDER = """
import torch

def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1024, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))

def nan_data():
    x = torch.randn(4, 1024)
    x[1, 3] = float("nan")
    return [torch.randn(4, 1024), x]

def inf_data():
    x = torch.randn(4, 1024)
    x[0, 0] = float("inf")
    return [x]

def huge_data():   # finite, but its second moment (1e60) is beyond float32
    return [torch.full((4, 1024), 1e30)]

def large_data():  # finite, and so is its second moment (1e36), but sums of it overflow float32
    return [torch.full((64, 1024), 1e18) * torch.randn(64, 1024).sign() for _ in range(4)]
"""


@pytest.fixture
def builder(tmp_path) -> Path:
    path = tmp_path / "mymodel.py"
    path.write_text(BUILDER)
    return path


@pytest.mark.parametrize("data, words", [("nan_data", "NaN or Inf"), ("inf_data", "NaN or Inf"),
                                         ("huge_data", "float32")])
@pytest.mark.parametrize("rank", [None, "8"])
def test_calibrate_refuses_to_save_non_finite_statistics(capsys, tmp_path, builder, data, words, rank):
    out = tmp_path / "stats.safetensors"
    r = run_cq(capsys, "calibrate", "--model", f"{builder}:build", "--data", f"{builder}:{data}", "-o", out,
               *(("--rank", rank) if rank else ()))
    assert r.code == 1, (r.out, r.err)
    assert r.err.startswith("cq: error: ") and r.err.count("\n") == 1 and "layer '0'" in r.err.lower(), r.err
    assert words in r.err, r.err
    assert not out.exists()


@pytest.mark.slow
def test_a_bounded_bfloat16_sketch_merged_many_times_is_still_accepted(tmp_path):
    """The ComfyUI node adds every run to its file: the bf16 sketch drifts, and the file stays usable."""
    from cq_core.engine.capture import StatisticsCapture, run_batches
    from cq_core.numerics.second_moment import BOUNDED_SKETCH_DTYPE

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 4))
    basis = torch.randn(16, 64) * torch.logspace(2, -2, 16)[:, None]
    path = None
    for _ in range(40):
        capture = StatisticsCapture(rank=16, sketch_dtype=BOUNDED_SKETCH_DTYPE)
        if path is not None:
            capture.merge_file(path)
        run_batches(capture, model, [torch.randn(64, 16) @ basis])
        path = capture.save(tmp_path / "stats.safetensors")
    assert CalibrationFile(path).get("0") is not None


@pytest.mark.parametrize("rank", [None, "8"])
def test_calibrate_accumulates_where_float32_would_overflow(capsys, tmp_path, builder, rank):
    out = tmp_path / "stats.safetensors"
    r = run_cq(capsys, "calibrate", "--model", f"{builder}:build", "--data", f"{builder}:large_data", "-o", out,
               *(("--rank", rank) if rank else ()))
    assert r.code == 0, r.err
    stats = CalibrationFile(out).get("0")
    assert all(bool(torch.isfinite(v).all()) for v in stats.values())
    diag = stats["H"].diagonal() if "H" in stats else stats["H_diag"]
    assert torch.allclose(diag, torch.full_like(diag, 1e36), rtol=1e-3)
