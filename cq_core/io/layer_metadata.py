"""ComfyUI's two per-layer metadata carriers: their names, the one parser of their JSON.

ComfyUI reads each quantized layer's JSON from a ``L.comfy_quant`` uint8
tensor (UTF-8 JSON) and from the header's ``_quantization_metadata`` =
``{"format_version": "1.0", "layers": {L: json}}``; the header wins
(``comfy/utils.py`` ``convert_old_quants``, ``comfy/ops.py``
``mixed_precision_ops``). Every reader in cq (inspect, verify, meta, migrate)
goes through :func:`read_carriers`; every writer builds both carriers with
:func:`layer_json` and :func:`header_entries`.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cq_core.errors import CqError, without_python_advice

if TYPE_CHECKING:
    from cq_core.io.source import Source

LAYER_SUFFIX = "comfy_quant"
HEADER_KEY = "_quantization_metadata"
FORMAT_VERSION = "1.0"


def layer_json(config: Mapping[str, Any]) -> bytes:
    """A layer config as the compact UTF-8 JSON both carriers hold."""
    return json.dumps(dict(config), separators=(",", ":")).encode("utf-8")


def layer_tensor(config: Mapping[str, Any]) -> torch.Tensor:
    """The ``L.comfy_quant`` carrier of a layer config: its JSON as a 1-D uint8 tensor."""
    return torch.frombuffer(bytearray(layer_json(config)), dtype=torch.uint8)


def header_entries(layers: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """The ``__metadata__`` entry that carries ``layers`` (none when there are no layers)."""
    if not layers:
        return {}
    body = {"format_version": FORMAT_VERSION, "layers": {k: dict(v) for k, v in layers.items()}}
    return {HEADER_KEY: json.dumps(body, separators=(",", ":"))}


#: JSON keys whose type cq knows, with the type a value must have.
KNOWN_KEYS: dict[str, type] = {
    "format": str,
    "full_precision_matrix_mult": bool,
    "convrot": bool,
    "convrot_groupsize": int,
    "group_size": int,
}

COMFY_QUANT_SUFFIX = "." + LAYER_SUFFIX


def type_name(kind: type) -> str:
    return {bool: "a bool (true/false)", int: "an integer", str: "a string"}.get(kind, kind.__name__)



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
    text = without_python_advice(" ".join(text.split()))
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
            return f"has {key}={_short(repr(config[key]), 40)}, which must be {type_name(kind)}"
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


def read_carriers(source: Source) -> LayerCarriers:
    """Both carriers, bad entries kept as :class:`BadLayerJson`; raises only for I/O.

    A sharded checkpoint's header layers are the union of its shards' headers
    (each shard lists the layers it holds).
    """
    carriers = LayerCarriers(None, {})
    for metadata in source.part_metadata():
        if HEADER_KEY in metadata:
            layers, problem = parse_header_layers(metadata[HEADER_KEY])
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


def read_layer_metadata(source: Source) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(header layers or None, per-layer tensor JSON) of a checkpoint, every entry a valid
    layer config; any other is a :class:`CqError` that names it and the command repairing it."""
    carriers = read_carriers(source)
    check_carriers(source.path, carriers)
    return carriers.header, carriers.tensors
