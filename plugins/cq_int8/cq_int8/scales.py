"""Symmetric integer scales: absmax, and the clipping search, exact over its candidates.

Every function here sees "groups": a 2-D float32 tensor whose rows each share
one scale (a weight row, a flattened tile, or a chunk of the whole tensor).

**What the clipping search finds.** Per group, of the scales
``scale_from_amax(absmax * 2**(-j / 64))``, ``j = 0, 1, 2, ...`` (clip ratios 1.1 % apart at
8 bits, 2**(-j / 32), 2.2 % apart, at 4; from absmax down to 1/16 of it), the one whose squared error ``sum (x - s * clamp(round(x / s), ±qmax))²``
(float32, added in one fixed order) is least; of equal errors the larger
scale (so absmax stays where clipping does not pay). It is exact over those candidates: it
skips only candidates that cannot win, for two reasons.

1. *Larger scales than absmax never win*: at twice a scale that clips nothing, every code
   halves and doubled lies again on the grid (or beyond ``qmax``, farther than ``qmax``
   itself), so no element gets closer.
2. *As the ratio falls, the clipped elements' own terms grow*: ``(|x| - qmax s)²`` for every
   ``|x| > qmax s``; the sum of those of the group's largest elements (``CLIP_TERMS``, or a
   32nd of the group at 8 bits, an 8th at 4 bits, if more) bounds
   its error from below, and once that bound reaches the best error found, that ratio and
   all smaller ones lose.

Steps twice as fine change SQNR by about 0.01 dB or less (measured in ``docs/scales.md``);
the float32 scale itself is continuous, so "exact" is over these steps.
"""

from __future__ import annotations

import torch

from cq_core.numerics.exact import div, sum_last

#: Candidate clip ratios: 2**(-j / steps) of absmax, j from 0, with 32 steps per octave at
#: 4 bits and 64 at 8 (:func:`steps_per_octave`).
STEPS_PER_OCTAVE = 32
#: Octaves below absmax searched at most (down to 1/16: heavy tails at 8 bits want about 0.15).
OCTAVES = 4
#: The largest elements of a group whose clipped terms bound the error of a smaller scale.
CLIP_TERMS = 64
#: The smallest positive float32 (a denormal).
SMALLEST_SCALE = float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23
#: Relative slack of the bound against float32's rounding of the sums it is compared with
#: (at most about 13 roundings of 2**-24 for groups up to 8192 wide; wider ones more, still far below).
_BOUND_SLACK = 2.0**-12


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


#: Adding and subtracting 1.5 * 2**23 rounds a float32 of magnitude below 2**22 to an
#: integer, half to even: torch.round's result (up to the sign of a zero), in two fast passes.
_ROUNDING = 1.5 * 2.0**23


def round_to_codes(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Nearest symmetric codes in [-qmax, qmax], as float32 (same shape as ``x``)."""
    return torch.round(div(x, scale)).clamp_(-qmax, qmax)


def _codes_of(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """:func:`round_to_codes` for ``|x / scale| < 2**22`` (every clip candidate: the scale is
    at least 1/16 of absmax / qmax), faster; the same codes, +0 for -0."""
    return div(x, scale).clamp_(-qmax - 1, qmax + 1).add_(_ROUNDING).sub_(_ROUNDING).clamp_(-qmax, qmax)


def steps_per_octave(qmax: int) -> int:
    """Candidate ratios per octave: 64 (1.1 % apart) on an 8-bit grid, whose search stops
    within a few percent of absmax, 32 (2.2 %) on a 4-bit one, whose best clips 30-40 %."""
    return STEPS_PER_OCTAVE if qmax < 16 else 2 * STEPS_PER_OCTAVE


def clip_ratio(step: int, qmax: int = 7) -> float:
    """The clip ratio of candidate ``step``: ``2**(-step / steps_per_octave(qmax))``."""
    return 2.0 ** (-step / steps_per_octave(qmax))


def group_errors(groups: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """float32 (rows,): each group's squared error under its scale (rows, 1), the terms
    ``(s * code - x)²`` added in :func:`~cq_core.numerics.exact.sum_last`'s order (fixed, so the
    same on every device; its rounding, about 1e-6 relative, decides only near-ties)."""
    error = _codes_of(groups, scale, qmax).mul_(scale).sub_(groups)
    return sum_last(error.square_())


class _GroupErrors:
    """:func:`group_errors` of one set of groups at many scales, in reused buffers (fresh
    buffers of a chunk's size cost page faults that outweigh the arithmetic). Same bits."""

    def __init__(self, groups: torch.Tensor) -> None:
        self.groups = groups
        rows, k = groups.shape
        self.work = torch.empty_like(groups)
        self.levels = []
        while k > 1:
            k = (k + 1) // 2
            self.levels.append(torch.empty((rows, k), dtype=torch.float32, device=groups.device))

    def __call__(self, scale: torch.Tensor, qmax: int) -> torch.Tensor:
        work = torch.div(self.groups, scale, out=self.work)  # CPU and CUDA divide exactly by a tensor
        work.clamp_(-qmax - 1, qmax + 1).add_(_ROUNDING).sub_(_ROUNDING).clamp_(-qmax, qmax)
        x = work.mul_(scale).sub_(self.groups).square_()
        for level in self.levels:  # sum_last's order: neighbours pairwise, an odd last one carried
            n = x.shape[1]
            even = n - n % 2
            torch.add(x[:, 0:even:2], x[:, 1:even:2], out=level[:, : even // 2])
            if n % 2:
                level[:, -1] = x[:, -1]
            x = level
        return x[:, 0].clone()


def _clipped(top: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """float32 (rows,): the clipped terms of the largest magnitudes ``top`` (rows, m) under
    ``scale``, computed as :func:`group_errors` computes those terms, added in float64 and
    shrunk by far more than float32's rounding of that error's sum: a lower bound of it."""
    limit = scale * float(qmax)
    excess = torch.where(top > limit, top - limit, 0.0)
    return excess.square_().double().sum(dim=1).mul_(1.0 - _BOUND_SLACK).float()


def exact_clip_scales(groups: torch.Tensor, qmax: int) -> torch.Tensor:
    """One scale per row of ``groups`` (float32 (rows, K)), (rows, 1): the clipping search of
    this module's docstring."""
    magnitudes = groups.abs()
    amax = magnitudes.amax(dim=1, keepdim=True)
    best_scale = scale_from_amax(amax, qmax)
    best = group_errors(groups, best_scale, qmax)
    # 4-bit grids clip a few percent of a group at their best: more terms to bound with
    terms = max(CLIP_TERMS, groups.shape[1] // (8 if qmax < 16 else 32))
    top = magnitudes.topk(min(terms, groups.shape[1]), dim=1).values
    rows = groups.shape[0]
    index = torch.arange(rows, device=groups.device)
    errors_of = _GroupErrors(groups)  # of the rows of index, gathered again when half have stopped
    for step in range(1, OCTAVES * steps_per_octave(qmax) + 1):
        scale = scale_from_amax(amax[index] * clip_ratio(step, qmax), qmax)
        open_ = _clipped(top[index], scale, qmax) < best[index]
        if not bool(open_.any()):
            break
        if 2 * int(open_.sum()) <= index.numel():
            index, scale = index[open_], scale[open_]
            errors_of = _GroupErrors(errors_of.groups[open_])
            open_ = None
        error = errors_of(scale, qmax)
        better = error < best[index]  # of equal errors the larger scale stays
        if open_ is not None:
            better &= open_
        best[index] = torch.where(better, error, best[index])
        best_scale[index] = torch.where(better.unsqueeze(1), scale, best_scale[index])
    return best_scale


def group_scales(groups: torch.Tensor, qmax: int, clip_search: bool) -> torch.Tensor:
    """One scale per row of ``groups``, shape (rows, 1): absmax, or the clipping search's
    (:func:`exact_clip_scales`; never worse than absmax, which it tries first)."""
    if not clip_search:
        return scale_from_amax(groups.abs().amax(dim=1, keepdim=True), qmax)
    return exact_clip_scales(groups, qmax)


def tensor_scale(chunks, qmax: int, clip_search: bool) -> torch.Tensor:
    """One scale for a whole tensor given as a factory of float32 row-chunk iterators.

    ``chunks`` is called once for the absmax (and the largest magnitudes) and, with the
    search, once more per candidate ratio the bound leaves open, so memory stays at one
    chunk. The search is :func:`exact_clip_scales`' for one group: the chunks' float64
    errors add in chunk order.
    """
    amax, top = None, None
    for chunk in chunks():
        flat = chunk.abs().reshape(1, -1)
        chunk_amax = flat.amax()
        amax = chunk_amax if amax is None else torch.maximum(amax, chunk_amax)
        if clip_search:
            merged = flat if top is None else torch.cat((top, flat), dim=1)
            top = merged.topk(min(CLIP_TERMS, merged.shape[1]), dim=1).values
    if amax is None:  # no rows
        amax = torch.zeros((), dtype=torch.float32, device="cpu")
    best_scale = scale_from_amax(amax, qmax).reshape(1, 1)
    if not clip_search or top is None:
        return best_scale.reshape(())

    def total_error(scale: torch.Tensor) -> float:
        return sum(float(group_errors(chunk.reshape(1, -1), scale, qmax)[0]) for chunk in chunks())

    best = total_error(best_scale)
    for step in range(1, OCTAVES * steps_per_octave(qmax) + 1):
        scale = scale_from_amax(amax.reshape(1, 1) * clip_ratio(step, qmax), qmax)
        if float(_clipped(top, scale, qmax)[0]) >= best:
            break
        error = total_error(scale)
        if error < best:
            best, best_scale = error, scale
    return best_scale.reshape(())
