"""Bad input is one clear sentence, a non-zero exit and no output: legacy scales,
per-layer JSON, and (in test_header_fuzz.py) headers generated field by field."""

from __future__ import annotations

import json

import pytest
import torch

from cq_core.errors import CqError
from cq_core.migrate import migrate
from tests.cli_runner import run_cq
from tests.conftest import write_checkpoint

N, K = 32, 64


def _fp8_layer(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, K, generator=g) * 50).to(torch.float8_e4m3fn)


@pytest.mark.parametrize("value,what", [(float("nan"), "NaN"), (-0.01, "a negative value"), (0.0, "zero"), (float("inf"), "Inf")])
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
