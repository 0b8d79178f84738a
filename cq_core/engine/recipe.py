"""One conversion, described by one object: the :class:`Recipe`, and its record in the output.

A recipe is everything that decides the bytes of a quantized file besides the
input: the format and its options, the optimizer and its options, the preset,
the per-layer rules, the excludes, the fallback, the calibration statistics'
fingerprint. It holds no paths and no user names, so it can be published with
the file. Execution settings (device, threads, shard size, progress) are not
part of it: they never change the bytes (:class:`cq_core.engine.run.RunSettings`).

Each field is declared once, below, with its kind, default, command-line flag and
help (:mod:`cq_core.engine.fields`); parsing a recipe file, the JSON record, the
labels in messages, applying keywords or flags over a recipe (:meth:`Recipe.override`)
and the CLI's options (:mod:`cq_core.cli.fields`) are all made from those declarations.

The CLI builds a recipe from its flags, or loads one (``--recipe FILE.toml``,
``--recipe-from OLD_OUTPUT``) and lets flags override fields; the Python API
takes one (:func:`cq_core.convert`). The output's ``__metadata__`` records it
under :data:`RECIPE_KEY` (a :class:`RecipeRecord`: the recipe, the versions of
cq and of every plugin whose format, optimizer, preset or writer was used, and
a SHA-256 of the source header), and ``cq inspect`` shows it.

A recipe file (TOML or JSON)::

    format = "nvfp4"
    optimizer = "gptq"
    preset = "flux"                 # omit to auto-detect; "none" for no preset
    exclude = ["img_in"]
    fallback = "float8_e4m3fn"
    embeddings = "int8"             # token-embedding tables too; "none" keeps them (a preset may default it)
    input_scale = "calibrated"      # or "none"; with awq, needs --calibration
    awq = true                      # pre_quant_scale where the format takes it (nvfp4)
    [format_options]
    [optimizer_options]
    damp = 0.01
    [layers]                        # regex = format | "skip" | {format, options, ...}; first match wins
    "final_layer" = "skip"

A size budget (:mod:`cq_core.engine.budget`) adds ``target_size`` (bytes, or a
string like ``"10GB"``) or ``bits_per_weight``, and ``formats`` (the allowed
formats, ``"bf16"`` meaning high precision) or ``gpu`` (``blackwell``,
``hopper``, ``ada``, ``older``: the formats stock ComfyUI runs natively there).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import InitVar, dataclass, field, replace
from pathlib import Path
from typing import Any

from cq_core.engine.activations import INPUT_SCALE_CHOICES, ActivationSettings
from cq_core.engine.budget import GPU_CHOICES, HIGH_PRECISION
from cq_core.engine.fields import (
    Flag,
    Kind,
    Names,
    Number,
    Patterns,
    Size,
    Switch,
    Table,
    Text,
    declare,
    field_specs,
    keyword_targets,
    parse_key_values,
)

from cq_core.engine.rules import HEUR_HELP, LayerRule, Rules, choice_from_spec, compile_patterns, layer_rule, resolve_embedding_format
from cq_core.errors import CqError, UsageError, exception_text, quoted
from cq_core.io.shards import open_source
from cq_core.plugin.comfyui_versions import check_known_release, parse_comfyui_version
from cq_core.plugin.manager import Registry

#: The ``__metadata__`` key of the record (a JSON string).
RECIPE_KEY = "cq_recipe"
#: Bumped when a field changes meaning; a newer record is refused by an older cq.
RECIPE_VERSION = 1
DEFAULT_OPTIMIZER = "rtn"
DEFAULT_METADATA_WRITER = "comfyui"
NONFINITE_CHOICES = ("error", "keep")


@dataclass(frozen=True)
class LayerSpec:
    """One per-layer rule: a regex and what matching layers get (a format name, ``"skip"``, or a
    table ``{format, options, optimizer, optimizer_options, full_precision_matrix_mult}``)."""

    pattern: str
    spec: str | Mapping[str, Any]
    #: where the rule was written (``--layer``, the config file's name, ``recipe``); not recorded
    source: str = field(default="recipe", compare=False)

    def rule(self) -> LayerRule:
        return layer_rule(self.pattern, self.spec, self.source)


class Layers(Kind):
    """Per-layer rules: a table ``{REGEX: spec}`` in a file (its order is the precedence)."""

    cli_type = list[str]

    def from_file(self, value: Any, label: str) -> Any:
        if not isinstance(value, Mapping):
            raise UsageError(f"{label} must be a table, not {value!r}.")
        return tuple(LayerSpec(pattern, spec, "recipe") for pattern, spec in value.items())

    def to_json(self, value: Any) -> Any:
        layers: dict[str, Any] = {}
        for spec in value:  # a repeated regex can never match second: the first one stays
            layers.setdefault(spec.pattern, spec.spec if isinstance(spec.spec, str) else dict(spec.spec))
        return layers


def _options(flag: str):
    return lambda pairs: parse_key_values(pairs, flag)


@dataclass(frozen=True)
class Recipe:
    """What a conversion does, validated; see the module docstring for the file form.

    ``format``: None takes the installed default format (the one whose class says
    ``is_default``; :meth:`Registry.default_format`). ``preset``: a preset name, ``None``
    to auto-detect every component, ``"none"`` for no preset. ``layers``: per-layer rules
    in precedence order (first match wins; they beat ``exclude``, the preset and ``format``).
    ``calibration``: ``"sha256:<hex>"`` of the statistics file the conversion used, or None;
    the file itself is given per run (``--calibration``), never recorded. ``target_size``
    (bytes of the output file) or ``bits_per_weight`` (output bits per input parameter): a
    size budget that chooses each free layer's format among ``formats`` (``"bf16"``: high
    precision) or ``gpu``'s native formats (each format's ``native_gpus``); neither:
    ``format`` and high precision. Raises :class:`UsageError` for a value of the wrong
    kind or a contradiction (:meth:`check_syntax`).
    """

    format: str | None = declare(
        None, Text(), "-f", "--format",
        help="Quantization format; 'cq formats' lists them. [default: the one 'cq formats' marks as default]")
    format_options: Mapping[str, Any] = declare(
        {}, Table(), Flag(("-O", "--option"), parse=_options("--option")), options_of="format",
        help="Format option KEY=VALUE (repeatable); 'cq formats' lists them.")
    optimizer: str = declare(
        DEFAULT_OPTIMIZER, Text(), "--optimizer",
        help="Rounding optimizer; 'rtn' is plain round-to-nearest. [default: rtn]")
    optimizer_options: Mapping[str, Any] = declare(
        {}, Table(), Flag(("--optimizer-option",), parse=_options("--optimizer-option")), options_of="optimizer",
        help="Optimizer option KEY=VALUE (repeatable).")
    preset: str | None = declare(
        None, Text(optional=True), Flag(("--model",), keyword="model"),
        help="Model preset to apply; default: auto-detect; 'none' for no preset.")
    exclude: tuple[str, ...] = declare(
        (), Patterns(), "-x", "--exclude", merge="union",
        help="Keep tensors whose name matches this regex in high precision.")
    fallback: str | None = declare(
        None, Text(optional=True), "--fallback",
        help="Format for layers that --exclude or the preset keep, or that the format refuses, instead of "
             "high precision.")
    heuristic: bool = declare(False, Switch(), "--heur", help=HEUR_HELP)
    full_precision_mm: bool = declare(
        False, Switch(), "--full-precision-mm",
        help="Mark every quantized layer full_precision_matrix_mult: ComfyUI dequantizes and multiplies in "
             "high precision.")
    nonfinite: str = declare(
        "error", Text(), "--nonfinite",
        help="A weight with NaN/Inf: 'error' (refuse) or 'keep' it in high precision. [default: error]")
    metadata_writer: str = declare(DEFAULT_METADATA_WRITER, Text())
    calibration: str | None = declare(None, Text(optional=True), label="--calibration")
    target_size: int | None = declare(
        None, Size(), "--target-size", replaces="bits_per_weight",
        help="Size budget for the output file (e.g. 10GB): each layer's format is chosen among the allowed "
             "ones (--formats, --gpu) by measured error to fit it. Reads every weight once more.")
    bits_per_weight: float | None = declare(
        None, Number("a number of bits (e.g. 5.5)"), "--bits-per-weight", replaces="target_size",
        help="Size budget as output bits per input parameter (e.g. 5.5), instead of --target-size.")
    formats: tuple[str, ...] = declare(
        (), Names(), "--formats", replaces="gpu",
        help="Formats the size budget may choose, comma-separated; 'bf16' keeps a layer in high precision. "
             "Default: --gpu's native formats, else --format and bf16.")
    gpu: str | None = declare(
        None, Text(optional=True), "--gpu", replaces="formats",
        help="blackwell, hopper, ada or older: the size budget chooses among the formats stock ComfyUI runs "
             "natively there (docs/budget.md).")
    comfyui_version: str | None = declare(
        None, Text(optional=True), "--comfyui-version",
        help="The ComfyUI release that will load the file (e.g. 0.30 or 0.33.0): a format it does not load is "
             "refused, naming the first release that does, and a size budget chooses only among those it "
             "loads. [default: none; a format no release loads gets a warning]")
    #: Token-embedding tables of text encoders: ``"int8"`` (or a format name whose ComfyUI
    #: ``Embedding`` loads it), ``"none"`` to keep them, None for the preset's default (none).
    embeddings: str | None = declare(
        None, Text(optional=True), "--embeddings",
        help="Token-embedding tables of text encoders: 'int8' (row-wise INT8, which ComfyUI's Embedding "
             "loads) or 'none' (keep). [default: the preset's, else none]")
    #: ``"calibrated"``: a static ``input_scale`` per layer from calibration statistics, where the
    #: format takes one (:mod:`cq_core.engine.activations`); ``"none"``: the format's default.
    input_scale: str = declare(
        "none", Text(), "--input-scale",
        help="'calibrated': a static activation scale per layer, where the format stores one, chosen on the "
             "calibration sample; 'none': the format's default. [default: none]")
    #: An AWQ-style ``pre_quant_scale`` per layer, where the format takes one (nvfp4).
    awq: bool = declare(
        False, Switch(), "--awq",
        help="AWQ smoothing: a pre_quant_scale per layer where the format stores one, searched on the "
             "calibration sample with activations quantized.")
    layers: tuple[LayerSpec, ...] = declare(
        (), Layers(),
        Flag(("--layer-config",), keyword="layer_config", parse=lambda path: layer_config_specs(path),
             cli_type=Path,
             help="TOML or JSON file: a 'layers' table of REGEX = FORMAT | \"skip\" | {format, options, "
                  "optimizer, full_precision_matrix_mult}; beats every other rule."),
        Flag(("--layer",), keyword="layer", parse=lambda flags: layer_flag_specs(flags),
             help="REGEX=FORMAT (or REGEX=skip) for matching layers (repeatable; first match wins; beats "
                  "--exclude, the preset and --format)."),
        merge="prepend")
    #: Not a field: where the values come from (a recipe file), named in the messages of
    #: :meth:`check_syntax`, which every new recipe passes (:class:`UsageError` otherwise).
    where: InitVar[str | None] = None

    def __post_init__(self, where: str | None) -> None:
        # Python callers' conveniences: one pattern as a string, rules as a table or pairs,
        # "10GB", formats as "a,b"; each field's kind knows its own.
        for spec in field_specs(Recipe):
            value = getattr(self, spec.name)
            if spec.name == "layers":
                if not isinstance(value, tuple) or not all(isinstance(s, LayerSpec) for s in value):
                    object.__setattr__(self, "layers", layer_specs(value, where))
                continue
            normal = spec.kind.normalise(value, spec.label_for(where))
            if normal is not value:
                object.__setattr__(self, spec.name, normal)
        self.check_syntax(where)

    # -- building ------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(spec.name for spec in field_specs(cls))

    @classmethod
    def from_mapping(cls, data: Any, where: str) -> Recipe:
        """A recipe from a parsed TOML/JSON table; raises :class:`UsageError` naming ``where``
        and the first unknown or invalid field."""
        if not isinstance(data, Mapping):
            raise UsageError(f"{where}: a recipe must be a table of fields, not {type(data).__name__}.")
        specs = {spec.name: spec for spec in field_specs(cls)}
        for key in data:
            if key not in specs:
                close = difflib.get_close_matches(str(key), list(specs), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UsageError(f"{where}: unknown recipe field {key!r}{hint}; known: {', '.join(specs)}.")
        values = {}
        for name, spec in specs.items():
            if name in data:
                value = spec.kind.from_file(data[name], spec.label_for(where))
                if value is not None:
                    values[name] = value
        return cls(**values, where=where)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        """A recipe file: TOML, or JSON when its name ends in ``.json``; or a whole
        :class:`RecipeRecord` as ``cq inspect --json`` prints it."""
        path = Path(path)
        where = f"--recipe {path}"
        data = read_table_file(path, where)
        if isinstance(data, Mapping) and "recipe_version" in data:  # a whole record (inspect --json)
            return RecipeRecord.from_json(data, where).recipe
        return cls.from_mapping(data, where)

    def override(self, **changes: Any) -> Recipe:
        """This recipe with some fields replaced, as flags given beside ``--recipe`` do.

        A new ``format`` (or ``optimizer``) drops the recipe's options for the old one
        unless new options come with it; options given are merged over the kept ones.
        ``layers`` given go before the recipe's (they win); ``exclude`` given is added;
        one of a pair (``target_size`` / ``bits_per_weight``, ``formats`` / ``gpu``) given
        resets the other. Each field's declaration says which applies.
        """
        specs = {spec.name: spec for spec in field_specs(Recipe)}
        values = dict(changes)
        for spec in specs.values():
            owner = spec.options_of
            if owner is None:
                continue
            new_options = dict(spec.kind.normalise(values.pop(spec.name, None) or {}, spec.label_for(None)))
            same = values.get(owner, getattr(self, owner)) == getattr(self, owner)
            if new_options or owner in values:
                values[spec.name] = {**(getattr(self, spec.name) if same else {}), **new_options}
        for name, value in list(values.items()):
            spec = specs[name]
            if spec.merge == "prepend":
                values[name] = (*layer_specs(value), *getattr(self, name))
            elif spec.merge == "union":
                values[name] = tuple(dict.fromkeys((*getattr(self, name), *spec.kind.normalise(value, spec.label_for(None)))))
        for name in list(values):
            spec = specs[name]
            if spec.replaces is not None and spec.kind.given(values[name]) and spec.replaces not in values:
                values[spec.replaces] = specs[spec.replaces].default
        return replace(self, **values)

    def with_options(self, **options: Any) -> Recipe:
        """This recipe with ``convert()``'s keyword arguments applied over it: field names, or the
        flags' keywords (``model`` for ``preset``, ``layer`` for ``--layer`` strings,
        ``layer_config`` for a ``--layer-config`` file, whose rules come first). Values that say
        nothing (None, False, empty) are ignored. Raises :class:`UsageError` for an unknown name,
        with the closest known one."""
        targets = keyword_targets(Recipe)
        given: dict[str, list[tuple[int, Any]]] = {}
        for keyword, value in options.items():
            if keyword not in targets:
                raise unknown_keyword(keyword, targets)
            spec, flag = targets[keyword]
            if flag is not None and flag.parse is not None and value is not None:
                value = flag.parse(value)
            elif isinstance(spec.kind, Table) and value is not None:  # format_options=..., a mapping
                value = spec.kind.normalise(value, spec.label_for(None))
            if spec.kind.given(value):  # in the flags' declared order (--layer-config rules first)
                given.setdefault(spec.name, []).append((spec.flags.index(flag) if flag else -1, value))
        changes: dict[str, Any] = {}
        for name, values in given.items():
            values.sort(key=lambda pair: pair[0])
            changes[name] = values[0][1] if len(values) == 1 else tuple(v for _, part in values for v in part)
        given_scale = dict(changes.get("format_options") or {}).get("input_scale")
        if changes.get("input_scale") == "calibrated" and given_scale is not None:
            raise UsageError(f"-O input_scale={given_scale} and --input-scale calibrated both set the activation "
                             "scale; pass one of them.")
        return self.override(**changes) if changes else self

    def resolved(self, registry: Registry) -> Recipe:
        """The recipe with its format named: the installed default when ``format`` is None."""
        return self if self.format is not None else replace(self, format=registry.default_format().name)

    # -- checking ------------------------------------------------------------------

    def check_syntax(self, where: str | None = None) -> None:
        """What can be checked without the plugins: choices, regexes, rule tables. ``where``
        names a recipe file in messages; None names the flags (``--nonfinite``, ...)."""
        if self.nonfinite not in NONFINITE_CHOICES:
            raise UsageError(
                f"{_label(where, 'nonfinite')} must be one of {', '.join(NONFINITE_CHOICES)}, not {self.nonfinite!r}."
            )
        if self.input_scale not in INPUT_SCALE_CHOICES:
            raise UsageError(
                f"{_label(where, 'input_scale')} must be one of {', '.join(INPUT_SCALE_CHOICES)}, "
                f"not {self.input_scale!r}."
            )
        if self.calibration is not None and not _is_digest(self.calibration):
            raise UsageError(
                f"{_label(where, 'calibration')} must be 'sha256:' and 64 hex digits, not {self.calibration!r}."
            )
        compile_patterns(self.exclude, _label(where, "exclude"), exclude=True)
        if self.comfyui_version is not None:
            try:
                parse_comfyui_version(self.comfyui_version)
            except UsageError:
                raise UsageError(f"{_label(where, 'comfyui_version')} must be a ComfyUI release number like 0.30 or "
                                 f"0.33.0, not {quoted(self.comfyui_version)}.") from None
            check_known_release(self.comfyui_version, _label(where, "comfyui_version"))
        self._check_budget(where)
        for spec in self.layers if where is not None else ():  # a recipe file's rules: name the file
            layer_rule(spec.pattern, spec.spec, f"{where}: recipe")
        self.rules()

    @property
    def has_budget(self) -> bool:
        return self.target_size is not None or self.bits_per_weight is not None

    def _check_budget(self, where: str | None) -> None:
        if self.gpu is not None and self.gpu not in GPU_CHOICES:
            raise UsageError(f"{_label(where, 'gpu')} must be one of {', '.join(GPU_CHOICES)}, not {self.gpu!r}.")
        if self.target_size is not None and self.bits_per_weight is not None:
            raise UsageError(f"{_pair(where, 'target_size', 'bits_per_weight')} both set the size budget; "
                             "give one of them.")
        if self.formats and self.gpu is not None:
            raise UsageError(f"{_pair(where, 'formats', 'gpu')} both set the allowed formats; give one of them.")
        if (self.formats or self.gpu is not None) and not self.has_budget:
            flag = _label(where, "formats" if self.formats else "gpu")
            budget = ("--target-size or --bits-per-weight" if where is None
                      else "recipe field 'target_size' or 'bits_per_weight' (or the flag)")
            raise UsageError(f"{flag} chooses formats for a size budget: give {budget} too.")
        if self.target_size is not None and (isinstance(self.target_size, bool) or not isinstance(self.target_size, int)
                                             or self.target_size <= 0):
            raise UsageError(f"{_label(where, 'target_size')} must be a positive number of bytes, "
                             f"not {self.target_size!r}.")
        if self.bits_per_weight is not None and not (0 < self.bits_per_weight < 1024):
            raise UsageError(f"{_label(where, 'bits_per_weight')} must be a number of bits above 0 and "
                             f"below 1024 (e.g. 5.5), not {self.bits_per_weight!r}.")

    def validate(self, registry: Registry) -> None:
        """Every name known to ``registry`` and every option valid; raises :class:`UsageError`."""
        self.check_syntax()
        fmt = registry.format(self.format) if self.format is not None else registry.default_format()
        fmt(**dict(self.format_options))
        registry.optimizer(self.optimizer)(**dict(self.optimizer_options))
        registry.metadata_writer(self.metadata_writer)
        if self.preset not in (None, "none"):
            registry.model_filter(self.preset)
        if self.fallback is not None:
            try:
                registry.format(self.fallback)
            except UsageError as exc:
                raise UsageError(f"--fallback: {exc}") from None
        for name in self.formats:
            if name != HIGH_PRECISION:
                try:
                    registry.format(name)
                except UsageError as exc:
                    raise UsageError(f"--formats: {exc} ({HIGH_PRECISION!r} keeps a layer in high precision)") from None
        if self.embeddings is not None:
            resolve_embedding_format(self.embeddings, registry)

    def may_read_statistics(self, registry: Registry) -> bool:
        """Whether a conversion by this recipe may read calibration statistics: a size budget,
        calibrated activation tensors, or an optimizer (global or in a layer rule) that uses them
        (:attr:`cq_core.plugin.types.Optimizer.uses_calibration`). Unknown names count as yes
        (validation names them)."""
        if self.has_budget or self.activation_settings().active:
            return True
        named = [(self.optimizer, self.optimizer_options)]
        named += [(spec.spec.get("optimizer"), spec.spec.get("optimizer_options") or {})
                  for spec in self.layers if isinstance(spec.spec, Mapping) and spec.spec.get("optimizer")]
        for name, options in named:
            try:
                if registry.optimizer(name)(**dict(options)).uses_calibration:
                    return True
            except (UsageError, TypeError):
                return True
        return False

    def activation_settings(self) -> ActivationSettings:
        """The activation-side settings (:mod:`cq_core.engine.activations`) this recipe asks for."""
        return ActivationSettings(self.input_scale, self.awq)

    def rules(self, keep: Mapping[str, str] | None = None) -> Rules:
        """The per-layer rules the planner applies (:class:`cq_core.engine.rules.Rules`)."""
        return Rules([spec.rule() for spec in self.layers], self.fallback, self.heuristic, self.full_precision_mm,
                     dict(keep or {}), self.embeddings)

    # -- recording -----------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The recipe as a JSON/TOML table: defaults included, ``None`` fields left out."""
        data = {spec.name: spec.kind.to_json(getattr(self, spec.name)) for spec in field_specs(Recipe)}
        return {k: v for k, v in data.items() if v is not None}

    def to_toml(self) -> str:
        """The recipe as a file ``--recipe`` reads back. TOML has no null: an option whose value
        is None (its default, where an option has one) is left out, which reads back the same."""
        import tomli_w

        def without_none(value: Any) -> Any:
            if isinstance(value, Mapping):
                return {k: without_none(v) for k, v in value.items() if v is not None}
            return value

        data = without_none(self.to_json())
        layers = data.pop("layers", {})
        text = tomli_w.dumps(data)
        if layers:
            # The rules' order is their precedence: one table, every rule on its own line
            # (a rule's table inline), where tomli_w would move table rules after the others.
            text += "\n[layers]\n" + "".join(f"{_toml_key(k)} = {_toml_inline(v)}\n" for k, v in layers.items())
        return text


def unknown_keyword(keyword: str, known: Mapping[str, Any] | Sequence[str], what: str = "convert()") -> UsageError:
    """``what`` has no keyword ``keyword``: one sentence with the closest known name."""
    close = difflib.get_close_matches(keyword, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UsageError(f"{what} has no option {keyword!r}{hint}; see help({what.removesuffix('()')}).")


def _toml_key(key: str) -> str:
    import tomli_w

    return tomli_w.dumps({key: 0}).rsplit(" = ", 1)[0]


def _toml_inline(value: Any) -> str:
    """A TOML value on one line: tables inline (``{ a = 1, b = "x" }``), the rest as tomli_w writes it."""
    import tomli_w

    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_inline(v)}" for k, v in value.items()) + " }"
    return tomli_w.dumps({"v": value}).split(" = ", 1)[1].rstrip("\n")


def _pair(where: str | None, first: str, second: str) -> str:
    """``--target-size and --bits-per-weight``, or ``FILE: recipe fields 'target_size' and 'bits_per_weight'``."""
    if where is None:
        return f"{_label(None, first)} and {_label(None, second)}"
    return f"{where}: recipe fields {first!r} and {second!r}"


def _label(where: str | None, name: str) -> str:
    """The field's flag, or ``WHERE: recipe field 'name'`` (its declaration says which flag)."""
    return next(spec for spec in field_specs(Recipe) if spec.name == name).label_for(where)


def resolve_recipe(recipe: Recipe | None, calibration: str | os.PathLike | None, registry: Registry,
                   **options: Any) -> Recipe:
    """The recipe a call to :func:`cq_core.convert` means: ``recipe`` (or the defaults) with
    ``options`` (:meth:`Recipe.with_options`) applied over it, its format named
    (:meth:`Recipe.resolved`), and the calibration file's fingerprint; validated.

    Raises :class:`UsageError` when the recipe records calibration statistics and
    ``calibration`` is None: the same conversion needs statistics of its own.
    """
    base = recipe if recipe is not None else Recipe()
    if not isinstance(base, Recipe):
        raise UsageError(f"recipe must be a cq_core.Recipe, not {type(base).__name__}.")
    resolved = base.with_options(**options)
    if calibration is not None:
        resolved = replace(resolved, calibration=file_digest(calibration))
    elif resolved.calibration is not None and resolved.may_read_statistics(registry):
        raise UsageError(
            f"The recipe was made with calibration statistics ({resolved.calibration[:19]}...); "
            "pass --calibration with a statistics file from 'cq calibrate' for this model."
        )
    elif resolved.calibration is not None:  # overridden (--optimizer rtn, say): nothing would read them
        resolved = replace(resolved, calibration=None)
    resolved.validate(registry)
    return resolved.resolved(registry)


def _is_digest(text: str) -> bool:
    kind, _, digest = text.partition(":")
    return kind == "sha256" and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


def _no_duplicate_keys(where: str):
    """A ``json.loads`` hook that refuses a key written twice (TOML refuses it by itself)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        table: dict[str, Any] = {}
        for key, value in items:
            if key in table:
                raise UsageError(f"{where}: the key {key!r} is written twice.")
            table[key] = value
        return table

    return pairs


def read_table_file(path: Path, where: str) -> Any:
    """A TOML file, or JSON when its name ends in ``.json``, parsed; :class:`UsageError` naming
    ``where`` when it cannot be read or parsed."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{where}: cannot be read ({exc.strerror or exc}).") from None
    except UnicodeDecodeError:
        raise UsageError(f"{where}: is not UTF-8 text.") from None
    is_json = path.suffix.lower() == ".json"
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys(where)) if is_json else tomllib.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"{where}: is not valid {'JSON' if is_json else 'TOML'} ({exception_text(exc)}).") from None


def layer_specs(layers: Any, where: str | None = None) -> tuple[LayerSpec, ...]:
    """Per-layer rules given as :class:`LayerSpec` items, a table ``{REGEX: spec}`` (its order
    kept) or ``(REGEX, spec)`` pairs, as :class:`LayerSpec` items; raises :class:`UsageError`
    for anything else (``where`` names the recipe file)."""
    items = layers.items() if isinstance(layers, Mapping) else layers
    label = f"{where}: recipe field 'layers'" if where else "Recipe field 'layers'"
    if isinstance(items, str) or not isinstance(items, (Sequence, type({}.items()))):
        raise UsageError(f"{label} must be a table of REGEX = FORMAT | \"skip\" | {{...}}, not {layers!r}.")
    specs = []
    for item in items:
        if isinstance(item, LayerSpec):
            specs.append(item)
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
            specs.append(LayerSpec(item[0], item[1], "recipe"))
        else:
            raise UsageError(f"{label} must be a table of REGEX = FORMAT | \"skip\" | {{...}} "
                             f"(or REGEX, spec pairs), not an item {item!r}.")
    return tuple(specs)


def layer_flag_specs(flags: Sequence[str]) -> tuple[LayerSpec, ...]:
    """``--layer REGEX=FORMAT`` strings (one string: one rule) -> rules."""
    specs = []
    for flag in (flags,) if isinstance(flags, str) else flags:
        pattern, sep, fmt = flag.rpartition("=")
        fmt = fmt.strip()
        if not sep or not pattern or not fmt:
            raise UsageError(f"--layer {flag!r} must look like REGEX=FORMAT (or REGEX=skip).")
        specs.append(LayerSpec(pattern, fmt, "--layer"))
    return tuple(specs)


def layer_config_specs(path: str | os.PathLike | None) -> tuple[LayerSpec, ...]:
    """Rules from a ``--layer-config`` TOML or JSON file with a ``layers`` table, in file order.

    TOML::

        [layers]
        "img_in|txt_in" = "skip"
        "double_blocks\\\\.\\\\d+\\\\.img_mlp" = "float8_e4m3fn"
        "single_blocks" = { format = "int8_tensorwise", full_precision_matrix_mult = true }
    """
    if path is None:
        return ()
    path = Path(path)
    where = f"--layer-config {path}"
    data = read_table_file(path, where)
    layers = data.get("layers") if isinstance(data, Mapping) else None
    if not isinstance(layers, Mapping):
        raise UsageError(f"{where}: needs a 'layers' table of REGEX = FORMAT | \"skip\" | {{...}}.")
    unknown = sorted(set(data) - {"layers"})
    if unknown:
        raise UsageError(f"{where}: unknown top-level key {unknown[0]!r} (only 'layers').")
    specs = tuple(LayerSpec(pattern, spec, path.name) for pattern, spec in layers.items())
    for spec in specs:  # checked now, so the message names the file
        choice_from_spec(spec.spec, f"{where}: rule {spec.pattern!r}")
        compile_patterns([spec.pattern], f"{where}: rule")
    return specs


# ---------------------------------------------------------------------------
# The record in the output file
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RecipeRecord:
    """What the output's ``__metadata__[cq_recipe]`` holds (a JSON object):

    ``recipe_version``, ``recipe`` (:meth:`Recipe.to_json`), ``versions`` (distribution
    name -> version: cq-core and each plugin whose format, optimizer, preset, writer
    or layout converter the conversion used), ``presets`` (component prefix -> the
    preset applied, as detected or chosen) and ``source_header_sha256`` (of the
    input's header bytes; for shards, of their headers in order).
    """

    recipe: Recipe
    versions: Mapping[str, str]
    source_header_sha256: str
    presets: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe_version": RECIPE_VERSION,
            "recipe": self.recipe.to_json(),
            "versions": dict(self.versions),
            "presets": dict(self.presets),
            "source_header_sha256": self.source_header_sha256,
        }

    def header_entry(self) -> dict[str, str]:
        return {RECIPE_KEY: json.dumps(self.to_json(), separators=(",", ":"), sort_keys=False)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> RecipeRecord:
        if not isinstance(data, Mapping) or not isinstance(data.get("recipe_version"), int):
            raise CqError(f"{where}: its {RECIPE_KEY} entry is not a cq recipe record.")
        if data["recipe_version"] > RECIPE_VERSION:
            raise CqError(
                f"{where}: its recipe is version {data['recipe_version']}; this cq reads up to "
                f"{RECIPE_VERSION}: upgrade cq."
            )
        versions = data.get("versions", {})
        presets = data.get("presets", {})
        return cls(
            Recipe.from_mapping(data.get("recipe"), f"{where}: recipe"),
            dict(versions) if isinstance(versions, Mapping) else {},
            str(data.get("source_header_sha256", "")),
            dict(presets) if isinstance(presets, Mapping) else {},
        )

    @classmethod
    def read(cls, metadata: Mapping[str, str], where: str) -> RecipeRecord | None:
        """The record in a file's ``__metadata__``, or None when it has none."""
        raw = metadata.get(RECIPE_KEY)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise CqError(f"{where}: its {RECIPE_KEY} entry is not valid JSON.") from None
        return cls.from_json(data, where)


def recipe_of(path: str | os.PathLike) -> RecipeRecord | None:
    """The record in a checkpoint's header (a file, an index or a folder of shards), or None."""
    with open_source(path) as source:
        return RecipeRecord.read(source.metadata, str(source.path))


def recipe_from(path: str | os.PathLike) -> Recipe:
    """The recipe that made ``path`` (``--recipe-from``); raises :class:`UsageError` for a path that
    is missing or a recipe file, :class:`CqError` when the checkpoint records none."""
    if not os.path.exists(path):
        raise UsageError(f"--recipe-from {path}: no such file or folder.")
    if str(path).lower().endswith((".toml", ".json")) and not str(path).lower().endswith(".index.json"):
        raise UsageError(f"--recipe-from {path}: takes a checkpoint cq made; pass a recipe file with --recipe.")
    record = recipe_of(path)
    if record is None:
        raise CqError(
            f"{path}: records no cq recipe (it was made by another tool or an older cq); give the options "
            "as flags, or write them in a file for --recipe."
        )
    return record.recipe


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def file_digest(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` of a whole file (a calibration file's fingerprint), read in 1 MiB
    blocks; remembered per (path, size, modification time), so the CLI and the API hash once.
    Raises :class:`UsageError` naming ``--calibration`` when the file cannot be read."""
    try:
        stat = os.stat(path)
        if not os.path.isfile(path):
            raise UsageError(f"--calibration {path}: is not a file.")
        return _digest(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    except FileNotFoundError:
        raise UsageError(f"--calibration {path}: no such file.") from None
    except OSError as exc:
        raise UsageError(f"--calibration {path}: cannot be read ({exc.strerror or exc}).") from None
