"""Layer metadata of a quantized checkpoint: read both carriers, edit, rewrite in sync.

ComfyUI reads each quantized layer's JSON from two carriers (the per-layer
``L.comfy_quant`` tensor and the header's ``_quantization_metadata``; the
header wins). ``cq meta`` shows them side by side, edits them, and rewrites
the file with both carriers rebuilt from one set of layer configs. The input
is any checkpoint :func:`~cq_core.shards.open_source` opens (a file, an index,
a folder of shards).
:class:`CheckpointDraft` is that rewrite: tensors as lazy loaders plus layer
configs, streamed out one tensor at a time. ``cq migrate`` edits the same
draft through the registered migrations.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from cq_core.builtin.comfy_metadata import COMFYUI_FORMATS, HEADER_KEY, LAYER_SUFFIX, ComfyMetadataWriter
from cq_core.errors import CqError, UsageError
from cq_core.outputs import check_not_inputs, check_output_name
from cq_core.safetensors_io import SafetensorsFile, write_safetensors
from cq_core.shards import (
    INDEX_SUFFIX,
    SHARD_NAME,
    ShardedSource,
    ShardLayout,
    open_source,
    source_files,
    split_groups,
    write_shard_set,
)
from cq_core.types import Format, TensorSpec

#: JSON keys whose type cq knows, with the type a value must have.
KNOWN_KEYS: dict[str, type] = {
    "format": str,
    "full_precision_matrix_mult": bool,
    "convrot": bool,
    "convrot_groupsize": int,
    "group_size": int,
}

COMFY_QUANT_SUFFIX = "." + LAYER_SUFFIX


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


def _type_name(kind: type) -> str:
    return {bool: "a bool (true/false)", int: "an integer", str: "a string"}.get(kind, kind.__name__)


def validate_value(key: str, value: Any, *, known_formats: Iterable[str] = ()) -> None:
    """Refuse a value of the wrong type for a known key, or an unknown ``format``."""
    kind = KNOWN_KEYS.get(key)
    if kind is None:
        return
    # bool is an int subclass in Python; a flag must not pass as a group size.
    if type(value) is not kind:
        raise UsageError(f"Metadata key {key!r} takes {_type_name(kind)}, not {value!r}.")
    if kind is int and value <= 0:
        raise UsageError(f"Metadata key {key!r} must be a positive integer, not {value}.")
    if key == "format":
        accepted = COMFYUI_FORMATS | set(known_formats)
        if value not in accepted:
            raise UsageError(
                f"Unknown format {value!r}; ComfyUI accepts {', '.join(sorted(COMFYUI_FORMATS))}."
            )


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


def flatten_params(layer: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"format": f, "params": {"group_size": 64}}`` -> ``{"format": f, "group_size": 64}``.

    Some writers nested options under ``params``, where ComfyUI never looks.
    A nested key that contradicts a top-level one is an error: cq cannot know
    which the file meant.
    """
    flat = {k: v for k, v in config.items() if k != "params"}
    for key, value in config.get("params", {}).items():
        if key in flat and flat[key] != value:
            raise CqError(
                f"Layer {layer!r} has {key}={flat[key]!r} and params.{key}={value!r}; fix one by hand."
            )
        flat[key] = value
    return flat


# ---------------------------------------------------------------------------
# Reading the carriers: the one parser of per-layer JSON
# ---------------------------------------------------------------------------

HEADER_CARRIER = f"__metadata__[{HEADER_KEY!r}]"


@dataclass(frozen=True)
class BadLayerJson:
    """A layer's JSON that cannot be used, kept in place of its config: where it was and why.

    Readers that only look (inspect, verify, meta show) refuse it through
    :func:`check_carriers`; the editors (``cq meta set``/``sync``) may replace it.
    """

    layer: str
    where: str  # "tensor 'L.comfy_quant'" or "__metadata__['_quantization_metadata'] layer 'L'"
    reason: str  # "is not valid JSON (...)"

    def describe(self) -> str:
        return f"{self.where} {self.reason}"


@dataclass
class LayerCarriers:
    """Both metadata carriers of a checkpoint as read, bad entries included."""

    #: Layer -> config from the header, or None when the file has no header carrier.
    header: dict[str, Any] | None
    #: Layer -> config from its ``L.comfy_quant`` tensor.
    tensors: dict[str, Any]
    #: Why the header carrier as a whole is unusable (then ``header`` is None).
    header_problem: str | None = None

    def bad(self) -> list[BadLayerJson]:
        entries = [*(self.header or {}).values(), *self.tensors.values()]
        return [config for config in entries if isinstance(config, BadLayerJson)]


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _holds_lone_surrogate(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except (TypeError, ValueError, RecursionError):
        return False
    return False


def parse_json_text(raw: bytes | str) -> tuple[Any, str | None]:
    """``(value, None)`` or ``(None, why it is not JSON)``: never raises on any input."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        return None, "is not UTF-8 text"
    try:
        return json.loads(text), None
    except RecursionError:
        return None, "nests JSON too deeply"
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4300 digits
        return None, f"is not valid JSON ({_short(str(exc))})"


def check_layer_config(config: Any) -> str | None:
    """Why ``config`` is not a layer JSON ComfyUI can read, or None: an object with a
    string ``format``, known keys of their types (:data:`KNOWN_KEYS`), valid Unicode."""
    if not isinstance(config, dict):
        return f"is not a JSON object ({_short(repr(config), 60)})"
    if not isinstance(config.get("format"), str):
        return "has no string 'format'"
    for key, kind in KNOWN_KEYS.items():
        if key in config and type(config[key]) is not kind:
            return f"has {key}={_short(repr(config[key]), 40)}, which must be {_type_name(kind)}"
        if kind is int and key in config and not 0 < config[key] < 2**31:
            return f"has {key}={_short(repr(config[key]), 40)}, which must be a positive integer"
    if _holds_lone_surrogate(config):
        return "holds a string that is not valid Unicode (a lone surrogate)"
    return None


def parse_layer_json(raw: bytes | str, layer: str, where: str) -> dict[str, Any] | BadLayerJson:
    """One layer's JSON (a ``comfy_quant`` tensor's bytes) -> its config, or why not."""
    config, problem = parse_json_text(raw)
    problem = problem or check_layer_config(config)
    return BadLayerJson(layer, where, problem) if problem else config


def parse_header_layers(raw: str) -> tuple[dict[str, Any] | None, str | None]:
    """The header carrier -> ``(layer -> config or BadLayerJson, None)`` or ``(None, why not)``."""
    body, problem = parse_json_text(raw)
    if problem:
        return None, problem
    if not isinstance(body, dict):
        return None, "is not a JSON object"
    layers = body.get("layers", {})
    if not isinstance(layers, dict):
        return None, "has a 'layers' entry that is not a JSON object"
    parsed: dict[str, Any] = {}
    for layer, config in layers.items():
        if _holds_lone_surrogate(layer):
            return None, "names a layer that is not valid Unicode (a lone surrogate)"
        problem = check_layer_config(config)
        parsed[layer] = BadLayerJson(layer, f"{HEADER_CARRIER} layer {layer!r}", problem) if problem else config
    return parsed, None


def read_carriers(source: SafetensorsFile) -> LayerCarriers:
    """Both carriers, bad entries kept as :class:`BadLayerJson`; raises only for I/O.

    A sharded checkpoint's header layers are the union of its shards' headers
    (each shard lists the layers it holds).
    """
    carriers = LayerCarriers(None, {})
    for part in getattr(source, "shards", None) or [source]:
        if HEADER_KEY in part.metadata:
            layers, problem = parse_header_layers(part.metadata[HEADER_KEY])
            if problem:
                carriers.header_problem = carriers.header_problem or problem
            else:
                carriers.header = {**(carriers.header or {}), **layers}
    if carriers.header_problem:
        carriers.header = None
    for name, info in source.tensors.items():
        if not name.endswith(COMFY_QUANT_SUFFIX):
            continue
        layer, where = name[: -len(COMFY_QUANT_SUFFIX)], f"tensor {name!r}"
        if info.dtype != torch.uint8 or len(info.shape) != 1:
            carriers.tensors[layer] = BadLayerJson(
                layer, where, f"is {info.dtype_name}{list(info.shape)}, not the 1-D U8 bytes of a JSON object"
            )
            continue
        carriers.tensors[layer] = parse_layer_json(source.read(name).numpy().tobytes(), layer, where)
    return carriers


def layer_regex(layer: str) -> str:
    """A ``--layer`` regex matching exactly ``layer``, printable on one line (escapes, not raw controls)."""
    parts = []
    for ch in layer:
        if ch.isprintable():
            parts.append(re.escape(ch))
        else:
            code = ord(ch)
            parts.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "^" + "".join(parts) + "$"


def meta_set_command(path: Path | str, layer: str) -> str:
    """The shell command that gives ``layer`` a format (FORMAT and OUTPUT left to fill in)."""
    return f"cq meta set {shlex.quote(str(path))} format=FORMAT --layer {shlex.quote(layer_regex(layer))} -o OUTPUT"


def repair_hint(path: Path | str, carriers: LayerCarriers, bad: BadLayerJson | None) -> str:
    """The ``cq meta`` command that repairs ``bad`` (or the whole header carrier when None);
    it ends the message, after "with: ", so it can be copied as it stands."""
    quoted = shlex.quote(str(path))
    if bad is None:
        return f"rebuild it from the per-layer tensors with: cq meta sync {quoted} --from tensors -o OUTPUT"
    in_header = bad.where.startswith(HEADER_CARRIER)
    other_name, other = ("tensors", carriers.tensors) if in_header else ("header", carriers.header or {})
    layer = bad.layer
    if other and not any(isinstance(c, BadLayerJson) for c in other.values()) and isinstance(other.get(layer), dict):
        return f"rebuild it from the {other_name} with: cq meta sync {quoted} --from {other_name} -o OUTPUT"
    return f"set its format with: {meta_set_command(path, layer)}"


def check_carriers(path: Path | str, carriers: LayerCarriers) -> None:
    """Refuse the first unusable carrier entry in one sentence naming it and its repair."""
    if carriers.header_problem:
        raise CqError(
            f"{path}: {HEADER_CARRIER} {carriers.header_problem}; {repair_hint(path, carriers, None)}"
        )
    for bad in carriers.bad():
        raise CqError(f"{path}: {bad.describe()}; {repair_hint(path, carriers, bad)}")


def read_layer_metadata(source: SafetensorsFile) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(header layers or None, per-layer tensor JSON) of a checkpoint, every entry a valid
    layer config; any other is a :class:`CqError` that names it and the command repairing it."""
    carriers = read_carriers(source)
    check_carriers(source.path, carriers)
    return carriers.header, carriers.tensors


# ---------------------------------------------------------------------------
# The draft: what will be written
# ---------------------------------------------------------------------------


@dataclass
class DraftTensor:
    """One output tensor: its spec, how to produce it, and the input tensor it comes from."""

    spec: TensorSpec
    load: Callable[[], torch.Tensor]
    origin: str | None


@dataclass
class Note:
    """One line of a migration or edit report."""

    kind: str  # "change", "drop", "warning" or "refused"
    subject: str  # the tensor or layer
    message: str
    by: str | None = None  # the migration that made it

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "subject": self.subject, "message": self.message, "by": self.by}


class CheckpointDraft:
    """An input checkpoint being rewritten: output tensors, layer configs, header.

    Built from the header alone; every tensor is a lazy loader, so writing the
    draft holds one tensor in memory at a time. ``layers`` is the single
    source of both metadata carriers; the input's ``L.comfy_quant`` tensors
    and ``_quantization_metadata`` are not copied but rebuilt from it.
    """

    def __init__(self, source: SafetensorsFile | ShardedSource) -> None:
        self.source = source
        self.path = source.path
        #: One file of a shard set, read on its own: a tensor's partner may be in a sibling shard.
        match = SHARD_NAME.match(source.path.name) if isinstance(source, SafetensorsFile) else None
        self.lone_shard = match is not None and int(match["total"]) > 1
        #: As read, unusable entries kept as :class:`BadLayerJson` (an edit may replace them).
        self.carriers = read_carriers(source)
        header_layers, tensor_layers = self.carriers.header, self.carriers.tensors
        self.header_layers: dict[str, Any] | None = header_layers
        self.tensor_layers: dict[str, Any] = tensor_layers
        #: Header metadata other than the quantization header (kept as is).
        self.metadata: dict[str, str] = {k: v for k, v in source.metadata.items() if k != HEADER_KEY}
        self.tensors: dict[str, DraftTensor] = {
            name: DraftTensor(TensorSpec(info.dtype, info.shape), partial(source.read, name), name)
            for name, info in source.tensors.items()
            if not name.endswith(COMFY_QUANT_SUFFIX)
        }
        #: Layer prefix -> the JSON ComfyUI will read; the header wins, as in ComfyUI.
        #: A config that is not a JSON object stays as read until an edit replaces it;
        #: writing refuses it (see :meth:`check_layers`).
        self.layers: dict[str, Any] = {
            layer: dict(config) if isinstance(config, dict) else config
            for layer, config in {**tensor_layers, **(header_layers or {})}.items()
        }
        self.notes: list[Note] = []
        #: The migration now applying (set by cq migrate), recorded on its notes.
        self.current: str | None = None

    # -- looking -----------------------------------------------------------------

    def spec(self, name: str) -> TensorSpec:
        return self.tensors[name].spec

    def read(self, name: str) -> torch.Tensor:
        """The tensor as it will be written (reads it now; for small tensors such as scales)."""
        return self.tensors[name].load()

    def names_ending(self, suffix: str) -> list[str]:
        return [name for name in self.tensors if name.endswith(suffix)]

    # -- editing -------------------------------------------------------------------

    def note(self, subject: str, message: str, kind: str = "change") -> None:
        self.notes.append(Note(kind, subject, message, self.current))

    def warn(self, subject: str, message: str) -> None:
        """Something the user should know that does not stop the rewrite."""
        self.note(subject, message, "warning")

    def refuse(self, layer: str, message: str) -> None:
        """A layer that cannot be written in a layout ComfyUI loads; cq migrate stops on it."""
        self.note(layer, message, "refused")

    def drop(self, name: str, message: str) -> None:
        del self.tensors[name]
        self.note(name, message, "drop")

    def check_not_elsewhere(self, name: str) -> None:
        """Refuse to treat ``name``'s missing partner as absent when this file is one shard of several."""
        if self.lone_shard:
            raise CqError(
                f"{self.path}: is one shard of a sharded checkpoint, and {name!r} belongs to a weight that "
                "is not in it (it may be in another shard); pass the index or the folder so every shard is read."
            )

    def replace(
        self,
        name: str,
        *,
        new_name: str | None = None,
        dtype: torch.dtype | None = None,
        shape: tuple[int, ...] | None = None,
    ) -> None:
        """Rename, cast or reshape a tensor in place (its position in the file is kept)."""
        old = self.tensors[name]
        new_name = new_name or name
        if new_name != name and new_name in self.tensors:
            raise CqError(f"{self.path}: cannot rename {name!r} to {new_name!r}, which already exists.")
        spec = TensorSpec(dtype or old.spec.dtype, tuple(shape) if shape is not None else old.spec.shape)
        if spec.nbytes // spec.dtype.itemsize != old.spec.nbytes // old.spec.dtype.itemsize:
            raise CqError(f"{self.path}: tensor {name!r} of shape {old.spec.shape} cannot become {spec.shape}.")

        def load(old_load=old.load) -> torch.Tensor:
            return old_load().to(spec.dtype).reshape(spec.shape)

        self.tensors = {
            (new_name if key == name else key): (DraftTensor(spec, load, old.origin) if key == name else value)
            for key, value in self.tensors.items()
        }

    def add(self, name: str, tensor: torch.Tensor, *, after: str) -> None:
        """Insert a small new tensor right after ``after``."""
        if name in self.tensors:
            raise CqError(f"{self.path}: tensor {name!r} already exists.")
        tensor = tensor.detach().cpu().contiguous()
        entry = DraftTensor(TensorSpec(tensor.dtype, tuple(tensor.shape)), lambda: tensor, None)
        items = list(self.tensors.items())
        at = next(i for i, (key, _) in enumerate(items) if key == after) + 1
        self.tensors = dict([*items[:at], (name, entry), *items[at:]])

    # -- the carriers ----------------------------------------------------------------

    def carriers_in_sync(self) -> bool:
        """Whether the input's two carriers already say exactly what ``layers`` says."""
        if not self.layers:
            return not self.header_layers and not self.tensor_layers
        return self.header_layers == self.layers and self.tensor_layers == self.layers

    def entries(self) -> list[tuple[str, TensorSpec, Callable[[], torch.Tensor]]]:
        """Every output tensor in write order; each layer's ``comfy_quant`` follows its weight."""
        writer = ComfyMetadataWriter()
        out = []
        for name, tensor in self.tensors.items():
            out.append((name, tensor.spec, tensor.load))
            layer = name.removesuffix(".weight")
            if name.endswith(".weight") and layer in self.layers:
                config = self.layers[layer]
                made = writer.layer_tensors(layer, config)
                for key, spec in writer.layer_specs(layer, config).items():
                    out.append((key, spec, partial(made.__getitem__, key)))
        return out

    def header(self) -> dict[str, str]:
        return {**self.metadata, **ComfyMetadataWriter().header_metadata(self.layers)}

    def check_layers(self) -> None:
        """Every layer config must be valid (:func:`check_layer_config`); the message says
        which ``cq meta`` command repairs one that is not."""
        for layer, config in self.layers.items():
            if isinstance(config, BadLayerJson):
                raise CqError(f"{self.path}: {config.describe()}; {repair_hint(self.path, self.carriers, config)}")
            problem = check_layer_config(config)
            if problem:
                raise CqError(
                    f"{self.path}: the metadata of layer {layer!r} {problem}; set it with: "
                    f"{meta_set_command(self.path, layer)}"
                )

    def write(self, output: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Stream the draft to ``output`` atomically, one tensor in memory at a time.

        An ``output`` named ``*.safetensors.index.json`` gets a shard set
        mirroring the input's shards; any other name, one file.
        """
        self.check_layers()
        missing = sorted(layer for layer in self.layers if f"{layer}.weight" not in self.tensors)
        if missing:
            raise CqError(f"{self.path}: layer {missing[0]!r} has metadata but no weight tensor.")
        entries = self.entries()
        output = Path(output)
        inputs = source_files(self.source)
        if output.name.endswith(INDEX_SUFFIX):
            target = write_shard_set(output, self._shard_layouts(entries), overwrite=overwrite, inputs=inputs)
        else:
            target = write_safetensors(
                output, [(name, spec) for name, spec, _ in entries], self.header(), overwrite=overwrite,
                inputs=inputs,
            )
        with target as out:
            for name, _, load in entries:
                tensor = load()
                out.write(name, tensor)
                del tensor

    def _shard_layouts(self, entries) -> list[ShardLayout]:
        """One output shard per input shard; a tensor cq adds goes with the one before it."""
        keys, key = [], 0
        for name, _, _ in entries:
            origin = self.tensors[name].origin if name in self.tensors else None
            if origin is not None and isinstance(self.source, ShardedSource):
                key = self.source.shard_number(origin)
            keys.append(key)
        writer = ComfyMetadataWriter()
        layouts = []
        for numbers in split_groups([[(name, spec)] for name, spec, _ in entries], None, keys):
            members = [entries[n][:2] for n in numbers]
            layers = {
                layer: self.layers[layer]
                for name, _ in members
                if name.endswith(".weight") and (layer := name.removesuffix(".weight")) in self.layers
            }
            layouts.append(ShardLayout(members, {**self.metadata, **writer.header_metadata(layers)}))
        return layouts


def check_output(source: SafetensorsFile | ShardedSource, output: Path) -> None:
    """No file of the output may be a file of the input (compared as files, not names)."""
    check_not_inputs([output], source_files(source))


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
    try:
        pattern = re.compile(layer_regex)
    except re.error as exc:
        raise UsageError(f"--layer {layer_regex!r} is not a valid regular expression ({exc}).") from None
    chosen = [layer for layer in draft.layers if pattern.search(layer)]
    if not chosen:
        raise UsageError(f"--layer {layer_regex!r} matches none of the {len(draft.layers)} quantized layers.")
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
        check_output(source, output_path)
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
        if fmt is not None and fmt not in COMFYUI_FORMATS:
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
