"""The protocols plugins implement: formats, optimizers, presets, metadata writers.

A format is the single source of truth for one on-disk layout. Optimizers see
a format only through this interface (scales, rounding onto the grid on a
slice of columns, packing), so one optimizer serves every format.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from cq_core.errors import PluginError, UsageError, quoted
from cq_core.io.safetensors_io import TensorSpec
from cq_core.numerics.metrics import weight_error_energy
from cq_core.numerics.second_moment import EXACT_KEY, dense_second_moment, features_of
from cq_core.plugin.comfyui_versions import parse_comfyui_version

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LayerInfo:
    """What a format may look at to decide whether it takes a layer."""

    name: str  # the layer prefix, e.g. ``double_blocks.0.img_attn.qkv``
    shape: tuple[int, ...]  # the weight's shape (N, K)
    dtype: torch.dtype
    bias_shape: tuple[int, ...] | None = None


#: float32's largest finite value and its smallest normal one (torch.finfo(torch.float32)).
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)
#: torch.int64's range: what an integer option may be.
INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)


@dataclass(frozen=True)
class Option:
    """A typed, documented option of a format or optimizer (``-O name=value``)."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    #: the value must be > 0 (a scale, a size)
    positive: bool = False
    #: the value must be >= this (a count or a weight that may be 0), or None
    minimum: float | None = None
    #: An executor's option may name a ``cq convert`` flag of its own that sets it
    #: (``cq_ray``'s ``address`` is ``--ray-address``); None: only ``--executor-option NAME=VALUE``.
    flag: str | None = None

    def parse(self, owner: str, raw: Any) -> Any:
        """Turn a command-line string (or a Python value) into a checked value.

        Raises :class:`~cq_core.errors.UsageError` for a value of the wrong type, one outside
        ``choices``, a float that is NaN or infinite, a value <= 0 where ``positive``, or one
        below ``minimum``.
        """
        value = raw
        if isinstance(raw, str) and self.type is not str:
            try:
                if self.type is bool:
                    lowered = raw.strip().lower()
                    if lowered not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(raw)
                    value = lowered in ("true", "1", "yes")
                else:
                    value = self.type(raw)
            except ValueError:
                raise UsageError(f"Option {self.name!r} of {owner} takes {self._a_type()}, not {quoted(raw)}.") from None
        elif raw is not None or self.default is not None:
            value = self._typed(owner, raw)
        if self.choices is not None and value not in self.choices:
            choices = ", ".join(str(c) for c in self.choices)
            raise UsageError(f"Option {self.name!r} of {owner} must be one of {choices}, not {quoted(raw)}.")
        if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
            # Options reach torch (int64) and the layer JSON ComfyUI reads: no count or size is this large.
            raise UsageError(f"Option {self.name!r} of {owner} must lie within 64-bit integers (at most "
                             f"{INT64_MAX} in magnitude), not {quoted(raw)}.")
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"Option {self.name!r} of {owner} must be a finite number, not {quoted(raw)}.")
        if isinstance(value, float) and value != 0 and not FLOAT32_TINY <= abs(value) <= FLOAT32_MAX:
            # cq stores and computes options in float32: beyond this range they become inf or 0.
            raise UsageError(
                f"Option {self.name!r} of {owner} must lie within float32's range "
                f"({FLOAT32_TINY:.2g} to {FLOAT32_MAX:.3g} in magnitude), not {quoted(raw)}."
            )
        if self.positive and value is not None and not isinstance(value, bool) and value <= 0:
            raise UsageError(f"Option {self.name!r} of {owner} must be greater than 0, not {quoted(raw)}.")
        if self.minimum is not None and value is not None and not isinstance(value, bool) and value < self.minimum:
            raise UsageError(f"Option {self.name!r} of {owner} must be at least {self.minimum:g}, not {quoted(raw)}.")
        return value

    def _a_type(self) -> str:
        name = self.type.__name__
        return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"

    def _typed(self, owner: str, raw: Any) -> Any:
        """A Python value (a recipe file's or the API's) of exactly the option's type: a bool
        is not an int (``block_size = true`` would be recorded as given and break the layer
        ComfyUI reads), an int is a float; None only where the default is None."""
        kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(self.type)
        if kinds is None:
            return raw
        if isinstance(raw, kinds) and not (self.type is not bool and isinstance(raw, bool)):
            return float(raw) if self.type is float else raw
        raise UsageError(f"Option {self.name!r} of {owner} takes {self._a_type()}, not {quoted(raw)}.")


class Configurable:
    """Shared handling of declared options for formats and optimizers."""

    name: ClassVar[str]
    kind: ClassVar[str] = "plugin object"
    options: ClassVar[tuple[Option, ...]] = ()

    def __init__(self, **options: Any) -> None:
        declared = {o.name: o for o in self.options}
        unknown = sorted(set(options) - set(declared))
        if unknown:
            valid = ", ".join(declared) or "none"
            raise UsageError(
                f"{self.kind.capitalize()} {self.name!r} has no option {unknown[0]!r} (valid: {valid})."
            )
        owner = f"{self.kind} {self.name!r}"
        self.opts: dict[str, Any] = {
            name: opt.parse(owner, options[name]) if name in options else opt.default
            for name, opt in declared.items()
        }


# ---------------------------------------------------------------------------
# What ComfyUI's loader takes: a format's contract
# ---------------------------------------------------------------------------

#: The stored weight's shape -> the shapes a tensor may have next to it.
ShapeRule = Callable[[tuple[int, ...]], Sequence[tuple[int, ...]]]

#: Float scales ComfyUI casts to float32 when it loads them (comfy-kitchen's layout ``Params``).
FLOAT_SCALE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


def one_element(weight_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """A scalar: ``()`` as cq writes it, or the ``(1,)`` / ``(1, 1)`` other writers use."""
    return ((), (1,), (1, 1))


def same_as_weight(weight_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """The weight itself: any 2-D shape."""
    return (tuple(weight_shape),) if len(weight_shape) == 2 else ()


@dataclass(frozen=True)
class TensorRule:
    """One tensor a quantized layer may hold (``L.<suffix>``), as ComfyUI's loader takes it.

    ``dtypes`` and ``shapes`` list what the loader accepts; the first dtype and
    the first shape of the same size are the canonical form, the one cq writes
    and decodes (other forms are converted to it before decoding). ``view``:
    ComfyUI reinterprets the bytes as the first dtype (1-byte block scales);
    otherwise it casts values. ``repairable`` lists shapes ComfyUI loads but
    decodes wrong, which a reshape to the canonical shape repairs.
    """

    dtypes: tuple[torch.dtype, ...]
    shapes: ShapeRule
    required: bool = True
    view: bool = False
    repairable: ShapeRule | None = None
    #: Words for messages, e.g. ``"F32 scalar"``.
    describe: str = ""


@dataclass(frozen=True)
class Contract:
    """What a format's layers hold on disk, as ComfyUI's loader reads them.

    Stock formats derive theirs from ComfyUI 0.30's ``comfy/quant_ops.py``
    (QUANT_ALGOS: the parameters each format loads) and ``comfy/ops.py``
    (``_load_quantized_module``: which tensors it pops, views or requires, which
    JSON keys it reads); the tests hold every contract to that loader. Where cq
    writes a narrower form than ComfyUI takes (``()`` scalars, F32 scales), the
    contract takes what ComfyUI takes.

    ``tensors`` maps suffix -> rule and always holds ``"weight"``, whose
    ``shapes`` rule returns the weight's own shape when it can be this format's
    stored weight (padding, packing) and nothing otherwise; every other rule's
    shapes follow from the stored weight's shape, so a layer can be checked,
    and recognized, from the file alone. A tensor under the layer that no rule
    names (besides ``bias`` and ``comfy_quant``) is one ComfyUI's loader leaves
    unused and lists as unexpected. ``json`` maps each JSON key ComfyUI reads
    for the format to the type it must have (``format`` is implied).
    """

    tensors: Mapping[str, TensorRule]
    json: Mapping[str, type] = field(default_factory=dict)


@dataclass(frozen=True)
class LegacyLayer:
    """How a layer of ComfyUI's older "scaled" layout maps onto a format (``cq migrate``).

    ``scale_shape``: the shape its ``L.scale_weight`` takes as ``L.weight_scale``; ``json``:
    keys its layer JSON needs besides ``format`` (a block size); ``unit_input_scale``: an
    absent ``L.scale_input`` means 1.0 and is written explicitly (FP8 on FP8 hardware clips
    activations without it); ``refusal``: why the layer is this format's but no ComfyUI
    layout can hold it (it is refused by name, not written in a form that decodes wrong).
    """

    scale_shape: tuple[int, ...] = ()
    json: Mapping[str, Any] = field(default_factory=dict)
    unit_input_scale: bool = False
    refusal: str | None = None


class Format(Configurable, ABC):
    """One on-disk quantized layout.

    Subclasses set ``name`` (the exact ComfyUI ``format`` string),
    ``description``, ``comfyui_since`` and optionally ``options``, and
    implement the abstract methods. Every method that produces stored tensors
    must agree with :meth:`stored_specs`; cq checks that at write time.
    """

    kind: ClassVar[str] = "format"
    description: ClassVar[str] = ""
    #: The first ComfyUI release whose loader takes this layout, ``"X.Y.Z"``: its name is a key of
    #: ``QUANT_ALGOS`` in that release's ``comfy/quant_ops.py`` (any other name raises ``KeyError``
    #: in ``comfy/ops.py``). A layout already in the oldest ComfyUI the tests read (0.30.0) declares
    #: that release, for no older one was checked; None: no release loads it. The tests hold every
    #: registered format to the ComfyUI trees they have (tests/test_comfyui_versions.py);
    #: :func:`cq_core.plugin.comfyui_versions.comfyui_loads` answers for a given release.
    comfyui_since: ClassVar[str | None] = None
    #: Whether some ComfyUI release loads this layout: follows from ``comfyui_since`` (a class
    #: that sets only ``comfy_loadable = False`` gets ``comfyui_since = None``).
    comfy_loadable: ClassVar[bool] = False
    #: What ComfyUI's LoRA path keeps or loses of this layout where it merges a LoRA into a layer
    #: (it re-quantizes it: ``comfy/model_patcher.py`` ``patch_weight_to_device``, the layer's
    #: ``set_weight``, comfy-kitchen's ``requantize_from_float``), one clause for ``cq formats``;
    #: measured in docs/comfyui_matrix.md (tests/test_lora_matrix.py). None: not measured.
    comfyui_lora: ClassVar[str | None] = None
    #: For a layout stock ComfyUI does not load: the loadable one to suggest.
    comfy_alternative: ClassVar[str | None] = None
    #: What ComfyUI's loader takes for this format (see :class:`Contract`); ``cq verify``,
    #: ``cq inspect`` and ``cq migrate`` check files against it. None: cq checks the
    #: exact :meth:`stored_specs` instead and cannot recognize the format without metadata.
    contract: ClassVar[Contract | None] = None
    #: The options with which ComfyUI's ``Embedding`` modules load this format for a token table
    #: (``comfy/ops.py`` ``MixedPrecisionOps.Embedding`` takes ``float8_e4m3fn``, ``float8_e5m2``
    #: and ``int8_tensorwise`` and pops only ``weight`` and ``weight_scale``); None: they cannot.
    embedding_options: ClassVar[Mapping[str, Any] | None] = None
    #: A short name ``--embeddings`` takes for this format (``int8``, ``fp8``); None: only its name.
    embedding_alias: ClassVar[str | None] = None
    #: The format ``cq convert`` uses without ``--format`` (:meth:`Registry.default_format`: the
    #: first registered format that says so).
    is_default: ClassVar[bool] = False
    #: The GPU families (``cq convert --gpu``: ``blackwell``, ``hopper``, ``ada``, ``older``) whose
    #: size budget offers this format by default: those where stock ComfyUI runs it natively
    #: (its ``comfy/ops.py`` ``pick_operations`` does not emulate it there), unless a format of
    #: the same size serves better there. Listed in the order the budget considers them.
    native_gpus: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Keep ``comfy_loadable`` and ``comfyui_since`` one fact: the release number decides.

        Raises :class:`~cq_core.errors.PluginError` for a ``comfyui_since`` that is not a release
        number, or a class that sets both and they disagree (or claims ``comfy_loadable`` without
        saying since which release)."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        name = own.get("name", cls.__name__)
        if "comfyui_since" in own:
            if cls.comfyui_since is not None:
                try:
                    parse_comfyui_version(cls.comfyui_since)
                except UsageError:
                    raise PluginError(f"Format {name!r}: comfyui_since {cls.comfyui_since!r} is not a ComfyUI "
                                      "release number like '0.31.0'.") from None
            loadable = cls.comfyui_since is not None
            if "comfy_loadable" in own and own["comfy_loadable"] != loadable:
                raise PluginError(f"Format {name!r} says comfy_loadable={own['comfy_loadable']} but comfyui_since="
                                  f"{cls.comfyui_since!r}; set comfyui_since alone.")
            cls.comfy_loadable = loadable
        elif "comfy_loadable" in own:
            if own["comfy_loadable"] and cls.comfyui_since is None:
                raise PluginError(f"Format {name!r} says ComfyUI loads it but not since which release: "
                                  "set comfyui_since (e.g. '0.30.0') instead of comfy_loadable.")
            if not own["comfy_loadable"]:
                cls.comfyui_since = None

    # -- what the format takes -------------------------------------------------

    def accepts(self, layer: LayerInfo) -> str | None:
        """Return None when the format can store this weight, else the reason why not."""
        if len(layer.shape) != 2:
            return f"{self.name} stores only 2-D Linear weights, this one is {len(layer.shape)}-D"
        if min(layer.shape) == 0:
            return "the weight is empty"
        return None

    @abstractmethod
    def stored_specs(self, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        """The stored tensors for a weight of ``shape``, keyed by suffix after the layer prefix.

        Always contains ``"weight"``; typically ``"weight_scale"`` and others.
        """

    def logical_shape(self, stored: Mapping[str, TensorSpec]) -> tuple[int, ...]:
        """The weight shape (N, K) that ``stored`` (suffix -> spec, as on disk) holds.

        ``cq inspect`` counts parameters with it. Formats that pack several values
        into one stored element override it; a padded layout gives its padded
        shape (the file does not record the original).
        """
        return tuple(stored["weight"].shape)

    def layer_config(self, shape: tuple[int, ...]) -> dict[str, Any]:
        """The per-layer JSON ComfyUI reads (``{"format": name, ...}``)."""
        return {"format": self.name}

    @classmethod
    def from_layer_config(cls, config: Mapping[str, Any], stored: Mapping[str, TensorSpec]) -> Format:
        """A format instance able to decode a layer already on disk.

        ``config`` is the layer's JSON, ``stored`` what the file holds for the
        layer (suffix -> spec). ``cq verify`` uses it to decode files it did
        not write in this run. Formats whose layout or decode depends on
        options (a ConvRot group in the JSON, a per-tensor scale visible in a
        stored shape) override it; the default takes the default options.
        """
        return cls()

    @classmethod
    def from_legacy_scale(cls, weight: TensorSpec, scale: TensorSpec) -> LegacyLayer | None:
        """How a layer of the older "scaled" layout (``L.weight`` with ``L.scale_weight``,
        ComfyUI's layout before per-layer metadata) is this format, or None when it is not
        (``cq migrate`` asks every installed format, the first answer wins). ``weight`` and
        ``scale`` are the stored tensors' specs. The default: never."""
        return None

    @classmethod
    def config_from_tensors(cls, stored: Mapping[str, TensorSpec]) -> dict[str, Any]:
        """The layer JSON for a layer whose tensors match :attr:`contract` but that carries
        no metadata (``cq migrate`` writes it). Override when an option is visible in the
        stored shapes (e.g. a block size); the default is ``{"format": name}``."""
        return {"format": cls.name}

    def layer_note(self, shape: tuple[int, ...]) -> str | None:
        """A short remark for the plan when this layer deviates from the chosen options
        (e.g. a smaller rotation group because K does not divide); None when it does not."""
        return None

    # -- the grid, for optimizers --------------------------------------------

    @abstractmethod
    def compute_scales(self, weight: torch.Tensor) -> Tensors:
        """Round-to-nearest scales for a float32 weight (the format's own recipe)."""

    @abstractmethod
    def to_grid(self, weight: torch.Tensor, scales: Tensors, cols: slice = slice(None)) -> torch.Tensor:
        """Round ``weight`` (float32, the columns ``cols`` of the full weight) to the
        nearest representable values under ``scales``; returns float32, same shape."""

    @abstractmethod
    def pack(self, weight_on_grid: torch.Tensor, scales: Tensors) -> Tensors:
        """Stored tensors (by suffix) for a float32 weight that already lies on the grid."""

    #: Block-scaled formats: how many consecutive input columns share one scale
    #: (blocks start at column 0). None: scales do not vary along K in blocks.
    scale_block: ClassVar[int | None] = None
    #: Whether an optimizer that can choose block scales again as it goes (gptq's
    #: ``refit_scales``) does so unless told: False where that was measured to lose
    #: (the format's docs say where).
    refit_by_default: ClassVar[bool] = True

    def refit_scales(
        self, weight: torch.Tensor, scales: Tensors, cols: slice, importance: torch.Tensor | None = None
    ) -> Tensors:
        """``scales`` with the scales of one column block chosen afresh for ``weight``.

        Optional, for formats that set :attr:`scale_block`. ``weight`` (N, width)
        holds the values the columns ``cols`` (exactly one block) are about to be
        rounded from, e.g. error-compensated ones that differ from the original
        weight; ``importance`` (width,) weights each column's squared error in
        the choice. May update ``scales`` in place. The default keeps them.
        """
        return scales

    def grid_neighbours(
        self, weight: torch.Tensor, scales: Tensors, cols: slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The representable values ``(below, above)`` that bracket each element of ``weight``.

        Optional: learned rounding chooses between the two. One of them is
        :meth:`to_grid`'s result. An element already on the grid, clamped at
        the format's range, or whose other neighbour the search does not
        reach, gets the nearest value twice (it simply is not a choice).

        The default needs only :meth:`to_grid`: it probes ever farther from
        the nearest value on the far side of the element, doubling the step.
        The first probe is at most 1/1024 of the value (finer than any
        quantized grid) and doubling never skips a grid point. Formats with a
        closed form should override it: it is called once per tensor.
        """
        nearest = self.to_grid(weight, scales, cols)
        direction = torch.sign(weight - nearest)
        other = nearest.clone()
        step = torch.maximum(2.0 * (weight - nearest).abs(), nearest.abs() * 2.0**-10)
        pending = (direction != 0) & (step > 0)
        for _ in range(6):  # enough for all but elements a hair away from a grid point
            probe = self.to_grid(nearest + direction * step, scales, cols)
            found = pending & (probe != nearest)
            other = torch.where(found, probe, other)
            pending &= ~found
            if not bool(pending.any()):
                break
            step = torch.where(pending, step * 2.0, step)
        return torch.minimum(nearest, other), torch.maximum(nearest, other)

    # -- whole-tensor encode / decode ----------------------------------------------

    def encode(self, weight: torch.Tensor, scales: Tensors | None = None) -> Tensors:
        """Round-to-nearest encode of a weight in its source dtype.

        Formats override this when a fused path is faster; the result must
        equal ``pack(to_grid(w, scales), scales)``.
        """
        weight = weight.float()
        if scales is None:
            scales = self.compute_scales(weight)
        return self.pack(self.to_grid(weight, scales), scales)

    def encode_measured(self, weight: torch.Tensor, scales: Tensors | None = None) -> tuple[Tensors, float, float]:
        """:meth:`encode`, plus the stored result's error energies ``(sum of weight²,
        sum of (decoded - weight)²)`` exactly as :func:`cq_core.numerics.metrics.weight_error_energy`
        computes them (same row chunks, same float32 dot products).

        The default encodes, then measures. A format whose encode already walks
        the weight in those row chunks may decode each chunk's stored values
        while they are in cache instead: one pass over the weight less.
        """
        tensors = self.encode(weight, scales)
        return (tensors, *weight_error_energy(self, weight, tensors))

    @abstractmethod
    def decode(self, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int] | None = None) -> torch.Tensor:
        """The float32 weight (N, K) that ComfyUI sees when it dequantizes ``tensors``.

        ``shape`` is the weight's (N, K), as ComfyUI takes it from the model's
        layer; cq always passes it. A padded layout needs it to cut the
        padding off (without it, it may return the padded weight).
        """

    def decode_rows(
        self, tensors: Mapping[str, torch.Tensor], start: int, stop: int, shape: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Rows ``start:stop`` of :meth:`decode`; override when a cheaper path exists."""
        return self.decode(tensors, shape)[start:stop]

    def grid_basis(self, shape: tuple[int, ...]) -> GridBasis | None:
        """The basis in which this format's grid is element-wise for a weight of ``shape``, when
        it is not the weight's own (a ConvRot rotation); None (the default) when it is."""

    # -- the compute path: what ComfyUI multiplies on a GPU that quantizes activations --

    #: For a format whose activations ComfyUI quantizes with a stored ``L.input_scale``: the
    #: activation magnitude that ``input_scale = 1`` maps to the format's largest value
    #: (``input_scale = amax / activation_max`` covers ``amax`` without clipping). None: the
    #: format takes no static activation scale, and cq calibrates none.
    activation_max: ClassVar[float | None] = None

    def activation_fake_quant(self, x: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The activation as the quantized matmul sees it, or None for a weight-only layer.

        ``x`` (..., K) float32 is the layer's input; ``tensors`` the layer's stored tensors
        (suffix -> tensor; ``input_scale`` and ``pre_quant_scale`` among them when stored).
        Returns (..., K) float32: ``pre_quant_scale`` applied, then quantized and dequantized
        as comfy-kitchen's eager backend does it for this layout (the reference for
        ComfyUI's GPU kernels). The layer's output on that path is
        :func:`cq_core.numerics.compute_path.layer_output`. The default, None, means
        ComfyUI multiplies the layer in high precision (it dequantizes the weight).
        """
        return None

    def row_decoder(
        self, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int]
    ) -> Callable[[int, int], torch.Tensor]:
        """``rows(start, stop)`` -> float32 rows of the decoded (N, K) weight, for walking a
        weight in chunks: :meth:`decode_rows` when the format overrides it, else one
        :meth:`decode` sliced (so a format without a cheap row path decodes once)."""
        if type(self).decode_rows is not Format.decode_rows:
            return lambda start, stop: self.decode_rows(tensors, start, stop, shape)
        full = self.decode(tensors, shape)
        return lambda start, stop: full[start:stop]


@dataclass(frozen=True)
class GridBasis:
    """An orthogonal change of basis along K in which a format's grid is element-wise.

    ConvRot formats round in a Hadamard-rotated basis: seen from the weight's own
    basis their grid is a rotated lattice, so rounding one column or one element
    at a time (GPTQ, learned rounding) has no meaning there. In the rotated basis
    it does, and the stored tensors are the same.
    """

    #: (rows, K) float32 in the weight's own basis -> (rows, K) float32 in this one (``W -> W T``, T orthogonal).
    into: Callable[[torch.Tensor], torch.Tensor]
    #: The same layout for weights already in this basis: ``compute_scales``, ``to_grid``,
    #: ``grid_neighbours``, ``pack`` and ``encode`` take them, ``decode`` returns them there,
    #: and its ``grid_basis`` is None.
    format: Format


@dataclass
class OptimizeContext:
    """What an optimizer may use besides the weight and the format."""

    layer: str
    #: Per-layer calibration statistics (e.g. ``{"H": ..., "absmax": ...}``), or None.
    stats: Mapping[str, torch.Tensor] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    #: Whether cq will measure the stored result's error. An optimizer that can get
    #: the numbers for free (:meth:`Format.encode_measured`) returns them in
    #: :attr:`OptimizeResult.energies`, and cq skips its own measuring pass.
    measure: bool = False


@dataclass
class OptimizeResult:
    """Stored tensors plus a short note for the report (which method won, by how much)."""

    tensors: Tensors
    note: str | None = None
    #: ``(sum of weight², sum of (decoded - weight)²)`` of ``tensors`` exactly as
    #: :func:`cq_core.numerics.metrics.weight_error_energy` gives them, when already measured.
    energies: tuple[float, float] | None = None


class Optimizer(Configurable, ABC):
    """Chooses the stored values of one weight through the format interface."""

    kind: ClassVar[str] = "optimizer"
    description: ClassVar[str] = ""
    #: True for an optimizer that can do nothing without calibration statistics: ``cq convert``
    #: then refuses to run it without ``--calibration`` instead of quietly rounding to nearest.
    needs_calibration: ClassVar[bool] = False

    @property
    def uses_calibration(self) -> bool:
        """Whether this optimizer, with these options, reads calibration statistics when given
        (``OptimizeContext.stats``); a conversion that gives statistics nothing reads says so
        and records none. Default: every optimizer that :attr:`needs_calibration`; one that only
        may use them (learned, rtn ``scales=output``) says True itself."""
        return self.needs_calibration

    #: True for an optimizer that rounds single columns or elements (``Format.to_grid`` on a
    #: column slice, ``Format.grid_neighbours``): for a format whose grid is element-wise only
    #: in another basis (:meth:`Format.grid_basis`), :meth:`optimize_layer` runs it there.
    elementwise: ClassVar[bool] = True

    @abstractmethod
    def optimize(self, weight: torch.Tensor, fmt: Format, context: OptimizeContext) -> OptimizeResult:
        """Encode ``weight`` (source dtype) with ``fmt``; never worse than round-to-nearest."""

    def optimize_layer(self, weight: torch.Tensor, fmt: Format, context: OptimizeContext) -> OptimizeResult:
        """:meth:`optimize`, in the format's grid basis when it has one and this optimizer is
        :attr:`elementwise`: the weight and the calibration's ``H`` are carried into that basis
        (``W T`` and ``Tᵀ H T``: the output error ``tr(E H Eᵀ)`` is the same in both), other
        statistics, per input channel of the original basis, are left out, and the optimizer
        sees the basis view of the format. The stored tensors are the same in either basis;
        their error is measured by cq afterwards, in the weight's own basis."""
        basis = fmt.grid_basis(tuple(weight.shape)) if self.elementwise and weight.dim() == 2 else None
        if basis is None:
            return self.optimize(weight, fmt, context)
        stats = None
        if context.stats is not None and features_of(context.stats) is not None:
            h = dense_second_moment(context.stats)  # H itself or its bounded form, for this one layer
            stats = {EXACT_KEY: basis.into(basis.into(h).T.contiguous())}
        inner = replace(context, stats=stats, measure=False)
        return replace(self.optimize(basis.into(weight), basis.format, inner), energies=None)


@dataclass(frozen=True)
class ModelFilter:
    """A model-family preset: which layers stay in high precision, which are dropped.

    Patterns are substrings of tensor names; a preset sees only the tensors
    of its own component (those under the component's prefix, see
    :class:`Detection`). ``exclude`` and ``high_precision`` both keep the
    source dtype; ``remove`` drops the tensor. ``quantize`` names Linear
    layers that cq would otherwise keep by default because their name says
    ``embed`` or ``norm`` (``context_embedder``), so the global format takes
    them. ``keep_all`` keeps every tensor of the component exactly as it is
    (a VAE: ComfyUI loads it without quantized layers), whatever other rule,
    flag or ``--model none`` says.
    """

    name: str
    category: str
    help: str
    exclude: tuple[str, ...] = ()
    high_precision: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    quantize: tuple[str, ...] = ()
    keep_all: bool = False
    #: The ``--embeddings`` choice (e.g. ``"int8"``) for the component's token-embedding tables
    #: when the recipe names none; None keeps them in high precision.
    embeddings: str | None = None
    #: Optional: more keep patterns computed from the checkpoint's tensor names,
    #: for what depends on the model's size (e.g. its first and last block).
    derive_keep: Callable[[Sequence[str]], tuple[str, ...]] | None = field(default=None, compare=False)
    #: One line saying what ``derive_keep`` adds (``cq models show`` prints it).
    derive_help: str = ""

    def for_checkpoint(self, keys: Sequence[str]) -> ModelFilter:
        """This preset with its derived patterns resolved for one checkpoint."""
        if self.derive_keep is None:
            return self
        derived = tuple(p for p in self.derive_keep(keys) if p not in self.high_precision)
        return replace(self, high_precision=(*self.high_precision, *derived), derive_keep=None)

    def rule_for(self, key: str) -> tuple[str, str] | None:
        """``("remove" | "keep" | "quantize", pattern)`` for the first pattern in ``key``, else None.

        ``key`` is the full tensor name of a tensor inside the preset's component.
        """
        for pattern in self.remove:
            if pattern in key:
                return "remove", pattern
        for pattern in (*self.exclude, *self.high_precision):
            if pattern in key:
                return "keep", pattern
        for pattern in self.quantize:
            if pattern in key:
                return "quantize", pattern
        return None


@dataclass(frozen=True)
class ShapeRead:
    """Why a model's loader reads a tensor's shape, and which of its dimensions.

    ``axes`` are the dimensions the loader uses (negative: from the end);
    None means all of them, or the value itself. A stored layout that changes
    one of them (padding, two codes per byte) makes the loader build another model.
    """

    reason: str
    axes: tuple[int, ...] | None = None

    def changed_by(self, shape: Sequence[int], stored: Sequence[int]) -> bool:
        """Whether storing a weight of ``shape`` as ``stored`` changes what the loader reads."""
        if len(shape) != len(stored):
            return True
        differing = {i for i, (a, b) in enumerate(zip(shape, stored, strict=True)) if a != b}
        if self.axes is None:
            return bool(differing)
        return any(axis % len(shape) in differing for axis in self.axes if -len(shape) <= axis < len(shape))


@dataclass(frozen=True)
class Detection:
    """One component found in a checkpoint: the preset that fits it, the evidence, and where it lives.

    A checkpoint can hold several components (a diffusion model, text
    encoders, a VAE), each under its own key prefix
    (``model.diffusion_model.``, ``text_encoders.t5xxl.transformer.``,
    ``vae.``). The preset acts only on tensors whose names start with
    ``prefix``; ``""`` means the whole file.
    """

    preset: str
    reason: str
    prefix: str = ""


class MetadataWriter(ABC):
    """Carries each quantized layer's JSON into the output file."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    @abstractmethod
    def layer_specs(self, prefix: str, config: Mapping[str, Any]) -> dict[str, TensorSpec]:
        """Extra tensors for one layer, by full key (may be empty)."""

    @abstractmethod
    def layer_tensors(self, prefix: str, config: Mapping[str, Any]) -> Tensors:
        """The tensors promised by :meth:`layer_specs`."""

    @abstractmethod
    def header_metadata(self, layers: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
        """Entries to add to the safetensors ``__metadata__`` for all quantized layers."""
