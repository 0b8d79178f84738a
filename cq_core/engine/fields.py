"""Fields declared once: each recipe field and run setting with its kind, default, flags and help.

A field is an attribute of a frozen dataclass (:class:`cq_core.engine.recipe.Recipe`,
:class:`cq_core.engine.run.RunSettings`) declared with :func:`declare`; the
declaration carries everything the rest of cq derives from it, as tox 4 declares its
settings (``add_config(keys, of_type, default, desc)``):

- its :class:`Kind`: how a value given in Python is normalised, how a recipe file's
  value is parsed and checked, how the value is written to JSON, whether a value counts
  as given;
- its command-line :class:`Flag` (or flags), whose help text is the field's help;
- how a value given beside a recipe combines with the recipe's (``merge``), which
  other field it replaces (``replaces``: one of a pair that says the same thing two
  ways) and whose options it holds (``options_of``).

:func:`field_specs` lists a class's fields in declaration order; the CLI's options
(:mod:`cq_core.cli.fields`), ``Recipe.from_mapping``, ``Recipe.to_json``,
``Recipe.override`` and the messages' labels are all made from that list, so adding a
field is one line plus its use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cq_core.errors import UsageError, quoted
from cq_core.io.sizes import parse_size

METADATA_KEY = "cq_field"


def parse_key_values(pairs: Sequence[str], flag: str) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}`` (``-O``, ``--optimizer-option``,
    ``--executor-option``); a pair without ``=`` is a :class:`UsageError` naming ``flag``."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} {pair!r} must look like KEY=VALUE.")
        result[key.strip()] = value.strip()
    return result


def comma_names(text: str | Sequence[str], flag: str) -> tuple[str, ...]:
    """``"nvfp4,float8_e4m3fn,bf16"`` (or a list) -> the names, stripped, duplicates dropped;
    a :class:`UsageError` naming ``flag`` for an empty one (``""`` names none)."""
    names = [name.strip() for name in (text.split(",") if isinstance(text, str) else text)]
    if not all(names):
        raise UsageError(f"{flag} {text!r} must be format names separated by commas.")
    return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------------------
# Kinds: how values of one sort are read, checked and written
# ---------------------------------------------------------------------------


class Kind:
    """How one sort of field value is read, checked and written. ``label`` in messages is the
    field's flag (a value given in Python or on the command line) or ``FILE: recipe field
    'name'`` (a value read from a recipe file)."""

    #: The type the CLI's option has (``str``, ``bool``, ``float``, ``int``; ``list[str]`` for a
    #: repeatable one), and whether a value of the Python type may be None.
    cli_type: Any = str

    def from_file(self, value: Any, label: str) -> Any:
        """A recipe file's value for this field, checked; :class:`UsageError` naming ``label``."""
        return value

    def normalise(self, value: Any, label: str) -> Any:
        """A value given in Python (``Recipe(...)``, ``convert(...)``), in the field's own form."""
        return value

    def to_json(self, value: Any) -> Any:
        """The value as JSON / TOML (None: left out of the record)."""
        return value

    def given(self, value: Any) -> bool:
        """Whether a value given beside a recipe (a flag, a keyword) changes it: None, an empty
        collection and False say nothing."""
        return value is not None and value is not False and value != () and value != {} and value != []


class Text(Kind):
    """A non-empty string; ``optional``: JSON null in a file means "not set"."""

    def __init__(self, optional: bool = False) -> None:
        self.optional = optional

    def from_file(self, value: Any, label: str) -> Any:
        if value is None and self.optional:
            return None
        if not isinstance(value, str) or not value:
            raise UsageError(f"{label} must be a non-empty string, not {quoted(value)}.")
        return value

    def normalise(self, value: Any, label: str) -> Any:
        if value is not None and not isinstance(value, str):  # None: not set (the field's default)
            raise UsageError(f"{label} must be a string, not {quoted(value)}.")
        return value


class Switch(Kind):
    cli_type = bool

    def from_file(self, value: Any, label: str) -> Any:
        if not isinstance(value, bool):
            raise UsageError(f"{label} must be true or false, not {quoted(value)}.")
        return value

    def normalise(self, value: Any, label: str) -> Any:
        if not isinstance(value, bool):  # "no" would be recorded as given, and is true
            raise UsageError(f"{label} must be True or False, not {quoted(value)}.")
        return value


class Table(Kind):
    """Options by name (a format's, an optimizer's); on the command line ``KEY=VALUE`` pairs."""

    cli_type = list[str]

    def from_file(self, value: Any, label: str) -> Any:
        if not isinstance(value, Mapping):
            raise UsageError(f"{label} must be a table, not {value!r}.")
        # A JSON null is the option's default, as if absent: what TOML (no null) reads back.
        return {k: v for k, v in value.items() if v is not None}

    def normalise(self, value: Any, label: str) -> Any:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise UsageError(f"{label} must be a mapping of option names to values (e.g. {{'block_size': 64}}), "
                             f"not {quoted(value)}.")
        return value

    def to_json(self, value: Any) -> Any:
        return dict(value)


class Patterns(Kind):
    """Regular expressions (``--exclude``): one string or a list of them."""

    cli_type = list[str]

    def from_file(self, value: Any, label: str) -> Any:
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise UsageError(f"{label} must be a list of regex strings.")
        return tuple(value)

    def normalise(self, value: Any, label: str) -> Any:
        if isinstance(value, str):
            return (value,)
        value = tuple(value) if isinstance(value, (list, set, tuple)) else None
        if value is None or not all(isinstance(p, str) for p in value):
            raise UsageError(f"{label} must be regex strings (a string or a list of them).")
        return value

    def to_json(self, value: Any) -> Any:
        return list(value)


class Names(Kind):
    """Format names (``--formats``): a comma-separated string or a list; empty: not set."""

    def from_file(self, value: Any, label: str) -> Any:
        if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
            raise UsageError(f"{label} must be a list of format names.")
        return tuple(value)

    def normalise(self, value: Any, label: str) -> Any:
        if isinstance(value, str):
            return comma_names(value, label)
        return tuple(value)

    def to_json(self, value: Any) -> Any:
        return list(value) or None


class Size(Kind):
    """Bytes: an int, or a size like ``"10GB"``."""

    def from_file(self, value: Any, label: str) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UsageError(f"{label} must be bytes or a size like \"10GB\", not {value!r}.")
        return parse_size(value, label)

    def normalise(self, value: Any, label: str) -> Any:
        return parse_size(value, label) if isinstance(value, str) else value


class Number(Kind):
    """A number (``--bits-per-weight``)."""

    cli_type = float

    def __init__(self, what: str = "a number") -> None:
        self.what = what

    def from_file(self, value: Any, label: str) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{label} must be a number, not {value!r}.")
        return float(value)

    def normalise(self, value: Any, label: str) -> Any:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UsageError(f"{label} must be {self.what}, not {value!r}.")
        return value


class Integer(Kind):
    cli_type = int


class Anything(Kind):
    """A Python-only value (a callback); no file form."""


# ---------------------------------------------------------------------------
# Declarations
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """A command-line option that sets a field.

    ``decls``: the option's names (``("-f", "--format")``); ``help``: its help text
    (default: the field's); ``keyword``: the ``convert()`` keyword it also answers to when
    it is not the field's name (``--model`` sets ``preset`` and is ``model=`` in Python);
    ``parse(raw)``: the command line's value (or the keyword's) -> the field's value, None to
    pass it as it is; ``cli_type``: the option's type when it differs from the kind's (a
    file name); ``invert``: a switch that sets the field to False (``--no-measure``).
    """

    decls: tuple[str, ...]
    help: str = ""
    keyword: str | None = None
    parse: Callable[[Any], Any] | None = None
    cli_type: Any = None
    invert: bool = False
    metavar: str | None = None

    @property
    def name(self) -> str:
        """The long option name, e.g. ``--format``."""
        return next((d for d in self.decls if d.startswith("--")), self.decls[0])


@dataclass(frozen=True)
class FieldSpec:
    """One declared field (see the module docstring); ``name`` and ``default`` are the
    dataclass field's."""

    kind: Kind
    flags: tuple[Flag, ...] = ()
    help: str = ""
    #: ``replace`` (the given value wins), ``prepend`` (given rules before the recipe's: they
    #: win) or ``union`` (given patterns added to the recipe's)
    merge: str = "replace"
    #: a field whose given value resets this one to its default (one of a pair)
    replaces: str | None = None
    #: for an options table: the field naming whose options they are (a new name drops them)
    options_of: str | None = None
    #: the label in messages when no flag sets the field (``--calibration``)
    label: str | None = None
    name: str = ""
    default: Any = None

    def label_for(self, where: str | None) -> str:
        """``--flag`` (a value given in Python or on the command line), or ``WHERE: recipe field
        'name'`` for a value read from the recipe file ``where``."""
        if where is not None:
            return f"{where}: recipe field {self.name!r}"
        return self.label or (self.flags[0].name if self.flags else self.name)


def declare(
    default: Any,
    kind: Kind,
    *flags: str | Flag,
    help: str = "",
    merge: str = "replace",
    replaces: str | None = None,
    options_of: str | None = None,
    label: str | None = None,
) -> Any:
    """A dataclass field declared with its :class:`FieldSpec` (``flags``: option names of one
    flag, or :class:`Flag` objects for several)."""
    if flags and all(isinstance(f, str) for f in flags):
        flags = (Flag(tuple(flags)),)
    spec = FieldSpec(kind, tuple(flags), help, merge, replaces, options_of, label)
    metadata = {METADATA_KEY: spec}
    if isinstance(default, (dict, list)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_specs(cls: type) -> tuple[FieldSpec, ...]:
    """Every declared field of ``cls`` (a dataclass) in declaration order, named."""
    specs = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(METADATA_KEY)
        if spec is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        specs.append(dataclasses.replace(spec, name=f.name, default=default))
    return tuple(specs)


def keyword_targets(cls: type) -> dict[str, tuple[FieldSpec, Flag | None]]:
    """``convert()`` keyword -> (the field it sets, the flag whose ``parse`` turns it into the
    field's value, or None): every field by name, plus each flag's own ``keyword``."""
    targets: dict[str, tuple[FieldSpec, Flag | None]] = {}
    for spec in field_specs(cls):
        targets[spec.name] = (spec, None)
        for flag in spec.flags:
            if flag.keyword is not None:
                targets[flag.keyword] = (spec, flag)
    return targets
