"""Symmetric integer scales: absmax, and the optional clipping search.

Every function here sees "groups": a 2-D float32 tensor whose rows each share
one scale (a weight row, a flattened tile, or a chunk of the whole tensor).
"""

from __future__ import annotations

import torch

from cq_core.numerics.exact import div

#: The search is coarse to fine: ratios of absmax 10% apart from 1.0 down to
#: 0.11, then 2% steps around each group's best. Heavy tails at 8 bits want
#: small ratios (a whole Student-t tensor about 0.15), 4-bit rows about 0.6-0.8.
COARSE_RATIOS = tuple(0.9**i for i in range(22))
#: The smallest positive float32 (a denormal).
SMALLEST_SCALE = float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23
FINE_STEPS = tuple(0.9 ** (j / 5) for j in (-4, -3, -2, -1, 1, 2, 3, 4))


def scale_from_amax(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """``amax / qmax``; an all-zero group gets 1.0 (its codes are 0 whatever the scale).

    Near FLT_MAX the quotient may round up so that ``qmax * scale`` (the decode of
    the top code) overflows to Inf: such a scale steps one ulp down, and the top
    code clamps to ``qmax``, which then decodes just below ``amax``.
    """
    amax = amax.float()
    # A denormal amax may divide to 0, which would decode to 0 and code 0/0 = NaN: keep the smallest scale.
    scale = torch.where(amax > 0, div(amax, qmax).clamp_(min=SMALLEST_SCALE), torch.ones_like(amax))
    overflows = torch.isinf(scale * qmax) & torch.isfinite(scale)
    return torch.where(overflows, torch.nextafter(scale, torch.zeros_like(scale)), scale)


def round_to_codes(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Nearest symmetric codes in [-qmax, qmax], as float32 (same shape as ``x``)."""
    return torch.round(div(x, scale)).clamp_(-qmax, qmax)


def clip_errors(groups: torch.Tensor, amax: torch.Tensor, qmax: int, ratios: torch.Tensor) -> torch.Tensor:
    """Squared error of each group (rows of ``groups``) for each clip ratio.

    ``ratios`` is (R,) for ratios shared by all groups or (groups, R) for each
    its own; returns float64 (groups, R).
    """
    ratios = ratios.expand(groups.shape[0], -1) if ratios.dim() == 1 else ratios
    errors = torch.empty(ratios.shape, dtype=torch.float64, device=groups.device)
    for i in range(ratios.shape[1]):
        scale = scale_from_amax(amax * ratios[:, i : i + 1], qmax)
        err = round_to_codes(groups, scale, qmax).mul_(scale).sub_(groups)
        errors[:, i] = err.square_().sum(dim=1, dtype=torch.float64)
    return errors


def _refine(best: torch.Tensor) -> torch.Tensor:
    """Fine candidates around each best coarse ratio (groups, 1): (groups, 1 + steps), at most 1.0."""
    steps = torch.tensor(FINE_STEPS, dtype=torch.float32, device=best.device)
    return torch.cat((best, (best * steps).clamp_(max=1.0)), dim=1)


def _pick(candidates: torch.Tensor, errors: torch.Tensor) -> torch.Tensor:
    return candidates.gather(1, errors.argmin(dim=1, keepdim=True))


def group_scales(groups: torch.Tensor, qmax: int, clip_search: bool) -> torch.Tensor:
    """One scale per row of ``groups``, shape (rows, 1): absmax, or the best clip ratio.

    The search tries ratio 1.0 (plain absmax), so it is never worse than absmax.
    """
    amax = groups.abs().amax(dim=1, keepdim=True)
    if not clip_search:
        return scale_from_amax(amax, qmax)
    coarse = torch.tensor(COARSE_RATIOS, dtype=torch.float32, device=groups.device)
    best = _pick(coarse.expand(groups.shape[0], -1), clip_errors(groups, amax, qmax, coarse))
    fine = _refine(best)
    return scale_from_amax(amax * _pick(fine, clip_errors(groups, amax, qmax, fine)), qmax)


def tensor_scale(chunks, qmax: int, clip_search: bool) -> torch.Tensor:
    """One scale for a whole tensor given as a factory of float32 row-chunk iterators.

    ``chunks`` is called once for the absmax and, with the search, twice more
    to total the error of each ratio, so memory stays at one chunk.
    """
    amax = None
    for chunk in chunks():
        chunk_amax = chunk.abs().amax()
        amax = chunk_amax if amax is None else torch.maximum(amax, chunk_amax)
    if amax is None:  # no rows
        amax = torch.zeros((), dtype=torch.float32, device="cpu")
    if not clip_search:
        return scale_from_amax(amax, qmax)
    amax = amax.reshape(1, 1)

    def total_error(ratios: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(1, ratios.shape[-1], dtype=torch.float64, device=amax.device)
        for chunk in chunks():
            total += clip_errors(chunk.reshape(1, -1), amax, qmax, ratios)
        return total

    coarse = torch.tensor(COARSE_RATIOS, dtype=torch.float32, device=amax.device).reshape(1, -1)
    fine = _refine(_pick(coarse, total_error(coarse)))
    return scale_from_amax(amax * _pick(fine, total_error(fine)), qmax).reshape(())
