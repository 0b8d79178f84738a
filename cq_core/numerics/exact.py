"""Arithmetic that gives the same bits on the CPU and on CUDA.

``--device cuda`` must write the same bytes as the CPU for round-to-nearest.
Element-wise IEEE operations (+, -, *, /, sqrt, comparisons, rounding, casts)
agree bit for bit between the two, with two traps that formats avoid through
this module:

- **Division by a CPU scalar.** CUDA divides by a Python number or a 0-dim CPU
  tensor by multiplying with its reciprocal, which differs from the true
  quotient in the last bit for about a third of all values (``x / 6``); the
  CPU divides. :func:`div` always divides, on either device.
- **Reductions.** ``sum`` and ``norm`` add in an order of each device's own,
  so where a sum decides a stored value (a scale search comparing errors) the
  last bit can flip the choice. :func:`sum_last` (and :func:`sum_first`) add in one fixed order.
  ``amax`` needs nothing: a maximum does not depend on the order.

Matrix products also add in a device-specific order. Where an encoding goes
through one, it must make the sum exact instead: ConvRot's rotation
(``cq_int8.hadamard``) multiplies in float64, where its sums of exact
products are exact, and rounds once.
"""

from __future__ import annotations

import torch


def _divisor_for(x: torch.Tensor, divisor: torch.Tensor | float) -> torch.Tensor | float:
    if x.device.type == "cpu":
        return divisor
    if isinstance(divisor, torch.Tensor):
        return divisor.to(x.device)
    return torch.tensor(divisor, dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)


def div(x: torch.Tensor, divisor: torch.Tensor | float) -> torch.Tensor:
    """``x / divisor``, correctly rounded on every device (a Python number or a tensor on any device)."""
    return x / _divisor_for(x, divisor)


def div_(x: torch.Tensor, divisor: torch.Tensor | float) -> torch.Tensor:
    """In-place :func:`div`."""
    return x.div_(_divisor_for(x, divisor))


def sum_last(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension in one fixed order (same bits on every device):
    neighbours pairwise, ``(x0 + x1) + (x2 + x3)`` and so on, an odd last one carried
    to the next round. (Neighbour pairs: a third faster on the CPU than halves.)"""
    while x.shape[-1] > 1:
        even = x.shape[-1] - x.shape[-1] % 2
        paired = x[..., 0:even:2] + x[..., 1:even:2]
        x = torch.cat((paired, x[..., even:]), dim=-1) if x.shape[-1] % 2 else paired
    return x[..., 0] if x.shape[-1] else x.sum(-1)


def sum_first(x: torch.Tensor) -> torch.Tensor:
    """Sum over the first dimension in :func:`sum_last`'s order: ``sum_first(x)`` has the bits of
    ``sum_last(x.movedim(0, -1))``. For data laid out element-major, ``(16, blocks)`` say, each
    round adds whole contiguous rows, which vectorizes better than pairs along the last axis."""
    while x.shape[0] > 1:
        even = x.shape[0] - x.shape[0] % 2
        paired = x[0:even:2] + x[1:even:2]
        x = torch.cat((paired, x[even:]), dim=0) if x.shape[0] % 2 else paired
    return x[0] if x.shape[0] else x.sum(0)
