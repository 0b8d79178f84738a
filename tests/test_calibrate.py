"""Calibration: capture per-layer input statistics from a torch model, save them, and
hand them to the optimizer through ``cq convert --calibration``."""

from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cq_core.calibrate import CalibrationFile, capture_statistics, load_statistics, save_statistics
from cq_core.convert import convert
from cq_core.errors import UsageError
from tests.cli_runner import run_cq
from tests.conftest import small_model, write_checkpoint


class TinyBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(8, 16)
        self.act = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(16, 4, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # (batch, tokens, features): statistics pool every token of every batch.
    return [torch.randn(3, 5, 8, generator=g) * torch.arange(1, 9), torch.randn(2, 7, 8, generator=g)]


def test_capture_writes_expected_keys_shapes_and_values(tmp_path):
    model = TinyBlock()
    data = batches()
    stats = capture_statistics(model, data)
    assert sorted(stats) == ["fc1", "fc2"]
    assert stats["fc1"]["H"].shape == (8, 8) and stats["fc1"]["absmax"].shape == (8,)
    assert stats["fc2"]["H"].shape == (16, 16) and stats["fc2"]["absmax"].shape == (16,)

    x1 = torch.cat([b.reshape(-1, 8) for b in data]).double()
    torch.testing.assert_close(stats["fc1"]["H"], (x1.T @ x1 / x1.shape[0]).float())
    torch.testing.assert_close(stats["fc1"]["absmax"], x1.abs().amax(0).float())
    with torch.no_grad():
        x2 = torch.cat([model.act(model.fc1(b)).reshape(-1, 16) for b in data]).double()
    torch.testing.assert_close(stats["fc2"]["H"], (x2.T @ x2 / x2.shape[0]).float(), rtol=1e-5, atol=1e-6)

    path = save_statistics(stats, tmp_path / "calib.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["fc1.H", "fc1.absmax", "fc2.H", "fc2.absmax"]
        assert f.get_slice("fc2.H").get_shape() == [16, 16]
    loaded = load_statistics(path)
    assert torch.equal(loaded["fc2"]["H"], stats["fc2"]["H"])


def test_capture_options_and_errors():
    model = TinyBlock()
    stats = capture_statistics(model, batches(), layers="fc2", prefix="model.")
    assert list(stats) == ["model.fc2"]
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed afterwards
    mapping_stats = capture_statistics(model, [{"x": torch.ones(2, 8)}])  # a dict batch is passed as kwargs
    assert torch.equal(mapping_stats["fc1"]["H"], torch.ones(8, 8))
    with pytest.raises(UsageError, match="no nn.Linear"):
        capture_statistics(torch.nn.Sequential(torch.nn.ReLU()), batches())
    with pytest.raises(UsageError, match="No calibration batch"):
        capture_statistics(model, [])


def test_cli_calibrate_from_a_python_file(tmp_path, capsys):
    source = tmp_path / "calib_model.py"
    source.write_text(textwrap.dedent("""
        import torch
        def build():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        def data():
            return [torch.randn(4, 8) for _ in range(3)]
    """))
    out = tmp_path / "stats.safetensors"
    result = run_cq(capsys, "calibrate", "--model", f"{source}:build", "--data", f"{source}:data", "-o", out)
    assert result.code == 0, result.err
    assert "2 Linear layers" in result.out
    assert sorted(CalibrationFile(out).layers) == ["0", "2"]
    again = run_cq(capsys, "calibrate", "--model", f"{source}:build", "--data", f"{source}:data", "-o", out)
    assert again.code != 0 and "already exists" in again.err
    missing = run_cq(capsys, "calibrate", "--model", f"{source}:nope", "--data", f"{source}:data", "-o", out,
                     "--overwrite")
    assert missing.code != 0 and "'nope'" in missing.err


def calibration_for(model: dict[str, torch.Tensor], tmp_path, seed: int = 0):
    """Anisotropic input statistics for every 2-D Linear weight of the test checkpoint."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, weight in model.items():
        if key.endswith(".weight") and weight.dim() == 2 and "embed" not in key:
            k = weight.shape[1]
            x = torch.randn(256, k, generator=g) @ (torch.randn(k, k, generator=g) * torch.logspace(0, -2, k))
            tensors[f"{key.removesuffix('.weight')}.H"] = x.T @ x / 256
            tensors[f"{key.removesuffix('.weight')}.absmax"] = x.abs().amax(0)
    path = tmp_path / "calib.safetensors"
    save_file(tensors, str(path))
    return path


def test_convert_passes_each_layers_statistics_to_the_optimizer(tmp_path, capsys):
    model = small_model(torch.float32)
    source = write_checkpoint(tmp_path / "model.safetensors", model)
    calib = calibration_for(model, tmp_path)
    report = convert(source, tmp_path / "out.safetensors", optimizer="gptq", calibration=calib, model="none",
                     device="cpu")
    notes = {t.name: t.note for t in report.quantized}
    assert notes and all(note.startswith("gptq won: output error +") for note in notes.values()), notes

    cli = run_cq(capsys, "convert", source, "-o", tmp_path / "cli.safetensors", "--optimizer", "learned",
                 "--calibration", calib, "--model", "none", "--device", "cpu", "-q")
    assert cli.code == 0, cli.err
    assert "learned won: output error" in cli.out


def test_convert_rejects_calibration_for_another_model(tmp_path, capsys):
    source = write_checkpoint(tmp_path / "model.safetensors", small_model(torch.float32))
    other = tmp_path / "other.safetensors"
    save_file({"text_model.fc.H": torch.eye(4), "text_model.fc.absmax": torch.ones(4)}, str(other))
    result = run_cq(capsys, "convert", source, "--optimizer", "gptq", "--calibration", other, "--model", "none")
    assert result.code != 0
    assert "none of its layers" in result.err and "text_model.fc" in result.err
    assert not (tmp_path / "model-float8_e4m3fn.safetensors").exists()
    missing = run_cq(capsys, "convert", source, "--calibration", tmp_path / "nope.safetensors")
    assert missing.code != 0 and "nope.safetensors" in missing.err
