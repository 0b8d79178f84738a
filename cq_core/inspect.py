"""What a checkpoint holds: dtypes, sizes, quantized layers and their metadata carriers."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from cq_core.meta import read_layer_metadata
from cq_core.shards import open_source


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    with open_source(Path(path)) as source:
        header_layers, tensor_layers = read_layer_metadata(source)
        dtypes: Counter[str] = Counter()
        dtype_bytes: Counter[str] = Counter()
        for info in source.tensors.values():
            dtypes[info.dtype_name] += 1
            dtype_bytes[info.dtype_name] += info.nbytes
        layers = header_layers if header_layers is not None else tensor_layers
        formats = Counter(
            (cfg or {}).get("format", "?") if isinstance(cfg, dict) else "?" for cfg in layers.values()
        )
        disagreements = []
        if header_layers is not None and tensor_layers:
            for layer in sorted(set(header_layers) | set(tensor_layers)):
                if header_layers.get(layer) != tensor_layers.get(layer):
                    disagreements.append(layer)
        return {
            "file": str(source.path),
            "file_bytes": source.file_size,
            "tensors": len(source.tensors),
            "params": sum(info.numel for info in source.tensors.values()),
            "dtypes": {k: {"tensors": dtypes[k], "bytes": dtype_bytes[k]} for k in sorted(dtypes)},
            "quantized_layers": sum(formats.values()),
            "formats": dict(sorted(formats.items())),
            "carriers": {
                "header": header_layers is not None,
                "header_layers": len(header_layers or {}),
                "layer_tensors": len(tensor_layers),
                "agree": not disagreements,
                "disagreeing_layers": disagreements,
            },
            "metadata_keys": sorted(source.metadata),
        }
