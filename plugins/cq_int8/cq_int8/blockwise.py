"""``int8_blockwise``: I8 codes with one F32 scale per b x b tile, ``(N/b, K/b)``.

Not loaded by stock ComfyUI (only by a deprecated custom node), so it is
offered with a pointer to ``int8_tensorwise``. The JSON carries
``group_size: b``. The scale shape is exactly ``(N/b, K/b)`` (FORMATS.md), so
layers whose N or K is not a multiple of b are refused rather than padded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cq_core import (
    FLOAT_SCALE_DTYPES,
    Contract,
    Format,
    LayerInfo,
    LegacyLayer,
    Option,
    TensorRule,
    Tensors,
    TensorSpec,
    UsageError,
    same_as_weight,
)
from cq_core.numerics.exact import div
from cq_core.numerics.metrics import CHUNK_ELEMENTS
from cq_int8.scales import group_scales, round_to_codes
from cq_int8.tensorwise import CLIP_SEARCH

QMAX = 127


def tiles(rows: torch.Tensor, block: int) -> torch.Tensor:
    """(r, K) with r and K multiples of ``block`` -> (r/b * K/b, b*b), one tile per row."""
    r, k = rows.shape
    return rows.reshape(r // block, block, k // block, block).transpose(1, 2).reshape(-1, block * block)


def untile(flat: torch.Tensor, r: int, k: int, block: int) -> torch.Tensor:
    return flat.reshape(r // block, k // block, block, block).transpose(1, 2).reshape(r, k)


def _tile_scales(weight_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    n, k = weight_shape if len(weight_shape) == 2 else (0, 0)
    return tuple((n // b, k // b) for b in range(1, min(n, k) + 1) if not n % b and not k % b)


#: Not a stock ComfyUI format: the layout the deprecated custom node loads, as cq writes it
#: (one F32 scale per b x b tile, JSON ``group_size: b``).
INT8_BLOCKWISE_CONTRACT = Contract(
    tensors={
        "weight": TensorRule((torch.int8,), same_as_weight),
        "weight_scale": TensorRule(FLOAT_SCALE_DTYPES, _tile_scales, describe="one float scale per square tile"),
    },
    json={"group_size": int},
)


class Int8BlockwiseFormat(Format):
    name = "int8_blockwise"
    description = "INT8 with one scale per b x b tile (not loaded by stock ComfyUI)."
    comfy_loadable = False
    comfyui_since = None  # in no ComfyUI release's QUANT_ALGOS (only a deprecated custom node loads it)
    comfy_alternative = "int8_tensorwise"
    contract = INT8_BLOCKWISE_CONTRACT
    options = (
        Option("block_size", int, 128, "Tile edge b: one scale per b x b tile; N and K must be multiples of it."),
        CLIP_SEARCH,
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.opts["block_size"] < 1:
            raise UsageError(f"Option block_size of format 'int8_blockwise' must be positive, not {self.opts['block_size']}.")

    @property
    def block(self) -> int:
        return self.opts["block_size"]

    def accepts(self, layer: LayerInfo) -> str | None:
        refusal = super().accepts(layer)
        if refusal is None and (layer.shape[0] % self.block or layer.shape[1] % self.block):
            n, k = layer.shape
            return f"{self.name} needs N and K to be multiples of block_size {self.block}, this one is {n}x{k}"
        return refusal

    @classmethod
    def from_legacy_scale(cls, weight: TensorSpec, scale: TensorSpec) -> LegacyLayer | None:
        # Scaled INT8 files with one scale per square b x b tile.
        if weight.dtype != torch.int8 or len(scale.shape) != 2 or len(weight.shape) != 2:
            return None
        (rows, cols), (tile_rows, tile_cols) = weight.shape, scale.shape
        if rows % tile_rows or cols % tile_cols or rows // tile_rows != cols // tile_cols:
            return None
        return LegacyLayer(tuple(scale.shape), {"group_size": rows // tile_rows})

    def stored_specs(self, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        n, k = shape
        return {
            "weight": TensorSpec(torch.int8, (n, k)),
            "weight_scale": TensorSpec(torch.float32, (n // self.block, k // self.block)),
        }

    @classmethod
    def from_layer_config(cls, config: Mapping[str, Any], stored: Mapping[str, TensorSpec]) -> Format:
        return cls(block_size=config.get("group_size", 128))

    def layer_config(self, shape: tuple[int, ...]) -> dict[str, Any]:
        return {"format": self.name, "group_size": self.block}

    @classmethod
    def config_from_tensors(cls, stored: Mapping[str, TensorSpec]) -> dict[str, Any]:
        return {"format": cls.name, "group_size": stored["weight"].shape[0] // stored["weight_scale"].shape[0]}

    def _block_rows(self, weight: torch.Tensor):
        """(start, stop, float32 rows) over chunks of whole tile rows."""
        step = max(1, CHUNK_ELEMENTS // (weight.shape[1] * self.block)) * self.block
        for start in range(0, weight.shape[0], step):
            rows = weight[start : start + step].to(torch.float32, copy=True)
            yield start, start + rows.shape[0], rows

    def _tile_scales(self, rows: torch.Tensor) -> torch.Tensor:
        r, k = rows.shape
        scales = group_scales(tiles(rows, self.block), QMAX, self.opts["clip_search"] is not False)
        return scales.reshape(r // self.block, k // self.block)

    def compute_scales(self, weight: torch.Tensor) -> Tensors:
        n, k = weight.shape
        scale = torch.empty(n // self.block, k // self.block, dtype=torch.float32, device=weight.device)
        for start, stop, rows in self._block_rows(weight):
            scale[start // self.block : stop // self.block] = self._tile_scales(rows)
        return {"weight_scale": scale}

    def _expand(self, scale: torch.Tensor, rows: slice, cols: slice, k: int) -> torch.Tensor:
        """Per-element scales for ``rows`` x ``cols`` of the weight, from the tile scales."""
        row_idx = torch.arange(rows.start, rows.stop, device=scale.device) // self.block
        col_idx = torch.arange(k, device=scale.device)[cols] // self.block
        return scale[row_idx][:, col_idx]

    def to_grid(self, weight: torch.Tensor, scales: Tensors, cols: slice = slice(None)) -> torch.Tensor:
        scale = scales["weight_scale"].float()
        k = scale.shape[1] * self.block
        expanded = self._expand(scale, slice(0, weight.shape[0]), cols, k)
        return round_to_codes(weight.float(), expanded, QMAX).mul_(expanded)

    def grid_neighbours(
        self, weight: torch.Tensor, scales: Tensors, cols: slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scale = scales["weight_scale"].float()
        expanded = self._expand(scale, slice(0, weight.shape[0]), cols, scale.shape[1] * self.block)
        scaled = div(weight.float(), expanded)
        below = torch.floor(scaled).clamp_(-QMAX, QMAX).mul_(expanded)
        above = torch.ceil(scaled).clamp_(-QMAX, QMAX).mul_(expanded)
        return below, above

    def pack(self, weight_on_grid: torch.Tensor, scales: Tensors) -> Tensors:
        return self.encode(weight_on_grid, scales)

    def encode(self, weight: torch.Tensor, scales: Tensors | None = None) -> Tensors:
        n, k = weight.shape
        scale = None if scales is None else scales["weight_scale"].to(weight.device, torch.float32)
        out_scale = scale if scale is not None else \
            torch.empty(n // self.block, k // self.block, dtype=torch.float32, device=weight.device)
        codes = torch.empty(n, k, dtype=torch.int8, device=weight.device)
        for start, stop, rows in self._block_rows(weight):
            tile_rows = slice(start // self.block, stop // self.block)
            if scale is None:
                out_scale[tile_rows] = self._tile_scales(rows)
            per_tile = out_scale[tile_rows].reshape(-1, 1)
            flat = round_to_codes(tiles(rows, self.block), per_tile, QMAX)
            codes[start:stop] = untile(flat, stop - start, k, self.block).to(torch.int8)
        return {"weight": codes, "weight_scale": out_scale.contiguous()}

    def decode(self, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int] | None = None) -> torch.Tensor:
        return self.decode_rows(tensors, 0, tensors["weight"].shape[0])

    def decode_rows(
        self, tensors: Mapping[str, torch.Tensor], start: int, stop: int, shape: tuple[int, int] | None = None
    ) -> torch.Tensor:
        codes = tensors["weight"][start:stop].float()
        scale = tensors["weight_scale"].float()
        return codes.mul_(self._expand(scale, slice(start, stop), slice(None), codes.shape[1]))
