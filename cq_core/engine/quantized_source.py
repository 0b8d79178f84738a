"""A quantized checkpoint read as the high-precision one its layers decode to, so ``cq convert``
can quantize it again (an FP8-only release to NVFP4 or INT8, say).

The input is brought to the current ComfyUI layout first, as ``cq migrate`` would
(:func:`cq_core.engine.migration.migrate_draft`: legacy scaled FP8/INT8, other producers'
layouts, layers without metadata), then each quantized layer is presented as one
``L.weight`` that :meth:`QuantizedSource.read` decodes exactly as ComfyUI does (the
format's ``decode``, float32), while its scales and carriers are hidden. An FP8 tensor no
format claims (a plain FP8 weight without a scale or metadata, an FP8 bias) is read as its
values in float32, as ComfyUI casts it (``comfy/ops.py`` ``cast_bias_weight``; scale 1). Every
other tensor is the input's own. The quantization that follows is measured against the decoded
weight, not the original (which the file no longer holds); the report says so.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

import torch

from cq_core.errors import CqError
from cq_core.engine.migration import migrate_draft
from cq_core.io.safetensors_io import TensorInfo, TensorLocation
from cq_core.io.source import Source, SourceView
from cq_core.plugin.contract import tensors_by_layer, unscaled_float8_layers
from cq_core.plugin.draft import CheckpointDraft
from cq_core.plugin.manager import Registry
from cq_core.plugin.types import Format

WEIGHT = "weight"


class QuantizedSource(SourceView):
    """``source`` (a :class:`cq_core.io.source.Source` holding quantized layers) under the same
    names, each quantized layer's ``weight`` decoded on :meth:`read` (float32; its planned dtype
    is the checkpoint's usual high-precision dtype, in which a layer the new plan keeps is
    written). ``layers``: layer -> format name, as the input stores them."""

    layout = None

    def __init__(self, source: Source, draft: CheckpointDraft, formats: Mapping[str, type[Format]]) -> None:
        self.source = source
        self.path = source.path
        self.metadata = dict(draft.metadata)
        self._draft = draft
        self.layers: dict[str, str] = {}
        self._decoders: dict[str, tuple[Format, dict[str, str], tuple[int, ...]]] = {}
        stored = tensors_by_layer({name: t.spec for name, t in draft.tensors.items()})
        hidden: set[str] = set()
        for layer, config in draft.layers.items():
            cls = formats[config["format"]]
            specs = stored.get(layer, {})
            fmt = cls.from_layer_config(config, specs)
            names = {suffix: f"{layer}.{suffix}" for suffix in specs
                     if cls.contract is None or suffix in cls.contract.tensors}
            self._decoders[f"{layer}.{WEIGHT}"] = (fmt, names, tuple(fmt.logical_shape(specs)))
            hidden.update(name for suffix, name in names.items() if suffix != WEIGHT)
            self.layers[layer] = config["format"]
        refused = {n.subject for n in draft.notes if n.kind == "refused"}
        #: Plain FP8 weights (no scale, no metadata), decoded as ComfyUI does: the values cast (scale 1).
        self.unscaled: dict[str, str] = unscaled_float8_layers(
            {name: t.spec for name, t in draft.tensors.items()}, [*draft.layers, *refused])
        for layer in self.unscaled:
            self._decoders[f"{layer}.{WEIGHT}"] = (None, {WEIGHT: f"{layer}.{WEIGHT}"},
                                                   tuple(draft.tensors[f"{layer}.{WEIGHT}"].spec.shape))
        #: Any other FP8 tensor no format decodes (a bias, a norm): ComfyUI casts it the same way.
        self.cast: list[str] = [name for name, t in draft.tensors.items()
                                if name not in hidden and name not in self._decoders
                                and t.spec.dtype.is_floating_point and t.spec.dtype.itemsize == 1]
        for name in self.cast:
            self._decoders[name] = (None, {WEIGHT: name}, tuple(draft.tensors[name].spec.shape))
        dtype = _high_precision_dtype(draft, set(self._decoders) | hidden)
        self.tensors: dict[str, TensorInfo] = {}
        offset = 0
        for name, tensor in draft.tensors.items():
            if name in hidden:
                continue
            if name in self._decoders:
                shape = self._decoders[name][2]
                info = TensorInfo(name, dtype, shape, offset, offset + math.prod(shape) * dtype.itemsize)
            else:
                info = TensorInfo(name, tensor.spec.dtype, tuple(tensor.spec.shape), offset,
                                  offset + math.prod(tensor.spec.shape) * tensor.spec.dtype.itemsize)
            self.tensors[name] = info
            offset = info.end

    def part_metadata(self) -> list[Mapping[str, str]]:
        return [self.metadata]

    def _origin(self, name: str) -> str | None:
        tensor = self._draft.tensors.get(name)
        return tensor.origin if tensor is not None else None

    def shard_number(self, name: str) -> int:
        origin = self._origin(name)
        return self.source.shard_number(origin) if origin in self.source.tensors else 0

    def location(self, name: str) -> TensorLocation | None:
        """The input's own bytes for a tensor carried unchanged; None for a decoded weight (and
        any tensor a migration rewrote): only :meth:`read` produces those."""
        if name in self._decoders or self._origin(name) != name or name not in self.source.tensors:
            return None
        original = self.source.tensors[name]
        spec = self._draft.tensors[name].spec
        if (original.dtype, tuple(original.shape)) != (spec.dtype, tuple(spec.shape)):
            return None
        return self.source.location(name)

    def read(self, name: str) -> torch.Tensor:
        if name not in self._decoders:
            return self._draft.tensors[name].load()
        fmt, names, shape = self._decoders[name]
        stored = {suffix: self._draft.tensors[tensor].load() for suffix, tensor in names.items()}
        if fmt is None:  # a plain FP8 weight: its values, as ComfyUI casts them (UNSCALED_FLOAT8)
            return stored[WEIGHT].float()
        return fmt.decode(stored, shape=shape).float().reshape(shape)

    def describe(self) -> str:
        """One line for the report: what the input stored, and that the SQNR is against its decode."""
        counts = Counter(self.layers.values())
        counts.update(f"plain {dtype} without a scale" for dtype in self.unscaled.values())
        if self.cast:
            counts[f"other FP8 tensors read as their values, e.g. {self.cast[0]!r}"] = len(self.cast)
        formats = ", ".join(f"{name} ({n})" for name, n in counts.most_common())
        return (f"the input was already quantized ({formats}): its layers were decoded as ComfyUI decodes them "
                "and quantized again; each SQNR is against that decode, not the original weights")


def _high_precision_dtype(draft: CheckpointDraft, skip: set[str]) -> torch.dtype:
    """The checkpoint's usual high-precision float dtype (bfloat16 when it has none)."""
    seen = Counter(t.spec.dtype for name, t in draft.tensors.items()
                   if name not in skip and t.spec.dtype.is_floating_point and t.spec.dtype.itemsize > 1)
    return seen.most_common(1)[0][0] if seen else torch.bfloat16


def decode_quantized(source: Source, registry: Registry) -> QuantizedSource:
    """``source`` as a :class:`QuantizedSource`, migrated to the current layout first; raises
    :class:`CqError` naming the file when a layer cannot be decoded (no installed format or
    migration reads it, or its layout cannot hold it)."""
    draft = CheckpointDraft(source, registry.formats)
    migrate_draft(draft, registry)
    refused = [n for n in draft.notes if n.kind == "refused"]
    if refused:
        raise CqError(f"{source.path}: is already quantized, and layer {refused[0].subject!r} cannot be decoded "
                      f"to quantize it again ({refused[0].message}).")
    unknown = sorted({config["format"] for config in draft.layers.values()} - set(registry.formats))
    if unknown:
        raise CqError(f"{source.path}: is already quantized in {unknown[0]!r}, which no installed format decodes; "
                      "install the plugin that provides it.")
    decoded = QuantizedSource(source, draft, registry.formats)
    if not decoded.layers and not decoded.unscaled and not decoded.cast:
        raise CqError(f"{source.path}: holds quantization tensors but no layer cq can decode; 'cq migrate --check' "
                      "says what it finds.")
    return decoded
