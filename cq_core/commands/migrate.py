"""``cq migrate``: rewrite legacy checkpoints in the current ComfyUI layout, without re-quantizing.

The input is opened as a :class:`~cq_core.commands.meta.CheckpointDraft` (header only),
offered to every registered :class:`~cq_core.Migration` in order, then
held to what ComfyUI loads: a layer that stores quantized tensors without
metadata gets the metadata of the one format its tensors fit (by the formats'
contracts; none or several fitting is refused by name), every labelled layer
is checked against its format's contract (a required tensor missing is an
error; a shape ComfyUI decodes wrong is reshaped, a tensor it leaves unused is
dropped, any other misfit refused), a scale belongs to a quantized layer, and
both metadata carriers say the same. The draft is streamed out one
tensor at a time. A file that needs nothing is copied byte for byte, so
migrating twice gives the same file. The input may be sharded (an index or a
folder, read as one checkpoint, so a scale in another shard than its weight
is still its weight's); a lone shard is refused where a tensor's partner is
missing, rather than the tensor dropped as an orphan.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cq_core.errors import CqError, UsageError
from cq_core.io.layer_metadata import (
    HEADER_KEY,
    LAYER_SUFFIX,
    check_carriers,
)
from cq_core.io.outputs import check_not_inputs, check_output_name, claim_outputs
from cq_core.io.source import Source
from cq_core.io.shards import INDEX_SUFFIX, open_source
from cq_core.plugin.contract import (
    MODULE_SUFFIXES,
    activation_scale_problem,
    check_layer,
    contract_suffixes,
    tensors_by_layer,
    unlabelled_layers,
)
from cq_core.plugin.draft import CheckpointDraft, Note
from cq_core.plugin.manager import Registry, resolve_registry
from cq_core.plugin.types import Format

#: ``--producer`` naming ComfyUI itself (a file that lost its metadata), not an import migration.
COMFYUI = "comfyui"
#: Tensors of a current-layout layer that only make sense next to a quantized weight.
SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")


@dataclass
class MigrationReport:
    """What ``cq migrate`` found and did."""

    input: str
    output: str | None
    check: bool
    #: (migration name, the reason it applied)
    applied: list[tuple[str, str]] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    layers: dict[str, str] = field(default_factory=dict)  # layer -> format
    changed: bool = False
    written: bool = False

    def of_kind(self, kind: str) -> list[Note]:
        return [n for n in self.notes if n.kind == kind]

    @property
    def refused(self) -> list[Note]:
        return self.of_kind("refused")

    #: Layers whose format stock ComfyUI cannot load, by name.
    not_loadable: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "output": self.output,
            "check": self.check,
            "changed": self.changed,
            "written": self.written,
            "applied": [{"migration": name, "reason": reason} for name, reason in self.applied],
            "layers": self.layers,
            "not_loadable": self.not_loadable,
            "refused": [n.subject for n in self.refused],
            "notes": [n.to_json() for n in self.notes],
        }


def _high_precision(dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize > 1


def _label_unlabelled(draft: CheckpointDraft, formats: Mapping[str, type[Format]]) -> None:
    """Write the metadata of layers whose tensors identify one format; refuse the others by name."""
    refused = {n.subject for n in draft.notes if n.kind == "refused"}
    specs = {name: tensor.spec for name, tensor in draft.tensors.items()}
    for found in unlabelled_layers(specs, [*draft.layers, *refused], formats):
        if found.format is None:
            draft.refuse(found.layer, found.sentence())
            continue
        draft.layers[found.layer] = formats[found.format].config_from_tensors(found.stored)
        draft.note(found.layer, f"{found.sentence()}: wrote its metadata")


def _hold_to_contracts(draft: CheckpointDraft, formats: Mapping[str, type[Format]]) -> None:
    """Every labelled layer as its format's contract says ComfyUI loads it: forms it decodes
    wrong reshaped, tensors it leaves unused dropped, anything else refused by name."""
    by_layer = tensors_by_layer({name: tensor.spec for name, tensor in draft.tensors.items()})
    for layer, config in draft.layers.items():
        fmt = formats.get(config["format"])
        if fmt is None or fmt.contract is None:
            continue
        judged = check_layer(layer, config["format"], fmt.contract, by_layer.get(layer, {}), config)
        if judged.missing:
            draft.check_not_elsewhere(f"{layer}.{judged.missing[0]}")
            raise CqError(
                f"{draft.path}: layer {layer!r} is quantized ({config['format']}) but has no "
                f"{layer}.{judged.missing[0]}; the file cannot be decoded."
            )
        problems = list(judged.problems)
        if f"{layer}.input_scale" in draft.tensors:
            problems += filter(None, [activation_scale_problem(layer, draft.read(f"{layer}.input_scale"))])
        if problems:
            draft.refuse(layer, "; ".join(problems))
            continue
        for suffix, spec in judged.repairs.items():
            old = draft.spec(f"{layer}.{suffix}").shape
            draft.replace(f"{layer}.{suffix}", shape=spec.shape)
            draft.note(
                f"{layer}.{suffix}",
                f"reshaped {list(old)} -> {list(spec.shape)}: ComfyUI loads {list(old)} but dequantizes it wrong",
            )
        for suffix in judged.ignored:
            draft.drop(
                f"{layer}.{suffix}",
                f"ComfyUI's {config['format']} does not use it (its loader lists it as unexpected); dropped",
            )


def _finish(draft: CheckpointDraft, formats: Mapping[str, type[Format]]) -> None:
    """The checks every current-layout file passes, whichever migrations ran."""
    draft.current = None
    for layer in [*draft.layers]:
        if f"{layer}.weight" not in draft.tensors:
            draft.check_not_elsewhere(f"{layer}.weight")
            del draft.layers[layer]
            draft.note(layer, "dropped stale layer metadata: the file has no such weight", "drop")
    draft.check_layers()
    _label_unlabelled(draft, formats)
    _hold_to_contracts(draft, formats)
    for layer, config in draft.layers.items():
        if f"{layer}.weight_scale" not in draft.tensors:
            draft.check_not_elsewhere(f"{layer}.weight_scale")
            raise CqError(
                f"{draft.path}: layer {layer!r} is quantized ({config['format']}) but has no "
                f"{layer}.weight_scale; the file cannot be decoded."
            )
    refused = {n.subject for n in draft.notes if n.kind == "refused"}
    _refuse_unread_layouts(draft, formats, refused)
    for suffix in sorted({*SCALE_SUFFIXES, *contract_suffixes(formats)}):
        for name in draft.names_ending("." + suffix):
            layer = name[: -len(suffix) - 1]
            if layer in draft.layers or layer in refused:
                continue
            weight = draft.tensors.get(f"{layer}.weight")
            if weight is None:
                draft.check_not_elsewhere(name)
            elif not _high_precision(weight.spec.dtype):
                # Dropping it would leave stored codes nothing can decode.
                raise CqError(
                    f"{draft.path}: layer {layer!r} stores a {weight.spec.dtype} weight with {name!r} but no "
                    "metadata says its format, and no installed migration recognizes it."
                )
            draft.drop(name, "orphan scale of a layer that is not quantized; dropped")
    for layer, config in draft.layers.items():
        if not comfy_loads(formats, config["format"]):
            draft.warn(layer, f"format {config['format']!r} does not load in stock ComfyUI")
    if not draft.carriers_in_sync():
        draft.note(
            HEADER_KEY, f"rebuilt {HEADER_KEY} and every {LAYER_SUFFIX} tensor from one set of layer configs"
        )


def _refuse_unread_layouts(draft: CheckpointDraft, formats: Mapping[str, type[Format]], refused: set[str]) -> None:
    """A layer left without metadata whose low-precision weight sits beside a tensor no installed
    format stores (e.g. a ``weight_scale_inv``), or that holds ``weight_*`` tensors but no
    weight (a packed layout): another producer's layout that no installed migration imports.
    Copying it would give ComfyUI codes it uses as a plain weight; dropping the tensor, codes
    nothing can decode."""
    known = {"weight", *MODULE_SUFFIXES, *contract_suffixes(formats)}
    for layer, stored in tensors_by_layer({name: t.spec for name, t in draft.tensors.items()}).items():
        if layer in draft.layers or layer in refused:
            continue
        unknown = sorted(suffix for suffix in stored if suffix not in known)
        weight = stored.get("weight")
        if weight is not None and not _high_precision(weight.dtype) and unknown:
            raise CqError(
                f"{draft.path}: layer {layer!r} stores a {weight.dtype} weight beside {layer}.{unknown[0]}, which no "
                "installed format or migration reads (another producer's layout?); ComfyUI would use the codes as a "
                "plain weight, so nothing was written."
            )
        packed = [suffix for suffix in unknown if suffix.startswith("weight_")]
        if weight is None and packed:
            draft.check_not_elsewhere(f"{layer}.weight")
            raise CqError(
                f"{draft.path}: layer {layer!r} stores {layer}.{packed[0]} but no weight, a packed layout no installed "
                "migration reads, so nothing was written."
            )


def migrate(
    input: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    check: bool = False,
    overwrite: bool = False,
    producer: str | None = None,
    registry: Registry | None = None,
) -> MigrationReport:
    """Migrate ``input`` to the current layout at ``output``; with ``check``, only report.

    ``producer``: who wrote the file, for files whose tensors fit both ComfyUI's layout and
    another producer's (see :attr:`CheckpointDraft.producer`): ``"comfyui"`` or the name of a
    registered migration. Anything else is a :class:`UsageError`.

    Raises :class:`CqError` for a quantized weight without a scale and, unless
    ``check``, for layers no ComfyUI format can hold (the report names them).
    """
    registry = resolve_registry(registry)
    if producer is not None and producer != COMFYUI and producer not in registry.migrations:
        raise UsageError(
            f"--producer {producer!r} is none of: {', '.join([COMFYUI, *registry.migrations])}."
        )
    input_path = Path(input)
    if not check:
        if output is None:
            raise UsageError("cq migrate needs -o OUTPUT (or --check to only report).")
        output = Path(output)
        check_output_name(output, overwrite)
    report = MigrationReport(str(input_path), None if check else str(output), check)
    with open_source(input_path) as source:
        if not check:
            check_not_inputs([output], source.files())
        draft = CheckpointDraft(source, registry.formats)
        draft.producer = producer
        check_carriers(input_path, draft.carriers)  # unusable layer JSON: say which cq meta command repairs it
        for name, migration_cls in registry.migrations.items():
            migration = migration_cls()
            reason = migration.detect(draft)
            if reason is None:
                continue
            report.applied.append((name, reason))
            draft.current = name
            migration.apply(draft)
        _finish(draft, registry.formats)
        report.notes = draft.notes
        report.layers = {layer: config["format"] for layer, config in draft.layers.items()}
        report.not_loadable = [layer for layer, fmt in report.layers.items() if not comfy_loads(registry.formats, fmt)]
        report.changed = bool(report.applied) or any(n.kind in ("change", "drop") for n in draft.notes)
        if check:
            return report
        if report.refused:
            listed = "; ".join(f"{n.subject} ({n.message})" for n in report.refused)
            raise CqError(f"{input_path}: {len(report.refused)} layers have no layout ComfyUI loads: {listed}.")
        if report.changed or source.sharded or output.name.endswith(INDEX_SUFFIX):
            draft.write(output, overwrite=overwrite)
        else:
            # Nothing to migrate: a byte copy, so a second migration is a no-op.
            _copy(source, output, overwrite)
    report.written = True
    return report


def _copy(source: Source, output: Path, overwrite: bool) -> None:
    """``source`` byte for byte at ``output``, written like every output (see :mod:`cq_core.io.outputs`)."""
    with claim_outputs([output], overwrite=overwrite, inputs=source.files()) as pending:
        with pending.open(0) as file, open(source.path, "rb") as original:
            while chunk := original.read(16 * 2**20):
                file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
        pending.commit()


def comfy_loads(formats: Mapping[str, type[Format]], name: str) -> bool:
    """Whether stock ComfyUI loads the format ``name``, as its installed class says (a name no
    installed format has: not as far as cq knows)."""
    return name in formats and formats[name].comfy_loadable
