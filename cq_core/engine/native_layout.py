"""A checkpoint read under the names ComfyUI builds, through the layout converters plugins register.

:func:`to_native_layout` offers the input's tensor names to each
:class:`cq_core.plugin.layouts.LayoutConverter` in registration order; the first whose
``detect`` accepts them maps the checkpoint, and :class:`NativeLayoutSource` reads the
input through that map, one output tensor at a time (see :mod:`cq_core.plugin.layouts`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from cq_core.errors import CqError
from cq_core.io.safetensors_io import TensorInfo, TensorLocation
from cq_core.io.source import Source, SourceView
from cq_core.plugin.layouts import TRANSFORMS, LayoutConverter, TensorAssembly


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


class NativeLayoutSource(SourceView):
    """A checkpoint (file or shard set) read under the names of another layout.

    ``tensors`` maps each output name to a :class:`TensorInfo` whose dtype and
    shape are the assembled tensor's; ``begin`` is its first part's offset (so
    plans keep the input's read order). ``read(name)`` assembles one tensor.
    """

    def __init__(self, source: Source, assemblies: Sequence[TensorAssembly], choice: LayoutChoice) -> None:
        self.source = source
        self.layout = choice
        self.path = source.path
        self.metadata = source.metadata
        self.assemblies = {a.name: a for a in assemblies}
        if len(self.assemblies) != len(assemblies):
            raise CqError(f"{choice.converter}: maps two input tensors to the same output name.")
        self.tensors: dict[str, TensorInfo] = {
            a.name: _check_parts(a, source.tensors) for a in assemblies
        }

    def is_identity(self, name: str) -> bool:
        """True when output ``name`` is one input tensor unchanged (it can be read in place)."""
        a = self.assemblies[name]
        return len(a.parts) == 1 and a.transform is None

    def read(self, name: str) -> torch.Tensor:
        a = self.assemblies[name]
        parts = [self.source.read(part) for part in a.parts]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return TRANSFORMS[a.transform](tensor) if a.transform else tensor

    def location(self, name: str) -> TensorLocation | None:
        """Where output ``name`` lies in the input when it is one input tensor unchanged
        (:meth:`is_identity`: read in place), else None (assembled by :meth:`read`)."""
        return self.source.location(self.first_part(name)) if self.is_identity(name) else None

    def first_part(self, name: str) -> str:
        return self.assemblies[name].parts[0]

    def shard_number(self, name: str) -> int:
        return self.source.shard_number(self.first_part(name))


def to_native_layout(source: Source, converters: Iterable[LayoutConverter]) -> Source:
    """``source`` itself, or a :class:`NativeLayoutSource` when one of ``converters`` (the
    registry's, in registration order) knows its layout.

    Raises :class:`cq_core.errors.CqError` when a converter recognises the
    layout but cannot map it (e.g. a family ComfyUI has no loader for).
    """
    keys = list(source.tensors)
    for converter in converters:
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


def describe_layout(source: Source) -> str | None:
    """One line for the report: which layout the input was converted from, or None (already native)."""
    choice = source.layout
    if choice is None:
        return None
    line = f"{choice.converter} ({choice.description}), keys converted to ComfyUI's layout"
    if choice.carried:
        line += f"; {len(choice.carried)} tensors without a mapping kept under their own names"
    return line
