"""Bringing a checkpoint to the current ComfyUI layout, without re-quantizing: the migrations,
then the checks every current-layout file passes.

A :class:`~cq_core.plugin.draft.CheckpointDraft` (header only) is offered to every registered
:class:`~cq_core.Migration` in order, then held to what ComfyUI loads: a layer that stores
quantized tensors without metadata gets the metadata of the one format its tensors fit (by the
formats' contracts; none or several fitting is refused by name), every labelled layer is
checked against its format's contract (a required tensor missing is an error; a shape ComfyUI
decodes wrong is reshaped, a tensor it leaves unused is dropped, any other misfit refused), a
scale belongs to a quantized layer, and both metadata carriers say the same. ``cq migrate``
writes the draft (:mod:`cq_core.commands.migrate`); ``cq convert`` decodes it to quantize a
quantized source again (:mod:`cq_core.engine.quantized_source`).
"""

from __future__ import annotations

from collections.abc import Mapping

from cq_core.errors import CqError
from cq_core.io.layer_metadata import HEADER_KEY, LAYER_SUFFIX
from cq_core.plugin.contract import (
    MODULE_SUFFIXES,
    UNSCALED_FLOAT8,
    activation_scale_problem,
    check_layer,
    contract_suffixes,
    tensors_by_layer,
    unlabelled_layers,
    unscaled_float8_layers,
)
from cq_core.plugin.draft import CheckpointDraft
from cq_core.plugin.manager import Registry
from cq_core.plugin.types import Format

#: Tensors of a current-layout layer that only make sense next to a quantized weight.
SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")


def migrate_draft(draft: CheckpointDraft, registry: Registry) -> list[tuple[str, str]]:
    """Apply every registered migration that detects its layout to ``draft``, in registration
    order, then hold the draft to the current layout (the module docstring); returns
    (migration name, the reason it applied) for each one that did. Raises :class:`CqError`
    naming the file and layer for what cannot be decoded."""
    applied = []
    for name, migration_cls in registry.migrations.items():
        migration = migration_cls()
        reason = migration.detect(draft)
        if reason is None:
            continue
        applied.append((name, reason))
        draft.current = name
        migration.apply(draft)
    _finish(draft, registry.formats)
    return applied


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
    specs = {name: tensor.spec for name, tensor in draft.tensors.items()}
    for layer, dtype in unscaled_float8_layers(specs, [*draft.layers, *refused]).items():
        draft.warn(layer, f"{dtype} {UNSCALED_FLOAT8}")
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


def comfy_loads(formats: Mapping[str, type[Format]], name: str) -> bool:
    """Whether stock ComfyUI loads the format ``name``, as its installed class says (a name no
    installed format has: not as far as cq knows)."""
    return name in formats and formats[name].comfy_loadable
