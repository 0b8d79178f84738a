"""Symmetric integer scales: absmax, and the optional clipping search.

Every function here sees "groups": a 2-D float32 tensor whose rows each share
one scale (a weight row, a flattened tile, or a chunk of the whole tensor).
"""

from __future__ import annotations

import torch

#: Clip ratios tried by the search, as fractions of the group's absmax. Heavy
#: tails (Student-t) want 0.3-0.6 at 8 bits; 4-bit rows want about 0.6-0.8.
CLIP_RATIOS = tuple(round(1.0 - 0.02 * i, 2) for i in range(36))  # 1.00 down to 0.30


def scale_from_amax(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """``amax / qmax``; an all-zero group gets 1.0 (its codes are 0 whatever the scale)."""
    amax = amax.float()
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def round_to_codes(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Nearest symmetric codes in [-qmax, qmax], as float32 (same shape as ``x``)."""
    return torch.round(x / scale).clamp_(-qmax, qmax)


def clip_errors(groups: torch.Tensor, amax: torch.Tensor, qmax: int, ratios=CLIP_RATIOS) -> torch.Tensor:
    """Squared error of each group (rows of ``groups``) for each clip ratio: (groups, ratios)."""
    errors = torch.empty(groups.shape[0], len(ratios), dtype=torch.float64)
    for i, ratio in enumerate(ratios):
        scale = scale_from_amax(amax * ratio, qmax)
        err = round_to_codes(groups, scale, qmax).mul_(scale).sub_(groups)
        errors[:, i] = err.square_().sum(dim=1, dtype=torch.float64)
    return errors


def group_scales(groups: torch.Tensor, qmax: int, clip_search: bool) -> torch.Tensor:
    """One scale per row of ``groups``, shape (rows, 1): absmax, or the best clip ratio."""
    amax = groups.abs().amax(dim=1, keepdim=True)
    if not clip_search:
        return scale_from_amax(amax, qmax)
    best = clip_errors(groups, amax, qmax).argmin(dim=1)
    ratios = torch.tensor(CLIP_RATIOS, dtype=torch.float32)[best].unsqueeze(1)
    return scale_from_amax(amax * ratios, qmax)


def tensor_scale(chunks, qmax: int, clip_search: bool) -> torch.Tensor:
    """One scale for a whole tensor given as an iterable factory of float32 row chunks.

    ``chunks`` is called once for the absmax and, with the search, once more
    to total the error of every ratio, so memory stays at one chunk.
    """
    amax = torch.zeros((), dtype=torch.float32)
    for chunk in chunks():
        amax = torch.maximum(amax, chunk.abs().amax())
    if not clip_search:
        return scale_from_amax(amax, qmax)
    total = torch.zeros(len(CLIP_RATIOS), dtype=torch.float64)
    for chunk in chunks():
        total += clip_errors(chunk.reshape(1, -1), amax.reshape(1, 1), qmax)[0]
    return scale_from_amax(amax * CLIP_RATIOS[int(total.argmin())], qmax)
