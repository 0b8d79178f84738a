"""Migrations of the older "scaled" layouts ComfyUI used before per-layer metadata.

Scaled FP8: a marker tensor ``scaled_fp8`` (two elements meant full-precision
matmul), ``L.weight`` in FP8, ``L.scale_weight`` and an optional
``L.scale_input`` that writers left out when it was 1.0. Scaled INT8 files
use the same ``scale_weight`` names, with or without the marker. Some writers
also nested options inside the layer JSON as ``{"params": {...}}``, where
ComfyUI never looks.

Each layer's format follows from what is stored, the weight's dtype and the
scale's shape, and the formats say which is theirs
(:meth:`cq_core.plugin.types.Format.from_legacy_scale`): no format is named here.
A layer a format claims but cannot hold (ComfyUI has no FP8 format with per-row
scales) is refused by name rather than written in a form that decodes wrong.
"""

from __future__ import annotations

import math

import torch

from cq_core.errors import CqError
from cq_core.io.layer_metadata import flatten_params
from cq_core.plugin.draft import CheckpointDraft, Migration
from cq_core.plugin.hookspecs import hookimpl
from cq_core.plugin.types import LegacyLayer, TensorSpec

MARKER = "scaled_fp8"
LEGACY_WEIGHT_SCALE = "scale_weight"
LEGACY_INPUT_SCALE = "scale_input"


def legacy_layer(draft: CheckpointDraft, weight: TensorSpec, scale: TensorSpec) -> tuple[str, LegacyLayer]:
    """(format name, how the layer maps) from the first installed format that recognizes it
    (:meth:`cq_core.plugin.types.Format.from_legacy_scale`); a refusal naming the shapes when none does."""
    for name, fmt in draft.formats.items():
        found = fmt.from_legacy_scale(weight, scale)
        if found is not None:
            return name, found
    return "", LegacyLayer(refusal=(
        f"{str(weight.dtype).removeprefix('torch.')} weight {tuple(weight.shape)} with a {tuple(scale.shape)} "
        "scale matches no installed format's layout (per tensor, per row or square blocks)"
    ))


def is_code_dtype(dtype: torch.dtype) -> bool:
    """One-byte codes (FP8, INT8), the weights legacy files scaled; not packed bytes (U8) or flags."""
    return dtype.itemsize == 1 and dtype not in (torch.uint8, torch.bool)


def check_scale(draft: CheckpointDraft, name: str) -> None:
    """A scale must be positive and finite everywhere: NaN, Inf, zero or a negative
    value would be migrated into a layer that decodes to garbage (or NaN)."""
    scale = draft.read(name).float()
    problems = (
        ("NaN", torch.isnan(scale)),
        ("Inf", torch.isinf(scale)),
        ("a negative value", scale < 0),
        ("zero", scale == 0),
    )
    for what, where in problems:
        if bool(where.any()):
            raise CqError(
                f"{draft.path}: scale tensor {name!r} holds {what} (a scale must be positive and finite), "
                "so its layer cannot be decoded; nothing was written."
            )


class ScaledLayout(Migration):
    name = "scaled_fp8"
    description = (
        "The 'scaled_fp8' layout (marker tensor, L.scale_weight, L.scale_input) and scaled INT8 files "
        "-> weight_scale / input_scale with per-layer metadata."
    )

    def detect(self, draft: CheckpointDraft) -> str | None:
        if MARKER in draft.tensors:
            return f"marker tensor {MARKER!r}"
        legacy = draft.names_ending("." + LEGACY_WEIGHT_SCALE) + draft.names_ending("." + LEGACY_INPUT_SCALE)
        if legacy:
            return f"{len(legacy)} legacy scale tensors such as {legacy[0]!r}"
        return None

    def apply(self, draft: CheckpointDraft) -> None:
        full_precision = False
        if MARKER in draft.tensors:
            full_precision = math.prod(draft.spec(MARKER).shape) == 2
            draft.drop(
                MARKER,
                "legacy marker removed"
                + ("; its 2 elements mean full_precision_matrix_mult on every layer" if full_precision else ""),
            )
        kept_legacy: set[str] = set()
        for name in [n for n in draft.tensors if n.endswith(".weight")]:
            spec = draft.spec(name)
            if not is_code_dtype(spec.dtype):
                continue
            layer = name.removesuffix(".weight")
            if f"{layer}.{LEGACY_WEIGHT_SCALE}" in draft.tensors:
                if not self._migrate_layer(draft, layer, spec, LEGACY_WEIGHT_SCALE, full_precision):
                    kept_legacy.add(layer)
            elif f"{layer}.weight_scale" in draft.tensors:
                # Current names: a layer without metadata is recognized by the formats' contracts.
                continue
            else:
                draft.check_not_elsewhere(f"{layer}.{LEGACY_WEIGHT_SCALE}")
                raise CqError(
                    f"{draft.path}: layer {layer!r} has a quantized {spec.dtype} weight but no "
                    f"{layer}.{LEGACY_WEIGHT_SCALE}; without its scale it cannot be decoded."
                )
        for suffix in (LEGACY_WEIGHT_SCALE, LEGACY_INPUT_SCALE):
            for name in draft.names_ending("." + suffix):
                if name[: -len(suffix) - 1] not in kept_legacy:
                    if f"{name[: -len(suffix) - 1]}.weight" not in draft.tensors:
                        draft.check_not_elsewhere(name)  # in a lone shard, its weight may be in another
                    draft.drop(name, "orphan scale of a layer that is not quantized; dropped")

    def _migrate_layer(
        self, draft: CheckpointDraft, layer: str, weight: TensorSpec, scale_suffix: str, full_precision: bool
    ) -> bool:
        """Rename one layer's scales and set its JSON; False when ComfyUI could not load it."""
        legacy_scale = f"{layer}.{scale_suffix}"
        if len(weight.shape) != 2:
            draft.refuse(layer, f"{len(weight.shape)}-D weight; ComfyUI quantizes only 2-D Linear weights")
            return False
        fmt, found = legacy_layer(draft, weight, draft.spec(legacy_scale))
        if found.refusal:
            draft.refuse(layer, found.refusal)
            return False
        scale_shape, extra = tuple(found.scale_shape), dict(found.json)
        legacy_input = f"{layer}.{LEGACY_INPUT_SCALE}"
        if legacy_input not in draft.tensors:
            legacy_input = f"{layer}.input_scale"
        if legacy_input in draft.tensors and math.prod(draft.spec(legacy_input).shape) != 1:
            draft.refuse(layer, f"{legacy_input} of shape {draft.spec(legacy_input).shape} is not a scalar")
            return False

        check_scale(draft, legacy_scale)
        if legacy_input in draft.tensors:
            check_scale(draft, legacy_input)
        draft.replace(legacy_scale, new_name=f"{layer}.weight_scale", dtype=torch.float32, shape=scale_shape)
        if legacy_input in draft.tensors:
            draft.replace(legacy_input, new_name=f"{layer}.input_scale", dtype=torch.float32, shape=())
        elif found.unit_input_scale:
            # Legacy writers left out scale_input when it was 1.0; the format wants it explicit
            # (FP8 hardware clips activations at the format's range without it).
            draft.add(f"{layer}.input_scale", torch.tensor(1.0, device="cpu"), after=f"{layer}.weight_scale")

        config = dict(draft.layers.get(layer) or {})
        if config.get("format") not in (None, fmt):
            draft.warn(layer, f"its metadata said {config['format']!r} but the stored tensors are {fmt}")
        config.update({"format": fmt, **extra})
        if full_precision:
            config["full_precision_matrix_mult"] = True
        draft.layers[layer] = config
        draft.note(layer, f"{scale_suffix} -> weight_scale {'x'.join(map(str, scale_shape)) or 'scalar'}, format {fmt}")
        return True


class NestedParams(Migration):
    name = "nested_params"
    description = 'Layer JSON that nests options as {"params": {...}} -> flat keys ComfyUI reads.'

    def detect(self, draft: CheckpointDraft) -> str | None:
        nested = [layer for layer, cfg in draft.layers.items() if isinstance(cfg, dict) and "params" in cfg]
        return f"{len(nested)} layers nest options under 'params'" if nested else None

    def apply(self, draft: CheckpointDraft) -> None:
        for layer, config in draft.layers.items():
            if isinstance(config, dict) and "params" in config:
                if not isinstance(config["params"], dict):
                    raise CqError(f"{draft.path}: layer {layer!r} has a 'params' entry that is not an object.")
                draft.layers[layer] = flatten_params(layer, config)
                draft.note(layer, f"flattened params {config['params']} into the layer JSON")


@hookimpl
def cq_register_migrations(register):
    # Flatten first, so the scaled-layout migration sees the keys ComfyUI reads.
    register(NestedParams)
    register(ScaledLayout)
