"""The migration contract: the draft of a checkpoint being rewritten, and :class:`Migration`.

``cq migrate`` opens the input as a :class:`CheckpointDraft` (header, tensor
specs and lazy loaders; no data read yet) and offers it to every registered
migration; ``cq meta set/unset/sync`` edit the same draft. Writing it streams
one tensor at a time and rebuilds both ComfyUI metadata carriers from one set
of layer configs (:mod:`cq_core.io.layer_metadata`).
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch

from cq_core.errors import CqError
from cq_core.io.layer_metadata import (
    COMFY_QUANT_SUFFIX,
    HEADER_KEY,
    LAYER_SUFFIX,
    BadLayerJson,
    check_layer_config,
    header_entries,
    layer_tensor,
    meta_set_command,
    read_carriers,
    repair_hint,
)
from cq_core.io.safetensors_io import TensorSpec, write_safetensors
from cq_core.io.source import Source
from cq_core.plugin.types import Format
from cq_core.io.shards import (
    INDEX_SUFFIX,
    SHARD_NAME,
    ShardLayout,
    split_groups,
    write_shard_set,
)

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

    def __init__(self, source: Source, formats: Mapping[str, type[Format]] | None = None) -> None:
        self.source = source
        #: The installed formats (name -> class, in registration order), for migrations that ask
        #: the formats how a layer maps (:meth:`cq_core.plugin.types.Format.from_legacy_scale`).
        self.formats: Mapping[str, type[Format]] = dict(formats or {})
        self.path = source.path
        #: One file of a shard set, read on its own: a tensor's partner may be in a sibling shard.
        match = None if source.sharded else SHARD_NAME.match(source.path.name)
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
        #: Who wrote the file, as the user said (``cq migrate --producer``): "comfyui" or a
        #: migration's name. Import migrations read it where the tensors fit both ComfyUI's
        #: layout and their producer's; None: the user said nothing.
        self.producer: str | None = None

    # -- looking -----------------------------------------------------------------

    def spec(self, name: str) -> TensorSpec:
        return self.tensors[name].spec

    def read(self, name: str) -> torch.Tensor:
        """The tensor as it will be written (reads it now; for small tensors such as scales)."""
        return self.tensors[name].load()

    def names_ending(self, suffix: str) -> list[str]:
        return [name for name in self.tensors if name.endswith(suffix)]

    def layer_tensors(self) -> dict[str, dict[str, TensorSpec]]:
        """Layers that carry no metadata yet, each with its direct tensors: ``{"a.b": {"weight": spec, ...}}``."""
        from cq_core.plugin.contract import tensors_by_layer

        by_layer = tensors_by_layer({name: tensor.spec for name, tensor in self.tensors.items()})
        return {layer: stored for layer, stored in by_layer.items() if layer not in self.layers}

    @staticmethod
    def describe(spec: TensorSpec) -> str:
        """``"F8_E4M3[64, 4]"``: a spec as messages name it."""
        from cq_core.plugin.contract import describe

        return describe(spec)

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

    def rewrite(
        self, name: str, *, spec: TensorSpec, load: Callable[[], torch.Tensor], new_name: str | None = None
    ) -> None:
        """Replace a tensor, position kept, by what ``load`` returns when it is written: a tensor
        of ``spec`` (the writer refuses any other). For edits that change the data, such as
        repacking another producer's layout; ``load`` reads its inputs then, one layer at a time."""
        old = self.tensors[name]
        new_name = new_name or name
        if new_name != name and new_name in self.tensors:
            raise CqError(f"{self.path}: cannot rename {name!r} to {new_name!r}, which already exists.")
        entry = DraftTensor(TensorSpec(spec.dtype, tuple(spec.shape)), load, old.origin)
        self.tensors = {(new_name if key == name else key): (entry if key == name else value)
                        for key, value in self.tensors.items()}

    def beside(self, filename: str) -> Any | None:
        """The JSON of ``filename`` in the checkpoint's folder (a producer's ``config.json`` or
        ``hf_quant_config.json``), or None when there is none. Raises :class:`CqError` naming the
        file when it is not JSON."""
        folder = self.path if self.path.is_dir() else self.path.parent  # a folder of shards, or a file's folder
        path = folder / filename
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CqError(f"{path}: is not a readable JSON file ({exc}); it describes {self.path.name}.") from None

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
        out = []
        for name, tensor in self.tensors.items():
            out.append((name, tensor.spec, tensor.load))
            layer = name.removesuffix(".weight")
            if name.endswith(".weight") and layer in self.layers:
                carrier = layer_tensor(self.layers[layer])
                out.append((f"{layer}.{LAYER_SUFFIX}", TensorSpec(carrier.dtype, tuple(carrier.shape)), lambda c=carrier: c))
        return out

    def header(self) -> dict[str, str]:
        return {**self.metadata, **header_entries(self.layers)}

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
        inputs = self.source.files()
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
            if origin is not None:
                key = self.source.shard_number(origin)
            keys.append(key)
        layouts = []
        for numbers in split_groups([[(name, spec)] for name, spec, _ in entries], None, keys):
            members = [entries[n][:2] for n in numbers]
            layers = {
                layer: self.layers[layer]
                for name, _ in members
                if name.endswith(".weight") and (layer := name.removesuffix(".weight")) in self.layers
            }
            layouts.append(ShardLayout(members, {**self.metadata, **header_entries(layers)}))
        return layouts


@dataclass
class ForeignLayer:
    """A layer stored in another producer's quantized layout, as a migration sees it from the header."""

    layer: str
    #: The producer's layout in words, e.g. "NVIDIA ModelOpt NVFP4".
    layout: str
    #: The ComfyUI format it becomes; None when the header cannot tell (see ``message``).
    format: str | None
    #: Why the layer cannot be imported as it is, one sentence (None: it can).
    message: str | None = None
    #: Other readings of the same tensors, for a layer the header cannot tell (e.g. "nvfp4").
    candidates: list[str] = field(default_factory=list)


class Migration(ABC):
    """Teaches cq one legacy checkpoint layout and how to rewrite it in the current one.

    ``cq migrate`` opens the input as a :class:`CheckpointDraft`
    (header, tensor specs and lazy loaders; no data read yet) and offers it to
    every registered migration in registration order. A migration whose
    :meth:`detect` returns a reason gets :meth:`apply`, which edits the draft
    in place: rename, reshape, cast, add or drop tensors, set layer configs,
    and record what it did. cq then checks the result and streams it out with
    both ComfyUI metadata carriers. Subclasses set ``name`` and ``description``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""

    @abstractmethod
    def detect(self, draft: CheckpointDraft) -> str | None:
        """A short reason when the draft holds this legacy layout (e.g. the marker
        tensor found), else None. Look at names, specs and header only."""

    @abstractmethod
    def apply(self, draft: CheckpointDraft) -> None:
        """Rewrite the draft into the current layout, recording every change with
        ``draft.note``; raise :class:`cq_core.errors.CqError` naming the tensor for
        input that cannot be migrated, or call ``draft.refuse`` for a layer ComfyUI
        could not load whatever cq wrote."""

    def foreign_layers(self, draft: CheckpointDraft) -> list[ForeignLayer]:
        """The layers in another producer's quantized layout this migration imports, from names,
        specs, header and the producer's files beside the checkpoint (no tensor data). ``cq
        inspect`` counts them as quantized layers and shows their layout. Migrations of legacy
        ComfyUI layouts need not implement it."""
        return []


class ForeignImport(Migration):
    """A migration that imports another producer's quantized layout (not a legacy ComfyUI one).

    Both steps follow from :meth:`foreign_layers`: :meth:`detect` names the layout and a layer;
    :meth:`apply` refuses, in the one sentence the subclass wrote, a file whose header cannot
    tell the producer's layout from ComfyUI's (``ForeignLayer.format`` None), refuses by name a
    layer that has a message, and hands every other layer to :meth:`import_layer`.
    """

    def detect(self, draft: CheckpointDraft) -> str | None:
        found = self.foreign_layers(draft)
        if not found:
            return None
        count = f"{len(found)} layers" if len(found) > 1 else "1 layer"
        return f"{count} in {found[0].layout} layout, such as {found[0].layer!r}"

    def apply(self, draft: CheckpointDraft) -> None:
        found = self.foreign_layers(draft)
        unclear = next((f for f in found if f.format is None), None)
        if unclear is not None:
            raise CqError(f"{draft.path}: {unclear.message}")
        for layer in found:
            if layer.message:
                draft.refuse(layer.layer, layer.message)
            else:
                self.import_layer(draft, layer)

    @abstractmethod
    def import_layer(self, draft: CheckpointDraft, found: ForeignLayer) -> None:
        """Rewrite one layer into ``found.format`` (tensors, ``draft.layers``, a note)."""
