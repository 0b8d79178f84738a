"""A layer's stored tensors against its format's :class:`~cq_core.plugin.types.Contract`.

Every format declares, once, what ComfyUI's loader takes for it (tensors,
dtypes, shapes, JSON keys). ``cq verify``, ``cq inspect`` and ``cq migrate``
all judge a file through the functions here, from header information only
(names, dtypes, shapes): which tensors a layer lacks, which have a form
ComfyUI refuses or decodes wrong, which it loads but leaves unused (its loader
lists them as unexpected), and, for a layer that carries no metadata at all,
which installed formats its tensors fit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from cq_core.io.safetensors_io import dtype_name
from cq_core.plugin.types import Contract, Format, TensorSpec

#: Tensors under a layer prefix that belong to the module, not to its format:
#: the Linear's own bias and the per-layer metadata carrier.
MODULE_SUFFIXES = frozenset({"bias", "comfy_quant"})


def spec_of(info: Any) -> TensorSpec:
    """A :class:`TensorSpec` of anything with ``dtype`` and ``shape`` (a header entry, a draft tensor)."""
    return TensorSpec(info.dtype, tuple(info.shape))


def tensors_by_layer(specs: Mapping[str, Any]) -> dict[str, dict[str, TensorSpec]]:
    """``{"a.b.weight": spec, ...}`` -> ``{"a.b": {"weight": spec, ...}}`` (a layer's direct tensors)."""
    layers: dict[str, dict[str, TensorSpec]] = {}
    for name, info in specs.items():
        layer, dot, suffix = name.rpartition(".")
        if dot:
            layers.setdefault(layer, {})[suffix] = spec_of(info)
    return layers


def describe(spec: TensorSpec) -> str:
    return f"{dtype_name(spec.dtype)}{list(spec.shape)}"


def describe_tensors(stored: Mapping[str, TensorSpec]) -> str:
    """``"F8_E4M3[32, 64] weight, F32[] weight_scale"``."""
    order = sorted((s for s in stored if s not in MODULE_SUFFIXES), key=lambda s: (s != "weight", s))
    return ", ".join(f"{describe(stored[suffix])} {suffix}" for suffix in order)


def _same_size(shapes: Iterable[tuple[int, ...]], shape: tuple[int, ...]) -> tuple[int, ...] | None:
    size = math.prod(shape)
    return next((s for s in shapes if math.prod(s) == size), None)


def _is_json_type(value: Any, kind: type) -> bool:
    if kind is int:
        return type(value) is int
    if kind is float:
        return type(value) in (int, float)
    return isinstance(value, kind)


@dataclass
class ContractCheck:
    """One layer judged against one format's contract."""

    layer: str
    format: str
    #: Sentences: what ComfyUI refuses, or loads and decodes wrong, that no reshape repairs.
    problems: list[str] = field(default_factory=list)
    #: Required suffixes the layer lacks.
    missing: list[str] = field(default_factory=list)
    #: suffix -> the canonical spec: forms ComfyUI loads but decodes wrong; a reshape repairs them.
    repairs: dict[str, TensorSpec] = field(default_factory=dict)
    #: Suffixes ComfyUI's loader leaves unused for this format (it lists them as unexpected).
    ignored: list[str] = field(default_factory=list)
    #: suffix -> the form cq decodes (the contract's canonical dtype and shape), for tensors present.
    canonical: dict[str, TensorSpec] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        """ComfyUI loads the layer (possibly after a repair) and uses every tensor of it."""
        return not self.problems and not self.ignored

    def sentences(self) -> list[str]:
        """Everything wrong, one sentence each: problems, then repairs and ignored tensors."""
        out = list(self.problems)
        for suffix, spec in self.repairs.items():
            out.append(
                f"{self.layer}.{suffix} has a shape ComfyUI's {self.format} loads but dequantizes wrong; "
                f"cq migrate reshapes it to {list(spec.shape)}"
            )
        for suffix in self.ignored:
            out.append(
                f"ComfyUI's {self.format} does not use {self.layer}.{suffix}: its loader lists it as "
                "unexpected (cq migrate drops it)"
            )
        return out


def check_layer(
    layer: str,
    fmt: str,
    contract: Contract,
    stored: Mapping[str, TensorSpec],
    config: Mapping[str, Any] | None = None,
) -> ContractCheck:
    """Judge a layer's tensors (suffix -> spec) and JSON against ``contract``."""
    check = ContractCheck(layer, fmt)
    weight = stored.get("weight")
    for suffix, rule in contract.tensors.items():
        spec = stored.get(suffix)
        if spec is None:
            if rule.required:
                check.missing.append(suffix)
                check.problems.append(f"ComfyUI's {fmt} needs {layer}.{suffix} but the file lacks it")
            continue
        if weight is None or (suffix != "weight" and len(weight.shape) != 2):
            continue  # shapes follow from a 2-D weight; a weight of another rank is judged itself
        accepted = tuple(rule.shapes(weight.shape))
        repairable = tuple(rule.repairable(weight.shape)) if rule.repairable else ()
        takes = " or ".join(str(list(s)) for s in accepted[:3]) + (" ..." if len(accepted) > 3 else "")
        names = "/".join(dtype_name(d) for d in rule.dtypes)
        if spec.dtype not in rule.dtypes:
            check.problems.append(
                f"{layer}.{suffix} is {describe(spec)}; ComfyUI's {fmt} takes {names}"
                + (" (it value-casts the weight, so other dtypes decode to garbage)" if suffix == "weight" else "")
            )
            continue
        if spec.shape in accepted:
            shape = _same_size(accepted, spec.shape)
        elif spec.shape in repairable:
            shape = _same_size(accepted, spec.shape)
            if shape is not None:
                check.repairs[suffix] = TensorSpec(rule.dtypes[0], shape)
        else:
            shape = None
        if shape is None and suffix == "weight":
            check.problems.append(
                f"{layer}.weight is {describe(spec)}; ComfyUI's {fmt} stores its weight as "
                f"{rule.describe or names + ', 2-D'}"
            )
            continue
        if shape is None:
            check.problems.append(
                f"{layer}.{suffix} is {describe(spec)}; ComfyUI's {fmt} takes {rule.describe or names} "
                f"of shape {takes} next to a {list(weight.shape)} weight"
            )
            continue
        check.canonical[suffix] = TensorSpec(rule.dtypes[0], shape)
    check.ignored = [s for s in stored if s not in contract.tensors and s not in MODULE_SUFFIXES]
    for key, kind in contract.json.items():
        if config is not None and key in config and not _is_json_type(config[key], kind):
            check.problems.append(f"its JSON {key}={config[key]!r} is not {kind.__name__}, which ComfyUI reads it as")
    return check


def canonical_tensor(tensor: torch.Tensor, contract: Contract, suffix: str, spec: TensorSpec) -> torch.Tensor:
    """A stored tensor in the form cq decodes: bytes viewed or values cast as ComfyUI does, reshaped."""
    if tensor.dtype != spec.dtype:
        rule = contract.tensors[suffix]
        tensor = tensor.view(spec.dtype) if rule.view else tensor.to(spec.dtype)
    return tensor.reshape(spec.shape)


def format_contracts(formats: Mapping[str, type[Format]]) -> dict[str, Contract]:
    """The declared contracts of the installed formats, by name."""
    return {name: cls.contract for name, cls in formats.items() if cls.contract is not None}


def contract_suffixes(formats: Mapping[str, type[Format]]) -> set[str]:
    """Every tensor suffix other than ``weight`` that some installed format stores."""
    return {s for c in format_contracts(formats).values() for s in c.tensors if s != "weight"}


def recognize(stored: Mapping[str, TensorSpec], formats: Mapping[str, type[Format]]) -> list[str]:
    """The installed formats whose contract a layer's tensors fit (possibly after a repair).

    Formats stock ComfyUI loads win over those it does not (an I8 square weight
    with one scale is per-tensor ``int8_tensorwise`` before one-tile
    ``int8_blockwise``), then formats that use every tensor of the layer over
    those that would leave some unused; several left means the tensors alone
    cannot tell.
    """
    checks = [check_layer("", name, contract, stored) for name, contract in format_contracts(formats).items()]
    fitting = [c for c in checks if not c.problems]
    stock = [c for c in fitting if formats[c.format].comfy_loadable]
    fitting = stock or fitting
    complete = [c.format for c in fitting if not c.ignored]
    return complete or [c.format for c in fitting]


def _high_precision(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize > 1


@dataclass
class Unlabelled:
    """A layer that stores quantized tensors but carries no metadata."""

    layer: str
    stored: dict[str, TensorSpec]
    candidates: list[str]

    @property
    def format(self) -> str | None:
        """The one format its tensors identify, or None (none or several fit)."""
        return self.candidates[0] if len(self.candidates) == 1 else None

    def sentence(self) -> str:
        tensors = describe_tensors(self.stored)
        if self.format:
            return f"carries no metadata; its tensors ({tensors}) are {self.format}"
        if self.candidates:
            return (
                f"carries no metadata and its tensors ({tensors}) fit {' and '.join(self.candidates)}; "
                "nothing in the file says which"
            )
        return f"carries no metadata and its tensors ({tensors}) fit no installed format"


def unlabelled_layers(
    specs: Mapping[str, Any], labelled: Iterable[str], formats: Mapping[str, type[Format]]
) -> list[Unlabelled]:
    """Layers with a low-precision weight and a tensor some format stores beside it
    (a ``weight_scale``...), but no metadata: ComfyUI would use their codes as plain weights."""
    labelled = set(labelled)
    scale_suffixes = contract_suffixes(formats)
    found = []
    for layer, stored in tensors_by_layer(specs).items():
        weight = stored.get("weight")
        if layer in labelled or weight is None or _high_precision(weight.dtype):
            continue
        if not scale_suffixes & set(stored):
            continue
        found.append(Unlabelled(layer, stored, recognize(stored, formats)))
    return found


def activation_scale_problem(layer: str, scale: torch.Tensor) -> str | None:
    """Why a stored ``input_scale`` cannot be used, or None.

    On FP8/FP4 hardware ComfyUI quantizes the layer's input with it (``comfy/ops.py``, the
    mixed-precision Linear's forward):
    NaN, Inf, zero or a negative value turns every activation into garbage, while the
    weight still decodes fine, so decoding alone never shows it.
    """
    values = scale.float()
    if not bool(torch.isfinite(values).all()) or not bool((values > 0).all()):
        return f"{layer}.input_scale holds {values.flatten()[:4].tolist()}; an activation scale must be positive and finite"
    return None


#: What ComfyUI does with an FP8 weight that has no scale and no layer metadata (a plain FP8
#: checkpoint): ``comfy/ops.py`` ``cast_bias_weight`` casts the stored values to the compute
#: dtype, i.e. decodes them with scale 1.
UNSCALED_FLOAT8 = ("weight without a scale or layer metadata (plain FP8): ComfyUI casts its stored values to the "
                   "compute dtype, i.e. scale 1, and cq decodes it so")


def unscaled_float8_layers(specs: Mapping[str, Any], labelled: Iterable[str]) -> dict[str, str]:
    """Layer -> weight dtype name for each layer whose ``weight`` is stored in a one-byte float
    (FP8) beside nothing but module tensors (``bias``, ``comfy_quant``), without metadata
    (``labelled``: the layers that have some): ComfyUI uses those values as they are
    (:data:`UNSCALED_FLOAT8`). A layer with a scale or other quantization tensor is not one."""
    labelled = set(labelled)
    found = {}
    for layer, stored in tensors_by_layer(specs).items():
        weight = stored.get("weight")
        if (layer in labelled or weight is None or not weight.dtype.is_floating_point or weight.dtype.itemsize != 1
                or set(stored) - {"weight", *MODULE_SUFFIXES}):
            continue
        found[layer] = dtype_name(weight.dtype)
    return found
