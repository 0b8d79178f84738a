"""The user's per-layer choices: ``--layer`` and ``--layer-config`` rules, ``--exclude`` patterns,
``--heur``, ``--fallback``, ``--embeddings`` (see :mod:`cq_core.engine.plan` for their precedence).

Everything here is checked from the recipe alone, before any checkpoint is opened.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import re2

from cq_core.errors import UsageError, quoted
from cq_core.plugin.manager import Registry

#: ``--embeddings none``: keep token tables in high precision even where a preset would quantize them.
NO_EMBEDDINGS = "none"

# --heur thresholds. Quantized GEMM kernels (FP8/INT8/FP4 tensor cores) work
# on tiles of 128-256 along each dimension and need dimensions that are
# multiples of 16; below that the padding, the activation quantization and the
# launch cost outweigh the bandwidth saved, and the memory saved is tiny.
HEUR_MIN_DIM = 256
HEUR_MIN_PARAMS = 1 << 20  # 1024 x 1024
HEUR_MAX_ASPECT = 32
HEUR_DIM_MULTIPLE = 16
HEUR_HELP = (
    f"Skip layers where quantizing costs more than it saves at run time: fewer than {HEUR_MIN_PARAMS:,} "
    f"weights, a dimension below {HEUR_MIN_DIM} or not a multiple of {HEUR_DIM_MULTIPLE} (GPU GEMM tile sizes), "
    f"or an aspect ratio above {HEUR_MAX_ASPECT}:1."
)


def embedding_aliases(registry: Registry) -> dict[str, str]:
    """Short names ``--embeddings`` takes (``int8``, ``fp8``) -> format names: each installed
    format's :attr:`~cq_core.plugin.types.Format.embedding_alias`."""
    return {cls.embedding_alias: name for name, cls in registry.formats.items() if cls.embedding_alias}


def resolve_embedding_format(name: str, registry: Registry) -> tuple[str, dict[str, Any]] | None:
    """``(format name, options)`` that ``--embeddings NAME`` stores token tables with, or None
    for ``"none"``. Raises :class:`UsageError` for an unknown format or one whose
    :attr:`~cq_core.plugin.types.Format.embedding_options` is None (ComfyUI's ``Embedding``
    cannot load it)."""
    if name == NO_EMBEDDINGS:
        return None
    aliases = embedding_aliases(registry)
    fmt_name = aliases.get(name, name)
    if fmt_name not in registry.formats:
        usable = [alias for alias, target in aliases.items() if registry.formats[target].embedding_options is not None]
        usable += [n for n, c in sorted(registry.formats.items()) if c.embedding_options is not None]
        raise UsageError(f"--embeddings {name!r} is not a format for token tables; valid: "
                         f"{', '.join(dict.fromkeys([*usable, NO_EMBEDDINGS]))}.")
    cls = registry.format(fmt_name)
    if cls.embedding_options is None:
        usable = ", ".join(dict.fromkeys([*(a for a, t in aliases.items() if registry.formats[t].embedding_options
                                             is not None), NO_EMBEDDINGS]))
        raise UsageError(
            f"--embeddings: ComfyUI's Embedding modules cannot load {fmt_name!r} as cq writes it; use {usable}."
        )
    return fmt_name, dict(cls.embedding_options)


def heuristic_skip(shape: tuple[int, ...]) -> str | None:
    """Why ``--heur`` keeps a 2-D weight of ``shape`` in high precision, or None."""
    n, k = shape
    dims = f"{n}x{k}"
    if n * k < HEUR_MIN_PARAMS:
        return f"--heur: {dims} has fewer than {HEUR_MIN_PARAMS:,} weights"
    if min(n, k) < HEUR_MIN_DIM:
        return f"--heur: {dims} has a dimension below {HEUR_MIN_DIM}"
    if n % HEUR_DIM_MULTIPLE or k % HEUR_DIM_MULTIPLE:
        return f"--heur: {dims} has a dimension that is not a multiple of {HEUR_DIM_MULTIPLE}"
    if max(n, k) > HEUR_MAX_ASPECT * min(n, k):
        return f"--heur: {dims} has an aspect ratio above {HEUR_MAX_ASPECT}:1"
    return None


# ---------------------------------------------------------------------------
# Per-layer rules: the layer config file and --layer flags
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerChoice:
    """What a rule asks for the layers it matches."""

    #: a format name; None means the global --format (with these options)
    format: str | None = None
    skip: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    optimizer: str | None = None
    optimizer_options: Mapping[str, Any] = field(default_factory=dict)
    #: None: the global --full-precision-mm
    full_precision_mm: bool | None = None

    def describe(self) -> str:
        if self.skip:
            return "skip"
        parts = [self.format or "the global format"]
        parts += [f"{k}={v}" for k, v in self.options.items()]
        if self.optimizer:
            parts.append(f"optimizer {self.optimizer}")
        if self.full_precision_mm is not None:
            parts.append(f"full_precision_matrix_mult={str(self.full_precision_mm).lower()}")
        return " ".join(parts[:1]) + (f" ({', '.join(parts[1:])})" if parts[1:] else "")


@dataclass(frozen=True)
class LayerRule:
    """One regex -> choice, and where the user wrote it."""

    pattern: UserPattern
    choice: LayerChoice
    source: str  # "layers.toml" or "--layer"

    def describe(self) -> str:
        # Quoted as typed: repr() would double every backslash of the regex.
        return f"{self.source} rule '{self.pattern.pattern}' -> {self.choice.describe()}"


class UserPattern:
    """A user's regular expression (``--layer``, ``--exclude``, a rule of a layer config or recipe
    file, ``cq calibrate --layers``, ``cq meta --layer``), matched by RE2 (google-re2): time linear
    in the name, whatever the pattern, so neither a pattern nor a checkpoint's tensor names can
    hang a run. RE2 is Python's ``re`` without backreferences and lookaround; ``\\d``, ``\\w``,
    ``\\b`` are ASCII classes (RE2 syntax: https://github.com/google/re2/wiki/Syntax)."""

    __slots__ = ("pattern", "_regex")

    def __init__(self, pattern: str, regex: Any) -> None:
        #: the pattern as the user typed it
        self.pattern = pattern
        self._regex = regex

    def search(self, name: str) -> Any:
        """A match of the pattern anywhere in ``name`` (as ``re.search``), or None. A name that is
        not valid Unicode text (a lone surrogate from a forged header) is searched byte-wise."""
        return self._regex.search(name.encode("utf-8", "surrogatepass"))

    def __repr__(self) -> str:
        return f"UserPattern({self.pattern!r})"


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # RE2 would print its own line on stderr for every refused pattern
    return options


_RE2_OPTIONS = _re2_options()
_BACKREFERENCE = re.compile(r"\\[1-9]|\(\?P=")
_LOOKAROUND = re.compile(r"\(\?(?:=|!|<=|<!)")
_ENGINE = "RE2 (the linear-time engine cq matches patterns with, so that none can hang a run)"


def compile_pattern(pattern: str, flag: str) -> UserPattern:
    """One user pattern compiled with RE2; raises :class:`UsageError` naming ``flag`` and the
    pattern (cut to a readable length) when it is invalid, or valid for Python's ``re`` but uses
    what RE2 does not support (a backreference, lookaround) or is too large for it."""
    shown = quoted(pattern)
    try:
        with warnings.catch_warnings():  # Python's FutureWarnings ('Possible nested set') are about re, not RE2
            warnings.simplefilter("ignore")
            re.compile(pattern)  # syntax only (no matching): Python's message for a mistyped pattern
    except re.error as exc:
        raise UsageError(f"{flag} {shown} is not a valid regular expression ({exc}).") from None
    except (OverflowError, RecursionError, MemoryError):
        raise UsageError(f"{flag} {shown} is too large to compile; use several smaller patterns.") from None
    try:
        regex = re2.compile(pattern.encode("utf-8", "surrogatepass"), _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        if _BACKREFERENCE.search(pattern):
            raise UsageError(f"{flag} {shown} uses a backreference, which {_ENGINE} does not support; write "
                             "the repeated part out instead.") from None
        if _LOOKAROUND.search(pattern):
            raise UsageError(f"{flag} {shown} uses lookaround, which {_ENGINE} does not support; match the "
                             "names directly, or leave some out with --exclude or a later rule.") from None
        if "too large" in reason or "repetition size" in reason:
            raise UsageError(f"{flag} {shown} is too large for RE2 ({reason}), the linear-time engine cq "
                             "matches patterns with; use fewer repetitions or several patterns.") from None
        hint = "; RE2 writes the end of the name as \\z or $" if "\\Z" in pattern else ""
        raise UsageError(f"{flag} {shown} uses syntax that {_ENGINE} does not support ({reason}){hint}.") from None
    return UserPattern(pattern, regex)


def compile_patterns(patterns: Sequence[str], flag: str, *, exclude: bool = False) -> list[UserPattern]:
    """Each regular expression compiled (:func:`compile_pattern`: RE2, searched anywhere in a tensor
    name); raises :class:`UsageError` naming ``flag`` for an invalid or unsupported one, or an empty
    one (it matches every name: almost always an unset shell variable or a stray list entry). With
    ``exclude`` also for any pattern that matches the empty string (``'img_in|'``, ``'^'``): it would
    exclude every tensor, which is never what an exclude is for."""
    compiled = []
    for pattern in patterns:
        if pattern == "":
            every = "" if exclude else ", or '.' to mean every tensor"
            raise UsageError(f"{flag} '' is an empty pattern, which matches every tensor; give a regular expression "
                             f"(e.g. 'img_in'){every}.")
        regex = compile_pattern(pattern, flag)
        if exclude and regex.search("") is not None:
            raise UsageError(f"{flag} {quoted(pattern)} matches the empty string, so it would exclude every tensor; "
                             "look for a stray '|' or an optional part that should not be.")
        compiled.append(regex)
    return compiled


_SPEC_KEYS = {"format", "skip", "options", "optimizer", "optimizer_options", "full_precision_matrix_mult"}


def choice_from_spec(spec: Any, where: str) -> LayerChoice:
    """A rule's value: a format name, "skip", or a table; unknown table keys are format options."""
    if isinstance(spec, str):
        return LayerChoice(skip=True) if spec == "skip" else LayerChoice(format=spec)
    if not isinstance(spec, Mapping):
        raise UsageError(f"{where}: must be a format name, \"skip\" or a table, not {spec!r}.")
    skip = spec.get("skip", False)
    fpmm = spec.get("full_precision_matrix_mult")
    fmt = spec.get("format")
    optimizer = spec.get("optimizer")
    options = spec.get("options", {})
    optimizer_options = spec.get("optimizer_options", {})
    checks = (
        (isinstance(skip, bool), "skip must be true or false"),
        (fpmm is None or isinstance(fpmm, bool), "full_precision_matrix_mult must be true or false"),
        (fmt is None or isinstance(fmt, str), "format must be a string"),
        (optimizer is None or isinstance(optimizer, str), "optimizer must be a string"),
        (isinstance(options, Mapping), "options must be a table"),
        (isinstance(optimizer_options, Mapping), "optimizer_options must be a table"),
    )
    for ok, message in checks:
        if not ok:
            raise UsageError(f"{where}: {message}.")
    # Shorthand: {format = "int8_blockwise", block_size = 64} puts block_size among the options.
    extra = {k: v for k, v in spec.items() if k not in _SPEC_KEYS}
    if skip:
        return LayerChoice(skip=True)
    return LayerChoice(
        format=fmt,
        options={**options, **extra},
        optimizer=optimizer,
        optimizer_options=dict(optimizer_options),
        full_precision_mm=fpmm,
    )


def layer_rule(pattern: str, spec: Any, source: str) -> LayerRule:
    """One rule from a regex and its spec (see :func:`choice_from_spec`); ``source`` names where
    it was written (``--layer``, a config file's name, ``recipe``) in reasons and errors."""
    where = "--layer" if source == "--layer" else f"{source} rule"
    return LayerRule(compile_patterns([pattern], where)[0], choice_from_spec(spec, f"{where} {pattern!r}"), source)


@dataclass
class Rules:
    """The user's per-layer choices beside the preset and the global format."""

    #: config-file rules first, then --layer flags: the order is the precedence
    layers: list[LayerRule] = field(default_factory=list)
    fallback: str | None = None
    heuristic: bool = False
    full_precision_mm: bool = False
    #: tensor name -> reason: kept in high precision whatever else applies (e.g. NaN found)
    keep: dict[str, str] = field(default_factory=dict)
    #: ``--embeddings``: a format (or alias) for token-embedding tables, ``"none"``, or None
    #: for the preset's default
    embeddings: str | None = None
