"""Bounded calibration statistics: the sketch, its file form, merging runs, and the optimizers reading it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from cq_core import OptimizeContext, StatisticsCapture
from cq_core.builtin.rounding_objective import hessian_from_stats
from cq_core.io.calibration_file import CalibrationFile, load_statistics
from cq_core.errors import CqError
from cq_core.numerics.second_moment import SecondMoment, capture_bytes, dense_second_moment, stored_bytes


def correlated_rows(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Rows with a few strong directions (activation outliers) over a broad spectrum."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(k, k, generator=g)
    scales = torch.logspace(1.5, -1, k)
    return (torch.randn(n, k, generator=g) * scales) @ basis / k**0.5


def test_small_inputs_keep_the_exact_second_moment():
    x = correlated_rows(300, 24)
    moment = SecondMoment(24, rank=32)  # K <= rank: exact
    moment.add(x[:100])
    moment.add(x[100:].reshape(20, 10, 24))
    torch.testing.assert_close(moment.result()["H"], (x.double().T @ x.double() / 300).float())


def test_the_sketch_is_low_rank_plus_the_exact_diagonal_and_never_overestimates():
    x = correlated_rows(2000, 96)
    h = x.double().T @ x.double() / 2000
    moment = SecondMoment(96, rank=16)
    for start in range(0, 2000, 333):  # uneven chunks
        moment.add(x[start : start + 333])
    stored = moment.result()
    assert set(stored) == {"H_lowrank", "H_diag"} and stored["H_lowrank"].shape == (16, 96)
    approx = dense_second_moment(stored).double()
    torch.testing.assert_close(approx.diagonal(), h.diagonal(), rtol=1e-5, atol=1e-6)
    # What the sketch drops is positive semi-definite: H - LᵀL >= 0.
    low = stored["H_lowrank"].double()
    assert torch.linalg.eigvalsh(h - low.T @ low).min() > -1e-4 * h.diagonal().mean()
    # It holds the dominant directions: the best rank-16 matrix errs as little, within 10 per cent.
    values, vectors = torch.linalg.eigh(h)
    best = (vectors[:, -16:] * values[-16:]) @ vectors[:, -16:].T
    off = ~torch.eye(96, dtype=torch.bool)
    assert (approx - h)[off].norm() < 1.1 * (best - h)[off].norm()
    assert moment.nbytes() == capture_bytes(96, 16) and stored_bytes(96, 16) == 17 * 96 * 4


def test_two_runs_merged_equal_one_run_with_all_the_inputs():
    x = correlated_rows(600, 48)
    whole = SecondMoment(48, rank=8)
    whole.add(x)
    first, second = SecondMoment(48, rank=8), SecondMoment(48, rank=8)
    first.add(x[:250])
    second.add(x[250:])
    first.merge(second.result(), second.rows)
    assert first.rows == 600
    merged, reference = dense_second_moment(first.result()), dense_second_moment(whole.result())
    h = (x.double().T @ x.double() / 600).float()
    torch.testing.assert_close(merged.diagonal(), h.diagonal(), rtol=1e-5, atol=1e-6)
    assert (merged - h).norm() < 1.1 * (reference - h).norm()


def test_capture_saves_rows_and_a_later_run_adds_to_the_file(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    x = correlated_rows(256, 64)
    path = tmp_path / "stats.safetensors"
    for half in (x[:128], x[128:]):
        capture = StatisticsCapture(rank=16, prefix="net.")
        with capture.attach(model), torch.no_grad():
            model(half)
        if path.exists():
            capture.merge_file(path)
        capture.save(path)
    calib = CalibrationFile(path)
    assert calib.rows == {"net.0": 256, "net.2": 256}
    stats = load_statistics(path)
    # K = 64 > 16: sketched; K = 16 <= 16: exact. Both keep the activation statistics too.
    assert set(stats["net.0"]) == {"H_lowrank", "H_diag", "absmax", "absmean", "sample"}
    assert set(stats["net.2"]) == {"H", "absmax", "absmean", "sample"}
    with torch.no_grad():
        torch.testing.assert_close(stats["net.0"]["H_diag"], x.square().mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats["net.0"]["absmax"], x.abs().amax(0))
        torch.testing.assert_close(stats["net.0"]["absmean"], x.abs().mean(0), rtol=1e-5, atol=1e-6)
    # The merged sample: 128 rows, drawn from both runs' inputs.
    sample = stats["net.0"]["sample"]
    assert sample.shape == (128, 64)
    first = sum(bool((x[:128] == row).all(1).any()) for row in sample)
    second = sum(bool((x[128:] == row).all(1).any()) for row in sample)
    assert first + second == 128 and first > 32 and second > 32
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["cq_calibration"])["rows"]["net.0"] == 256


def test_a_file_without_row_counts_cannot_be_added_to(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    save_file({"fc.H": torch.eye(4), "fc.absmax": torch.ones(4)}, str(path))
    capture = StatisticsCapture()
    with pytest.raises(CqError, match="records no row counts"):
        capture.merge_file(path)


def test_statistics_of_bare_names_serve_a_prefixed_checkpoint(tmp_path):
    capture = StatisticsCapture(rank=4)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with capture.attach(model), torch.no_grad():
        model(torch.randn(20, 8))
    capture.save(tmp_path / "s.safetensors")
    calib = CalibrationFile(tmp_path / "s.safetensors")
    assert "model.diffusion_model.0" in calib and "other.0" not in calib
    assert calib.get("model.diffusion_model.0").keys() == calib.get("0").keys()


def test_optimizers_read_the_bounded_form(registry):
    x = correlated_rows(800, 64)
    moment = SecondMoment(64, rank=16)
    moment.add(x)
    stored = moment.result()
    h = hessian_from_stats(stored, 64, "fc")
    torch.testing.assert_close(h, dense_second_moment(stored))
    with pytest.raises(CqError, match="'fc'.*describe 64 input features.*has 32"):
        hessian_from_stats(stored, 32, "fc")
    with pytest.raises(CqError, match="'fc'.*only half"):
        hessian_from_stats({"H_lowrank": stored["H_lowrank"]}, 64, "fc")
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(3)) * 0.05
    fmt = registry.format("nvfp4")()
    exact = (x.double().T @ x.double() / 800).float()

    def output_error(tensors):
        e = (fmt.decode(tensors) - weight).double()
        return float(((e @ exact.double()) * e).sum())

    rtn = output_error(fmt.encode(weight))
    for name in ("gptq", "learned"):
        result = registry.optimizer(name)().optimize(weight, fmt, OptimizeContext("fc", stats=stored))
        assert " won" in result.note, result.note
        assert output_error(result.tensors) < 0.8 * rtn, name
