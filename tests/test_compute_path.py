"""The compute path (activations quantized as on a GPU) against comfy-kitchen's eager backend.

Activation quantization is compared bit for bit with comfy-kitchen's own quantize/dequantize
functions. Whole-layer outputs of the integer formats are compared with a tolerance: the eager
kernels multiply integer codes first and scale afterwards, cq multiplies dequantized values,
so the two differ by float32 rounding of the sums (relative 1e-5 bounds it).
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from comfy_kitchen.backends.eager import convrot_w4a4 as eager_w4a4
from comfy_kitchen.backends.eager import quantization as eager

from cq_core import LayerInfo, Recipe, UsageError, convert
from cq_core.io.calibration_file import load_statistics, save_statistics
from cq_core.commands.verify import verify
from cq_core.engine.activations import (
    ActivationSettings,
    optimize_for_compute_path,
    smoothed_statistics,
    smoothing_scales,
)
from cq_core.engine.recipe import recipe_from
from cq_core.numerics.compute_path import layer_output, output_error, stored_weight
from cq_core.numerics.metrics import sqnr_db
from cq_core.plugin.manager import get_registry
from cq_core.plugin.types import OptimizeContext
from cq_fp8.float8 import Float8E4M3Format, Float8E5M2Format
from cq_fp8.mxfp8 import Mxfp8Format
from cq_int8.tensorwise import Int8TensorwiseFormat
from cq_int8.w4a4 import ConvrotW4A4Format
from cq_nvfp4.nvfp4 import Nvfp4Format
from tests.cli_runner import run_cq
from tests.conftest import small_model, write_checkpoint


def activations(rows, k, seed=0, outliers=True):
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    if outliers:  # a few large channels, as in real activations
        x[:, ::17] *= 30.0
    return x


def same_bits(a, b):
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


@pytest.mark.parametrize("fmt_cls", [Float8E4M3Format, Float8E5M2Format])
@pytest.mark.parametrize("input_scale", [None, 0.01, 0.5])
def test_fp8_activation_is_comfy_kitchens_static_quantization(fmt_cls, input_scale):
    x = activations(7, 48)
    fmt = fmt_cls()
    tensors = {} if input_scale is None else {"input_scale": torch.tensor(input_scale)}
    scale = torch.tensor(1.0 if input_scale is None else input_scale)
    expected = eager.dequantize_per_tensor_fp8(eager.quantize_per_tensor_fp8(x, scale, fmt.dtype), scale, torch.float32)
    assert same_bits(fmt.activation_fake_quant(x, tensors), expected)
    if input_scale == 0.01:  # values beyond 448 * 0.01 clamp, as ComfyUI clamps them
        assert float(fmt.activation_fake_quant(x, tensors).abs().max()) <= fmt.max_value * 0.01 * (1 + 1e-6)


@pytest.mark.parametrize("shape", [(5, 64), (3, 40), (2, 3, 32)])
@pytest.mark.parametrize("input_scale", [None, 0.004])
def test_nvfp4_activation_is_comfy_kitchens_two_level_quantization(shape, input_scale):
    x = activations(int(torch.tensor(shape[:-1]).prod()), shape[-1]).reshape(shape)
    rows = x.reshape(-1, shape[-1])
    k = shape[-1]
    g = torch.amax(rows.abs()) / (448.0 * 6.0) if input_scale is None else torch.tensor(input_scale)
    codes, blocked = eager.quantize_nvfp4(rows, g, pad_16x=k % 16 != 0)
    expected = eager.dequantize_nvfp4(codes, g, blocked, torch.float32)[: rows.shape[0], :k].reshape(shape)
    tensors = {} if input_scale is None else {"input_scale": torch.tensor(input_scale)}
    assert same_bits(Nvfp4Format().activation_fake_quant(x, tensors), expected)


def test_nvfp4_pre_quant_scale_multiplies_the_input_first():
    x = activations(6, 64)
    smoothing = torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.5
    g = torch.amax((x * smoothing).abs()) / (448.0 * 6.0)
    codes, blocked = eager.quantize_nvfp4(x * smoothing, g)
    expected = eager.dequantize_nvfp4(codes, g, blocked, torch.float32)
    assert same_bits(Nvfp4Format().activation_fake_quant(x, {"pre_quant_scale": smoothing}), expected)


def test_mxfp8_activation_is_comfy_kitchens_block_quantization():
    for k in (64, 40):
        x = activations(9, k)
        x[0, :32] = 0.0  # an all-zero block stays zero
        codes, blocked = eager.quantize_mxfp8(x, pad_32x=k % 32 != 0)
        expected = eager.dequantize_mxfp8(codes, blocked, torch.float32)[:9, :k]
        assert same_bits(Mxfp8Format().activation_fake_quant(x, {}), expected)


@pytest.mark.parametrize("convrot", [False, True])
def test_int8_activation_codes_are_comfy_kitchens_per_row_codes(convrot):
    x = activations(5, 64)
    fmt = Int8TensorwiseFormat(scaling="row", convrot=convrot, convrot_groupsize=16)
    tensors = fmt.encode(torch.randn(8, 64))
    seen = fmt.activation_fake_quant(x, tensors)
    if convrot:
        h = eager._build_hadamard(16, dtype=torch.float32)
        codes, scale = eager.quantize_and_rotate_rowwise(x, h, 16)
        expected = eager._rotate_activation(codes.float() * scale, h, 16)
    else:
        codes, scale = eager.quantize_int8_rowwise(x)
        expected = codes.float() * scale
    assert same_bits(seen, expected)


@pytest.mark.parametrize("convrot", [False, True])
def test_int8_layer_output_matches_comfy_kitchens_int8_linear(convrot):
    x = activations(6, 64, seed=1)
    weight, bias = torch.randn(24, 64), torch.randn(24)
    fmt = Int8TensorwiseFormat(scaling="row", convrot=convrot, convrot_groupsize=16)
    tensors = fmt.encode(weight)
    expected = eager.int8_linear(
        x, tensors["weight"], tensors["weight_scale"], bias, torch.float32, convrot=convrot, convrot_groupsize=16
    )
    ours = layer_output(fmt, x, tensors, (24, 64), bias)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_convrot_w4a4_layer_output_matches_comfy_kitchens_eager_linear():
    x = activations(6, 128, seed=2)
    weight = torch.randn(32, 128)
    fmt = ConvrotW4A4Format(convrot_groupsize=64)
    tensors = fmt.encode(weight)
    expected = eager_w4a4.convrot_w4a4_linear(x, tensors["weight"], tensors["weight_scale"], convrot_groupsize=64)
    ours = layer_output(fmt, x, tensors, (32, 128))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_fp8_and_nvfp4_layer_outputs_are_the_dequantized_product():
    """comfy-kitchen's fallback without the hardware kernel: linear(dequantize(x), dequantize(w))."""
    x, weight = activations(4, 64, seed=4), torch.randn(16, 64)
    fmt = Float8E4M3Format(input_scale=0.05)
    tensors = fmt.encode(weight)
    xq = eager.dequantize_per_tensor_fp8(
        eager.quantize_per_tensor_fp8(x, tensors["input_scale"]), tensors["input_scale"], torch.float32
    )
    expected = torch.nn.functional.linear(xq, fmt.decode(tensors))
    assert same_bits(layer_output(fmt, x, tensors, (16, 64)), expected)
    # nvfp4 with pre_quant_scale: the matmul sees quant(x * s) and the weight as stored.
    nv = Nvfp4Format()
    smoothing = torch.rand(64, generator=torch.Generator().manual_seed(5)) + 0.5
    stored = {**nv.encode(weight / smoothing), "pre_quant_scale": smoothing}
    raw = nv.decode({k: v for k, v in stored.items() if k != "pre_quant_scale"}, (16, 64))
    assert same_bits(stored_weight(nv, stored, (16, 64)), raw)
    expected = torch.nn.functional.linear(nv.activation_fake_quant(x, stored), raw)
    assert same_bits(layer_output(nv, x, stored, (16, 64)), expected)


def test_every_format_says_whether_it_quantizes_activations():
    registry = get_registry()
    x = activations(3, 64)
    quantizing = set()
    for name, fmt_cls in registry.formats.items():
        fmt = fmt_cls()
        if fmt.accepts(LayerInfo("l", (16, 64), torch.float32)):
            continue
        tensors = fmt.encode(torch.randn(16, 64))
        seen = fmt.activation_fake_quant(x, tensors)
        if seen is not None:
            assert seen.shape == x.shape and seen.dtype == torch.float32 and not torch.equal(seen, x)
            quantizing.add(name)
    # ComfyUI 0.30 quantizes the inputs of these (comfy/quant_ops.py, comfy-kitchen's int8 kernels).
    assert {"float8_e4m3fn", "float8_e5m2", "nvfp4", "mxfp8", "int8_tensorwise", "convrot_w4a4"} <= quantizing


# -- calibrated input_scale and AWQ pre_quant_scale through cq convert ------------------------------

LAYERS = {"blocks.0.mlp.fc1": 32, "blocks.0.mlp.fc2": 128, "blocks.0.attn.qkv": 32}


def write_statistics(path, seed=0, factor=1.0):
    """Statistics as 'cq calibrate' writes them, from inputs with a few large channels."""
    stats = {}
    for layer, k in LAYERS.items():
        x = activations(256, k, seed=seed) * factor
        stats[layer] = {"H": x.T @ x / 256, "absmax": x.abs().amax(0), "absmean": x.abs().mean(0), "sample": x[:128]}
    return save_statistics(stats, path)


def read_all(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture
def model_and_stats(tmp_path):
    source = write_checkpoint(tmp_path / "m.safetensors", small_model(torch.float32))
    return source, write_statistics(tmp_path / "stats.safetensors")


def test_convert_writes_calibrated_input_scale_and_pre_quant_scale_comfyui_runs(tmp_path, model_and_stats, comfyui):
    source, stats = model_and_stats
    out = tmp_path / "out.safetensors"
    report = convert(source, out, format="nvfp4", optimizer="gptq", model="none", input_scale="calibrated",
                     awq=True, calibration=stats)
    assert report.recipe["recipe"]["input_scale"] == "calibrated" and report.recipe["recipe"]["awq"] is True
    stored = read_all(out)
    weights = small_model(torch.float32)
    fmt = Nvfp4Format()
    for layer, k in LAYERS.items():
        assert stored[f"{layer}.input_scale"].dtype == torch.float32 and stored[f"{layer}.input_scale"].shape == ()
        assert stored[f"{layer}.pre_quant_scale"].shape == (k,)
        assert "AWQ alpha" in next(t.note for t in report.tensors if t.name == f"{layer}.weight")
    assert verify(source, out).ok
    # ComfyUI's own Linear loads the layer and, on the CPU, computes exactly the simulated output.
    layer, shape = "blocks.0.attn.qkv", (96, 32)
    tensors = {s: stored[f"{layer}.{s}"] for s in ("weight", "weight_scale", "weight_scale_2", "input_scale",
                                                    "pre_quant_scale")}
    linear = comfyui.ops.mixed_precision_ops({}, compute_dtype=torch.float32).Linear(32, 96, bias=True)
    missing, unexpected = linear.load_state_dict(
        {**tensors, "bias": weights[f"{layer}.bias"], "comfy_quant": stored[f"{layer}.comfy_quant"]}, strict=False
    )
    assert not missing and not unexpected
    x = activations(10, 32, seed=9).reshape(2, 5, 32)
    with torch.no_grad():
        assert same_bits(linear(x), layer_output(fmt, x, tensors, shape, weights[f"{layer}.bias"]))
    # The recipe repeats the conversion byte for byte.
    again = tmp_path / "again.safetensors"
    convert(source, again, recipe=recipe_from(out), calibration=stats)
    assert again.read_bytes() == out.read_bytes()


def test_calibrated_fp8_input_scale_beats_one_on_the_compute_path(tmp_path, model_and_stats):
    """Inputs up to about 10**4, as in large DiTs: input_scale 1.0 clips them at 448."""
    source, _ = model_and_stats
    stats = write_statistics(tmp_path / "large.safetensors", factor=100.0)
    plain, calibrated = tmp_path / "plain.safetensors", tmp_path / "cal.safetensors"
    convert(source, plain, format="float8_e4m3fn", model="none")
    convert(source, calibrated, format="float8_e4m3fn", model="none", input_scale="calibrated", calibration=stats)
    a, b = read_all(plain), read_all(calibrated)
    fmt, weights = Float8E4M3Format(), small_model(torch.float32)
    x = activations(64, 128, seed=3) * 100.0
    layer = "blocks.0.mlp.fc2"
    tensors = {s: b[f"{layer}.{s}"] for s in ("weight", "weight_scale", "input_scale")}
    assert float(a[f"{layer}.input_scale"]) == 1.0 and float(tensors["input_scale"]) != 1.0
    reference = x @ weights[f"{layer}.weight"].T
    before = output_error(reference, layer_output(fmt, x, {**tensors, "input_scale": torch.tensor(1.0)}, (32, 128)))
    after = output_error(reference, layer_output(fmt, x, tensors, (32, 128)))
    assert sqnr_db(*after) > sqnr_db(*before) + 10
    assert not any(name.endswith("pre_quant_scale") for name in b)


def test_calibrated_tensors_need_calibration_and_a_valid_setting(capsys, tmp_path, model_and_stats):
    source, _ = model_and_stats
    for flags, message in ((("--input-scale", "calibrated"), "--input-scale calibrated needs --calibration"),
                           (("--awq",), "--awq needs --calibration"),
                           (("--input-scale", "static"), "--input-scale must be one of none, calibrated")):
        result = run_cq(capsys, "convert", source, "-f", "nvfp4", "-o", tmp_path / "o.safetensors", *flags)
        assert result.code == 2 and message in result.err, result.err
        assert not (tmp_path / "o.safetensors").exists()
    with pytest.raises(UsageError, match="recipe field 'input_scale'"):
        Recipe.from_mapping({"input_scale": "max"}, "r.toml")
    with pytest.raises(UsageError, match="recipe field 'awq' must be true or false"):
        Recipe.from_mapping({"awq": "yes"}, "r.toml")


def test_activation_flags_no_format_stores_are_refused(capsys, tmp_path, model_and_stats):
    """--awq on fp8 (no pre_quant_scale in its contract) would be recorded and do nothing."""
    source, stats = model_and_stats
    result = run_cq(capsys, "convert", source, "-f", "float8_e4m3fn", "--model", "none", "--awq",
                    "--calibration", stats, "-o", tmp_path / "o.safetensors")
    assert result.code == 2, result.err
    assert "--awq does nothing here: no quantized layer's format (float8_e4m3fn) stores pre_quant_scale" in result.err
    assert not (tmp_path / "o.safetensors").exists()
    # A size budget that chose only formats without it: a warning, not a refusal (a reused recipe may choose otherwise).
    chosen = convert(source, tmp_path / "b.safetensors", format="nvfp4", model="none", awq=True, calibration=stats,
                     target_size=1 << 30, formats="float8_e4m3fn,bf16")
    assert chosen.warnings and chosen.warnings[0].startswith("--awq does nothing in this file: the size budget chose")
    assert not any(name.endswith("pre_quant_scale") for name in read_all(tmp_path / "b.safetensors"))
    # nvfp4 stores it: the same flags are taken.
    convert(source, tmp_path / "n.safetensors", format="nvfp4", model="none", awq=True, calibration=stats)
    assert any(name.endswith("pre_quant_scale") for name in read_all(tmp_path / "n.safetensors"))


def test_statistics_missing_a_layer_that_awq_needs_name_it(tmp_path, model_and_stats):
    source, stats = model_and_stats
    partial = tmp_path / "partial.safetensors"
    with safe_open(str(stats), "pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("blocks.0.mlp.fc2.")}  # noqa: SIM118
    save_file(kept, str(partial))
    with pytest.raises(UsageError, match=r"partial.safetensors: has no statistics for layer 'blocks.0.mlp.fc2', "
                                         r"which --awq needs"):
        convert(source, tmp_path / "o.safetensors", format="nvfp4", model="none", awq=True, calibration=partial)
    assert not (tmp_path / "o.safetensors").exists()


def test_statistics_without_a_sample_are_refused_by_layer(tmp_path, model_and_stats):
    source, _ = model_and_stats
    old = {f"{layer}.{s}": torch.eye(k) if s == "H" else torch.ones(k) for layer, k in LAYERS.items()
           for s in ("H", "absmax")}
    path = tmp_path / "old.safetensors"
    save_file(old, str(path))
    with pytest.raises(UsageError, match="activation sample"):
        convert(source, tmp_path / "o.safetensors", format="nvfp4", model="none", awq=True, calibration=path)
    assert not (tmp_path / "o.safetensors").exists()


def test_awq_composes_with_the_optimizer_through_smoothed_statistics():
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    x = activations(128, 64, seed=2)
    stats = {"H": x.T @ x / 128, "absmax": x.abs().amax(0), "absmean": x.abs().mean(0), "sample": x}
    s = smoothing_scales(stats["absmean"], 0.5)
    smoothed = smoothed_statistics(stats, s)
    xs = x * s
    torch.testing.assert_close(smoothed["H"], xs.T @ xs / 128, rtol=1e-4, atol=1e-3)
    assert float(torch.sqrt(s.max() * s.min())) == pytest.approx(1.0, rel=1e-5)
    fmt = Nvfp4Format()
    gptq = get_registry().optimizer("gptq")()
    result = optimize_for_compute_path(gptq, weight, fmt, OptimizeContext("l", stats), ActivationSettings("calibrated", True))
    reference = x @ weight.T
    plain = fmt.encode(weight)
    error = output_error(reference, layer_output(fmt, x, result.tensors, (48, 64)))[1]
    assert error < output_error(reference, layer_output(fmt, x, plain, (48, 64)))[1]


def test_verify_reports_output_sqnr_weight_only_and_on_the_compute_path(capsys, tmp_path, model_and_stats):
    source, stats = model_and_stats
    out = tmp_path / "out.safetensors"
    convert(source, out, format="nvfp4", model="none")
    report = verify(source, out, calibration=stats)
    fmt, weights = Nvfp4Format(), small_model(torch.float32)
    loaded = read_all(out)
    for check in report.layers:
        x = load_statistics(stats)[check.layer]["sample"]
        w = weights[f"{check.layer}.weight"]
        tensors = {s: loaded[f"{check.layer}.{s}"] for s in ("weight", "weight_scale", "weight_scale_2")}
        expected = output_error(x @ w.T, layer_output(fmt, x, tensors, tuple(w.shape)))
        assert check.compute_sqnr_db == pytest.approx(sqnr_db(*expected))
        assert check.compute_sqnr_db < check.output_sqnr_db  # W4A4 loses more than W4 alone
    assert verify(source, out).layers[0].output_sqnr_db is None
    result = run_cq(capsys, "verify", source, out, "--calibration", stats)
    assert result.code == 0 and "GPU path dB" in result.out
    as_json = run_cq(capsys, "verify", source, out, "--calibration", stats, "--json")
    assert "compute_sqnr_db" in as_json.out


def test_smoothing_scales_the_bounded_second_moment_like_the_dense_one():
    from cq_core.engine.activations import smoothed_statistics
    from cq_core.numerics.second_moment import SecondMoment, dense_second_moment

    torch.manual_seed(0)
    x = torch.randn(300, 32) @ torch.randn(32, 32)
    s = torch.rand(32) + 0.5
    moment = SecondMoment(32, torch.device("cpu"), rank=8)
    moment.add(x)
    stored = moment.result()
    smoothed = smoothed_statistics(stored, s)
    expected = dense_second_moment(stored) * s.reshape(-1, 1) * s.reshape(1, -1)
    torch.testing.assert_close(dense_second_moment(smoothed), expected, rtol=1e-4, atol=1e-4)


def test_a_sample_of_another_width_is_refused_by_layer_name(tmp_path):
    from safetensors.torch import save_file

    import cq_core
    from tests.conftest import write_checkpoint

    torch.manual_seed(0)
    source = write_checkpoint(tmp_path / "m.safetensors", {"fc.weight": torch.randn(64, 32)})
    stats = tmp_path / "s.safetensors"
    save_file({"fc.H": torch.eye(32), "fc.absmax": torch.ones(32), "fc.absmean": torch.ones(32),
               "fc.sample": torch.randn(16, 7)}, str(stats))
    with pytest.raises(cq_core.CqError, match=r"Layer 'fc': its calibration 'sample' has shape \[16, 7\]"):
        cq_core.convert(source, tmp_path / "o.safetensors", format="float8_e4m3fn", model="none",
                        input_scale="calibrated", calibration=stats)
    assert not (tmp_path / "o.safetensors").exists()
