"""FP8 codes to float32, exactly and fast.

On CPU, torch's FP8 -> float32 cast runs near 280 Mparam/s on one core; a
gather from a 256-entry table of every code's value is about six times
faster and bit-identical (NaN codes stay NaN). Decoding is on the hot path:
every quantized layer is decoded once to measure its error.
"""

from __future__ import annotations

import torch

_TABLES: dict[torch.dtype, torch.Tensor] = {}


def _table(dtype: torch.dtype) -> torch.Tensor:
    table = _TABLES.get(dtype)
    if table is None:
        table = torch.arange(256, dtype=torch.uint8).view(dtype).float()
        _TABLES[dtype] = table
    return table


def codes_to_float(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of FP8 ``codes`` (any shape), as ``codes.float()`` gives them."""
    if codes.device.type != "cpu":
        return codes.float()
    flat = codes.reshape(-1).view(torch.uint8).to(torch.int32)
    return torch.index_select(_table(codes.dtype), 0, flat).reshape(codes.shape)
