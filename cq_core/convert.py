"""Runs a plan: read -> optimize -> encode -> write, one tensor at a time."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cq_core.errors import CqError, UsageError
from cq_core.metrics import weight_sqnr_db
from cq_core.plan import DROP, KEEP, QUANTIZE, Plan, plan_tensors
from cq_core.plugins import Registry, get_registry
from cq_core.report import Report, TensorResult, peak_rss_bytes
from cq_core.safetensors_io import SafetensorsFile, write_safetensors
from cq_core.types import Format, MetadataWriter, OptimizeContext, Optimizer

DEFAULT_FORMAT = "float8_e4m3fn"
DEFAULT_OPTIMIZER = "rtn"
DEFAULT_METADATA_WRITER = "comfyui"


def default_output_path(input_path: Path, format_name: str) -> Path:
    """``model.safetensors`` -> ``model-float8_e4m3fn.safetensors`` next to it."""
    stem = input_path.name.removesuffix(".safetensors")
    return input_path.with_name(f"{stem}-{format_name}.safetensors")


def check_finite(name: str, weight: torch.Tensor) -> None:
    """NaN or Inf in a weight would poison its scale: refuse, naming the tensor."""
    low, high = torch.aminmax(weight)
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise CqError(f"Tensor {name!r} contains NaN or Inf values; fix the source checkpoint.")


def _resolve_preset(registry: Registry, source: SafetensorsFile, model: str | None):
    """``model``: a preset name, "none", or None to auto-detect."""
    if model == "none":
        return None, "no preset (--model none)"
    if model is not None:
        return registry.model_filter(model), f"chosen with --model {model}"
    detection = registry.detect_model(list(source.tensors), dict(source.metadata))
    if detection is None:
        return None, "no preset detected"
    return registry.model_filter(detection.preset), f"detected: {detection.reason}"


def build_plan(
    source: SafetensorsFile,
    registry: Registry,
    fmt: Format,
    writer: MetadataWriter,
    *,
    exclude: Sequence[str] = (),
    model: str | None = None,
) -> Plan:
    preset, preset_reason = _resolve_preset(registry, source, model)
    return plan_tensors(source, fmt, writer, exclude=exclude, preset=preset, preset_reason=preset_reason)


def convert(
    input: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    format: str = DEFAULT_FORMAT,
    format_options: Mapping[str, Any] | None = None,
    optimizer: str = DEFAULT_OPTIMIZER,
    optimizer_options: Mapping[str, Any] | None = None,
    exclude: Sequence[str] = (),
    model: str | None = None,
    metadata_writer: str = DEFAULT_METADATA_WRITER,
    dry_run: bool = False,
    overwrite: bool = False,
    measure: bool = True,
    progress: bool = False,
    registry: Registry | None = None,
) -> Report:
    """Convert ``input`` to a quantized checkpoint; returns the report.

    With ``dry_run`` nothing is read but the header and nothing is written;
    the report lists each tensor's planned action and reason. ``measure``
    decodes every quantized layer to report its weight SQNR.
    """
    started = time.perf_counter()
    registry = registry or get_registry()
    fmt = registry.format(format)(**dict(format_options or {}))
    opt: Optimizer = registry.optimizer(optimizer)(**dict(optimizer_options or {}))
    writer = registry.metadata_writer(metadata_writer)()

    input_path = Path(input)
    output_path = Path(output) if output is not None else default_output_path(input_path, fmt.name)
    if not dry_run:
        if output_path.exists() and not overwrite:
            raise CqError(f"{output_path}: already exists; pass --overwrite to replace it.")
        if input_path.exists() and output_path.exists() and output_path.samefile(input_path):
            raise UsageError(f"{output_path}: the output would overwrite the input.")

    with SafetensorsFile(input_path) as source:
        plan = build_plan(source, registry, fmt, writer, exclude=exclude, model=model)
        report = Report(
            input=str(input_path),
            output=None if dry_run else str(output_path),
            format=fmt.name,
            optimizer=opt.name,
            preset=plan.preset.name if plan.preset else None,
            preset_reason=plan.preset_reason,
            dry_run=dry_run,
            input_bytes=source.file_size,
            output_bytes=plan.output_bytes,
        )
        for item in plan.items:
            report.total_params += _numel(item.shape)
            if item.action == QUANTIZE:
                report.quantized_params += _numel(item.shape)
        if dry_run:
            report.tensors = [
                TensorResult(i.name, i.action, i.reason, i.shape, _dtype(i.dtype), i.format and i.format.name)
                for i in plan.items
            ]
        else:
            _execute(plan, source, output_path, opt, writer, report, overwrite, measure, progress)
    report.seconds = time.perf_counter() - started
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _execute(
    plan: Plan,
    source: SafetensorsFile,
    output: Path,
    opt: Optimizer,
    writer: MetadataWriter,
    report: Report,
    overwrite: bool,
    measure: bool,
    progress: bool,
) -> None:
    bar = tqdm(plan.items, desc="cq convert", unit="tensor", disable=not progress, leave=False)
    with write_safetensors(output, plan.entries, plan.metadata, overwrite=overwrite) as out:
        for item in bar:
            bar.set_postfix_str(item.name[-40:], refresh=False)
            tick = time.perf_counter()
            result = TensorResult(item.name, item.action, item.reason, item.shape, _dtype(item.dtype))
            if item.action == DROP:
                report.tensors.append(result)
                continue
            tensor = source.read(item.name)
            if item.action == KEEP:
                out.write(item.name, tensor)
            else:
                check_finite(item.name, tensor)
                fmt = item.format
                optimized = opt.optimize(tensor, fmt, OptimizeContext(layer=item.layer))
                stored = {f"{item.layer}.{suffix}": t for suffix, t in optimized.tensors.items()}
                stored.update(writer.layer_tensors(item.layer, item.layer_config))
                for out_name, _ in item.outputs:
                    if out_name not in stored:
                        raise CqError(
                            f"Format {fmt.name!r} did not produce {out_name!r} for tensor {item.name!r}."
                        )
                    out.write(out_name, stored[out_name])
                result.format = fmt.name
                result.note = optimized.note
                if measure:
                    result.sqnr_db = weight_sqnr_db(fmt, tensor, optimized.tensors)
            del tensor
            result.seconds = time.perf_counter() - tick
            report.tensors.append(result)
    bar.close()
