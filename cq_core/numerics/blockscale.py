"""Helpers shared by block-scaled formats (one scale per run of elements along K).

Tensor-core formats such as NVFP4 and MXFP8 store their block-scale matrix in
the cuBLAS "to_blocked" layout: the (rows, cols) matrix is padded to multiples
of (128, 4) and each 128x4 tile is rearranged so that row ``r`` of the tile
becomes entry ``(r % 32) * 16 + (r // 32) * 4 + c`` of a 512-byte run. These
helpers know nothing about any one format, so every block-scaled plugin can
use them without depending on another plugin.
"""

from __future__ import annotations

import torch

Tensors = dict[str, torch.Tensor]

#: The swizzle works on tiles of this many rows and columns of the scale matrix.
TILE_ROWS, TILE_COLS = 128, 4


def roundup(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple


def swizzled_shape(rows: int, cols: int) -> tuple[int, int]:
    """Shape of the stored (swizzled) scale matrix for a (rows, cols) block-scale matrix."""
    return roundup(rows, TILE_ROWS), roundup(cols, TILE_COLS)


def swizzle(scales: torch.Tensor) -> torch.Tensor:
    """(rows, cols) block scales -> the cuBLAS tiled layout, zero-padded to ``swizzled_shape``."""
    rows, cols = scales.shape
    padded_rows, padded_cols = swizzled_shape(rows, cols)
    padded = scales.new_zeros((padded_rows, padded_cols))
    padded[:rows, :cols] = scales
    tiles = padded.view(padded_rows // TILE_ROWS, TILE_ROWS, padded_cols // TILE_COLS, TILE_COLS)
    tiles = tiles.permute(0, 2, 1, 3).reshape(-1, 4, 32, TILE_COLS).transpose(1, 2)
    return tiles.reshape(padded_rows, padded_cols).contiguous()


def unswizzle(stored: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`swizzle`: the (rows, cols) block scales from the stored layout."""
    return unswizzle_rows(stored, rows, cols, 0, rows)


def unswizzle_rows(stored: torch.Tensor, rows: int, cols: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of :func:`unswizzle`, rearranging only the 128-row tiles they touch.

    Each band of 128 scale rows is stored contiguously (128 stored rows), so a
    chunk-by-chunk decode costs one pass over the scales in all instead of one
    per chunk.
    """
    padded_rows, padded_cols = swizzled_shape(rows, cols)
    if tuple(stored.shape) != (padded_rows, padded_cols):
        raise ValueError(
            f"a swizzled scale matrix for ({rows}, {cols}) blocks has shape "
            f"({padded_rows}, {padded_cols}), not {tuple(stored.shape)}"
        )
    stop = min(stop, rows)
    first = start // TILE_ROWS * TILE_ROWS
    last = max(first, roundup(stop, TILE_ROWS))
    band = stored[first:last]
    tiles = band.reshape(-1, 32, 4, TILE_COLS).transpose(1, 2)
    tiles = tiles.reshape((last - first) // TILE_ROWS, padded_cols // TILE_COLS, TILE_ROWS, TILE_COLS)
    unswizzled = tiles.permute(0, 2, 1, 3).reshape(last - first, padded_cols)
    return unswizzled[start - first : stop - first, :cols].contiguous()


def pad_2d(weight: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``weight`` zero-padded at the bottom and right to (rows, cols); itself when no padding is needed."""
    n, k = weight.shape
    if (n, k) == (rows, cols):
        return weight
    return torch.nn.functional.pad(weight, (0, cols - k, 0, rows - n))


def blocks_along_k(weight: torch.Tensor, block: int) -> torch.Tensor:
    """View an (n, k) weight as (n, ceil(k / block), block), zero-padding the last block."""
    n, k = weight.shape
    return pad_2d(weight, n, roundup(k, block)).reshape(n, -1, block)


def block_amax(weight: torch.Tensor, block: int) -> torch.Tensor:
    """Largest magnitude of each run of ``block`` elements along K: shape (n, ceil(k / block))."""
    return blocks_along_k(weight, block).abs().amax(dim=-1)


def blocks_at(weight: torch.Tensor, index: torch.Tensor, block: int) -> torch.Tensor:
    """The (m, block) float32 blocks of an (N, K) weight at flat block indices ``index`` (m,)
    (row * blocks per row + block along K, as :func:`blocks_along_k` numbers them), zero past K."""
    n, k = weight.shape
    per_row = roundup(k, block) // block
    columns = (index % per_row).unsqueeze(1) * block + torch.arange(block, device=index.device)
    inside = columns < k
    flat = (index // per_row).unsqueeze(1) * k + columns.clamp(max=k - 1)
    return torch.where(inside, weight.reshape(-1)[flat].float(), 0.0)


def scales_per_column(block_scales: torch.Tensor, block: int, cols: slice, width: int) -> torch.Tensor:
    """The block scale that applies to each of ``width`` columns starting at ``cols.start``.

    Optimizers round a slice of columns at a time; block scales index by the
    column's position in the full weight, so the slice's start matters.
    """
    start = cols.start or 0
    if cols.step not in (None, 1) or start < 0:
        raise ValueError("block-scaled formats round contiguous column slices with a non-negative start")
    index = torch.arange(start, start + width, device=block_scales.device) // block
    return block_scales.index_select(1, index)


class PaddedTensors(dict):
    """Stored tensors of a padded layout that remember the weight's unpadded (N, K).

    A padded layout cannot tell (N, K) from its stored shapes; ComfyUI takes it
    from the model's layer. Formats return this from ``encode``/``pack`` so that
    their ``decode`` hands back exactly (N, K) to optimizers and metrics.
    """

    def __init__(self, tensors: Tensors, shape: tuple[int, int]) -> None:
        super().__init__(tensors)
        self.shape = tuple(shape)


def unpadded_shape(
    tensors: Tensors, shape: tuple[int, int] | None, padded: tuple[int, int]
) -> tuple[int, int]:
    """(N, K) to decode to: the caller's ``shape``, else what :class:`PaddedTensors` remembers, else ``padded``."""
    return tuple(shape or getattr(tensors, "shape", None) or padded)


def stored_rows(
    tensors: Tensors, padded: tuple[int, int], block: int, start: int, stop: int, shape: tuple[int, int] | None
) -> tuple[int, int, torch.Tensor]:
    """For decoding rows ``start:stop`` of a padded, swizzled block-scaled layout:
    ``(stop, k, scales)`` with ``stop`` clipped to the unpadded rows, ``k`` the unpadded
    width and ``scales`` the uint8 block scales of those rows, (stop - start, padded K / block)."""
    n, k = unpadded_shape(tensors, shape, padded)
    stop = min(stop, n)
    scales = unswizzle_rows(tensors["weight_scale"].view(torch.uint8), padded[0], padded[1] // block, start, stop)
    return stop, k, scales
