"""The plan: for every input tensor, keep / quantize / drop, and why.

Built from the header alone (no tensor data), so ``--dry-run`` is instant and
the whole output header is known before the first byte is written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cq_core.errors import CqError, UsageError
from cq_core.safetensors_io import SafetensorsFile, TensorInfo
from cq_core.types import Format, LayerInfo, MetadataWriter, ModelFilter, TensorSpec

QUANTIZE, KEEP, DROP = "quantize", "keep", "drop"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WEIGHT_SUFFIX = ".weight"

#: Layers kept by default, matched against the last part of the layer name:
#: norms and embedding tables are not Linear layers in ComfyUI.
DEFAULT_KEEP = re.compile(r"norm|embed|^(wte|wpe|shared)$", re.IGNORECASE)

#: Tensor names that mark a checkpoint as already quantized.
QUANTIZED_MARKERS = (".comfy_quant", ".scale_weight", ".weight_scale", ".scale_input")


@dataclass
class TensorPlan:
    """What happens to one input tensor."""

    name: str
    action: str  # QUANTIZE, KEEP or DROP
    reason: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    layer: str | None = None  # the layer prefix, for quantized weights
    format: Format | None = None
    layer_config: dict[str, Any] | None = None
    #: output tensors this input produces, in write order
    outputs: list[tuple[str, TensorSpec]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "tensor": self.name,
            "action": self.action,
            "format": self.format.name if self.format else None,
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
            "reason": self.reason,
            "layer_config": self.layer_config,
        }


@dataclass
class Plan:
    items: list[TensorPlan]
    metadata: dict[str, str]  # the output's __metadata__
    preset: ModelFilter | None = None
    preset_reason: str | None = None

    @property
    def entries(self) -> list[tuple[str, TensorSpec]]:
        return [entry for item in self.items for entry in item.outputs]

    @property
    def output_bytes(self) -> int:
        return sum(spec.nbytes for _, spec in self.entries)

    @property
    def layer_configs(self) -> dict[str, dict[str, Any]]:
        return {item.layer: item.layer_config for item in self.items if item.action == QUANTIZE}

    def count(self, action: str) -> int:
        return sum(item.action == action for item in self.items)


def _layer_prefix(name: str) -> str | None:
    return name[: -len(WEIGHT_SUFFIX)] if name.endswith(WEIGHT_SUFFIX) else None


def refuse_quantized_input(source: SafetensorsFile) -> None:
    """An input that already holds quantized layers is refused, with where to go instead."""
    for name in source.tensors:
        if name == "scaled_fp8" or name.endswith(QUANTIZED_MARKERS):
            raise CqError(
                f"{source.path}: is already quantized (it holds {name!r}); use 'cq migrate' to "
                "update an old layout or 'cq meta' to edit its metadata."
            )
        info = source.tensors[name]
        if info.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise CqError(
                f"{source.path}: is already quantized (tensor {name!r} is {info.dtype_name}); "
                "convert from the original high-precision checkpoint instead."
            )


def compile_patterns(patterns: Sequence[str], flag: str) -> list[re.Pattern[str]]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise UsageError(f"{flag} {pattern!r} is not a valid regular expression ({exc}).") from None
    return compiled


def _decide(
    info: TensorInfo,
    fmt: Format,
    excludes: list[re.Pattern[str]],
    preset: ModelFilter | None,
    bias_shapes: Mapping[str, tuple[int, ...]],
) -> tuple[str, str]:
    """(action, reason) for one tensor: the rules in order, first match wins."""
    if preset is not None:
        rule = preset.rule_for(info.name)
        if rule is not None and rule[0] == "remove":
            return DROP, f"preset {preset.name!r} removes tensors matching {rule[1]!r}"
    layer = _layer_prefix(info.name)
    if layer is None:
        return KEEP, "not a .weight tensor"
    if info.dtype not in FLOAT_DTYPES:
        return KEEP, f"{info.dtype_name} is not a floating-point weight"
    if len(info.shape) != 2:
        return KEEP, f"{len(info.shape)}-D tensor; only 2-D Linear weights are quantized"
    for pattern in excludes:
        if pattern.search(info.name):
            return KEEP, f"excluded by --exclude {pattern.pattern!r}"
    if preset is not None and rule is not None:
        return KEEP, f"preset {preset.name!r} keeps {rule[1]!r} in high precision"
    if DEFAULT_KEEP.search(layer.rsplit(".", 1)[-1]):
        return KEEP, "norm or embedding table (kept by default)"
    refusal = fmt.accepts(LayerInfo(layer, info.shape, info.dtype, bias_shapes.get(layer)))
    if refusal:
        return KEEP, refusal
    note = fmt.layer_note(info.shape)
    return QUANTIZE, f"2-D Linear weight -> {fmt.name}" + (f" ({note})" if note else "")


def plan_tensors(
    source: SafetensorsFile,
    fmt: Format,
    writer: MetadataWriter,
    *,
    exclude: Sequence[str] = (),
    preset: ModelFilter | None = None,
    preset_reason: str | None = None,
) -> Plan:
    """Decide every tensor's fate and compute the full output layout."""
    refuse_quantized_input(source)
    excludes = compile_patterns(exclude, "--exclude")
    bias_shapes = {
        name[: -len(".bias")]: info.shape for name, info in source.tensors.items() if name.endswith(".bias")
    }
    items: list[TensorPlan] = []
    for info in source.tensors.values():  # offset order, so the input is read sequentially
        action, reason = _decide(info, fmt, excludes, preset, bias_shapes)
        item = TensorPlan(info.name, action, reason, info.shape, info.dtype)
        if action == KEEP:
            item.outputs = [(info.name, TensorSpec(info.dtype, info.shape))]
        elif action == QUANTIZE:
            item.layer = _layer_prefix(info.name)
            item.format = fmt
            item.layer_config = fmt.layer_config(info.shape)
            item.outputs = [
                (f"{item.layer}.{suffix}", spec) for suffix, spec in fmt.stored_specs(info.shape).items()
            ]
            item.outputs += list(writer.layer_specs(item.layer, item.layer_config).items())
        items.append(item)

    produced: dict[str, str] = {}
    for item in items:
        for out_name, _ in item.outputs:
            if out_name in produced:
                raise CqError(
                    f"Output tensor {out_name!r} would be written for both {produced[out_name]!r} and "
                    f"{item.name!r}; the input already holds a tensor with that name."
                )
            produced[out_name] = item.name

    plan = Plan(items, {}, preset, preset_reason)
    plan.metadata = {**source.metadata, **writer.header_metadata(plan.layer_configs)}
    return plan


def plan_summary_json(plan: Plan) -> str:
    return json.dumps([item.to_json() for item in plan.items], indent=2)
