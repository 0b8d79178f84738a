"""Extreme magnitudes: no format writes a layer that decodes to NaN/Inf, and the
convert report and ``cq verify`` measure every layer with the same arithmetic.

Parametrized over the format registry, so a new format is covered without
touching this file.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import cq_core
from cq_core.errors import CqError
from cq_core.numerics.metrics import ErrorEnergy, sqnr_db, sqnr_json
from cq_core.io.safetensors_io import SafetensorsFile
from cq_core.commands.verify import verify
from tests.cli_runner import run_cq
from tests.helpers import build_registry, write_checkpoint

FLT_MAX = torch.finfo(torch.float32).max
#: A multiple of every block, tile and rotation group the formats use.
SHAPE = (128, 256)
LAYER = "blocks.0.fc"


def _signs(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g).sign().add_(0.5).sign()


def _randn(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


WEIGHTS = {
    "+-FLT_MAX": lambda: _signs(1) * FLT_MAX,
    "FLT_MAX row among ordinary": lambda: torch.cat([torch.full((1, SHAPE[1]), -FLT_MAX), _randn(2)[1:]]),
    "near FLT_MAX": lambda: _randn(3).clamp(-3, 3) * 1e38,
    "1e30": lambda: _randn(4) * 1e30,
    "denormal": lambda: _randn(5) * 1e-42,
    "smallest denormal": lambda: _signs(6) * 1.401298464324817e-45,
}
#: Magnitudes every format must hold; near FLT_MAX a format may refuse by name instead
#: (ConvRot's rotation genuinely overflows float32 there).
MUST_CONVERT = ("1e30", "denormal", "smallest denormal")


def _formats():
    return sorted(build_registry().formats)


@pytest.mark.parametrize("kind", list(WEIGHTS))
@pytest.mark.parametrize("fmt", _formats())
def test_no_format_writes_a_layer_that_decodes_to_nan_or_inf(tmp_path, registry, fmt, kind):
    weight = WEIGHTS[kind]()
    assert bool(torch.isfinite(weight).all())
    source = write_checkpoint(tmp_path / "src.safetensors", {f"{LAYER}.weight": weight})
    for measure in (True, False):
        out = tmp_path / f"out-{measure}.safetensors"
        try:
            report = cq_core.convert(source, out, format=fmt, measure=measure, registry=registry)
        except CqError as exc:
            assert kind not in MUST_CONVERT, f"{fmt} refused {kind} weights: {exc}"
            assert f"{LAYER}.weight" in str(exc)
            assert not out.exists() and not list(tmp_path.glob(".*cq-partial"))
            continue
        stored = _stored(out)
        format_cls = registry.formats[fmt]
        with SafetensorsFile(out) as f:
            on_disk = {k: v for k, v in _specs(f).items()}
        decoded = format_cls.from_layer_config({"format": fmt}, on_disk).decode(stored, SHAPE)
        assert bool(torch.isfinite(decoded).all()), f"{fmt} wrote a {kind} layer that decodes to NaN/Inf"
        checked = verify(source, out, registry=registry)
        assert checked.ok, checked.layers[0].problems
        if measure:
            # One measurement: the report and verify agree (to the thread count's last digits).
            reported, verified = sqnr_json(report.quantized[0].sqnr_db), sqnr_json(checked.layers[0].sqnr_db)
            assert reported["exact"] == verified["exact"]
            if reported["sqnr_db"] is None:
                assert verified["sqnr_db"] is None
            else:
                assert reported["sqnr_db"] == pytest.approx(verified["sqnr_db"], rel=1e-9, abs=1e-9)


def _stored(path):
    with SafetensorsFile(path) as f:
        return {name.removeprefix(LAYER + "."): f.read(name) for name in f.tensors if name.startswith(LAYER + ".")}


def _specs(f):
    from cq_core.plugin.types import TensorSpec

    prefix = LAYER + "."
    return {n.removeprefix(prefix): TensorSpec(i.dtype, i.shape) for n, i in f.tensors.items() if n.startswith(prefix)}


@pytest.mark.parametrize(
    "scale,expected",
    [
        (1e-42, 0.0),  # denormal weights that decode to all zeros: 0 dB, not "exact"
        (1e30, None),  # near 1e30 a number, not "nan"
    ],
)
def test_report_and_verify_agree_at_extreme_magnitudes(capsys, tmp_path, scale, expected):
    source = write_checkpoint(tmp_path / "src.safetensors", {f"{LAYER}.weight": _randn(7) * scale})
    out = tmp_path / "out.safetensors"
    converted = run_cq(capsys, "convert", source, "-o", out, "-f", "nvfp4", "--json")
    assert converted.code == 0, converted.err
    layer = next(t for t in json.loads(converted.out)["tensors"] if t["action"] == "quantize")
    checked = run_cq(capsys, "verify", source, out, "--json", "--min-sqnr", "-1000")
    assert checked.code == 0, checked.err
    verified = json.loads(checked.out)["layers"][0]
    assert isinstance(layer["sqnr_db"], float) and layer["exact"] is False
    assert layer["sqnr_db"] == pytest.approx(verified["sqnr_db"], rel=1e-9) and layer["exact"] == verified["exact"]
    if expected is not None:
        assert layer["sqnr_db"] == pytest.approx(expected, abs=1e-9)
    else:
        assert 15.0 < layer["sqnr_db"] < 25.0


def test_an_exact_layer_is_null_and_flagged_in_both_json_outputs(capsys, tmp_path):
    # Values on the e4m3 grid with amax 448: the scale is 1.0 and every value is exact.
    weight = torch.tensor([0.0, 1.0, -2.0, 448.0] * (SHAPE[1] // 4)).repeat(SHAPE[0], 1)
    source = write_checkpoint(tmp_path / "src.safetensors", {f"{LAYER}.weight": weight})
    out = tmp_path / "out.safetensors"
    converted = run_cq(capsys, "convert", source, "-o", out, "--json")
    layer = next(t for t in json.loads(converted.out)["tensors"] if t["action"] == "quantize")
    verified = json.loads(run_cq(capsys, "verify", source, out, "--json").out)["layers"][0]
    for row in (layer, verified):
        assert row["sqnr_db"] is None and row["exact"] is True


def test_error_energy_neither_overflows_nor_underflows():
    for scale in (FLT_MAX / 4, 1e30, 1.0, 1e-30, 1e-42):
        weight = _randn(8).clamp(-3, 3) * scale
        decoded = weight * (1 + 2.0**-8)
        energy = ErrorEnergy()
        energy.add(weight, decoded.clone())
        ref = weight.double()
        expected = sqnr_db(float(ref.square().sum()), float((decoded.double() - ref).square().sum()))
        got = sqnr_db(*energy.totals())
        assert math.isfinite(got) and got == pytest.approx(expected, abs=1e-3), scale
