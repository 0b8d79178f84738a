"""``cq verify``: decode every quantized layer of a checkpoint and compare it with its source.

A layer fails when it decodes to NaN/Inf, when its stored tensors are not what
ComfyUI's loader takes for its format (the format's contract: a tensor missing,
of a dtype or shape ComfyUI refuses or decodes wrong, or one it leaves unused
and lists as unexpected), when its weight's stored shape does not fit the
source shape, or when its two metadata carriers disagree. A layer that stores
quantized tensors but carries no metadata fails too: ComfyUI would use its
codes as a plain weight. A layer below the SQNR threshold is flagged but does
not fail.

With calibration statistics (``cq calibrate``'s ``{layer}.sample``, rows of each layer's
input), each layer also reports its output SQNR on that sample twice: weight-only
(``x @ decode(W).T``, what ComfyUI computes on a CPU or an older GPU) and on the compute
path (activations quantized as on an Ada/Hopper/Blackwell GPU:
:mod:`cq_core.numerics.compute_path`). Both leave the bias out (it cancels in the error).
"""

from __future__ import annotations

import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cq_core.io.calibration_file import CalibrationFile
from cq_core.errors import CqError, UsageError
from cq_core.io.layer_metadata import read_layer_metadata
from cq_core.io.source import Source
from cq_core.io.shards import open_source
from cq_core.numerics.compute_path import layer_output, output_error
from cq_core.numerics.metrics import sqnr_db, sqnr_json, weight_error_energy
from cq_core.plugin.contract import (
    Unlabelled,
    activation_scale_problem,
    canonical_tensor,
    check_layer,
    unlabelled_layers,
)
from cq_core.engine.native_layout import to_native_layout
from cq_core.engine.plan import quantized_marker
from cq_core.engine.quantized_source import decode_quantized
from cq_core.plugin.manager import Registry, resolve_registry
from cq_core.plugin.types import TensorSpec

DEFAULT_MIN_SQNR_DB = 10.0


@dataclass
class LayerCheck:
    layer: str
    format: str | None
    sqnr_db: float | None = None
    problems: list[str] = field(default_factory=list)
    low: bool = False
    #: Output SQNR on the layer's calibration sample: weight-only, and on the compute path.
    output_sqnr_db: float | None = None
    compute_sqnr_db: float | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class VerifyReport:
    source: str
    quantized: str
    min_sqnr_db: float
    layers: list[LayerCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(layer.ok for layer in self.layers)

    @property
    def failed(self) -> list[LayerCheck]:
        return [layer for layer in self.layers if not layer.ok]

    @property
    def low(self) -> list[LayerCheck]:
        return [layer for layer in self.layers if layer.low]

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "quantized": self.quantized,
            "min_sqnr_db": self.min_sqnr_db,
            "ok": self.ok,
            "layers": [
                {
                    "layer": c.layer,
                    "format": c.format,
                    **sqnr_json(c.sqnr_db),
                    "low": c.low,
                    "problems": c.problems,
                    **({"output_sqnr_db": _finite(c.output_sqnr_db), "compute_sqnr_db": _finite(c.compute_sqnr_db)}
                       if c.output_sqnr_db is not None else {}),
                }
                for c in self.layers
            ],
        }


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _output_sqnrs(fmt, weight, stored, sample) -> tuple[float, float]:
    """(weight-only, compute-path) output SQNR in dB of one layer on its input sample (S, K)."""
    x = sample.float()
    shape = tuple(weight.shape)
    reference = x @ weight.float().T
    weight_only = output_error(reference, x @ fmt.decode(stored, shape).T)
    compute = output_error(reference, layer_output(fmt, x, stored, shape))
    return sqnr_db(*weight_only), sqnr_db(*compute)


def _stored_tensors(quant: Source, layer: str) -> dict[str, TensorSpec]:
    """The layer's own tensors (suffix -> spec), without its metadata carrier."""
    prefix = layer + "."
    return {
        name[len(prefix):]: TensorSpec(info.dtype, info.shape)
        for name, info in quant.tensors.items()
        if name.startswith(prefix) and "." not in name[len(prefix):] and name[len(prefix):] != "comfy_quant"
    }


def _check_layer(
    layer: str,
    header_cfg: Any,
    tensor_cfg: Any,
    source: Source,
    quant: Source,
    registry: Registry,
    stats: Any = None,
) -> LayerCheck:
    config = header_cfg if header_cfg is not None else tensor_cfg
    check = LayerCheck(layer, config.get("format") if isinstance(config, dict) else None)
    if header_cfg is not None and tensor_cfg is not None and header_cfg != tensor_cfg:
        check.problems.append(f"header JSON {header_cfg} disagrees with {layer}.comfy_quant {tensor_cfg}")
    elif tensor_cfg is None and any(n.endswith(".comfy_quant") for n in quant.tensors):
        check.problems.append("listed in the header but has no .comfy_quant tensor")
    elif header_cfg is None and quant.metadata.get("_quantization_metadata"):
        check.problems.append("has a .comfy_quant tensor but is missing from the header")
    if not isinstance(config, dict) or check.format not in registry.formats:
        check.problems.append(f"unknown format {check.format!r}")
        return check
    source_name = f"{layer}.weight"
    if source_name not in source.tensors:
        check.problems.append(f"the source has no tensor {source_name!r}")
        return check
    on_disk = _stored_tensors(quant, layer)
    fmt_cls = registry.format(check.format)
    contract = fmt_cls.contract
    if contract is not None:
        # What ComfyUI's loader takes decides; the canonical forms are what cq decodes.
        judged = check_layer(layer, check.format, contract, on_disk, config)
        check.problems.extend(judged.sentences())
        specs_for_format = {**on_disk, **judged.canonical}
    else:
        specs_for_format = on_disk
    try:
        fmt = fmt_cls.from_layer_config(config, specs_for_format)
    except CqError as exc:
        check.problems.append(f"its JSON does not describe a valid {check.format} layer ({exc})")
        return check
    weight = source.read(source_name)
    specs = fmt.stored_specs(tuple(weight.shape))
    # The weight's stored shape follows from the source shape (padding, packing); with a
    # contract the other tensors follow from the stored weight and are judged above.
    if contract is None:
        expected = specs
    else:  # a weight the contract already refused is not judged twice
        expected = {"weight": specs["weight"]} if "weight" in judged.canonical else {}
    stored = {}
    for suffix, spec in expected.items():
        info = quant.tensors.get(f"{layer}.{suffix}")
        if info is None:
            if contract is None:
                check.problems.append(f"{check.format} stores {layer}.{suffix} but the file lacks it")
        elif info.dtype != spec.dtype or info.shape != spec.shape:
            check.problems.append(
                f"{layer}.{suffix} is {info.dtype_name}{list(info.shape)}, {check.format} stores "
                f"{spec.dtype}{list(spec.shape)} for a {list(weight.shape)} weight"
            )
    if check.problems:
        return check
    if contract is not None:
        for suffix, spec in judged.canonical.items():
            stored[suffix] = canonical_tensor(quant.read(f"{layer}.{suffix}"), contract, suffix, spec)
    else:
        stored = {suffix: quant.read(f"{layer}.{suffix}") for suffix in specs}
    if f"{layer}.input_scale" in quant.tensors:
        problem = activation_scale_problem(layer, quant.read(f"{layer}.input_scale"))
        if problem:
            check.problems.append(problem)
            return check
    # The convert report's own measurement (cq_core.numerics.metrics), so both say the same number.
    signal, noise = weight_error_energy(fmt, weight, stored)
    if not math.isfinite(noise):
        check.problems.append("decodes to NaN or Inf")
        return check
    if not math.isfinite(signal):
        check.problems.append(f"the source tensor {source_name!r} holds NaN or Inf")
        return check
    check.sqnr_db = sqnr_db(signal, noise)
    if stats is not None and "sample" in stats and stats["sample"].shape[-1] == weight.shape[-1]:
        check.output_sqnr_db, check.compute_sqnr_db = _output_sqnrs(fmt, weight, stored, stats["sample"])
    return check


def _unlabelled_check(found: Unlabelled) -> LayerCheck:
    check = LayerCheck(found.layer, found.format)
    check.problems.append(
        f"{found.sentence()}; without metadata ComfyUI uses the stored codes as a plain weight"
        + (" (cq migrate writes the metadata)" if found.format else "")
    )
    return check


def _swapped_hint(source: Source, quant: Source, registry: Registry) -> str:
    """``; SOURCE holds N quantized layers: swapped? ...`` when the source is the quantized one."""
    header_layers, tensor_layers = read_layer_metadata(source)
    held = len(set(header_layers or {}) | set(tensor_layers)) or len(unlabelled_layers(source.tensors, [], registry.formats))
    if not held:
        return ""
    return (f", but {source.path} holds {held} quantized layers: the arguments look swapped; 'cq verify' takes the "
            f"original first: cq verify {shlex.quote(str(quant.path))} {shlex.quote(str(source.path))}")


def _statistics_of(statistics: CalibrationFile | None, layer: str, source: Source) -> dict[str, torch.Tensor] | None:
    """The layer's checked statistics (K from the source weight, where it has one), or None."""
    if statistics is None:
        return None
    info = source.tensors.get(f"{layer}.weight")
    return statistics.get(layer, features=info.shape[-1] if info is not None and len(info.shape) == 2 else None)


def verify(
    source_path: str | os.PathLike,
    quantized_path: str | os.PathLike,
    *,
    min_sqnr_db: float = DEFAULT_MIN_SQNR_DB,
    registry: Registry | None = None,
    calibration: str | os.PathLike | None = None,
) -> VerifyReport:
    """Check every quantized layer of ``quantized_path`` against ``source_path``; with
    ``calibration`` (a ``cq calibrate`` file) also measure each layer's output on its sample."""
    if isinstance(min_sqnr_db, bool) or not isinstance(min_sqnr_db, (int, float)) or math.isnan(min_sqnr_db):
        # NaN compares false with every SQNR: no layer would ever be LOW, silently
        raise UsageError(f"--min-sqnr must be a number of dB (e.g. {DEFAULT_MIN_SQNR_DB:g}), not {min_sqnr_db!r}.")
    registry = resolve_registry(registry)
    statistics = CalibrationFile(calibration) if calibration is not None else None
    with open_source(Path(source_path)) as raw_source, open_source(Path(quantized_path)) as quant:
        # A quantized source (an FP8 release quantized again) is compared as it decodes; a diffusers
        # source under the names cq wrote.
        decoded = decode_quantized(raw_source, registry) if quantized_marker(raw_source) is not None else raw_source
        source = to_native_layout(decoded, registry.layout_converters.values())
        header_layers, tensor_layers = read_layer_metadata(quant)
        layers = sorted(set(header_layers or {}) | set(tensor_layers))
        unlabelled = unlabelled_layers(quant.tensors, layers, registry.formats)
        if not layers and not unlabelled:
            raise CqError(f"{quant.path}: holds no quantized layers (no comfy_quant metadata) to verify"
                          f"{_swapped_hint(raw_source, quant, registry)}.")
        report = VerifyReport(str(source.path), str(quant.path), min_sqnr_db)
        for layer in layers:
            check = _check_layer(
                layer, (header_layers or {}).get(layer), tensor_layers.get(layer), source, quant, registry,
                _statistics_of(statistics, layer, source),
            )
            check.low = check.ok and check.sqnr_db is not None and check.sqnr_db < min_sqnr_db
            report.layers.append(check)
        report.layers.extend(_unlabelled_check(found) for found in unlabelled)
        report.layers.sort(key=lambda check: check.layer)
    return report
