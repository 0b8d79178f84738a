"""Failures are one clear sentence and never leave a file behind; outputs are reproducible."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import cq_core
from cq_core.errors import CqError
from cq_core.io.outputs import partial_files
from cq_core.io.safetensors_io import SafetensorsFile, StreamingWriter
from cq_core.plugin.types import LayerInfo
from cq_core.commands.verify import verify
from tests.cli_runner import run_cq
from tests.conftest import small_model, write_checkpoint

ROOT = Path(__file__).resolve().parent.parent


# -- output safety -------------------------------------------------------------------


def test_disk_full_half_way_removes_everything(tmp_path, model_file, monkeypatch):
    calls = {"n": 0}
    real_write = StreamingWriter.write

    def failing_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, name, tensor)

    monkeypatch.setattr(StreamingWriter, "write", failing_write)
    with pytest.raises(CqError, match="No space left on device"):
        cq_core.convert(model_file, tmp_path / "out.safetensors")
    assert calls["n"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_not_enough_free_space_is_refused_before_writing(tmp_path, model_file, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(CqError, match="needs .* KB .* but only 1.00 KB is free"):
        cq_core.convert(model_file, tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_output_equal_to_input_is_refused(capsys, model_file):
    before = model_file.read_bytes()
    r = run_cq(capsys, "convert", model_file, "-o", model_file, "--overwrite")
    assert r.code == 2 and "would overwrite the input" in r.err
    assert model_file.read_bytes() == before


SLOW_CQ = """
import sys, time
sys.path.insert(0, {root!r})
from cq_core import hookimpl
from cq_core.plugin.manager import set_registry
from cq_core.plugin.types import OptimizeResult, Optimizer
from tests.conftest import build_registry


class Slow(Optimizer):
    name = "slow"

    def optimize(self, weight, fmt, context):
        time.sleep(0.5)
        return OptimizeResult(fmt.encode(weight))


class SlowPlugin:
    __name__ = "slow-plugin"

    @hookimpl
    def cq_register_optimizers(self, register):
        register(Slow)


set_registry(build_registry(SlowPlugin()))
from cq_core.cli.app import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_interrupt_during_conversion_leaves_no_output(tmp_path, sig):
    tensors = {f"blocks.{i}.fc.weight": torch.randn(64, 64) for i in range(20)}
    source = write_checkpoint(tmp_path / "model.safetensors", tensors)
    out = tmp_path / "out.safetensors"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CQ.format(root=str(ROOT)), "convert", str(source), "-o", str(out),
         "--optimizer", "slow", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while not partial_files(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert partial_files(out), proc.communicate()[1]
    time.sleep(0.3)
    proc.send_signal(sig)
    out_text, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, (proc.returncode, out_text[-500:], err[-2000:])  # 130, 143, 129
    assert "interrupted; no output was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


# -- weights -----------------------------------------------------------------------------


def test_every_format_handles_tiny_and_all_zero_weights(registry):
    for name, fmt_cls in registry.formats.items():
        fmt = fmt_cls()
        for shape in [(1, 1), (1, 7), (3, 5), (2, 48), (16, 16), (33, 130)]:
            reason = fmt.accepts(LayerInfo("blocks.0.fc", shape, torch.bfloat16))
            if reason is not None:
                assert isinstance(reason, str) and reason, (name, shape)
                continue
            for weight in (torch.zeros(shape), torch.randn(shape)):
                stored = fmt.encode(weight.to(torch.bfloat16))
                for suffix, spec in fmt.stored_specs(shape).items():
                    assert stored[suffix].dtype == spec.dtype and tuple(stored[suffix].shape) == spec.shape
                decoded = fmt.decode(stored)[: shape[0], : shape[1]]
                assert torch.isfinite(decoded).all(), (name, shape)
                if not weight.any():
                    assert not decoded.any(), (name, shape)


def test_every_format_measures_while_encoding_exactly_as_cq_measures_apart(registry, monkeypatch):
    from cq_core.numerics import metrics
    from cq_core.numerics.metrics import weight_error_energy

    # Small chunks, so the weights below span several of them.
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 256)
    variants = [(name, fmt_cls()) for name, fmt_cls in registry.formats.items()]
    int8 = registry.formats["int8_tensorwise"]
    variants += [("int8 ConvRot", int8(convrot=True)), ("int8 per tensor", int8(scaling="tensor"))]
    for name, fmt in variants:
        for shape in [(1, 64), (37, 64), (130, 96)]:
            if fmt.accepts(LayerInfo("blocks.0.fc", shape, torch.bfloat16)) is not None:
                continue
            weight = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
            tensors, signal, noise = fmt.encode_measured(weight)
            plain = fmt.encode(weight)
            assert tensors.keys() == plain.keys(), name
            for suffix in plain:
                assert torch.equal(tensors[suffix].reshape(-1).view(torch.uint8), plain[suffix].reshape(-1).view(torch.uint8))
            assert (signal, noise) == weight_error_energy(fmt, weight, plain), (name, shape)
            assert noise > 0 and signal == pytest.approx(float(weight.float().square().sum()), rel=1e-5)


def test_round_to_nearest_hands_its_measurement_to_the_report(tmp_path, model_file, registry, monkeypatch):
    work_module = sys.modules["cq_core.engine.execute"]  # where the per-tensor work measures
    calls = []
    real = work_module.weight_error_energy
    monkeypatch.setattr(work_module, "weight_error_energy", lambda *a: calls.append(a) or real(*a))
    report = cq_core.convert(model_file, tmp_path / "o.safetensors", format="float8_e4m3fn")
    measured = [t for t in report.tensors if t.sqnr_db is not None]
    assert measured and all(25 < t.sqnr_db < 40 for t in measured)
    assert calls == []  # rtn handed over the energies its format measured; core did not decode again


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_by_name(tmp_path, bad):
    tensors = small_model(dtype=torch.float32)
    tensors["blocks.0.attn.qkv.weight"][0, 0] = bad
    path = write_checkpoint(tmp_path / "m.safetensors", tensors)
    with pytest.raises(CqError, match="'blocks.0.attn.qkv.weight' contains NaN or Inf"):
        cq_core.convert(path, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_same_input_and_options_give_identical_bytes(tmp_path, model_file, registry):
    from safetensors.torch import load_file

    from tests.test_calibrate import calibration_for

    calibration = calibration_for(load_file(str(model_file)), tmp_path)
    runs = [(name, "rtn", None) for name in registry.formats]
    for opt, cls in registry.optimizers.items():
        if opt == "rtn":
            continue
        for calib in (calibration,) if cls.needs_calibration else (None, calibration):
            runs += [(fmt, opt, calib) for fmt in ("float8_e4m3fn", "nvfp4")]
    for fmt, opt, calib in runs:
        tag = f"{fmt}-{opt}-{calib is not None}"
        first, second = tmp_path / f"a-{tag}.safetensors", tmp_path / f"b-{tag}.safetensors"
        cq_core.convert(model_file, first, format=fmt, optimizer=opt, calibration=calib)
        cq_core.convert(model_file, second, format=fmt, optimizer=opt, calibration=calib)
        assert first.read_bytes() == second.read_bytes(), (fmt, opt, calib)


# -- verification ------------------------------------------------------------------------


def test_verify_passes_a_fresh_conversion_and_matches_its_report(capsys, tmp_path, model_file):
    out = tmp_path / "o.safetensors"
    report = cq_core.convert(model_file, out)
    result = verify(model_file, out)
    assert result.ok and len(result.layers) == len(report.quantized)
    reported = {t.name.removesuffix(".weight"): t.sqnr_db for t in report.quantized}
    for check in result.layers:
        assert check.sqnr_db == pytest.approx(reported[check.layer], abs=1e-3)
    r = run_cq(capsys, "verify", model_file, out)
    assert r.code == 0 and "3 layers, 0 failed" in r.out
    r = run_cq(capsys, "convert", model_file, "-o", tmp_path / "v.safetensors", "--verify")
    assert r.code == 0 and "verify: 3 layers, 0 failed" in r.out


def _rewrite(path: Path, out: Path, change) -> Path:
    with SafetensorsFile(path) as f:
        metadata = dict(f.metadata)
    tensors = load_file(str(path))
    change(tensors, metadata)
    save_file(tensors, str(out), metadata=metadata)
    return out


def test_verify_fails_on_nan_and_on_disagreeing_metadata(capsys, tmp_path, model_file):
    good = tmp_path / "o.safetensors"
    cq_core.convert(model_file, good)

    def nan_scale(tensors, metadata):
        tensors["blocks.0.mlp.fc1.weight_scale"] = torch.tensor(float("nan"))

    r = run_cq(capsys, "verify", model_file, _rewrite(good, tmp_path / "nan.safetensors", nan_scale))
    assert r.code == 1 and "'blocks.0.mlp.fc1' (decodes to NaN or Inf)" in r.err

    def disagree(tensors, metadata):
        header = json.loads(metadata["_quantization_metadata"])
        header["layers"]["blocks.0.mlp.fc2"] = {"format": "float8_e5m2"}
        metadata["_quantization_metadata"] = json.dumps(header)

    r = run_cq(capsys, "verify", model_file, _rewrite(good, tmp_path / "dis.safetensors", disagree))
    assert r.code == 1 and "disagrees" in r.err and "blocks.0.mlp.fc2" in r.err

    def wrong_dtype(tensors, metadata):
        tensors["blocks.0.attn.qkv.weight"] = tensors["blocks.0.attn.qkv.weight"].view(torch.uint8)

    r = run_cq(capsys, "verify", model_file, _rewrite(good, tmp_path / "u8.safetensors", wrong_dtype))
    assert r.code == 1 and "is U8" in r.err

    r = run_cq(capsys, "verify", model_file, model_file)
    assert r.code == 1 and "holds no quantized layers" in r.err


def test_verify_flags_layers_below_the_threshold(capsys, tmp_path, model_file):
    out = tmp_path / "o.safetensors"
    cq_core.convert(model_file, out, format="float8_e5m2")
    r = run_cq(capsys, "verify", model_file, out, "--min-sqnr", "40", "--json")
    data = json.loads(r.out)
    assert r.code == 0 and data["ok"] and all(layer["low"] for layer in data["layers"])


# -- fuzzing the reader ---------------------------------------------------------------------


def _valid_file_bytes() -> bytes:
    from safetensors.torch import save

    return save({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.int8)},
                metadata={"k": "v"})


VALID = _valid_file_bytes()


def _read_everything(path: Path) -> None:
    with SafetensorsFile(path) as f:
        for name in f.tensors:
            f.read(name)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_files_raise_only_cq_errors(tmp_path, data):
    kind = data.draw(st.sampled_from(["truncate", "flip", "random", "header"]))
    if kind == "truncate":
        content = VALID[: data.draw(st.integers(0, len(VALID) - 1))]
    elif kind == "flip":
        content = bytearray(VALID)
        for _ in range(data.draw(st.integers(1, 8))):
            content[data.draw(st.integers(0, len(VALID) - 1))] = data.draw(st.integers(0, 255))
        content = bytes(content)
    elif kind == "random":
        content = data.draw(st.binary(max_size=300))
    else:
        header = data.draw(
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                max_leaves=12,
            )
        )
        raw = json.dumps({"t": header}).encode()
        content = struct.pack("<Q", len(raw)) + raw + bytes(data.draw(st.integers(0, 64)))
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(content)
    try:
        _read_everything(path)
    except CqError:
        pass


def test_nonfinite_keep_keeps_the_tensor_and_says_why(capsys, tmp_path):
    tensors = small_model(dtype=torch.float32)
    tensors["blocks.0.mlp.fc1.weight"][1, 2] = float("nan")
    path = write_checkpoint(tmp_path / "m.safetensors", tensors)
    out = tmp_path / "o.safetensors"
    r = run_cq(capsys, "convert", path, "-o", out, "--nonfinite", "keep", "--json")
    assert r.code == 0, r.err
    actions = {t["name"]: t for t in json.loads(r.out)["tensors"]}
    assert actions["blocks.0.mlp.fc1.weight"]["action"] == "keep"
    assert "NaN or Inf" in actions["blocks.0.mlp.fc1.weight"]["reason"]
    assert actions["blocks.0.mlp.fc2.weight"]["action"] == "quantize"
    stored = load_file(str(out))
    assert stored["blocks.0.mlp.fc1.weight"].dtype == torch.float32
    assert torch.equal(stored["blocks.0.mlp.fc1.weight"].isnan(), tensors["blocks.0.mlp.fc1.weight"].isnan())
    assert "blocks.0.mlp.fc1.comfy_quant" not in stored
    r = run_cq(capsys, "convert", path, "-o", tmp_path / "x.safetensors", "--nonfinite", "maybe")
    assert r.code == 2 and "--nonfinite must be one of error, keep" in r.err


def test_verify_reads_a_sharded_output(tmp_path, model_file):
    report = cq_core.convert(model_file, tmp_path / "out.safetensors", max_shard_size="8KB")
    assert len(list(tmp_path.glob("out-*-of-*.safetensors"))) >= 2
    result = verify(model_file, report.output)
    assert result.ok and len(result.layers) == 3


@pytest.mark.parametrize(
    "fmt,options",
    [
        ("float8_e4m3fn", {}),
        ("float8_e5m2", {}),
        ("int8_tensorwise", {}),
        ("int8_tensorwise", {"scaling": "tensor"}),
        ("int8_tensorwise", {"convrot": "true", "convrot_groupsize": "64"}),
        ("int8_blockwise", {"block_size": "32"}),
        ("convrot_w4a4", {"convrot_groupsize": "16"}),
        ("nvfp4", {}),
        ("nvfp4", {"input_scale": "0.5"}),
        ("mxfp8", {}),
    ],
)
def test_verify_decodes_every_format_it_did_not_write_itself(tmp_path, fmt, options):
    """verify rebuilds each layer's decoder from the file alone and must agree with the converter."""
    g = torch.Generator().manual_seed(1)
    tensors = {f"blocks.{i}.fc.weight": torch.randn(64, 128, generator=g).to(torch.bfloat16) for i in range(3)}
    source = write_checkpoint(tmp_path / "m.safetensors", tensors)
    out = tmp_path / "o.safetensors"
    report = cq_core.convert(source, out, format=fmt, format_options=options, model="none")
    assert len(report.quantized) == 3
    result = verify(source, out)
    assert result.ok, [c.problems for c in result.layers]
    for check, layer in zip(result.layers, report.quantized, strict=True):
        assert check.sqnr_db == pytest.approx(layer.sqnr_db, abs=1e-3), (fmt, check.layer)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8"])
def test_verify_cuts_padding_with_the_source_shape(tmp_path, fmt):
    """Read back from a file, padded layouts learn (N, K) only from the source shape cq passes."""
    g = torch.Generator().manual_seed(2)
    source = write_checkpoint(tmp_path / "m.safetensors", {"blocks.0.fc.weight": torch.randn(100, 72, generator=g)})
    out = tmp_path / "o.safetensors"
    report = cq_core.convert(source, out, format=fmt, model="none")
    assert len(report.quantized) == 1
    result = verify(source, out)
    assert result.ok and result.layers[0].sqnr_db == pytest.approx(report.quantized[0].sqnr_db, abs=1e-3)
