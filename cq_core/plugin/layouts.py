"""Key layouts: present a checkpoint published in another layout under the names ComfyUI builds.

ComfyUI renames some layouts on load (diffusers-format FLUX, SD3, AuraFlow,
PixArt and Z-Image transformers: ``comfy/model_detection.py``
``convert_diffusers_mmdit``), fusing separate q/k/v projections into one
tensor. Quantization tensors stored under the old names are then dropped as
"left over" (fp8 weights used unscaled, nvfp4 shapes mismatched). So cq
converts the keys first and quantizes the native layout: the output is a
ComfyUI-native file.

A plugin registers a :class:`LayoutConverter` per layout it knows
(``cq_register_layout_converters``). Each one recognises its layout from the
key set and returns :class:`TensorAssembly` records: every output tensor and
the input tensors it is made of (concatenated along dim 0, in order), with an
optional transform. :class:`NativeLayoutSource` then reads the input through
that map, one output tensor at a time, so memory stays near one tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cq_core.errors import CqError
from cq_core.io.safetensors_io import TensorInfo

if TYPE_CHECKING:
    from cq_core.plugin.manager import Registry


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """``[a; b] -> [b; a]`` along dim 0: diffusers stores adaLN (shift, scale) where ComfyUI reads (scale, shift)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


#: Transforms a :class:`TensorAssembly` may name (names, so plans and reports stay printable).
TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"swap_halves": swap_halves}


@dataclass(frozen=True)
class TensorAssembly:
    """One output tensor: ``parts`` (input tensor names) concatenated along dim 0, then ``transform``."""

    name: str
    parts: tuple[str, ...]
    transform: str | None = None

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError(f"{self.name}: an assembly needs at least one input tensor")
        if self.transform is not None and self.transform not in TRANSFORMS:
            raise ValueError(f"{self.name}: unknown transform {self.transform!r}; known: {', '.join(TRANSFORMS)}")


class LayoutConverter(ABC):
    """A checkpoint layout that ComfyUI renames on load, and the map to the layout it builds.

    ``name`` identifies the layout in reports (``"diffusers-flux"``);
    ``description`` says what it is in one line.
    """

    name: str = ""
    description: str = ""

    @abstractmethod
    def detect(self, keys: Sequence[str]) -> bool:
        """True when ``keys`` (every tensor name of the input) are in this layout."""

    @abstractmethod
    def assemblies(self, tensors: Mapping[str, TensorInfo]) -> list[TensorAssembly]:
        """The output tensors, made from ``tensors`` (name -> dtype, shape); read no data.

        Every input tensor should be used exactly once; one left out is carried
        under its own name. Raises :class:`cq_core.errors.CqError` when the
        layout is recognised but cannot be mapped (one sentence saying why).
        """


@dataclass(frozen=True)
class LayoutChoice:
    """Which converter took a checkpoint, for the plan and report."""

    converter: str
    description: str
    carried: tuple[str, ...] = ()


def _check_parts(assembly: TensorAssembly, tensors: Mapping[str, TensorInfo]) -> TensorInfo:
    infos = []
    for part in assembly.parts:
        if part not in tensors:
            raise CqError(f"{assembly.name}: needs input tensor {part!r}, which the checkpoint lacks.")
        infos.append(tensors[part])
    first = infos[0]
    for info in infos[1:]:
        if info.dtype != first.dtype or info.shape[1:] != first.shape[1:]:
            raise CqError(
                f"{assembly.name}: cannot join {first.name!r} ({first.dtype}, {first.shape}) and "
                f"{info.name!r} ({info.dtype}, {info.shape}) along dim 0."
            )
    rows = sum(info.shape[0] for info in infos) if first.shape else 0
    shape = (rows, *first.shape[1:]) if first.shape else first.shape
    nbytes = sum(info.nbytes for info in infos)
    return TensorInfo(assembly.name, first.dtype, shape, first.begin, first.begin + nbytes)


class NativeLayoutSource:
    """A checkpoint (file or shard set) read under the names of another layout.

    ``tensors`` maps each output name to a :class:`TensorInfo` whose dtype and
    shape are the assembled tensor's; ``begin`` is its first part's offset (so
    plans keep the input's read order). ``read(name)`` assembles one tensor.
    """

    def __init__(self, source: Any, assemblies: Sequence[TensorAssembly], choice: LayoutChoice) -> None:
        self.source = source
        self.choice = choice
        self.path = source.path
        self.metadata = source.metadata
        self.assemblies = {a.name: a for a in assemblies}
        if len(self.assemblies) != len(assemblies):
            raise CqError(f"{choice.converter}: maps two input tensors to the same output name.")
        self.tensors: dict[str, TensorInfo] = {
            a.name: _check_parts(a, source.tensors) for a in assemblies
        }

    @property
    def file_size(self) -> int:
        return self.source.file_size

    @property
    def header_sha256(self) -> str:
        """The input's own header digest: the file as published, before its keys were converted."""
        return self.source.header_sha256

    def is_identity(self, name: str) -> bool:
        """True when output ``name`` is one input tensor unchanged (it can be read in place)."""
        a = self.assemblies[name]
        return len(a.parts) == 1 and a.transform is None

    def read(self, name: str) -> torch.Tensor:
        a = self.assemblies[name]
        parts = [self.source.read(part) for part in a.parts]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return TRANSFORMS[a.transform](tensor) if a.transform else tensor

    def location(self, name: str) -> tuple[Path, int]:
        """Where output ``name``'s first part lies in the input (read in place when :meth:`is_identity`)."""
        return self.source.location(self.first_part(name))

    def first_part(self, name: str) -> str:
        return self.assemblies[name].parts[0]

    def shard_number(self, name: str) -> int:
        return self.source.shard_number(self.first_part(name))

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> NativeLayoutSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def to_native_layout(source: Any, registry: Registry) -> Any:
    """``source`` itself, or a :class:`NativeLayoutSource` when a registered converter knows its layout.

    Raises :class:`cq_core.errors.CqError` when a converter recognises the
    layout but cannot map it (e.g. a family ComfyUI has no loader for).
    """
    keys = list(source.tensors)
    for converter in registry.layout_converters.values():
        if not converter.detect(keys):
            continue
        try:
            assemblies = converter.assemblies(source.tensors)
        except CqError as exc:
            raise CqError(f"{source.path}: {exc}") from None
        used = {part for a in assemblies for part in a.parts}
        carried = tuple(name for name in keys if name not in used)
        taken = {a.name for a in assemblies}
        clash = [name for name in carried if name in taken]
        if clash:
            raise CqError(f"{converter.name}: input tensor {clash[0]!r} clashes with a converted name.")
        assemblies = [*assemblies, *(TensorAssembly(name, (name,)) for name in carried)]
        order = {name: i for i, name in enumerate(keys)}  # the source's own read order
        assemblies.sort(key=lambda a: order[a.parts[0]])
        return NativeLayoutSource(source, assemblies, LayoutChoice(converter.name, converter.description, carried))
    return source


def describe_layout(source: Any) -> str | None:
    """One line for the report: which layout the input was converted from, or None (already native)."""
    if not isinstance(source, NativeLayoutSource):
        return None
    line = f"{source.choice.converter} ({source.choice.description}), keys converted to ComfyUI's layout"
    if source.choice.carried:
        line += f"; {len(source.choice.carried)} tensors without a mapping kept under their own names"
    return line
