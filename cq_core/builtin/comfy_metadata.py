"""The ComfyUI metadata writer: both of ComfyUI's carriers, with identical content.

Per layer: a uint8 tensor ``L.comfy_quant`` holding the UTF-8 JSON. In the
header: ``_quantization_metadata`` = ``{"format_version": "1.0", "layers":
{L: json}}``. ComfyUI prefers the header; older versions read only it. The
carriers' names and encoding live in :mod:`cq_core.io.layer_metadata`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cq_core.io.layer_metadata import (
    LAYER_SUFFIX,
    header_entries,
    layer_json,
    layer_tensor,
)
from cq_core.plugin.hookspecs import hookimpl
from cq_core.plugin.types import MetadataWriter, TensorSpec


class ComfyMetadataWriter(MetadataWriter):
    name = "comfyui"
    description = "Per-layer .comfy_quant tensors plus the _quantization_metadata header (ComfyUI)."

    def layer_specs(self, prefix: str, config: Mapping[str, Any]) -> dict[str, TensorSpec]:
        return {f"{prefix}.{LAYER_SUFFIX}": TensorSpec(torch.uint8, (len(layer_json(config)),))}

    def layer_tensors(self, prefix: str, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{LAYER_SUFFIX}": layer_tensor(config)}

    def header_metadata(self, layers: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
        return header_entries(layers)


@hookimpl
def cq_register_metadata_writers(register):
    register(ComfyMetadataWriter)
