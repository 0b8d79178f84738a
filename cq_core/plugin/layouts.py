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
optional transform. :class:`cq_core.engine.native_layout.NativeLayoutSource`
then reads the input through that map, one output tensor at a time, so memory
stays near one tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from cq_core.io.safetensors_io import TensorInfo


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
