"""ConvRot's rotation: a normalized regular Hadamard matrix applied group-wise along K.

The matrix of size ``G = 4**s`` is the s-fold Kronecker power of
``H4 = [[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]]`` divided by ``sqrt(G)``.
H4 is symmetric and ``H4 @ H4 = 4 I``, so the normalized matrix is symmetric
and orthogonal: it is its own inverse. ComfyUI stores ``W @ H.T`` per group of
G input columns and multiplies activations by ``H`` at run time, so
``(x H)(W H)^T = x W^T``; decoding applies the same matrix once more.

A dense (G, G) matmul per group is used: on CPU, BLAS beats a butterfly
(O(G log G)) implementation written with tensor ops by 4-10x at these sizes.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from cq_core.errors import UsageError

#: The group sizes ComfyUI's kernels are built for.
GROUP_SIZES = (16, 64, 256, 1024)

_H4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))


def check_group_size(group_size: int) -> None:
    if group_size < 4 or 4 ** round(math.log(group_size, 4)) != group_size:
        raise UsageError(f"ConvRot group size must be a power of 4 (16, 64, 256, 1024), not {group_size}.")


def regular_hadamard(group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense normalized matrix, built in float64 and rounded once."""
    return _hadamard64(group_size).to(dtype)


@lru_cache(maxsize=None)
def _hadamard64(group_size: int) -> torch.Tensor:
    check_group_size(group_size)
    h4 = torch.tensor(_H4, dtype=torch.float64)
    h = h4
    while h.shape[0] < group_size:
        h = torch.kron(h, h4)
    return h / math.sqrt(group_size)


@lru_cache(maxsize=None)
def _hadamard32(group_size: int) -> torch.Tensor:
    return _hadamard64(group_size).to(torch.float32)


def rotate_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x`` (rows, K) times H per group of ``group_size`` columns, as a new float32 tensor.

    Since H is symmetric and orthogonal, the same call rotates and un-rotates.
    """
    rows, k = x.shape
    if k % group_size:
        raise ValueError(f"{k} columns are not a multiple of the rotation group {group_size}")
    h = _hadamard32(group_size).to(x.device)
    grouped = x.to(torch.float32).reshape(rows, k // group_size, group_size)
    return torch.matmul(grouped, h).reshape(rows, k)


def fitting_group_size(k: int, wanted: int) -> int | None:
    """The largest ConvRot group size not above ``wanted`` that divides ``k``, else None."""
    for size in sorted(GROUP_SIZES, reverse=True):
        if size <= wanted and k % size == 0:
            return size
    return None
