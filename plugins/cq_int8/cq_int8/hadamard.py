"""ConvRot's rotation: a normalized regular Hadamard matrix applied group-wise along K.

The matrix of size ``G = 4**s`` is the s-fold Kronecker power of
``H4 = [[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]]`` divided by ``sqrt(G)``.
H4 is symmetric and ``H4 @ H4 = 4 I``, so the normalized matrix is symmetric
and orthogonal: it is its own inverse. ComfyUI stores ``W @ H.T`` per group of
G input columns and multiplies activations by ``H`` at run time, so
``(x H)(W H)^T = x W^T``; decoding applies the same matrix once more.

A dense (G, G) matmul per group is used: on CPU, BLAS beats a butterfly
(O(G log G)) implementation written with tensor ops by 4-10x at these sizes.
Into the rotated basis (encoding) it runs in float64 and rounds once to
float32 (:func:`rotate_groups`). The entries of H are ±2**-s
exactly, so each product is exact and so, nearly always, is the float64 sum
of G of them (unless one group's values span more than about 2**22): the
result is then the correctly rounded rotation whatever order the matmul adds
in, the same bits on the CPU and on CUDA (a float32 matmul differs between
them in the last bit, which can move a row's scale). The cost on this
project's 2-core CPU, ``convrot_w4a4`` encoding plus measurement of a
3072x12288 layer: 194 -> 143 Mparam/s.
Back out of it (decoding, :func:`unrotate_groups`) it runs in float32, the
arithmetic of ComfyUI's own decode, whose result cq measures.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from cq_core import UsageError

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
    h4 = torch.tensor(_H4, dtype=torch.float64, device="cpu")  # cached: never on a default device
    h = h4
    while h.shape[0] < group_size:
        h = torch.kron(h, h4)
    return h / math.sqrt(group_size)


def rotate_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x`` (rows, K) times H per group of ``group_size`` columns, as a new float32 tensor,
    computed in float64 and rounded once (the same bits on every device; see above)."""
    return _times_h(x, group_size, torch.float64)


def unrotate_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """The inverse of :func:`rotate_groups` (H is symmetric and orthogonal: the same
    product), in float32 as ComfyUI decodes."""
    return _times_h(x, group_size, torch.float32)


def _times_h(x: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    rows, k = x.shape
    if k % group_size:
        raise ValueError(f"{k} columns are not a multiple of the rotation group {group_size}")
    h = _hadamard(group_size, dtype).to(x.device)
    grouped = x.to(dtype).reshape(rows, k // group_size, group_size)
    return torch.matmul(grouped, h).reshape(rows, k).to(torch.float32)


@lru_cache(maxsize=None)
def _hadamard(group_size: int, dtype: torch.dtype) -> torch.Tensor:
    return _hadamard64(group_size).to(dtype)


def fitting_group_size(k: int, wanted: int) -> int | None:
    """The largest ConvRot group size not above ``wanted`` that divides ``k``, else None."""
    for size in sorted(GROUP_SIZES, reverse=True):
        if size <= wanted and k % size == 0:
            return size
    return None
