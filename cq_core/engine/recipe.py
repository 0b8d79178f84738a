"""One conversion, described by one object: the :class:`Recipe`, and its record in the output.

A recipe is everything that decides the bytes of a quantized file besides the
input: the format and its options, the optimizer and its options, the preset,
the per-layer rules, the excludes, the fallback, the calibration statistics'
fingerprint. It holds no paths and no user names, so it can be published with
the file. Execution settings (device, threads, shard size, progress) are not
part of it: they never change the bytes.

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
from dataclasses import InitVar, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from cq_core.engine.budget import GPU_CHOICES, HIGH_PRECISION
from cq_core.engine.activations import INPUT_SCALE_CHOICES, ActivationSettings
from cq_core.engine.plan import (
    LayerRule,
    Rules,
    choice_from_spec,
    compile_patterns,
    layer_rule,
    resolve_embedding_format,
)
from cq_core.errors import CqError, UsageError
from cq_core.io.shards import open_source
from cq_core.io.sizes import parse_size
from cq_core.plugin.manager import Registry

#: The ``__metadata__`` key of the record (a JSON string).
RECIPE_KEY = "cq_recipe"
#: Bumped when a field changes meaning; a newer record is refused by an older cq.
RECIPE_VERSION = 1
DEFAULT_FORMAT = "float8_e4m3fn"
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


@dataclass(frozen=True)
class Recipe:
    """What a conversion does, validated; see the module docstring for the file form.

    ``preset``: a preset name, ``None`` to auto-detect every component, ``"none"``
    for no preset. ``layers``: per-layer rules in precedence order (first match
    wins; they beat ``exclude``, the preset and ``format``). ``calibration``:
    ``"sha256:<hex>"`` of the statistics file the conversion used, or None; the
    file itself is given per run (``--calibration``), never recorded.
    ``target_size`` (bytes of the output file) or ``bits_per_weight`` (output
    bits per input parameter): a size budget that chooses each free layer's
    format among ``formats`` (``"bf16"``: high precision) or ``gpu``'s native
    formats (:data:`cq_core.engine.budget.GPU_FORMATS`); neither: ``format``
    and high precision.
    """

    format: str = DEFAULT_FORMAT
    format_options: Mapping[str, Any] = field(default_factory=dict)
    optimizer: str = DEFAULT_OPTIMIZER
    optimizer_options: Mapping[str, Any] = field(default_factory=dict)
    preset: str | None = None
    layers: tuple[LayerSpec, ...] = ()
    exclude: tuple[str, ...] = ()
    fallback: str | None = None
    heuristic: bool = False
    full_precision_mm: bool = False
    nonfinite: str = "error"
    metadata_writer: str = DEFAULT_METADATA_WRITER
    calibration: str | None = None
    target_size: int | None = None
    bits_per_weight: float | None = None
    formats: tuple[str, ...] = ()
    gpu: str | None = None
    #: Token-embedding tables of text encoders: ``"int8"`` (or a format name whose ComfyUI
    #: ``Embedding`` loads it), ``"none"`` to keep them, None for the preset's default (none).
    embeddings: str | None = None
    #: ``"calibrated"``: a static ``input_scale`` per layer from calibration statistics, where the
    #: format takes one (:mod:`cq_core.engine.activations`); ``"none"``: the format's default.
    input_scale: str = "none"
    #: An AWQ-style ``pre_quant_scale`` per layer, where the format takes one (nvfp4).
    awq: bool = False
    #: Not a field: where the values come from (a recipe file), named in the messages of
    #: :meth:`check_syntax`, which every new recipe passes (:class:`UsageError` otherwise).
    where: InitVar[str | None] = None

    def __post_init__(self, where: str | None) -> None:
        # Python callers' conveniences: one pattern as a string, rules as a table or pairs.
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        elif not isinstance(self.exclude, tuple):
            object.__setattr__(self, "exclude", tuple(self.exclude) if isinstance(self.exclude, (list, set)) else None)
        if self.exclude is None or not all(isinstance(p, str) for p in self.exclude):
            raise UsageError(f"{_label(where, 'exclude')} must be regex strings (a string or a list of them).")
        if not isinstance(self.layers, tuple) or not all(isinstance(s, LayerSpec) for s in self.layers):
            object.__setattr__(self, "layers", layer_specs(self.layers, where))
        if isinstance(self.target_size, str):  # "10GB", as the flag and a recipe file take it
            object.__setattr__(self, "target_size", parse_size(self.target_size, _label(where, "target_size")))
        if self.bits_per_weight is not None and (isinstance(self.bits_per_weight, bool)
                                                 or not isinstance(self.bits_per_weight, (int, float))):
            raise UsageError(f"{_label(where, 'bits_per_weight')} must be a number of bits (e.g. 5.5), "
                             f"not {self.bits_per_weight!r}.")
        if isinstance(self.formats, str):
            object.__setattr__(self, "formats", budget_fields(None, None, self.formats, None)["formats"])
        elif not isinstance(self.formats, tuple):
            object.__setattr__(self, "formats", tuple(self.formats))
        self.check_syntax(where)

    # -- building ------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, data: Any, where: str) -> Recipe:
        """A recipe from a parsed TOML/JSON table; raises :class:`UsageError` naming ``where``
        and the first unknown or invalid field."""
        if not isinstance(data, Mapping):
            raise UsageError(f"{where}: a recipe must be a table of fields, not {type(data).__name__}.")
        known = cls.field_names()
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UsageError(f"{where}: unknown recipe field {key!r}{hint}; known: {', '.join(known)}.")
        values: dict[str, Any] = {}
        for name in ("format", "optimizer", "metadata_writer", "nonfinite", "input_scale"):
            if name in data:
                values[name] = _string(data[name], where, name)
        for name in ("preset", "fallback", "calibration", "gpu", "embeddings"):
            if name in data and data[name] is not None:
                values[name] = _string(data[name], where, name)
        if data.get("target_size") is not None:
            size = data["target_size"]
            if isinstance(size, bool) or not isinstance(size, (int, str)):
                raise UsageError(f"{where}: recipe field 'target_size' must be bytes or a size like \"10GB\", "
                                 f"not {size!r}.")
            values["target_size"] = parse_size(size, f"{where}: recipe field 'target_size'")
        if data.get("bits_per_weight") is not None:
            bits = data["bits_per_weight"]
            if isinstance(bits, bool) or not isinstance(bits, (int, float)):
                raise UsageError(f"{where}: recipe field 'bits_per_weight' must be a number, not {bits!r}.")
            values["bits_per_weight"] = float(bits)
        if "formats" in data:
            names = data["formats"]
            if not isinstance(names, list) or not all(isinstance(x, str) and x for x in names):
                raise UsageError(f"{where}: recipe field 'formats' must be a list of format names.")
            values["formats"] = tuple(names)
        for name in ("format_options", "optimizer_options"):
            if name in data:
                values[name] = dict(_table(data[name], where, name))
        for name in ("heuristic", "full_precision_mm", "awq"):
            if name in data:
                if not isinstance(data[name], bool):
                    raise UsageError(f"{where}: recipe field {name!r} must be true or false, not {data[name]!r}.")
                values[name] = data[name]
        if "exclude" in data:
            excludes = data["exclude"]
            if not isinstance(excludes, list) or not all(isinstance(x, str) for x in excludes):
                raise UsageError(f"{where}: recipe field 'exclude' must be a list of regex strings.")
            values["exclude"] = tuple(excludes)
        if "layers" in data:
            values["layers"] = tuple(
                LayerSpec(pattern, spec, "recipe") for pattern, spec in _table(data["layers"], where, "layers").items()
            )
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

    @classmethod
    def from_options(
        cls,
        *,
        format: str = DEFAULT_FORMAT,
        format_options: Mapping[str, Any] | None = None,
        optimizer: str = DEFAULT_OPTIMIZER,
        optimizer_options: Mapping[str, Any] | None = None,
        model: str | None = None,
        layer: Sequence[str] = (),
        layer_config: str | os.PathLike | None = None,
        exclude: Sequence[str] = (),
        fallback: str | None = None,
        heuristic: bool = False,
        full_precision_mm: bool = False,
        nonfinite: str = "error",
        metadata_writer: str = DEFAULT_METADATA_WRITER,
        target_size: str | int | None = None,
        bits_per_weight: float | None = None,
        formats: str | Sequence[str] | None = None,
        gpu: str | None = None,
        embeddings: str | None = None,
        input_scale: str = "none",
        awq: bool = False,
    ) -> Recipe:
        """A recipe from the CLI's flags (``model`` is ``--model``; ``layer`` the ``--layer``
        strings; ``layer_config`` a ``--layer-config`` file, read now: its rules come first)."""
        return cls(
            format=format,
            format_options=dict(format_options or {}),
            optimizer=optimizer,
            optimizer_options=dict(optimizer_options or {}),
            preset=model,
            layers=(*layer_config_specs(layer_config), *layer_flag_specs(layer)),
            exclude=(exclude,) if isinstance(exclude, str) else tuple(exclude),
            fallback=fallback,
            heuristic=heuristic,
            full_precision_mm=full_precision_mm,
            nonfinite=nonfinite,
            metadata_writer=metadata_writer,
            **budget_fields(target_size, bits_per_weight, formats, gpu),
            embeddings=embeddings,
            input_scale=input_scale,
            awq=awq,
        )

    def override(self, **changes: Any) -> Recipe:
        """This recipe with some fields replaced, as flags given beside ``--recipe`` do.

        A new ``format`` (or ``optimizer``) drops the recipe's options for the old one
        unless new options come with it; options given are merged over the kept ones.
        ``layers`` given go before the recipe's (they win); ``exclude`` given is added.
        """
        values = dict(changes)
        for name, options in (("format", "format_options"), ("optimizer", "optimizer_options")):
            new_options = dict(values.pop(options, None) or {})
            base = getattr(self, options) if values.get(name, getattr(self, name)) == getattr(self, name) else {}
            if new_options or name in values:
                values[options] = {**base, **new_options}
        if "layers" in values:
            values["layers"] = (*values["layers"], *self.layers)
        if "exclude" in values:
            values["exclude"] = tuple(dict.fromkeys((*self.exclude, *values["exclude"])))
        # One of each pair: a flag given replaces the recipe's other way of saying it.
        for given, other, empty in (("target_size", "bits_per_weight", None), ("bits_per_weight", "target_size", None),
                                    ("formats", "gpu", None), ("gpu", "formats", ())):
            if values.get(given) not in (None, ()) and other not in values:
                values[other] = empty
        return replace(self, **values)

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
        registry.format(self.format)(**dict(self.format_options))
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

    def activation_settings(self) -> ActivationSettings:
        """The activation-side settings (:mod:`cq_core.engine.activations`) this recipe asks for."""
        return ActivationSettings(self.input_scale, self.awq)

    def rules(self, keep: Mapping[str, str] | None = None) -> Rules:
        """The per-layer rules the planner applies (:class:`cq_core.engine.plan.Rules`)."""
        return Rules([spec.rule() for spec in self.layers], self.fallback, self.heuristic, self.full_precision_mm,
                     dict(keep or {}), self.embeddings)

    # -- recording -----------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The recipe as a JSON/TOML table: defaults included, ``None`` fields left out."""
        layers: dict[str, Any] = {}
        for spec in self.layers:  # a repeated regex can never match second: the first one stays
            layers.setdefault(spec.pattern, spec.spec if isinstance(spec.spec, str) else dict(spec.spec))
        data: dict[str, Any] = {
            "format": self.format,
            "format_options": dict(self.format_options),
            "optimizer": self.optimizer,
            "optimizer_options": dict(self.optimizer_options),
            "preset": self.preset,
            "exclude": list(self.exclude),
            "fallback": self.fallback,
            "heuristic": self.heuristic,
            "full_precision_mm": self.full_precision_mm,
            "nonfinite": self.nonfinite,
            "metadata_writer": self.metadata_writer,
            "calibration": self.calibration,
            "target_size": self.target_size,
            "bits_per_weight": self.bits_per_weight,
            "formats": list(self.formats) or None,
            "gpu": self.gpu,
            "embeddings": self.embeddings,
            "input_scale": self.input_scale,
            "awq": self.awq,
            "layers": layers,
        }
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


def _toml_key(key: str) -> str:
    import tomli_w

    return tomli_w.dumps({key: 0}).rsplit(" = ", 1)[0]


def _toml_inline(value: Any) -> str:
    """A TOML value on one line: tables inline (``{ a = 1, b = "x" }``), the rest as tomli_w writes it."""
    import tomli_w

    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_inline(v)}" for k, v in value.items()) + " }"
    return tomli_w.dumps({"v": value}).split(" = ", 1)[1].rstrip("\n")


def budget_fields(
    target_size: str | int | None, bits_per_weight: float | None, formats: str | Sequence[str] | None,
    gpu: str | None,
) -> dict[str, Any]:
    """The size budget's recipe fields from ``--target-size`` ("10GB"), ``--bits-per-weight``,
    ``--formats`` ("nvfp4,float8_e4m3fn,bf16" or a list) and ``--gpu``; only those given."""
    values: dict[str, Any] = {}
    if target_size is not None:
        values["target_size"] = parse_size(target_size, "--target-size")
    if bits_per_weight is not None:
        values["bits_per_weight"] = float(bits_per_weight)
    if isinstance(formats, str) or formats:  # "" is given, and names no format
        names = formats.split(",") if isinstance(formats, str) else list(formats)
        names = [name.strip() for name in names]
        if not all(names):
            raise UsageError(f"--formats {formats!r} must be format names separated by commas.")
        values["formats"] = tuple(dict.fromkeys(names))
    if gpu is not None:
        values["gpu"] = gpu
    return values


def _pair(where: str | None, first: str, second: str) -> str:
    """``--target-size and --bits-per-weight``, or ``FILE: recipe fields 'target_size' and 'bits_per_weight'``."""
    if where is None:
        return f"{_label(None, first)} and {_label(None, second)}"
    return f"{where}: recipe fields {first!r} and {second!r}"


def _label(where: str | None, name: str) -> str:
    flag = {"nonfinite": "--nonfinite", "exclude": "--exclude", "calibration": "--calibration",
            "target_size": "--target-size", "bits_per_weight": "--bits-per-weight", "formats": "--formats",
            "gpu": "--gpu", "input_scale": "--input-scale"}[name]
    return flag if where is None else f"{where}: recipe field {name!r}"


def resolve_recipe(
    recipe: Recipe | None,
    calibration: str | os.PathLike | None,
    *,
    format: str | None = None,
    format_options: Mapping[str, Any] | None = None,
    optimizer: str | None = None,
    optimizer_options: Mapping[str, Any] | None = None,
    exclude: Sequence[str] = (),
    model: str | None = None,
    layer: Sequence[str] = (),
    layer_config: str | os.PathLike | None = None,
    fallback: str | None = None,
    heuristic: bool = False,
    full_precision_mm: bool = False,
    metadata_writer: str | None = None,
    nonfinite: str | None = None,
    target_size: str | int | None = None,
    bits_per_weight: float | None = None,
    formats: str | Sequence[str] | None = None,
    gpu: str | None = None,
    embeddings: str | None = None,
    input_scale: str | None = None,
    awq: bool = False,
) -> Recipe:
    """The recipe a call to :func:`cq_core.convert` means: ``recipe`` (or the defaults) with
    the keywords given applied over it, and the calibration file's fingerprint.

    Raises :class:`UsageError` when the recipe records calibration statistics and
    ``calibration`` is None: the same conversion needs statistics of its own.
    """
    changes: dict[str, Any] = {}
    for name, value in (("format", format), ("optimizer", optimizer), ("fallback", fallback),
                        ("metadata_writer", metadata_writer), ("nonfinite", nonfinite), ("preset", model),
                        ("embeddings", embeddings), ("input_scale", input_scale)):
        if value is not None:
            changes[name] = value
    if format_options:
        changes["format_options"] = dict(format_options)
    if optimizer_options:
        changes["optimizer_options"] = dict(optimizer_options)
    rules = (*layer_config_specs(layer_config), *layer_flag_specs(layer))
    if rules:
        changes["layers"] = rules
    if exclude:
        changes["exclude"] = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    if heuristic:
        changes["heuristic"] = True
    if full_precision_mm:
        changes["full_precision_mm"] = True
    changes.update(budget_fields(target_size, bits_per_weight, formats, gpu))
    if awq:
        changes["awq"] = True
    base = recipe if recipe is not None else Recipe()
    if not isinstance(base, Recipe):
        raise UsageError(f"recipe must be a cq_core.Recipe, not {type(base).__name__}.")
    resolved = base.override(**changes) if changes else base
    if calibration is not None:
        resolved = replace(resolved, calibration=file_digest(calibration))
    elif resolved.calibration is not None:
        raise UsageError(
            f"The recipe was made with calibration statistics ({resolved.calibration[:19]}...); "
            "pass --calibration with a statistics file from 'cq calibrate' for this model."
        )
    return resolved


def _string(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise UsageError(f"{where}: recipe field {name!r} must be a non-empty string, not {value!r}.")
    return value


def _table(value: Any, where: str, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise UsageError(f"{where}: recipe field {name!r} must be a table, not {value!r}.")
    return value


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
        raise UsageError(f"{where}: is not valid {'JSON' if is_json else 'TOML'} ({exc}).") from None


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
