"""The plan: for every input tensor, keep / quantize / drop, and why.

Built from the header alone (no tensor data), so ``--dry-run`` is instant and
the whole output header is known before the first byte is written.

Who decides a tensor's fate, first match wins:

1. a rule of the layer config file (``--layer-config``; regex -> format,
   options, or skip), in file order;
2. a ``--layer REGEX=FORMAT`` flag, in command-line order;
3. ``--exclude REGEX`` (keep in high precision);
4. the preset of the tensor's component (keep or remove; see
   :class:`cq_core.plugin.types.ModelFilter`). A checkpoint can hold several
   components under their own prefixes (diffusion model, text encoders,
   VAE), each with its own preset, which acts only inside that prefix; a
   component whose preset keeps everything (a VAE) is kept whole, ahead of
   every other rule;
5. ``--heur`` (skip layers too small or too oddly shaped to gain at run time);
6. the global ``--format``.

Layers that an exclude or the preset keeps, or that their format refuses,
get ``--fallback FORMAT`` instead when one is given. A format also refuses a
layer whose shape the loader reads to build the model (``shape_reads``, from
the plugins' ``cq_shape_read_layers``) when its stored weight would change a
dimension the loader reads (padding, two codes per byte); only a fallback
that keeps those dimensions may take it, and no rule overrides it. Whatever
the rules say, only 2-D floating-point ``.weight`` tensors are ever
quantized, and norms and embedding tables (not ``nn.Linear`` in ComfyUI)
are kept, except token-embedding tables under ``--embeddings`` (or a
preset's default for it), which go to an embedding format ComfyUI's
``Embedding`` modules load, round-to-nearest, unless ``--exclude`` or a
``--layer ...=skip`` names them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from cq_core.engine.activations import ActivationSettings, extra_specs
from cq_core.errors import CqError, UsageError
from cq_core.io.layer_metadata import HEADER_KEY as QUANTIZATION_HEADER_KEY
from cq_core.io.safetensors_io import TensorInfo, build_header
from cq_core.io.shards import ShardLayout, split_groups
from cq_core.io.source import Source
from cq_core.engine.rules import (
    LayerChoice,
    LayerRule,
    Rules,
    compile_patterns,
    heuristic_skip,
    resolve_embedding_format,
)
from cq_core.plugin.manager import Registry
from cq_core.plugin.types import (
    Format,
    LayerInfo,
    MetadataWriter,
    ModelFilter,
    Optimizer,
    ShapeRead,
    TensorSpec,
)

QUANTIZE, KEEP, DROP = "quantize", "keep", "drop"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WEIGHT_SUFFIX = ".weight"

#: Layers kept by default, matched against the last part of the layer name:
#: norms and embedding tables are not Linear layers in ComfyUI.
DEFAULT_KEEP = re.compile(r"norm|embed|^(wte|wpe|shared)$", re.IGNORECASE)

#: Token-embedding tables (``nn.Embedding`` in ComfyUI's text encoders: ``embed_tokens`` of
#: Llama/Qwen/Mistral/Gemma, ``shared`` of T5, ``token_embedding`` of CLIP, ``word_embeddings``
#: of BERT), matched against the last part of the layer name. ``--embeddings`` quantizes them.
TOKEN_EMBEDDING = re.compile(r"^(embed_tokens|shared|token_embedding|word_embeddings|wte|tok_embeddings)$")

#: Tensor names that mark a checkpoint as already quantized.
QUANTIZED_MARKERS = (".comfy_quant", ".scale_weight", ".weight_scale", ".scale_input")


class InstanceCache:
    """Formats and optimizers built once per (name, options).

    A rule naming the global format or optimizer inherits the global options
    (``-O``), its own options overriding them.
    """

    def __init__(self, registry: Registry, fmt: Format, optimizer: Optimizer | None = None) -> None:
        self.registry = registry
        self.default_format = fmt
        self.default_optimizer = optimizer
        self._cache: dict[tuple[str, str, str], Any] = {}
        for obj in (fmt, optimizer):
            if obj is not None:
                self._cache[(obj.kind, obj.name, _options_key(obj.opts))] = obj

    def _get(self, kind: str, name: str, options: Mapping[str, Any], default: Any) -> Any:
        if default is not None and name == default.name:
            options = {**default.opts, **options}
        key = (kind, name, _options_key(options))
        if key not in self._cache:
            lookup = self.registry.format if kind == "format" else self.registry.optimizer
            self._cache[key] = lookup(name)(**options)
        return self._cache[key]

    def format(self, name: str | None, options: Mapping[str, Any] = {}) -> Format:  # noqa: B006 (read only)
        return self._get("format", name or self.default_format.name, options, self.default_format)

    def optimizer(self, name: str | None, options: Mapping[str, Any] = {}) -> Optimizer | None:  # noqa: B006
        if name is None and not options:
            return None  # the global optimizer
        if name is None:
            if self.default_optimizer is None:
                raise UsageError("optimizer_options need an optimizer name.")
            name = self.default_optimizer.name
        return self._get("optimizer", name, options, self.default_optimizer)


def _options_key(options: Mapping[str, Any]) -> str:
    return json.dumps(dict(sorted(options.items())), default=str)


# ---------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------


@dataclass
class TensorPlan:
    """What happens to one input tensor."""

    name: str
    action: str  # QUANTIZE, KEEP or DROP
    reason: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    layer: str | None = None  # the layer prefix, for quantized weights
    format: Format | None = None
    #: None: the conversion's global optimizer
    optimizer: Optimizer | None = None
    layer_config: dict[str, Any] | None = None
    #: output tensors this input produces, in write order
    outputs: list[tuple[str, TensorSpec]] = field(default_factory=list)
    #: for a layer the global format decides (no rule, exclude or preset fixed it): the
    #: formats among ``plan_tensors(candidates=...)`` that accept it, None meaning high
    #: precision; a size budget (:mod:`cq_core.engine.budget`) chooses among them
    candidates: list[Format | None] | None = None
    #: activation-side tensors to calibrate for this layer (input_scale, pre_quant_scale), or None
    activation: ActivationSettings | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "tensor": self.name,
            "action": self.action,
            "format": self.format.name if self.format else None,
            "optimizer": self.optimizer.name if self.optimizer else None,
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
            "reason": self.reason,
            "layer_config": self.layer_config,
        }


@dataclass(frozen=True)
class Component:
    """A part of the checkpoint under one key prefix, and the preset that acts on it alone."""

    prefix: str  # "" for the whole file
    preset: ModelFilter
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "preset": self.preset.name, "reason": self.reason}


@dataclass
class Plan:
    items: list[TensorPlan]
    metadata: dict[str, str]  # the output's __metadata__
    components: list[Component] = field(default_factory=list)
    #: why these components (or none): detection, --model, or nothing found
    preset_reason: str | None = None
    #: what the output records of how it was made (a :class:`cq_core.engine.recipe.RecipeRecord`,
    #: in ``metadata`` too), once the conversion has made it
    record: Any = None

    @property
    def preset(self) -> ModelFilter | None:
        """The main component's preset (the first one)."""
        return self.components[0].preset if self.components else None

    @property
    def entries(self) -> list[tuple[str, TensorSpec]]:
        return [entry for item in self.items for entry in item.outputs]

    @property
    def output_bytes(self) -> int:
        """The output's tensor data in bytes (no header)."""
        return sum(spec.nbytes for _, spec in self.entries)

    @property
    def file_bytes(self) -> int:
        """The output written as one safetensors file, in bytes: the header (its 8-byte length
        included) and the tensor data."""
        return len(build_header(self.entries, self.metadata)) + self.output_bytes

    @property
    def layer_configs(self) -> dict[str, dict[str, Any]]:
        return {item.layer: item.layer_config for item in self.items if item.action == QUANTIZE}


def _layer_prefix(name: str) -> str | None:
    return name[: -len(WEIGHT_SUFFIX)] if name.endswith(WEIGHT_SUFFIX) else None


def quantized_marker(source: Source) -> str | None:
    """Why ``source`` already holds quantized layers (a quantization tensor's name, or a tensor
    stored in one-byte floats), or None. ``cq convert`` then decodes it first
    (:mod:`cq_core.engine.quantized_source`)."""
    for name, info in source.tensors.items():
        if name == "scaled_fp8" or name.endswith(QUANTIZED_MARKERS):
            return f"it holds {name!r}"
        if info.dtype.is_floating_point and info.dtype.itemsize == 1:
            return f"tensor {name!r} is {info.dtype_name}"
    return None


def refuse_quantized_input(source: Source) -> None:
    """A source still holding quantization tensors cannot be planned (it is decoded first)."""
    marker = quantized_marker(source)
    if marker is not None:
        raise CqError(f"{source.path}: is already quantized ({marker}); decode it first "
                      "(cq convert does, through cq_core.engine.quantized_source).")


@dataclass
class Decision:
    action: str
    reason: str
    format: Format | None = None
    optimizer: Optimizer | None = None
    full_precision_mm: bool = False
    #: reached the global format's step: a size budget may choose this layer's format
    free: bool = False


class _Planner:
    """Applies the precedence order to one tensor at a time."""

    def __init__(
        self,
        excludes: list[re.Pattern[str]],
        components: Sequence[Component],
        rules: Rules,
        instances: InstanceCache,
        bias_shapes: Mapping[str, tuple[int, ...]],
        shape_reads: Mapping[str, ShapeRead] | None = None,
        choices: Mapping[str, tuple[Format | None, str]] | None = None,
    ) -> None:
        self.excludes = excludes
        self.choices = choices or {}
        self.shape_reads = shape_reads or {}
        # Longest prefix first: a keep-all component (a VAE) inside a whole-file one wins there.
        self.components = sorted(components, key=lambda c: len(c.prefix), reverse=True)
        self.rules = rules
        self.instances = instances
        self.bias_shapes = bias_shapes
        self.global_choice = LayerChoice()
        self._check_rules()

    def _check_rules(self) -> None:
        """Build every format and optimizer a rule names now, so a typo fails before any work."""
        for rule in self.rules.layers:
            if rule.choice.skip:
                continue
            try:
                self.instances.format(rule.choice.format, rule.choice.options)
                self.instances.optimizer(rule.choice.optimizer, rule.choice.optimizer_options)
            except UsageError as exc:
                raise UsageError(f"{rule.describe()}: {exc}") from None
        if self.rules.fallback is not None:
            try:
                self.instances.format(self.rules.fallback)
            except UsageError as exc:
                raise UsageError(f"--fallback: {exc}") from None

    def component_of(self, name: str) -> Component | None:
        return next((c for c in self.components if name.startswith(c.prefix)), None)

    def decide(self, info: TensorInfo) -> Decision:
        name = info.name
        component = self.component_of(name)
        preset = component.preset if component is not None else None
        if preset is not None and preset.keep_all:
            return Decision(KEEP, f"preset {preset.name!r} keeps every tensor under {component.prefix!r} as it is")
        explicit = next((r for r in self.rules.layers if r.pattern.search(name)), None)
        excluded = next((p for p in self.excludes if p.search(name)), None)
        preset_rule = preset.rule_for(name) if preset is not None else None
        if explicit is None and excluded is None and preset_rule is not None and preset_rule[0] == "remove":
            return Decision(DROP, f"preset {preset.name!r} removes tensors matching {preset_rule[1]!r}")

        layer = _layer_prefix(name)
        if layer is None:
            return Decision(KEEP, "not a .weight tensor")
        if info.dtype not in FLOAT_DTYPES:
            return Decision(KEEP, f"{info.dtype_name} is not a floating-point weight")
        if len(info.shape) != 2:
            return Decision(KEEP, f"{len(info.shape)}-D tensor; only 2-D Linear weights are quantized")
        # Norms and embedding tables are not Linear layers in ComfyUI: no rule and no
        # fallback quantizes them, but an exclude or the preset that names them is the reason shown.
        if name in self.rules.keep:
            return Decision(KEEP, self.rules.keep[name])
        table = bool(DEFAULT_KEEP.search(layer.rsplit(".", 1)[-1]))
        table_reason = "norm or embedding table (kept by default)"
        if table and TOKEN_EMBEDDING.search(layer.rsplit(".", 1)[-1]):
            decision = self._token_table(info, layer, preset, explicit, excluded)
            if decision is not None:
                return decision

        if explicit is not None:
            if explicit.choice.skip:
                return Decision(KEEP, explicit.describe())
            if table:
                return Decision(KEEP, f"{table_reason}; {explicit.describe()} does not apply")
            return self._quantize(info, layer, explicit.choice, explicit.describe())
        if excluded is not None:
            return self._keep_or_fallback(info, layer, f"excluded by --exclude '{excluded.pattern}'", table)
        if preset_rule is not None and preset_rule[0] == "keep":
            reason = f"preset {preset.name!r} keeps {preset_rule[1]!r} in high precision"
            return self._keep_or_fallback(info, layer, reason, table)
        if table and preset_rule is not None and preset_rule[0] == "quantize":
            table = False  # the preset says: a Linear layer, despite its name
        if table:
            return Decision(KEEP, table_reason)
        if self.rules.heuristic:
            skip = heuristic_skip(info.shape)
            if skip is not None:
                return Decision(KEEP, skip)
        if name in self.choices:
            chosen, why = self.choices[name]
            decision = Decision(KEEP, why) if chosen is None else self._quantize_as(info, layer, chosen, None, why)
        else:
            decision = self._quantize(info, layer, self.global_choice, f"--format {self.instances.default_format.name}")
        decision.free = True
        return decision

    def accepted(self, candidates: Sequence[Format | None], info: TensorInfo) -> list[Format | None]:
        """The candidates (None: high precision) that may store this weight."""
        layer = _layer_prefix(info.name)
        return [c for c in candidates if c is None or self._refusal(c, info, layer) is None]

    def _token_table(self, info: TensorInfo, layer: str, preset: ModelFilter | None,
                     explicit: LayerRule | None, excluded: re.Pattern[str] | None) -> Decision | None:
        """A token-embedding table under ``--embeddings`` (or its preset's default): quantized
        round-to-nearest in the embedding format, unless ``--layer ...=skip`` or ``--exclude``
        names it; None when no embedding format applies (the table is kept as before)."""
        choice, source = self.rules.embeddings, "--embeddings"
        if choice is None and preset is not None and preset.embeddings is not None:
            choice, source = preset.embeddings, f"preset {preset.name!r}"
        resolved = resolve_embedding_format(choice, self.instances.registry) if choice is not None else None
        if resolved is None:
            return None
        if explicit is not None and explicit.choice.skip:
            return Decision(KEEP, explicit.describe())
        if excluded is not None:
            return Decision(KEEP, f"excluded by --exclude '{excluded.pattern}'")
        fmt = self.instances.format(*resolved)
        refusal = self._refusal(fmt, info, layer)
        if refusal:
            return Decision(KEEP, f"token-embedding table; {fmt.name} refuses: {refusal}")
        return Decision(QUANTIZE, f"token-embedding table ({source} {choice})", fmt, self.instances.optimizer("rtn"))

    def _refusal(self, fmt: Format, info: TensorInfo, layer: str) -> str | None:
        refusal = fmt.accepts(LayerInfo(layer, info.shape, info.dtype, self.bias_shapes.get(layer)))
        read = self.shape_reads.get(info.name)
        if refusal is None and read is not None:
            stored = fmt.stored_specs(info.shape)["weight"].shape
            if read.changed_by(info.shape, stored):
                refusal = f"{read.reason}, and {fmt.name} would store it as {_dims(stored)}"
        return refusal

    def _quantize(self, info: TensorInfo, layer: str, choice: LayerChoice, why: str) -> Decision:
        fmt = self.instances.format(choice.format, choice.options)
        optimizer = self.instances.optimizer(choice.optimizer, choice.optimizer_options)
        return self._quantize_as(info, layer, fmt, optimizer, why, choice.full_precision_mm)

    def _quantize_as(
        self, info: TensorInfo, layer: str, fmt: Format, optimizer: Optimizer | None, why: str,
        full_precision_mm: bool | None = None,
    ) -> Decision:
        refusal = self._refusal(fmt, info, layer)
        if refusal:
            return self._keep_or_fallback(info, layer, f"{why}, but {fmt.name} refuses: {refusal}")
        fpmm = self.rules.full_precision_mm if full_precision_mm is None else full_precision_mm
        return Decision(QUANTIZE, why + _note(fmt, info), fmt, optimizer, fpmm)

    def _keep_or_fallback(self, info: TensorInfo, layer: str, why: str, table: bool = False) -> Decision:
        if self.rules.fallback is None or table:
            return Decision(KEEP, why)
        fmt = self.instances.format(self.rules.fallback)
        refusal = self._refusal(fmt, info, layer)
        if refusal:
            return Decision(KEEP, f"{why}; --fallback {fmt.name} refuses too: {refusal}")
        reason = f"{why}; --fallback {fmt.name}" + _note(fmt, info)
        return Decision(QUANTIZE, reason, fmt, None, self.rules.full_precision_mm)


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _note(fmt: Format, info: TensorInfo) -> str:
    """The format's remark on this layer (e.g. a smaller rotation group), for the plan."""
    note = fmt.layer_note(info.shape)
    return f" ({note})" if note else ""


def quantized_outputs(
    layer: str,
    fmt: Format,
    shape: tuple[int, ...],
    writer: MetadataWriter,
    full_precision_mm: bool = False,
    extra: Mapping[str, TensorSpec] | None = None,
) -> tuple[dict[str, Any], list[tuple[str, TensorSpec]]]:
    """A quantized layer's JSON and its output tensors (name, spec) in write order, from the
    weight's shape alone: the format's stored tensors, ``extra`` ones (suffix -> spec: the
    calibrated activation tensors), then the writer's (``comfy_quant``)."""
    # Each layer's JSON is its own, so one file can mix formats and options.
    config = dict(fmt.layer_config(shape))
    if full_precision_mm:
        config["full_precision_matrix_mult"] = True
    specs = {**fmt.stored_specs(shape), **(extra or {})}
    outputs = [(f"{layer}.{suffix}", spec) for suffix, spec in specs.items()]
    outputs += list(writer.layer_specs(layer, config).items())
    return config, outputs


def plan_tensors(
    source: Source,
    fmt: Format,
    writer: MetadataWriter,
    *,
    exclude: Sequence[str] = (),
    preset: ModelFilter | None = None,
    preset_reason: str | None = None,
    rules: Rules | None = None,
    instances: InstanceCache,
    shape_reads: Mapping[str, ShapeRead | str] | None = None,
    components: Sequence[Component] = (),
    candidates: Sequence[Format | None] = (),
    choices: Mapping[str, tuple[Format | None, str]] | None = None,
    activation: ActivationSettings | None = None,
) -> Plan:
    """Decide every tensor's fate and compute the full output layout.

    ``candidates``: formats (None: high precision) a size budget may choose
    among; each layer the global format decides gets those that accept it as
    :attr:`TensorPlan.candidates`. ``choices``: tensor name -> (format or None,
    reason) for such layers, as the budget chose (:mod:`cq_core.engine.budget`);
    rules, excludes and presets still decide every other layer.
    ``activation``: the recipe's activation-side settings; a layer whose format takes the
    tensors they ask for (:func:`cq_core.engine.activations.extra_specs`) stores them too.

    ``components``: the checkpoint's parts, each with its preset (see
    :class:`Component`); ``preset`` alone is one component spanning the whole file.
    ``shape_reads``: tensor name -> why and where the loader reads its shape
    (see :func:`cq_core.plugin.hookspecs.cq_shape_read_layers`; a bare reason means
    all dimensions); such a weight is never stored with those dimensions changed.
    """
    shape_reads = {k: v if isinstance(v, ShapeRead) else ShapeRead(v) for k, v in (shape_reads or {}).items()}
    refuse_quantized_input(source)
    excludes = compile_patterns(exclude, "--exclude", exclude=True)
    bias_shapes = {
        name[: -len(".bias")]: info.shape for name, info in source.tensors.items() if name.endswith(".bias")
    }
    components = list(components)
    if preset is not None:
        components.insert(0, Component("", preset, preset_reason or ""))
    # Each preset derives its depth-dependent patterns from its own component's names.
    components = [
        replace(c, preset=c.preset.for_checkpoint([k for k in source.tensors if k.startswith(c.prefix)]))
        for c in components
    ]
    planner = _Planner(
        excludes, components, rules or Rules(), instances, bias_shapes, shape_reads,
        choices,
    )
    items: list[TensorPlan] = []
    for info in source.tensors.values():  # offset order, so the input is read sequentially
        decision = planner.decide(info)
        item = TensorPlan(info.name, decision.action, decision.reason, info.shape, info.dtype)
        if decision.free and candidates:
            item.candidates = planner.accepted(candidates, info)
        if decision.action == KEEP:
            item.outputs = [(info.name, TensorSpec(info.dtype, info.shape))]
        elif decision.action == QUANTIZE:
            item.layer = _layer_prefix(info.name)
            item.format = decision.format
            item.optimizer = decision.optimizer
            extra = extra_specs(decision.format, info.shape, activation) if activation is not None else {}
            if extra:
                item.activation = activation
            item.layer_config, item.outputs = quantized_outputs(
                item.layer, decision.format, info.shape, writer, decision.full_precision_mm, extra
            )
        items.append(item)

    produced: dict[str, str] = {}
    for item in items:
        for out_name, _ in item.outputs:
            if out_name in produced:
                raise CqError(
                    f"Output tensor {out_name!r} would be written for both {produced[out_name]!r} and "
                    f"{item.name!r}; the input already holds a tensor with that name."
                )
            produced[out_name] = item.name

    plan = Plan(items, {}, components, preset_reason)
    # The input's own quantization header (stale, or not even JSON) never reaches the output:
    # it would label high-precision weights as quantized. Only this plan's layers are listed.
    kept = {k: v for k, v in source.metadata.items() if k != QUANTIZATION_HEADER_KEY}
    plan.metadata = {**kept, **writer.header_metadata(plan.layer_configs)}
    return plan


# ---------------------------------------------------------------------------
# Building the plan of a checkpoint: components, presets, shape reads
# ---------------------------------------------------------------------------


def resolve_components(registry: Registry, source: Source, model: str | None) -> tuple[list[Component], str]:
    """The checkpoint's components with their presets, and why.

    ``model``: None auto-detects every component (see ``cq_detect_model``);
    a preset name replaces the preset of the main (first detected) model
    component, or covers the whole file when none is detected, and leaves the
    other components (text encoders, VAE) to detection; ``"none"`` turns the
    model presets off. A component whose preset keeps everything (a VAE)
    stays protected in every case: quantizing it is never right.
    """
    chosen = registry.model_filter(model) if model not in (None, "none") else None
    detections = registry.detect_components(list(source.tensors), dict(source.metadata))
    components = [Component(d.prefix, registry.model_filter(d.preset), f"detected: {d.reason}") for d in detections]
    if model == "none":
        return [c for c in components if c.preset.keep_all], "no preset (--model none)"
    if chosen is not None:
        reason = f"chosen with --model {model}"
        main = next((i for i, c in enumerate(components) if not c.preset.keep_all), None)
        if main is None:
            return [Component("", chosen, reason), *components], reason
        components[main] = Component(components[main].prefix, chosen, reason)
        return components, reason
    if not any(not c.preset.keep_all for c in components):
        return components, "no preset detected"
    return components, components[0].reason


def build_plan(
    source: Source,
    registry: Registry,
    fmt: Format,
    writer: MetadataWriter,
    *,
    exclude: Sequence[str] = (),
    model: str | None = None,
    rules: Rules | None = None,
    instances: InstanceCache | None = None,
    candidates: Sequence[Format | None] = (),
    choices: Mapping[str, tuple[Format | None, str]] | None = None,
    activation: ActivationSettings | None = None,
) -> Plan:
    components, reason = resolve_components(registry, source, model)
    return plan_tensors(
        source, fmt, writer, exclude=exclude, components=components, preset_reason=reason, rules=rules,
        instances=instances or InstanceCache(registry, fmt),
        shape_reads=registry.shape_read_layers(list(source.tensors), dict(source.metadata)),
        candidates=candidates, choices=choices,
        activation=activation,
    )


def plan_uses(plan: Plan, writer: MetadataWriter, source: Source) -> list[tuple[str, str]]:
    """(kind, name) of every plugin object the plan uses: formats, optimizers, presets, the
    writer, the layout converter; their plugins' versions go into the recipe record."""
    uses = [("metadata writer", writer.name)]
    uses += [("model filter", c.preset.name) for c in plan.components]
    for item in plan.items:
        if item.action == QUANTIZE:
            uses.append(("format", item.format.name))
            if item.optimizer is not None:
                uses.append(("optimizer", item.optimizer.name))
    if source.layout is not None:
        uses.append(("layout converter", source.layout.converter))
    return list(dict.fromkeys(uses))


def shard_layouts(
    plan: Plan,
    source: Source,
    writer: MetadataWriter,
    max_shard_bytes: int | None,
) -> list[ShardLayout]:
    """Split the plan's outputs into shards: by size, or mirroring the input's shards.

    Each shard's header carries the plan's metadata, with the layer metadata
    narrowed to the layers stored in that shard.
    """
    groups = [item.outputs for item in plan.items]
    keys = [source.shard_number(item.name) for item in plan.items] if source.sharded else None
    all_layers = writer.header_metadata(plan.layer_configs)
    base = {k: v for k, v in plan.metadata.items() if k not in all_layers}
    layouts = []
    for numbers in split_groups(groups, max_shard_bytes, keys):
        members = [plan.items[n] for n in numbers]
        layers = {i.layer: i.layer_config for i in members if i.action == QUANTIZE}
        entries = [entry for item in members for entry in item.outputs]
        layouts.append(ShardLayout(entries, {**base, **writer.header_metadata(layers)}))
    return layouts
