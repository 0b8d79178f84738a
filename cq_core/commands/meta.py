"""Layer metadata of a quantized checkpoint: read both carriers, edit, rewrite in sync.

ComfyUI reads each quantized layer's JSON from two carriers (the per-layer
``L.comfy_quant`` tensor and the header's ``_quantization_metadata``; the
header wins). ``cq meta`` shows them side by side, edits them, and rewrites
the file with both carriers rebuilt from one set of layer configs. The input
is any checkpoint :func:`~cq_core.io.shards.open_source` opens (a file, an index,
a folder of shards).
:class:`CheckpointDraft` is that rewrite: tensors as lazy loaders plus layer
configs, streamed out one tensor at a time. ``cq migrate`` edits the same
draft through the registered migrations.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cq_core.engine.rules import compile_pattern
from cq_core.errors import CqError, UsageError, quoted
from cq_core.io.layer_metadata import (
    HEADER_CARRIER,
    HEADER_KEY,
    KNOWN_KEYS,
    LAYER_SUFFIX,
    BadLayerJson,
    read_layer_metadata,
    repair_hint,
    type_name,
)
from cq_core.io.outputs import check_not_inputs, check_output_name

from cq_core.io.shards import open_source
from cq_core.plugin.draft import CheckpointDraft, Note
from cq_core.plugin.types import Format

# ---------------------------------------------------------------------------
# Values and configs
# ---------------------------------------------------------------------------


def parse_value(raw: str) -> bool | int | float | str:
    """``true``/``false`` -> bool, then int, then float; anything else stays a string.

    Quotes force a string: ``'"1"'`` is the string ``1``.
    """
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text



def validate_value(key: str, value: Any, *, known_formats: Iterable[str] = ()) -> None:
    """Refuse a value of the wrong type for a known key, or a ``format`` none of ``known_formats``
    (the installed formats' names) is."""
    kind = KNOWN_KEYS.get(key)
    if kind is None:
        return
    # bool is an int subclass in Python; a flag must not pass as a group size.
    if type(value) is not kind:
        raise UsageError(f"Metadata key {key!r} takes {type_name(kind)}, not {value!r}.")
    if kind is int and value <= 0:
        raise UsageError(f"Metadata key {key!r} must be a positive integer, not {value}.")
    if key == "format":
        known = sorted(known_formats)
        if value not in known:
            raise UsageError(f"Unknown format {value!r}; valid: {', '.join(known) or 'none installed'}.")


def parse_assignments(pairs: Iterable[str], *, known_formats: Iterable[str] = ()) -> dict[str, Any]:
    """``["format=nvfp4", "full_precision_matrix_mult=true"]`` -> typed, validated values."""
    known_formats = tuple(known_formats)
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"Metadata assignment {pair!r} must look like KEY=VALUE.")
        value = parse_value(raw)
        validate_value(key, value, known_formats=known_formats)
        result[key] = value
    return result



# ---------------------------------------------------------------------------
# cq meta show / set / unset / sync
# ---------------------------------------------------------------------------


def show(path: str | os.PathLike) -> dict[str, Any]:
    """Both carriers of every layer side by side, with disagreements flagged."""
    with open_source(path) as source:
        header_layers, tensor_layers = read_layer_metadata(source)
    names = list(dict.fromkeys([*(header_layers or {}), *tensor_layers]))
    layers = {}
    for layer in names:
        in_header = header_layers is not None and layer in header_layers
        in_tensor = layer in tensor_layers
        header_cfg = header_layers.get(layer) if in_header else None
        tensor_cfg = tensor_layers.get(layer) if in_tensor else None
        if in_header and in_tensor:
            status = "agree" if header_cfg == tensor_cfg else "differ"
        else:
            status = "header only" if in_header else "tensor only"
        layers[layer] = {"header": header_cfg, "tensor": tensor_cfg, "status": status}
    return {
        "file": str(path),
        "header": header_layers is not None,
        "layers": layers,
        "disagreeing": [layer for layer, row in layers.items() if row["status"] != "agree"],
    }


def _select(draft: CheckpointDraft, layer_regex: str | None) -> list[str]:
    if not draft.layers:
        raise CqError(f"{draft.path}: has no quantized layers (no layer metadata) to edit.")
    if layer_regex is None:
        return list(draft.layers)
    pattern = compile_pattern(layer_regex, "--layer")
    chosen = [layer for layer in draft.layers if pattern.search(layer)]
    if not chosen:
        raise UsageError(f"--layer {quoted(layer_regex)} matches none of the {len(draft.layers)} quantized layers.")
    return chosen


@dataclass
class EditResult:
    """What a ``cq meta`` edit changed."""

    output: str
    layers: list[str] = field(default_factory=list)  # the layers whose JSON changed
    notes: list[Note] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"output": self.output, "changed_layers": self.layers, "notes": [n.to_json() for n in self.notes]}


def _edit(
    path: str | os.PathLike,
    output: str | os.PathLike,
    overwrite: bool,
    change: Callable[[CheckpointDraft], None],
) -> EditResult:
    input_path, output_path = Path(path), Path(output)
    check_output_name(output_path, overwrite)
    with open_source(input_path) as source:
        check_not_inputs([output_path], source.files())
        draft = CheckpointDraft(source)
        before = {layer: dict(config) if isinstance(config, dict) else config for layer, config in draft.layers.items()}
        change(draft)
        draft.write(output_path, overwrite=overwrite)
    changed = [layer for layer, config in draft.layers.items() if before.get(layer) != config]
    return EditResult(str(output_path), changed, draft.notes)


def _check_weight_dtype(draft: CheckpointDraft, layer: str, fmt_cls: type[Format]) -> None:
    stored = draft.spec(f"{layer}.weight")
    try:
        wanted = fmt_cls().stored_specs(stored.shape)["weight"].dtype
    except Exception:  # a format that cannot describe this shape: nothing to compare
        return
    if wanted != stored.dtype:
        raise UsageError(
            f"Layer {layer!r} stores a {stored.dtype} weight but format {fmt_cls.name!r} stores {wanted}; "
            "changing the label would decode garbage (re-quantize with 'cq convert' instead)."
        )


def set_keys(
    path: str | os.PathLike,
    output: str | os.PathLike,
    values: Mapping[str, Any],
    *,
    layer_regex: str | None = None,
    formats: Mapping[str, type[Format]] | None = None,
    overwrite: bool = False,
) -> EditResult:
    """Set typed keys on the selected layers' JSON, both carriers alike.

    ``formats`` (the registry's) lets cq check that a new ``format`` matches
    the weight dtype already stored: relabelling FP8 bytes as NVFP4 would load
    and decode to garbage.
    """
    if not values:
        raise UsageError("cq meta set needs at least one KEY=VALUE.")
    formats = dict(formats or {})
    for key, value in values.items():
        validate_value(key, value, known_formats=formats)
    fmt = values.get("format")

    def change(draft: CheckpointDraft) -> None:
        for layer in _select(draft, layer_regex):
            if fmt in formats and f"{layer}.weight" in draft.tensors:
                _check_weight_dtype(draft, layer, formats[fmt])
            if not isinstance(draft.layers[layer], dict):
                draft.layers[layer] = {}
            draft.layers[layer].update(values)
        if fmt is not None and not formats[fmt].comfy_loadable:
            draft.warn(str(fmt), "stock ComfyUI does not load this format")

    return _edit(path, output, overwrite, change)


def unset_keys(
    path: str | os.PathLike,
    output: str | os.PathLike,
    keys: Iterable[str],
    *,
    layer_regex: str | None = None,
    overwrite: bool = False,
) -> EditResult:
    """Remove keys from the selected layers' JSON; ``format`` cannot be removed."""
    keys = [key.strip() for key in keys]
    if not keys:
        raise UsageError("cq meta unset needs at least one KEY.")
    if "format" in keys:
        raise UsageError("'format' is required by ComfyUI and cannot be unset; use 'cq meta set format=...'.")

    def change(draft: CheckpointDraft) -> None:
        chosen = [layer for layer in _select(draft, layer_regex) if isinstance(draft.layers[layer], dict)]
        for key in keys:
            if not any(key in draft.layers[layer] for layer in chosen):
                raise UsageError(f"No selected layer has the key {key!r}.")
        for layer in chosen:
            for key in keys:
                draft.layers[layer].pop(key, None)

    return _edit(path, output, overwrite, change)


def sync(
    path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    source: str = "tensors",
    overwrite: bool = False,
) -> EditResult:
    """Rebuild one carrier from the other: ``source`` is ``"tensors"`` or ``"header"``."""
    if source not in ("tensors", "header"):
        raise UsageError(f"--from must be 'tensors' or 'header', not {source!r}.")

    def change(draft: CheckpointDraft) -> None:
        if source == "header":
            if draft.carriers.header_problem:
                raise CqError(
                    f"{draft.path}: {HEADER_CARRIER} {draft.carriers.header_problem}, so it cannot be synced from; "
                    "use --from tensors."
                )
            if draft.header_layers is None:
                raise CqError(f"{draft.path}: has no {HEADER_KEY} header to sync from.")
            chosen = draft.header_layers
        else:
            # A header that is not JSON at all may be rebuilt from no tensors: it is dropped.
            if not draft.tensor_layers and not draft.carriers.header_problem:
                raise CqError(f"{draft.path}: has no per-layer {LAYER_SUFFIX} tensors to sync from.")
            chosen = draft.tensor_layers
        for config in chosen.values():
            if isinstance(config, BadLayerJson):
                raise CqError(
                    f"{draft.path}: {config.describe()}, so it cannot be synced from; "
                    f"{repair_hint(draft.path, draft.carriers, config)}"
                )
        if draft.carriers.header_problem and source == "tensors":
            draft.note(HEADER_KEY, f"the header carrier {draft.carriers.header_problem}; rebuilt from the tensors")
        for layer in [*draft.layers]:
            if layer not in chosen:
                draft.note(layer, "dropped: only the other carrier listed it", "drop")
        draft.layers = {layer: dict(config) for layer, config in chosen.items()}

    return _edit(path, output, overwrite, change)
