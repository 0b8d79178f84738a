"""A plain FP8 checkpoint: ``L.weight`` stored in float8 with no scale and no layer metadata.

ComfyUI casts such a weight's stored values to the compute dtype (``comfy/ops.py``
``cast_bias_weight``: ``s.weight.to(dtype=...)``), i.e. decodes it with scale 1. ``cq migrate
--check`` and ``cq inspect`` name those layers and say so, and ``cq convert`` decodes them the
same way before quantizing again."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from tests.cli_runner import run_cq
from tests.comfyui import load_diffusion_model
from tests.helpers import flux_forward
from tests.helpers import quantized_tensors


def plain_fp8(tiny_flux, folder):
    """``tiny_flux`` with its double blocks' Linear weights cast to float8_e4m3fn (no scale), and
    that file's exact decode (the values, scale 1) as float32."""
    tensors = load_file(str(tiny_flux))
    cast = {name for name, t in tensors.items()
            if name.startswith("double_blocks.") and name.endswith(".weight") and t.dim() == 2}
    plain = {name: t.to(torch.float8_e4m3fn) if name in cast else t for name, t in tensors.items()}
    decoded = {name: t.float() if name in cast else t for name, t in plain.items()}
    save_file(plain, str(folder / "plain-fp8.safetensors"))
    save_file(decoded, str(folder / "decoded.safetensors"))
    return folder / "plain-fp8.safetensors", folder / "decoded.safetensors", {n.removesuffix(".weight") for n in cast}


def test_migrate_check_and_inspect_name_plain_fp8_layers(capsys, tmp_path, tiny_flux):
    plain, _, layers = plain_fp8(tiny_flux, tmp_path)
    check = run_cq(capsys, "migrate", plain, "--check")
    assert check.code == 0, check.err  # ComfyUI loads it as it is
    layer = sorted(layers)[0]
    row = next(line for line in check.out.splitlines() if f" {layer} " in line)
    assert row.startswith("warning") and "F8_E4M3 weight without a scale" in row and "scale 1" in row, check.out
    shown = run_cq(capsys, "inspect", plain)
    assert f"plain FP8 weights (no scale, no layer metadata): {len(layers)} layers" in shown.out, shown.out
    assert f"  {layer}: F8_E4M3" in shown.out
    info = json.loads(run_cq(capsys, "inspect", plain, "--json").out)
    assert set(info["unscaled_float8"]) == layers


def test_a_plain_fp8_checkpoint_converts_from_what_comfyui_loads(capsys, tmp_path, tiny_flux):
    plain, decoded, _ = plain_fp8(tiny_flux, tmp_path)
    # ComfyUI's own word: the plain FP8 file runs as its values cast (the decoded copy).
    as_plain, log = load_diffusion_model(plain)
    assert log.problems() == []
    as_decoded, _ = load_diffusion_model(decoded)
    want = flux_forward(as_decoded)
    assert (flux_forward(as_plain) - want).norm() / want.norm() < 1e-2
    out = tmp_path / "nvfp4.safetensors"
    r = run_cq(capsys, "convert", plain, "-o", out, "-f", "nvfp4")
    assert r.code == 0, r.err
    assert "the input was already quantized (plain F8_E4M3 without a scale (" in r.err, r.err
    direct = tmp_path / "direct.safetensors"
    assert run_cq(capsys, "convert", decoded, "-o", direct, "-f", "nvfp4", "-q").code == 0
    a, b = quantized_tensors(out), quantized_tensors(direct)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a)


def test_an_fp8_bias_is_read_as_its_values(capsys, tmp_path):
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(64, generator=g).to(torch.float8_e4m3fn)
    source = tmp_path / "fp8-bias.safetensors"
    save_file({"a.weight": torch.randn(64, 64, generator=g).bfloat16(), "a.bias": bias}, str(source))
    out = tmp_path / "out.safetensors"
    r = run_cq(capsys, "convert", source, "-o", out, "-f", "nvfp4", "--model", "none")
    assert r.code == 0, r.err
    assert "other FP8 tensors read as their values, e.g. 'a.bias' (1)" in r.err, r.err
    written = load_file(str(out))["a.bias"]
    assert written.dtype == torch.bfloat16 and torch.equal(written, bias.float().bfloat16())
