"""Each format's contract against ComfyUI's own loader: verify, inspect and migrate agree with it, both ways.

Files are built by hand from cq's output for a tiny FLUX (ComfyUI's own class): one
layer at a time is given a form another writer uses, a tensor ComfyUI ignores, or
a misfit. ComfyUI's loader (tests/comfyui.py) says what it makes of each file,
and the checkers must say the same: a file it loads cleanly (no unexpected or
missing keys, a finite forward close to the original's, every quantized weight
dequantizes) passes ``cq verify`` and is current for ``cq migrate``; a tensor it
lists as unexpected is flagged by verify and inspect and dropped by migrate; a file
it refuses or decodes wrong fails verify. Files whose layers carry no metadata are
recognized by inspect and repaired by migrate into the file cq wrote, bit for bit
in ComfyUI's forward.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import cq_core
from cq_core.errors import CqError
from cq_core.plugin.contract import check_layer, recognize
from cq_core.commands.inspect import inspect_checkpoint
from cq_core.commands.migrate import migrate
from cq_core.plugin.types import TensorSpec
from cq_core.commands.verify import verify
from tests.cli_runner import run_cq
from tests.comfyui import load_diffusion_model
from tests.test_comfyui_loader import _forward, tiny_flux  # noqa: F401 (a fixture)

#: A Linear every format quantizes in the tiny FLUX: (N, K) = (512, 128).
L = "double_blocks.0.img_mlp.0"
N, K = 512, 128
FORMATS = ("float8_e4m3fn", "float8_e5m2", "int8_tensorwise", "nvfp4", "mxfp8", "convrot_w4a4")


# -- the declarations themselves --------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, options, shape",
    [
        ("float8_e4m3fn", {}, (48, 80)),
        ("float8_e5m2", {}, (48, 80)),
        ("int8_tensorwise", {}, (48, 80)),
        ("int8_tensorwise", {"scaling": "tensor"}, (48, 80)),
        ("int8_tensorwise", {"convrot": True}, (48, 256)),
        ("int8_blockwise", {"block_size": 16}, (48, 80)),
        ("nvfp4", {}, (40, 72)),
        ("nvfp4", {"input_scale": 0.5}, (300, 4096)),
        ("mxfp8", {}, (40, 72)),
        ("convrot_w4a4", {}, (48, 256)),
    ],
)
def test_what_cq_writes_is_the_canonical_form_of_its_contract(registry, fmt, options, shape):
    cls = registry.format(fmt)
    specs = cls(**options).stored_specs(shape)
    judged = check_layer("x", fmt, cls.contract, specs, cls(**options).layer_config(shape))
    assert judged.fits and not judged.repairs and not judged.missing
    assert judged.canonical == specs
    found = recognize(specs, registry.formats)
    # A packed convrot_w4a4 layer looks like a per-row INT8 layer stored flat: two candidates.
    assert found == (["int8_tensorwise", "convrot_w4a4"] if fmt == "convrot_w4a4" else [fmt])
    if fmt == "int8_blockwise":
        assert cls.config_from_tensors(specs) == {"format": fmt, "group_size": 16}


@pytest.mark.parametrize(
    "stored, expected",
    [
        # One scale for a square weight: per tensor, or a single tile; stock ComfyUI loads the first.
        ({"weight": (torch.int8, (64, 64)), "weight_scale": (torch.float32, (1, 1))}, ["int8_tensorwise"]),
        # A flat row scale where K is no multiple of 64: only a (repairable) per-row INT8 layer.
        ({"weight": (torch.int8, (32, 48)), "weight_scale": (torch.float32, (32,))}, ["int8_tensorwise"]),
        ({"weight": (torch.int8, (32, 64)), "weight_scale": (torch.float32, (2, 4))}, ["int8_blockwise"]),
        ({"weight": (torch.float8_e4m3fn, (32, 64)), "weight_scale": (torch.bfloat16, (1,))}, ["float8_e4m3fn"]),
        ({"weight": (torch.float8_e4m3fn, (32, 64)), "weight_scale": (torch.float32, (32,))}, []),
        ({"weight": (torch.uint8, (32, 32)), "weight_scale": (torch.uint8, (128, 4)),
          "weight_scale_2": (torch.float32, ())}, ["nvfp4"]),
        ({"weight": (torch.float8_e4m3fn, (32, 64)), "weight_scale": (torch.float8_e8m0fnu, (128, 4))}, ["mxfp8"]),
    ],
)
def test_recognition_from_tensors_alone(registry, stored, expected):
    specs = {suffix: TensorSpec(dtype, shape) for suffix, (dtype, shape) in stored.items()}
    assert recognize(specs, registry.formats) == expected


def test_every_project_format_declares_its_contract(registry):
    for name, cls in registry.formats.items():
        assert cls.contract is not None, name
        assert "weight" in cls.contract.tensors and cls.contract.tensors["weight"].required


# -- hand-made files through ComfyUI's loader -----------------------------------------------


@pytest.fixture(scope="module")
def converted(tiny_flux, tmp_path_factory):  # noqa: F811 (the imported fixture)
    """cq's output for the tiny FLUX in every stock format."""
    folder = tmp_path_factory.mktemp("converted")
    out = {}
    for fmt in FORMATS:
        out[fmt] = folder / f"{fmt}.safetensors"
        cq_core.convert(tiny_flux, out[fmt], format=fmt)
    return out


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(tensors without the comfy_quant carriers, header layers)."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.endswith(".comfy_quant")}
    layers = json.loads(metadata.get("_quantization_metadata", '{"layers": {}}'))["layers"]
    return tensors, layers


def write(path: Path, tensors: dict[str, torch.Tensor], layers: dict[str, dict]) -> Path:
    """Both carriers from ``layers`` (none at all when it is empty)."""
    tensors = dict(tensors)
    for layer, config in layers.items():
        tensors[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(config).encode()), dtype=torch.uint8)
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} if layers else None
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


@dataclass
class ComfyVerdict:
    """What ComfyUI's loader made of a file."""

    problems: list[str]
    error: str | None = None
    output: torch.Tensor | None = None
    dequantizes: bool = True

    def kind(self, reference: torch.Tensor) -> str:
        """``accepts``, ``unexpected`` (loads, lists unused keys), ``wrong`` (loads cleanly but
        computes something else) or ``fails`` (raises, or its own dequantize does)."""
        if self.error is not None or not self.dequantizes:
            return "fails"
        if self.problems:
            return "unexpected"
        assert torch.isfinite(self.output).all()
        rel = (self.output - reference).norm() / reference.norm()
        return "accepts" if rel < 0.05 else "wrong"


def comfy_load(path: Path) -> ComfyVerdict:
    from comfy.quant_ops import QuantizedTensor

    try:
        patcher, log = load_diffusion_model(path)
        output = _forward(patcher)
    except Exception as exc:  # the loader's own verdict, whatever it raises
        return ComfyVerdict([], error=f"{type(exc).__name__}: {exc}")
    verdict = ComfyVerdict(log.problems(), output=output)
    for module in patcher.model.diffusion_model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, QuantizedTensor):
            try:  # what LoRA patching and every fallback path use
                verdict.dequantizes &= bool(torch.isfinite(weight.dequantize()).all())
            except Exception:
                verdict.dequantizes = False
    return verdict


Edit = Callable[[dict[str, torch.Tensor], dict[str, dict]], None]


def tensor(suffix: str, change: Callable[[torch.Tensor | None], torch.Tensor | None]) -> Edit:
    def edit(tensors, layers):
        value = change(tensors.get(f"{L}.{suffix}"))
        if value is None:
            del tensors[f"{L}.{suffix}"]
        else:
            tensors[f"{L}.{suffix}"] = value

    return edit


def json_key(key: str, value) -> Edit:
    def edit(tensors, layers):
        layers[L][key] = value

    return edit


def gone(_):
    return None


def one(_):
    return torch.tensor(1.0)


def row_scales(scale):  # one scale per row, for a format that takes one per tensor
    return scale.float().reshape(1).expand(N) * torch.linspace(0.5, 1.5, N)


# (format, variant, edit of layer L, what ComfyUI does with it)
VARIANTS = [
    ("float8_e4m3fn", "weight_scale (1,)", tensor("weight_scale", lambda s: s.reshape(1)), "accepts"),
    ("float8_e4m3fn", "weight_scale (1, 1)", tensor("weight_scale", lambda s: s.reshape(1, 1)), "accepts"),
    ("float8_e4m3fn", "weight_scale F16", tensor("weight_scale", lambda s: s.half()), "accepts"),
    ("float8_e4m3fn", "weight_scale BF16", tensor("weight_scale", lambda s: s.bfloat16()), "accepts"),
    ("float8_e4m3fn", "no input_scale", tensor("input_scale", gone), "accepts"),
    ("float8_e4m3fn", "input_scale (1,)", tensor("input_scale", lambda s: s.reshape(1)), "accepts"),
    ("float8_e4m3fn", "input_scale BF16", tensor("input_scale", lambda s: s.bfloat16()), "accepts"),
    ("float8_e4m3fn", "weight_scale per row (N,)", tensor("weight_scale", row_scales), "fails"),
    ("float8_e4m3fn", "no weight_scale", tensor("weight_scale", gone), "fails"),
    ("float8_e4m3fn", "weight stored as U8 bytes", tensor("weight", lambda w: w.view(torch.uint8)), "wrong"),
    ("float8_e4m3fn", "extra weight_scale_2", tensor("weight_scale_2", one), "unexpected"),
    ("float8_e4m3fn", "extra pre_quant_scale", tensor("pre_quant_scale", lambda _: torch.ones(K)), "unexpected"),
    ("float8_e5m2", "weight_scale (1,)", tensor("weight_scale", lambda s: s.reshape(1)), "accepts"),
    ("float8_e5m2", "no input_scale", tensor("input_scale", gone), "accepts"),
    ("int8_tensorwise", "weight_scale per tensor ()", tensor("weight_scale", lambda s: s.mean().reshape(())), "accepts"),
    ("int8_tensorwise", "weight_scale per tensor (1,)", tensor("weight_scale", lambda s: s.mean().reshape(1)), "accepts"),
    ("int8_tensorwise", "weight_scale BF16", tensor("weight_scale", lambda s: s.bfloat16()), "accepts"),
    ("int8_tensorwise", "weight_scale (N,)", tensor("weight_scale", lambda s: s.reshape(N)), "fails"),
    ("int8_tensorwise", "extra input_scale", tensor("input_scale", one), "unexpected"),
    ("int8_tensorwise", "convrot_groupsize not a number",
     lambda t, layers: layers[L].update(convrot=True, convrot_groupsize="many"), "fails"),
    ("nvfp4", "weight_scale as U8 bytes", tensor("weight_scale", lambda s: s.view(torch.uint8)), "accepts"),
    ("nvfp4", "weight_scale_2 (1,)", tensor("weight_scale_2", lambda s: s.reshape(1)), "accepts"),
    ("nvfp4", "input_scale ()", tensor("input_scale", one), "accepts"),
    ("nvfp4", "input_scale (1,)", tensor("input_scale", lambda _: torch.ones(1)), "accepts"),
    ("nvfp4", "pre_quant_scale (K,)", tensor("pre_quant_scale", lambda _: torch.ones(K)), "accepts"),
    ("nvfp4", "no weight_scale_2", tensor("weight_scale_2", gone), "fails"),
    ("nvfp4", "extra unknown tensor", tensor("smooth", one), "unexpected"),
    ("mxfp8", "weight_scale as F8_E8M0", tensor("weight_scale", lambda s: s.view(torch.float8_e8m0fnu)), "accepts"),
    ("mxfp8", "input_scale ()", tensor("input_scale", one), "accepts"),
    ("mxfp8", "extra weight_scale_2", tensor("weight_scale_2", one), "unexpected"),
    ("convrot_w4a4", "weight_scale BF16", tensor("weight_scale", lambda s: s.bfloat16()), "accepts"),
    ("convrot_w4a4", "weight_scale (N, 1)", tensor("weight_scale", lambda s: s.reshape(N, 1)), "fails"),
    ("convrot_w4a4", "extra input_scale", tensor("input_scale", one), "unexpected"),
]


@pytest.fixture(scope="module")
def references(converted):
    """ComfyUI's forward of each unmodified cq output."""
    out = {}
    for fmt, path in converted.items():
        verdict = comfy_load(path)
        assert verdict.error is None and verdict.problems == [] and verdict.dequantizes, fmt
        out[fmt] = verdict.output
    return out


@pytest.mark.parametrize("fmt, variant, edit, comfy", VARIANTS, ids=[f"{v[0]}: {v[1]}" for v in VARIANTS])
def test_checkers_agree_with_comfyuis_loader(tmp_path, tiny_flux, converted, references, fmt, variant, edit, comfy):  # noqa: F811
    tensors, layers = read(converted[fmt])
    edit(tensors, layers)
    path = write(tmp_path / "variant.safetensors", tensors, layers)
    verdict = comfy_load(path)
    assert verdict.kind(references[fmt]) == comfy, (verdict.problems, verdict.error)

    try:
        report = verify(tiny_flux, path)
    except CqError as refused:  # layer JSON of the wrong type: every checker refuses the file, naming the layer
        assert comfy != "accepts" and f"layer {L!r}" in str(refused), str(refused)
        with pytest.raises(CqError, match=f"layer {L!r}"):
            inspect_checkpoint(path)
        return
    check = next(c for c in report.layers if c.layer == L)
    flagged = inspect_checkpoint(path)["contract_problems"]
    assert [c.layer for c in report.failed if c.layer != L] == []
    if comfy == "accepts":
        assert check.ok, check.problems
        assert flagged == {}
        assert not migrate(path, check=True).changed  # current: nothing to migrate
        return
    assert not check.ok
    if comfy == "unexpected":
        (extra,) = {k.removeprefix(f"{L}.") for k in tensors} - {k.removeprefix(f"{L}.") for k in read(converted[fmt])[0]}
        assert any(f"{L}.{extra}" in p and "unexpected" in p for p in check.problems), check.problems
        assert any(f"{L}.{extra}" in p for p in flagged[L])
        repaired = tmp_path / "migrated.safetensors"
        report = migrate(path, repaired)
        assert f"{L}.{extra}" in {n.subject for n in report.notes if n.kind == "drop"}
        after = comfy_load(repaired)
        assert after.kind(references[fmt]) == "accepts" and torch.equal(after.output, references[fmt])
    else:
        assert L in flagged


def test_a_flat_int8_row_scale_is_repaired_into_the_shape_comfyui_dequantizes(tmp_path, converted, references):
    tensors, layers = read(converted["int8_tensorwise"])
    tensors[f"{L}.weight_scale"] = tensors[f"{L}.weight_scale"].reshape(N)
    path = write(tmp_path / "flat.safetensors", tensors, layers)
    assert comfy_load(path).dequantizes is False  # loads, but ComfyUI's own dequantize breaks on it
    report = migrate(path, tmp_path / "migrated.safetensors")
    assert report.changed and not report.refused
    after = comfy_load(tmp_path / "migrated.safetensors")
    assert after.kind(references["int8_tensorwise"]) == "accepts"
    assert torch.equal(after.output, references["int8_tensorwise"])
    assert read(tmp_path / "migrated.safetensors")[0][f"{L}.weight_scale"].shape == (N, 1)


# -- checkpoints whose layers carry no metadata at all ----------------------------------


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2", "int8_tensorwise", "nvfp4", "mxfp8"])
def test_metadata_less_files_are_recognized_and_repaired(tmp_path, tiny_flux, converted, references, fmt):  # noqa: F811
    tensors, layers = read(converted[fmt])
    bare = write(tmp_path / "bare.safetensors", tensors, {})
    assert comfy_load(bare).kind(references[fmt]) != "accepts"  # ComfyUI uses the codes as plain weights

    info = inspect_checkpoint(bare)
    assert info["quantized_layers"] == 0
    # Block scales of these shapes also fit NVIDIA ModelOpt's unswizzled NVFP4 (cq_nvfp4/imports.py):
    # the tensors alone cannot tell, so the user says who wrote the file.
    ambiguous = fmt == "nvfp4"
    assert info["unlabelled_formats"] == {"ambiguous" if ambiguous else fmt: len(layers)}
    assert {layer: row["format"] for layer, row in info["unlabelled"].items()} == \
        {layer: None if ambiguous else fmt for layer in layers}
    report = verify(tiny_flux, bare)
    assert {c.layer for c in report.failed} == set(layers)
    assert all("no metadata" in c.problems[0] for c in report.failed)

    repaired = tmp_path / "repaired.safetensors"
    if ambiguous:
        with pytest.raises(CqError, match="--producer comfyui"):
            migrate(bare, repaired)
    migrated = migrate(bare, repaired, producer="comfyui" if ambiguous else None)
    assert migrated.layers == {layer: cfg["format"] for layer, cfg in layers.items()} and not migrated.refused
    assert read(repaired)[1] == layers
    after = comfy_load(repaired)
    assert after.kind(references[fmt]) == "accepts"
    assert torch.equal(after.output, references[fmt])
    assert verify(tiny_flux, repaired).ok


def test_metadata_less_layers_that_fit_several_formats_are_named(tmp_path, converted):
    tensors, layers = read(converted["convrot_w4a4"])
    bare = write(tmp_path / "bare.safetensors", tensors, {})
    info = inspect_checkpoint(bare)
    assert info["unlabelled_formats"] == {"ambiguous": len(layers)}
    assert info["unlabelled"][L]["candidates"] == ["int8_tensorwise", "convrot_w4a4"]
    report = migrate(bare, check=True)
    assert {n.subject for n in report.refused} == set(layers)
    assert all("int8_tensorwise and convrot_w4a4" in n.message for n in report.refused)


def test_the_cli_shows_layers_without_metadata_and_tensors_comfyui_ignores(capsys, tmp_path, tiny_flux, converted):  # noqa: F811
    tensors, layers = read(converted["float8_e4m3fn"])
    bare = write(tmp_path / "bare.safetensors", tensors, {})
    shown = run_cq(capsys, "inspect", bare)
    assert shown.code == 0 and "quantized layers: none" in shown.out
    assert f"quantized layers without metadata: {len(layers)} (float8_e4m3fn: {len(layers)})" in shown.out
    assert run_cq(capsys, "verify", tiny_flux, bare).code != 0
    assert run_cq(capsys, "migrate", bare, "--check").code == 1

    tensors, layers = read(converted["int8_tensorwise"])
    tensors[f"{L}.input_scale"] = torch.tensor(1.0)
    extra = write(tmp_path / "extra.safetensors", tensors, layers)
    shown = run_cq(capsys, "inspect", extra)
    assert f"{L}: ComfyUI's int8_tensorwise does not use {L}.input_scale" in shown.out
    failed = run_cq(capsys, "verify", tiny_flux, extra)
    assert failed.code != 0 and f"{L}.input_scale" in failed.err
    assert run_cq(capsys, "migrate", extra, "-o", tmp_path / "fixed.safetensors").code == 0
    assert run_cq(capsys, "verify", tiny_flux, tmp_path / "fixed.safetensors").code == 0
