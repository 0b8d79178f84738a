"""NVFP4 block scales: the amax/6 recipe, and the e4m3 scale of least squared error, found exactly.

A block of 16 elements decodes as ``e2m1 * (g * s)`` with ``g`` the fp32 global scale
(``weight_scale_2``) and ``s`` an FP8 e4m3 block scale. amax/6 maps the block's largest
element onto 6, but its e4m3 rounding and the coarse top of the E2M1 grid (4 -> 6) often
leave the rest of the block badly placed. Two modes choose better:

- ``exact`` (the default): per block, the e4m3 value ``s`` with the least squared error over
  *every* positive finite e4m3 value (:func:`exact_block_scales`; what "optimal" means and
  why the few candidates it evaluates are enough is proved there);
- ``neighbours``: cq 883b9d1's search, the amax/6 value and its two e4m3 neighbours (kept
  to reproduce files written by it; it misses the second optimum near amax/4, see
  :func:`exact_block_scales`).

Every comparison adds in one fixed order (:func:`cq_core.numerics.exact.sum_first`): the
choice, and so the stored bytes, are the same on every run and device.
"""

from __future__ import annotations

import torch

from cq_core.numerics.exact import div, sum_first, sum_last
from cq_nvfp4 import e2m1

BLOCK = 16
E4M3_MAX = 448.0
#: Largest finite e4m3fn code (0x7F is NaN); codes 0..0x7E order like their values.
E4M3_TOP_CODE = 0x7E
#: The e4m3 value of each code 0..0x7E (float32, exact).
E4M3_VALUES = torch.arange(E4M3_TOP_CODE + 1, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
#: Block-scale modes (the nvfp4 option ``scale_search``).
EXACT, NEIGHBOURS, AMAX = "exact", "neighbours", "off"
SCALE_SEARCHES = (EXACT, NEIGHBOURS, AMAX)
#: e4m3 code offsets the ``neighbours`` mode tries besides the amax/6 scale itself.
SEARCH_OFFSETS = (-1, 1)
#: Codes above a block's no-clip code that the exact search evaluates: one octave (see
#: :func:`exact_block_scales`: a scale twice another that does not clip never wins).
OCTAVE = 8
#: The first code whose value is twice that of the code 8 below it (normal e4m3 values from
#: code 8 up; halving a value in 2**-6 .. 2**-5 may fall between two subnormal ones).
_FIRST_DOUBLED_CODE = 16
#: e4m3 code + this, shifted left by 20, is the float32 bit pattern of a normal e4m3 value.
_FLOAT32_FROM_E4M3 = (127 - 7) << 3

#: The smallest positive float32 (a denormal).
SMALLEST_SCALE = float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23
_SMALLEST_NORMAL = float(torch.finfo(torch.float32).smallest_normal)
#: Scales above this have reciprocals too close to float32's subnormals to halve exactly.
_LARGEST_EXACT_HALVING = 2.0**124
#: Relative slack of the clipping bound, far above float32's rounding of the error sums
#: (about 20 roundings of 2**-24 each), see :func:`exact_block_scales`.
_BOUND_SLACK = 2.0**-16


def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """fp32 ``weight_scale_2``: maps the tensor's largest element to 6 at block scale 448."""
    amax = amax.float()
    if amax <= 0:
        return torch.ones((), device=amax.device)  # all-zero weight: any scale decodes to zero
    # Denormal weights: the quotient may underflow to 0, and block scales amax_b / 6 / 0 would
    # be NaN; the smallest positive float32 keeps every block scale finite.
    return div(amax, E4M3_MAX * e2m1.MAX).clamp_(min=SMALLEST_SCALE).reshape(())


def _e4m3(values: torch.Tensor) -> torch.Tensor:
    return values.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float()


def inverse_scale(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale, with 0 for a zero scale (its block decodes to zero) and no inf for a subnormal one."""
    inverse = torch.where(scale > 0, 1.0 / scale, 0.0)
    return inverse.clamp_(max=torch.finfo(torch.float32).max)


def rounded_blocks(blocks: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blocks / scale, its nearest E2M1 values)`` for (n, nb, 16) blocks and (n, nb) scales.

    ``scale`` is the fp32 product ``g * s`` decoders form; a zero scale gives zeros.
    """
    ratio = blocks * inverse_scale(scale).unsqueeze(-1)
    return ratio, e2m1.nearest(ratio)


def amax_block_scales(blocks: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The plain recipe: ``e4m3(amax_b / 6 / g)`` for (..., 16) blocks, float32 (...)."""
    return _e4m3(div(div(blocks.abs().amax(dim=-1), e2m1.MAX), g))


def choose_block_scales(
    blocks: torch.Tensor, g: torch.Tensor, search: str | bool, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block scales (float32 (n, nb), e4m3 values) for (n, nb, 16) float32 blocks, and the E2M1
    values they give (n, nb, 16).

    ``search`` is one of :data:`SCALE_SEARCHES` (``True``/``False`` mean ``exact``/``off``).
    ``importance`` (16,), optional, non-negative: each column's squared error counts that
    much in the choice (the output-error cost of a column, from calibration statistics).
    """
    search = EXACT if search is True else AMAX if search is False else search
    if search == EXACT:
        best = exact_block_scales(blocks, g, importance)
    elif search == NEIGHBOURS:
        return neighbour_block_scales(blocks, g, importance)
    elif search == AMAX:
        best = amax_block_scales(blocks, g)
    else:
        raise ValueError(f"unknown scale search {search!r}; valid: {', '.join(SCALE_SEARCHES)}")
    return best, rounded_blocks(blocks, g * best)[1]


# -- the exact search ---------------------------------------------------------------------


def block_errors(
    magnitudes: torch.Tensor,
    inverse: torch.Tensor,
    scale: torch.Tensor,
    weights: torch.Tensor | None = None,
    saturates: bool = True,
) -> torch.Tensor:
    """Each block's squared error in units of ``g²``, as the exact search compares it.

    ``magnitudes`` (16, B) float32: the blocks' absolute values, element-major; ``inverse``
    (B,): ``1 / (g * s)`` as :func:`inverse_scale` forms it; ``scale`` (B,): ``s``;
    ``weights`` (16, 1) or None. Returns float32 (B,):
    ``sum_i w_i (r_i - e2m1(r_i))² * s²`` with ``r_i = |x_i| * inverse``, summed in
    :func:`~cq_core.numerics.exact.sum_first`'s order. ``s²`` is exact in float32 (an e4m3
    value has 4 significant bits), so no scale underflows here, however small the weight.
    ``saturates=False`` promises that no ``r_i`` exceeds 6 (the same result, one pass less).
    """
    squares = e2m1.distance_squared_(magnitudes * inverse, saturates)
    if weights is not None:
        squares.mul_(weights)
    return sum_first(squares).mul_(scale.square())


def _code_values(code: torch.Tensor) -> torch.Tensor:
    """float32 value of e4m3 codes 8..0x7E (normal values) given as int32: sign 0, the code's
    4 exponent and 3 mantissa bits shifted into float32's, exponent bias 7 -> 127."""
    return ((code + _FLOAT32_FROM_E4M3) << 20).view(torch.float32)


def _any_code_values(code: torch.Tensor) -> torch.Tensor:
    """float32 value of e4m3 codes 0..0x7E (int32), subnormal ones (1..7: ``code * 2**-9``) too."""
    return torch.where(code < 8, code.float() * 2.0**-9, _code_values(code))


class _BlockErrors:
    """:func:`block_errors` over one chunk's blocks, many times, in reused buffers.

    Fresh buffers of a chunk's size come from ``mmap`` in glibc's allocator, and their page
    faults cost more than the arithmetic (measured: 3-4x per pass); one set per chunk avoids
    it. The arithmetic and its order are :func:`block_errors`', so the bits are the same.
    """

    def __init__(self, magnitudes: torch.Tensor, weights: torch.Tensor | None) -> None:
        self.magnitudes, self.weights = magnitudes, weights
        self.ratio = torch.empty_like(magnitudes)
        self.rounded = torch.empty_like(magnitudes)
        self.magic = torch.empty(magnitudes.shape, dtype=torch.int32, device=magnitudes.device)
        self.sums = [
            torch.empty((rows, magnitudes.shape[1]), dtype=torch.float32, device=magnitudes.device)
            for rows in (BLOCK // 2, BLOCK // 4, BLOCK // 8)
        ]

    def __call__(self, inverse: torch.Tensor, scale: torch.Tensor, saturates: bool = True,
                 index: torch.Tensor | None = None) -> torch.Tensor:
        count = scale.shape[0]
        ratio, rounded, magic = self.ratio[:, :count], self.rounded[:, :count], self.magic[:, :count]
        magnitudes = self.magnitudes if index is None else self.magnitudes.index_select(1, index)
        torch.mul(magnitudes, inverse, out=ratio)
        clamped = torch.clamp(ratio, -e2m1.MAX, e2m1.MAX, out=rounded) if saturates else ratio
        torch.bitwise_and(clamped.view(torch.int32), e2m1.EXPONENT_BITS, out=magic)
        magic.clamp_(min=e2m1.ONE_BITS).add_(e2m1.MAGIC_FROM_EXPONENT)
        torch.add(clamped, magic.view(torch.float32), out=rounded).sub_(magic.view(torch.float32))
        squares = ratio.sub_(rounded).square_()
        if self.weights is not None:
            squares.mul_(self.weights)
        for level in self.sums:  # sum_first's order (BLOCK is a power of two)
            squares = torch.add(squares[0::2], squares[1::2], out=level[:, :count])
        return torch.add(squares[0], squares[1]).mul_(scale.square())


def exact_block_scales(blocks: torch.Tensor, g: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """The e4m3 block scale of least squared error for each (n, nb, 16) block: float32 (n, nb).

    **What "optimal" means.** For block ``x`` and global scale ``g``, the chosen ``s``
    minimizes :func:`block_errors` (the block's squared error ``Σ w_i (x_i - g s q_i)²``,
    ``q_i`` the nearest E2M1 value of ``x_i / (g s)``, computed in float32 in one fixed order)
    over every positive finite e4m3 value, the 126 codes 0x01..0x7E: the same result as
    evaluating all of them (``tests`` in ``plugins/cq_nvfp4/tests`` check it against that brute
    force). Ties go to the candidate evaluated first (the no-clip code, then upwards, then
    downwards). Zero (code 0) is never better: each element's nearest grid point is at least
    as close as 0. An all-zero block gets 0, as in the amax/6 recipe.

    **Why a few candidates are enough.** Let ``c`` be the block's *no-clip code*: the
    smallest code whose scale maps the block's largest magnitude ``a`` to at most 6 (the
    amax/6 code or the next one). Two facts prune the other 125:

    1. *Doubling a scale that does not clip never helps.* If every ``r_i = |x_i| / (g s) <= 6``,
       then at ``2s`` each ratio is ``r_i / 2 <= 3``, its nearest E2M1 value ``q'`` is at
       most 3, and ``2q'`` lies in ``{0, 1, 2, 3, 4, 6}``, a subset of the E2M1 grid: so
       ``|r_i - 2q'| >= |r_i - q_i|`` for every element, and the error at ``2s``,
       ``(r_i - 2q')² / 4 * (2s)²``, is at least the error at ``s``. In float32 too: ``g * 2s``,
       ``1 / (g * 2s)`` and ``r_i / 2`` are exact halvings and doublings, the differences
       are exact (Sterbenz), rounding is monotone. Every code from 16 up has twice the value
       of the code 8 below it (normal e4m3 values), which does not clip when it is ``c`` or
       above: so above ``c`` only ``c + 1 .. c + 7`` need evaluating, and, for a subnormal
       ``c`` (below 8: a block below about 4e-5 of the tensor's largest element), every code up
       to 15.
    2. *Below ``c`` the largest element clips*: ``q = 6`` and its error alone is
       ``w (a - 6 g s)² / g²``, which only grows as ``s`` shrinks. Going down code by code,
       once that bound (with a relative slack of 2**-16 against float32's rounding of the
       sums, which is below 2**-19) reaches the best error found, that code and all below it
       are out.

    In practice the search evaluates the 8 codes ``c .. c + 7`` and one to three below ``c``:
    on Gaussian weights the optimum is the amax/6 code or one below it for about 60 % of the
    blocks and 3 to 5 codes above it (the largest element near 4, not 6) for the other 40 %,
    which is what the ``neighbours`` mode misses.

    Float32 underflow: terms below 2**-120 of a block's error are not resolved. A global scale so
    small that ``g * s`` is subnormal for some e4m3 ``s`` (weights below about 1e-33), or so
    large that ``1 / (g * s)`` nears the subnormals (above about 1e35), gets all 126 candidates
    evaluated instead, since halving is no longer exact there.
    """
    n, nb, _ = blocks.shape
    count = n * nb
    device = blocks.device
    magnitudes = torch.empty((BLOCK, count), dtype=torch.float32, device=device)
    torch.abs(blocks.reshape(count, BLOCK).T, out=magnitudes)
    weights = None if importance is None else importance.to(device, torch.float32).reshape(BLOCK, 1)
    g = g.to(device, torch.float32).reshape(())
    if not _SMALLEST_NORMAL <= float(g) * float(E4M3_VALUES[1]) <= float(g) * E4M3_MAX <= _LARGEST_EXACT_HALVING:
        return _every_candidate(magnitudes, g, weights).reshape(n, nb)
    amax = magnitudes.amax(dim=0)
    code = _e4m3(div(div(amax, e2m1.MAX), g)).to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
    code.clamp_(min=1)
    subnormal = bool((code < _FIRST_DOUBLED_CODE).any())
    values_of = _any_code_values if subnormal else _code_values
    # The codes' scales are normal float32 numbers here (checked above): 1 / (g s) needs no guard.
    clips = amax * (1.0 / (g * values_of(code))) > e2m1.MAX
    code += clips & (code < E4M3_TOP_CODE)
    base = values_of(code)
    no_clip = amax * (1.0 / (g * base)) <= e2m1.MAX
    every_no_clip = bool(no_clip.all())
    errors_of = _BlockErrors(magnitudes, weights)

    # 1. Every block at once: its no-clip code and the seven above it (where the no-clip code
    # does clip, that code again: it cannot win a tie against itself).
    best = errors_of(1.0 / (g * base), base, saturates=False)
    best_step = torch.zeros_like(code)
    top = E4M3_TOP_CODE - code
    for step in range(1, OCTAVE):
        stepped = code + step if every_no_clip else torch.where(no_clip, code + step, code)
        value = values_of(stepped.clamp_(max=E4M3_TOP_CODE))
        error = errors_of(1.0 / (g * value), value, saturates=False)
        better = error < best  # strictly: the first of equal errors stays
        if not every_no_clip:
            better &= no_clip
        torch.where(better, error, best, out=best)
        best_step.masked_fill_(better, step)
    # Past the top code the candidate was the top again: never strictly better, so no step is.
    best_code = code + torch.minimum(best_step, top, out=best_step)
    # 2. Below it, while the clipping bound of the largest element leaves room: densely while
    # many blocks need the code (the first one or two below), then for those blocks alone.
    if weights is None:
        top_weight = torch.ones((), dtype=torch.float64, device=device)
    else:
        top_weight = weights.reshape(-1).double()[magnitudes.argmax(dim=0)]
    amax64, g64 = amax.double() * (1.0 - 2.0**-22), g.double()
    index = None  # all blocks
    for step in range(1, E4M3_TOP_CODE):
        codes = code if index is None else code[index]
        candidate = (codes - step).clamp_(min=1)
        value = _any_code_values(candidate) if subnormal or step >= codes.min() else _code_values(candidate)
        t = (g * value).double()
        weight = top_weight if top_weight.dim() == 0 else top_weight if index is None else top_weight[index]
        clipped = amax64 if index is None else amax64[index]
        bound = weight * ((clipped - 6.0 * t).clamp_(min=0.0) / g64).square_() * (1.0 - _BOUND_SLACK)
        current = best if index is None else best[index]
        open_ = (bound < current.double()).logical_and_(codes - step >= 1)
        opened = int(open_.sum())
        if opened == 0:
            break
        if index is None and opened > open_.numel() // 4:
            error = errors_of(1.0 / (g * value), value)
            better = (error < best).logical_and_(open_)
            torch.where(better, error, best, out=best)
            torch.where(better, candidate, best_code, out=best_code)
            continue
        index = open_.nonzero().squeeze(1) if index is None else index[open_]
        value, candidate = value[open_], candidate[open_]
        error = errors_of(1.0 / (g * value), value, index=index)
        better = error < best[index]
        best[index] = torch.where(better, error, best[index])
        best_code[index] = torch.where(better, candidate, best_code[index])

    # 3. A subnormal no-clip code: every code up to 15 (halving is inexact below code 16).
    for step in range(OCTAVE, _FIRST_DOUBLED_CODE - 1) if subnormal else ():
        index = (no_clip & (code + step < _FIRST_DOUBLED_CODE)).nonzero().squeeze(1)
        if index.numel() == 0:
            break
        candidate = code[index] + step
        value = _any_code_values(candidate)
        error = errors_of(1.0 / (g * value), value, index=index)
        better = error < best[index]
        best[index] = torch.where(better, error, best[index])
        best_code[index] = torch.where(better, candidate, best_code[index])
    scale = _any_code_values(best_code) if subnormal or bool((best_code < 8).any()) else _code_values(best_code)
    return torch.where(amax > 0, scale, 0.0).reshape(n, nb)


def _every_candidate(magnitudes: torch.Tensor, g: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The best of all 126 positive e4m3 values for each block ((16, B) magnitudes), first on ties."""
    amax = magnitudes.amax(dim=0)
    best = best_value = None
    for value in E4M3_VALUES[1:].to(magnitudes.device):
        scale = value.expand(amax.shape)
        error = block_errors(magnitudes, inverse_scale(g * scale), scale, weights)
        if best is None:
            best, best_value = error, scale.clone()
            continue
        better = error < best
        best = torch.where(better, error, best)
        best_value = torch.where(better, scale, best_value)
    return torch.where(amax > 0, best_value, 0.0)


# -- cq 883b9d1's search --------------------------------------------------------------------


def _block_error(ratio, values, scale, energy, importance=None):
    """Squared error of each block decoded as ``values * scale`` (consumes ``ratio``),
    each column's term times ``importance`` (16,) when given."""
    squares = ratio.sub_(values).square_()
    if importance is not None:
        squares = squares.mul_(importance)
    # A fixed order of addition: the choice, and so the stored bytes, are the same on every device.
    distance = sum_last(squares).mul_(scale.square())
    return torch.where(scale > 0, distance, energy)


def neighbour_block_scales(
    blocks: torch.Tensor, g: torch.Tensor, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cq 883b9d1's search, bit for bit: per block, the e4m3 scale among amax/6 and its two
    neighbours with the least squared error (each column's term weighted by ``importance``);
    every candidate is tried on all blocks at once. Returns (scales, values) as
    :func:`choose_block_scales` does."""
    best = amax_block_scales(blocks, g)
    ratio, values = rounded_blocks(blocks, g * best)
    weighted = blocks.square() if importance is None else blocks.square() * importance
    energy = sum_last(weighted)
    best_error = _block_error(ratio, values, g * best, energy, importance)
    code = best.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int16)
    for offset in SEARCH_OFFSETS:
        candidate = (code + offset).clamp_(0, E4M3_TOP_CODE).to(torch.uint8).view(torch.float8_e4m3fn).float()
        ratio, candidate_values = rounded_blocks(blocks, g * candidate)
        error = _block_error(ratio, candidate_values, g * candidate, energy, importance)
        better = error < best_error
        best = torch.where(better, candidate, best)
        best_error = torch.where(better, error, best_error)
        values = torch.where(better.unsqueeze(-1), candidate_values, values)
    return best, values
