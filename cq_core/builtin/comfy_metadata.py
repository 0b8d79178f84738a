"""ComfyUI's two metadata carriers, written with identical content.

Per layer: a uint8 tensor ``L.comfy_quant`` holding the UTF-8 JSON. In the
header: ``_quantization_metadata`` = ``{"format_version": "1.0", "layers":
{L: json}}``. ComfyUI prefers the header; older versions read only it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from cq_core.hookspecs import hookimpl
from cq_core.types import MetadataWriter, TensorSpec

LAYER_SUFFIX = "comfy_quant"
HEADER_KEY = "_quantization_metadata"
FORMAT_VERSION = "1.0"
#: The ``format`` strings stock ComfyUI accepts (any other raises KeyError at load time).
COMFYUI_FORMATS = frozenset(
    {"float8_e4m3fn", "float8_e5m2", "nvfp4", "mxfp8", "int8_tensorwise", "convrot_w4a4"}
)


def layer_json(config: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(config), separators=(",", ":")).encode("utf-8")


class ComfyMetadataWriter(MetadataWriter):
    name = "comfyui"
    description = "Per-layer .comfy_quant tensors plus the _quantization_metadata header (ComfyUI)."

    def layer_specs(self, prefix: str, config: Mapping[str, Any]) -> dict[str, TensorSpec]:
        return {f"{prefix}.{LAYER_SUFFIX}": TensorSpec(torch.uint8, (len(layer_json(config)),))}

    def layer_tensors(self, prefix: str, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        raw = layer_json(config)
        return {f"{prefix}.{LAYER_SUFFIX}": torch.frombuffer(bytearray(raw), dtype=torch.uint8)}

    def header_metadata(self, layers: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
        if not layers:
            return {}
        body = {"format_version": FORMAT_VERSION, "layers": {k: dict(v) for k, v in layers.items()}}
        return {HEADER_KEY: json.dumps(body, separators=(",", ":"))}


@hookimpl
def cq_register_metadata_writers(register):
    register(ComfyMetadataWriter)
