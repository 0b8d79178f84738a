"""What a checkpoint holds: dtypes, sizes, quantized layers and their metadata carriers.

Layers are also judged, from the header alone, against their formats' contracts
(what ComfyUI's loader takes), and layers that store quantized tensors without
any metadata are recognized by the formats their tensors fit.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cq_core.engine.recipe import RecipeRecord
from cq_core.errors import CqError
from cq_core.io.calibration_file import FILE_MARKER, STAT_NAMES
from cq_core.io.layer_metadata import LAYER_SUFFIX, read_layer_metadata
from cq_core.io.source import Source
from cq_core.io.shards import open_source
from cq_core.plugin.contract import (
    Unlabelled,
    check_layer,
    tensors_by_layer,
    unlabelled_layers,
    unscaled_float8_layers,
)
from cq_core.plugin.draft import CheckpointDraft, ForeignLayer
from cq_core.plugin.manager import Registry, resolve_registry
from cq_core.plugin.types import Format, TensorSpec


def count_params(source: Source, layers: dict[str, Any], registry: Registry) -> int:
    """Parameters as the model has them: a quantized layer's weight counts its logical
    (N, K) elements (its format reads them off the stored shapes), not its packed bytes,
    scales or metadata; every other tensor counts its elements."""
    counted = {name: info.numel for name, info in source.tensors.items()}
    for layer, config in layers.items():
        name = config.get("format") if isinstance(config, dict) else None
        if name not in registry.formats:
            continue  # a format no installed plugin knows: count what is stored
        prefix = layer + "."
        on_disk = {
            tensor[len(prefix):]: TensorSpec(info.dtype, info.shape)
            for tensor, info in source.tensors.items()
            if tensor.startswith(prefix) and "." not in tensor[len(prefix):]
        }
        if "weight" not in on_disk:
            continue
        try:
            fmt = registry.format(name).from_layer_config(config, on_disk)
            shape = fmt.logical_shape(on_disk)
            owned = set(fmt.stored_specs(shape)) | {LAYER_SUFFIX}
        except (CqError, KeyError, ValueError):
            continue
        for suffix in owned & set(on_disk):
            counted[prefix + suffix] = 0
        counted[prefix + "weight"] = math.prod(shape)
    return sum(counted.values())


def contract_findings(
    specs: Mapping[str, Any], layers: Mapping[str, Any], formats: Mapping[str, type[Format]]
) -> tuple[dict[str, list[str]], list[Unlabelled]]:
    """Header-only judgement of a checkpoint against the installed formats' contracts:
    (layer -> what is wrong with a labelled layer, one sentence each; the layers that
    store quantized tensors without metadata, with the formats their tensors fit)."""
    by_layer = tensors_by_layer(specs)
    problems: dict[str, list[str]] = {}
    for layer, config in layers.items():
        fmt = config.get("format") if isinstance(config, dict) else None
        contract = formats[fmt].contract if fmt in formats else None
        if contract is None or layer not in by_layer:
            continue
        sentences = check_layer(layer, fmt, contract, by_layer[layer], config).sentences()
        if sentences:
            problems[layer] = sentences
    return problems, unlabelled_layers(specs, layers, formats)


def foreign_findings(source: Any, registry: Registry) -> dict[str, tuple[str, ForeignLayer]]:
    """Layers in another producer's quantized layout, by layer: (the migration that imports it,
    what it found), from the header and the producer's files beside the checkpoint."""
    draft = CheckpointDraft(source, registry.formats)
    found: dict[str, tuple[str, ForeignLayer]] = {}
    for name, migration in registry.migrations.items():
        for layer in migration().foreign_layers(draft):
            found.setdefault(layer.layer, (name, layer))
    return found


def inspect_checkpoint(path: str | os.PathLike, *, registry: Registry | None = None) -> dict[str, Any]:
    registry = resolve_registry(registry)
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
        problems, unlabelled = contract_findings(
            source.tensors, {k: v for k, v in {**tensor_layers, **(header_layers or {})}.items()}, registry.formats
        )
        foreign = foreign_findings(source, registry)
        unlabelled = [found for found in unlabelled if found.layer not in foreign]
        unlabelled_rows = {
            found.layer: {"format": found.format, "candidates": found.candidates, "message": found.sentence()}
            for found in unlabelled
        }
        for layer, (_, found) in foreign.items():
            if found.format is None:  # the header cannot tell the producer's layout from ComfyUI's
                unlabelled_rows[layer] = {"format": None, "candidates": found.candidates, "message": found.message}
        recognized = Counter(
            row["format"] or ("ambiguous" if row["candidates"] else "unknown") for row in unlabelled_rows.values()
        )
        imported = {layer: entry for layer, entry in foreign.items() if entry[1].format is not None}
        disagreements = []
        if header_layers is not None and tensor_layers:
            for layer in sorted(set(header_layers) | set(tensor_layers)):
                if header_layers.get(layer) != tensor_layers.get(layer):
                    disagreements.append(layer)
        # ComfyUI applies a layer's metadata to the weight of that name: a name with no weight (a
        # prefix that does not match the file's) is metadata for nothing, however the carriers agree.
        without_weight = sorted(layer for layer in layers if f"{layer}.weight" not in source.tensors)
        return {
            "file": str(source.path),
            "file_bytes": source.file_size,
            "tensors": len(source.tensors),
            "params": count_params(source, layers, registry),
            "dtypes": {k: {"tensors": dtypes[k], "bytes": dtype_bytes[k]} for k in sorted(dtypes)},
            "quantized_layers": sum(formats.values()) + len(imported),
            "formats": dict(sorted(formats.items())),
            # Layers in another producer's layout (ModelOpt, compressed-tensors...): 'cq migrate' imports them.
            "foreign_layers": len(imported),
            "foreign_formats": dict(sorted(Counter(found.layout for _, found in imported.values()).items())),
            "foreign": {
                layer: {"layout": found.layout, "format": found.format, "migration": name, "message": found.message}
                for layer, (name, found) in imported.items()
            },
            # What ComfyUI's loader would refuse, decode wrong or leave unused, by layer.
            "contract_problems": problems,
            # Quantized tensors without metadata: ComfyUI would use the codes as plain weights.
            "unlabelled_layers": len(unlabelled_rows),
            "unlabelled_formats": dict(sorted(recognized.items())),
            "unlabelled": unlabelled_rows,
            # Plain FP8 weights (no scale, no metadata): layer -> dtype; ComfyUI casts their values (scale 1).
            "unscaled_float8": unscaled_float8_layers(source.tensors, layers),
            "carriers": {
                "header": header_layers is not None,
                "header_layers": len(header_layers or {}),
                "layer_tensors": len(tensor_layers),
                "agree": not disagreements and not without_weight,
                "disagreeing_layers": disagreements,
                "layers_without_weight": without_weight,
            },
            # Older layouts a migration recognizes (name -> why): their layers are quantized too.
            "legacy_layouts": legacy_layouts(source, registry),
            # A 'cq calibrate' statistics file, not a checkpoint: its layers and input rows.
            "calibration": calibration_entry(source),
            "metadata_keys": sorted(source.metadata),
            "recipe": _recipe_entry(source),
        }


def legacy_layouts(source: Source, registry: Registry) -> dict[str, str]:
    """The installed migrations that recognize ``source`` (``cq migrate`` would apply them),
    each with its reason; read from the header alone."""
    try:
        draft = CheckpointDraft(source, registry.formats)
        found = {}
        for name, migration_cls in registry.migrations.items():
            reason = migration_cls().detect(draft)
            if reason is not None:
                found[name] = reason
        return found
    except CqError:
        return {}  # unreadable layer metadata: the carriers' own lines say so


def calibration_entry(source: Source) -> dict[str, Any] | None:
    """``{"layers", "rows"}`` of a statistics file ``cq calibrate`` wrote (its ``cq_calibration``
    metadata), else None."""
    marker = source.metadata.get(FILE_MARKER)
    if marker is None:
        return None
    try:
        recorded = json.loads(marker)
    except ValueError:
        recorded = {}
    layers = {name.rsplit(".", 1)[0] for name in source.tensors if name.rsplit(".", 1)[-1] in STAT_NAMES}
    rows = recorded.get("rows") if isinstance(recorded, dict) else None
    return {"layers": len(layers), "rows": rows if isinstance(rows, dict) else None}


def _recipe_entry(source: Any) -> dict[str, Any] | None:
    """The recipe record that made the file (None: none recorded); an unreadable one as ``{"error": ...}``."""
    try:
        record = RecipeRecord.read(source.metadata, str(source.path))
    except CqError as exc:
        return {"error": str(exc)}
    return record.to_json() if record is not None else None
