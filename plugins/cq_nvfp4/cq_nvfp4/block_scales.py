"""NVFP4 scales: the amax/6 recipe, and the scales of least squared error, found exactly.

A block of 16 elements decodes as ``e2m1 * (g * s)`` with ``g`` the fp32 global scale
(``weight_scale_2``) and ``s`` an FP8 e4m3 block scale. amax/6 maps the block's largest
element onto 6, but its e4m3 rounding and the coarse top of the E2M1 grid (4 -> 6) often
leave the rest of the block badly placed. Two modes choose better:

- ``exact`` (the default): per block, the e4m3 value ``s`` with the least squared error over
  *every* positive finite e4m3 value (:func:`exact_block_scales`; what "optimal" means and
  why the few candidates it evaluates are enough is proved there), and the global scale
  chosen with them (:func:`searched_global_scale`, :func:`best_octave`);
- ``neighbours``: cq 883b9d1's search, the amax/6 value and its two e4m3 neighbours at
  ComfyUI's global scale amax/2688 (kept to reproduce files written by it; it misses the
  second optimum near amax/4, see :func:`exact_block_scales`).

Every comparison adds in one fixed order (:func:`cq_core.numerics.exact.sum_first`): the
choice, and so the stored bytes, are the same on every run and device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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
_VALUES = E4M3_VALUES
#: Added to a normal e4m3 code shifted left by 20: its float32 bits (exponent bias 7 -> 127).
_FLOAT32_FROM_E4M3 = (127 - 7) << 23
#: E2M1 rounding adds and subtracts this times the ratio's binade (:data:`e2m1.MAGIC_FROM_EXPONENT`).
_MAGIC = 1.5 * 2.0**22
#: The dense search evaluates codes ``c - 2 .. c + 6`` (``c + 7`` where ``c - 1`` is
#: subnormal) around each block's no-clip code ``c``.
_BELOW, _ABOVE = 2, OCTAVE - 1
#: Codes the blocks still open below c - 2 try before their bound is checked again (on
#: Gaussian weights about 15 % of the blocks try c - 3, 0.5 % c - 4).
_DESCENT = 3
#: Weights of those rows, largest first: the first row of least error has the largest.
_ROW_WEIGHTS = torch.arange(_BELOW + 1 + _ABOVE, 0, -1, dtype=torch.float32).reshape(-1, 1)

#: The smallest positive float32 (a denormal).
SMALLEST_SCALE = float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23
_SMALLEST_NORMAL = float(torch.finfo(torch.float32).smallest_normal)
#: Scales above this have reciprocals too close to float32's subnormals to halve exactly.
_LARGEST_EXACT_HALVING = 2.0**124
#: Relative slack of the clipping bound, far above float32's rounding of one term of the error
#: sum (a few roundings of 2**-24 each), see :func:`exact_block_scales`.
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
    blocks: torch.Tensor,
    g: torch.Tensor,
    search: str | bool,
    importance: torch.Tensor | None = None,
    record: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block scales (float32 (n, nb), e4m3 values) for (n, nb, 16) float32 blocks, and the E2M1
    values they give (n, nb, 16).

    ``search`` is one of :data:`SCALE_SEARCHES` (``True``/``False`` mean ``exact``/``off``).
    ``importance`` (16,) or (nb, 16), optional, non-negative: each column's squared error
    counts that much in the choice (the output-error cost of a column, from calibration
    statistics). ``record``: see :func:`exact_block_scales` (``exact`` only).
    """
    search = EXACT if search is True else AMAX if search is False else search
    if search == EXACT:
        best = exact_block_scales(blocks, g, importance, record)
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
    g: torch.Tensor,
    value: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each block's squared error at block scale ``value``, in units of ``g²``: the number the
    exact search minimizes (its definition; the search computes the same bits faster).

    ``magnitudes`` (16, B) float32: the blocks' absolute values, element-major; ``g`` the
    float32 global scale; ``value`` (B,) float32 e4m3 values; ``weights`` None, (16, 1) or
    (16, B), non-negative. Returns float32 (B,):
    ``sum_i w_i (r_i - e2m1(r_i))² * value²`` with ``r_i = |x_i| * (1 / (g * value))``
    (``g * value`` is the fp32 product decoders form; ``e2m1`` rounds to nearest, ties to
    even, saturating at 6), summed in :func:`~cq_core.numerics.exact.sum_first`'s order. In
    exact arithmetic this is ``sum_i w_i (|x_i| - g value q_i)² / g²``, the block's squared
    error; ``value²`` is exact in float32 (an e4m3 value has 4 significant bits).
    """
    ratio = magnitudes * (1.0 / (g * value))
    squares = e2m1.distance_squared_(ratio)
    if weights is not None:
        squares.mul_(weights)
    return sum_first(squares).mul_(value.square())


class _BlockErrors:
    """:func:`block_errors` of one set of blocks at many scales, in reused buffers.

    Fresh buffers of a chunk's size come from ``mmap`` in glibc's allocator, and their page
    faults cost more than the arithmetic; one set per chunk avoids it. The bits are
    :func:`block_errors`': its E2M1 rounding adds and subtracts ``1.5 * 2**22 * p`` (``p`` the
    power of two of the ratio's binade, at least 1), here formed as ``add(r, p, alpha=...)``,
    which is the same sum since ``1.5 * 2**22 * p`` is exact; eight passes over the blocks.
    """

    def __init__(self, magnitudes: torch.Tensor, weights: torch.Tensor | None) -> None:
        self.magnitudes, self.weights = magnitudes, weights
        self.ratio = torch.empty_like(magnitudes)
        self.rounded = torch.empty_like(magnitudes)
        self.binade = torch.empty(magnitudes.shape, dtype=torch.int32, device=magnitudes.device)
        self.sums = [
            torch.empty((rows, magnitudes.shape[1]), dtype=torch.float32, device=magnitudes.device)
            for rows in (BLOCK // 2, BLOCK // 4, BLOCK // 8)
        ]

    def __call__(
        self, g: torch.Tensor, value: torch.Tensor, saturates: bool = True, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Errors at ``value`` (B,) (into ``out`` when given); ``saturates=False`` promises that
        no ratio exceeds 6 (a pass less)."""
        ratio, rounded = self.ratio, self.rounded
        torch.mul(self.magnitudes, 1.0 / (g * value), out=ratio)
        clamped = torch.clamp(ratio, max=e2m1.MAX, out=rounded) if saturates else ratio
        torch.bitwise_and(clamped.view(torch.int32), e2m1.EXPONENT_BITS, out=self.binade)
        binade = self.binade.clamp_(min=e2m1.ONE_BITS).view(torch.float32)
        torch.add(clamped, binade, alpha=_MAGIC, out=rounded).sub_(binade, alpha=_MAGIC)
        squares = ratio.sub_(rounded).square_()
        if self.weights is not None:
            squares.mul_(self.weights)
        for level in self.sums:  # sum_first's order (BLOCK is a power of two)
            squares = torch.add(squares[0::2], squares[1::2], out=level)
        return torch.add(squares[0], squares[1], out=out).mul_(value.square())


def no_clip_codes(amax: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """int32 (B,): each block's *no-clip code*, the smallest e4m3 code 1..0x7E whose scale maps
    the block's largest magnitude ``amax`` to at most 6 (0x7E where none does): the amax/6
    code, or the next one where its rounding clipped."""
    quotient = div(div(amax, e2m1.MAX), g).clamp_(max=E4M3_MAX)
    code = quotient.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
    code.clamp_(1, E4M3_TOP_CODE)  # 0: an all-zero block; 0x7F: a NaN
    clips = amax * (1.0 / (g * code_values(code))) > e2m1.MAX
    return code.add_(clips).clamp_(max=E4M3_TOP_CODE)


def code_values(code: torch.Tensor) -> torch.Tensor:
    """float32 value of e4m3 codes 1..0x7E (int32): for normal codes (8 up) the code's
    exponent and mantissa bits shifted into float32's, exponent bias 7 -> 127 (cheaper than a
    table lookup); subnormal ones from the table."""
    normal = ((code << 20) + _FLOAT32_FROM_E4M3).view(torch.float32)
    if code.numel() and int(code.min()) >= OCTAVE:
        return normal
    return torch.where(code >= OCTAVE, normal, _VALUES.to(code.device)[code.clamp(0, OCTAVE).long()])


def _weights(importance: torch.Tensor | None, n: int, nb: int, device) -> torch.Tensor | None:
    """Importance (16,) or (nb, 16) as element-major weights for (16, n * nb) magnitudes."""
    if importance is None:
        return None
    importance = importance.to(device, torch.float32)
    if importance.dim() == 1:
        return importance.reshape(BLOCK, 1)
    return importance.T.contiguous().repeat(1, n)


def exact_block_scales(
    blocks: torch.Tensor, g: torch.Tensor, importance: torch.Tensor | None = None, record: torch.Tensor | None = None
) -> torch.Tensor:
    """The e4m3 block scale of least squared error for each (n, nb, 16) block: float32 (n, nb).

    **What "optimal" means.** For block ``x`` and global scale ``g``, the chosen ``s``
    minimizes :func:`block_errors` (the block's squared error ``Σ w_i (|x_i| - g s q_i)²``,
    ``q_i`` the nearest E2M1 value of ``|x_i| / (g s)``, computed in float32 in one fixed
    order) over every positive finite e4m3 value, the 126 codes 0x01..0x7E; of equal errors,
    the smallest scale. That is the result of evaluating all 126 (the tests in
    ``plugins/cq_nvfp4/tests/test_block_scales.py`` check it against that brute force). An
    all-zero block gets 0, as in the amax/6 recipe. ``importance`` (16,) or (nb, 16),
    optional, non-negative: the weights ``w_i`` of each block's columns.

    **Why a few candidates are enough.** Let ``c`` be the block's no-clip code
    (:func:`no_clip_codes`). Three facts prune the other codes:

    1. *Doubling a scale that does not clip never helps.* If every ``r_i = |x_i| / (g s) <= 6``,
       then at ``2s`` each ratio is ``r_i / 2 <= 3``, its nearest E2M1 value ``q'`` is at
       most 3, and ``2q'`` lies in ``{0, 1, 2, 3, 4, 6}``, a subset of the E2M1 grid: so
       ``|r_i - 2q'| >= |r_i - q_i|`` for every element, and the error at ``2s``,
       ``(r_i - 2q')² / 4 * (2s)²``, is at least the error at ``s``. In float32 too:
       ``g * 2s``, ``1 / (g * 2s)`` and ``r_i / 2`` are exact halvings and doublings,
       scaling by 2 commutes with rounding, and rounding is monotone. Every code from 16 up
       has twice the value of the code 8 below it (normal e4m3 values), and of equal errors
       the smaller scale wins: so above ``c`` only ``c + 1 .. c + 7`` can win and, for a
       subnormal ``c`` (below 8: a block below about 4e-5 of the tensor's largest element),
       every code up to 15.
    2. *Twice a scale that clips a little does not help either.* At ``c - 1`` the clipped
       ratios are at most ``6 * 9/8 = 6.75`` (consecutive normal e4m3 values differ by at
       most 9/8), so at twice that scale, ``c + 7`` for a normal ``c - 1``, they are below 3.5
       and round to 3: ``2 * 3 = 6`` is the saturated value, the same term; every other
       element is as in fact 1. So ``c + 7`` is evaluated only where ``c - 1`` is subnormal.
    3. *Below ``c`` the largest element clips*: ``q = 6``, and its term alone,
       ``w (a - 6 g s)² / g²``, grows as ``s`` shrinks. Going down code by code, once that
       bound (:class:`_ClipBound`, computed with margins far above float32's rounding of
       both it and the error) reaches the best error found, that code and all below it are
       strictly worse. (With ``importance``, the largest such term over the block's elements.)

    So the search evaluates ``c - 2 .. c + 6`` for every block at once and goes further down
    only for the blocks the bound leaves open (on Gaussian weights about 15 % try ``c - 3``,
    0.5 % ``c - 4``). There the optimum is ``c`` or one or two below it for about 60 % of
    the blocks and 3 to 5 codes above it (the largest element near 4, not 6) for most of
    the rest, which the ``neighbours`` mode misses.

    ``record``, optional int32 (2, n, nb): filled with each block's no-clip code and the lowest
    code the search evaluated (0 and 0x7E for an all-zero block), what :func:`best_octave`
    needs to know which blocks a change of the global scale by a power of two leaves alone.

    Float32 range: a global scale so small that ``g * s`` is subnormal for some e4m3 ``s``
    (weights below about 1e-33), or so large that ``1 / (g * s)`` nears the subnormals
    (above about 1e35), gets all 126 candidates evaluated instead, since halving is no
    longer exact there.
    """
    n, nb, _ = blocks.shape
    count = n * nb
    device = blocks.device
    magnitudes = torch.empty((BLOCK, count), dtype=torch.float32, device=device)
    torch.abs(blocks.reshape(count, BLOCK).T, out=magnitudes)
    weights = _weights(importance, n, nb, device)
    g = g.to(device, torch.float32).reshape(())
    values = _VALUES.to(device)
    if not _SMALLEST_NORMAL <= float(g) * float(values[1]) <= float(g) * E4M3_MAX <= _LARGEST_EXACT_HALVING:
        best = _every_candidate(magnitudes, g, weights)
        if record is not None:  # every code evaluated
            record[0].copy_(torch.where(best > 0, E4M3_TOP_CODE, 0).reshape(n, nb))
            record[1].fill_(1)
        return best.reshape(n, nb)
    amax = magnitudes.amax(dim=0)
    code = no_clip_codes(amax, g)
    errors_of = _BlockErrors(magnitudes, weights)

    # 1. Every block at once: codes c - 2 .. c + 6 (c + 7 where c - 1 is subnormal),
    # ascending, and of equal errors the first (the smallest code). At c only a block whose c
    # is the top code can clip; at c - 1 the ratios exceed 6 by at most 8/7 (c from 8 up),
    # below 7, so they round to 6 as if saturated (fact 2); below that, rounding saturates. Codes outside 1..0x7E are evaluated
    # at the nearest valid one and ruled out with an infinite error.
    low, high = int(code.min()), int(code.max())
    rows = _BELOW + _ABOVE + (low - 1 < OCTAVE)  # fact 2
    steps = torch.arange(-_BELOW, rows - _BELOW, dtype=torch.int32, device=device).reshape(-1, 1)
    candidates = code + steps
    outside = low - _BELOW < 1 or high + rows - _BELOW - 1 > E4M3_TOP_CODE
    row_values = code_values(candidates.clamp(1, E4M3_TOP_CODE) if outside else candidates)
    top_clips = high == E4M3_TOP_CODE and bool((amax * (1.0 / (g * row_values[_BELOW])) > e2m1.MAX).any())
    errors = torch.empty((rows, count), dtype=torch.float32, device=device)
    for row in range(rows):
        errors_of(g, row_values[row], saturates=row < _BELOW - 1 or (row <= _BELOW and top_clips)
                  or (row == _BELOW - 1 and low < OCTAVE), out=errors[row])
        step = row - _BELOW
        if low + step < 1 or high + step > E4M3_TOP_CODE:
            errors[row].masked_fill_((candidates[row] < 1) | (candidates[row] > E4M3_TOP_CODE), math.inf)
    best = errors.amin(dim=0)
    # The first row holding the minimum, in float arithmetic (comparisons into bool tensors cost
    # more than the search's passes): sign(error - best) - 1 is -1 there, 0 elsewhere.
    first = torch.sign(errors.sub_(best)).sub_(1.0).mul_(_ROW_WEIGHTS[-rows:].to(device)).amin(dim=0)
    best_code = first.add_(rows).clamp_(0, rows - 1).to(torch.int32).add_(code - _BELOW)

    # 2. Further down, while the clipping bound leaves room (fact 3; <=: of equal errors the
    # smaller code wins). The first bound rules out most blocks at once; the rest go on alone,
    # a few codes at a time.
    nonzero = amax > 0
    bound_of = _ClipBound(amax, magnitudes, weights, g)
    codes = code - (_BELOW + 1)
    deepest = low - (_BELOW + 1)
    lowest = (code - _BELOW).clamp_(min=1) if record is not None else None
    index = _open(bound_of(code_values(codes.clamp(min=1))), best, codes, nonzero, deepest).nonzero().squeeze(1)
    codes = codes[index]
    while index.numel():
        deepest -= _DESCENT
        few = _BlockErrors(magnitudes.index_select(1, index), _columns(weights, index))
        current, current_code = best[index], best_code[index]
        for _ in range(_DESCENT):
            valid = codes >= 1
            error = few(g, code_values(codes.clamp(min=1)))
            better = (error <= current).logical_and_(valid)
            current = torch.where(better, error, current)
            current_code = torch.where(better, codes, current_code)
            codes = codes - 1
        best[index], best_code[index] = current, current_code
        if record is not None:
            lowest.index_copy_(0, index, codes.clamp(min=0) + 1)
        keep = _open(bound_of(code_values(codes.clamp(min=1)), index), current, codes, nonzero[index], deepest)
        index, codes = index[keep], codes[keep]

    # 3. A subnormal no-clip code: every code up to 15 (below code 16 halving is not exact).
    for step in range(rows - _BELOW, _FIRST_DOUBLED_CODE - 1) if low < OCTAVE else ():
        index = ((code + step < _FIRST_DOUBLED_CODE) & nonzero).nonzero().squeeze(1)
        if index.numel() == 0:
            break
        _update(best, best_code, index, code[index] + step, magnitudes, weights, g)
    if record is not None:
        record[0].copy_(torch.where(nonzero, code, 0).reshape(n, nb))
        record[1].copy_(torch.where(nonzero, lowest, E4M3_TOP_CODE).reshape(n, nb))
    return torch.where(nonzero, code_values(best_code), 0.0).reshape(n, nb)


# -- the global scale ----------------------------------------------------------------------


def searched_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """Where the joint search of ``weight_scale_2`` starts: twice :func:`global_scale`
    (``amax / 1344``). The block holding the tensor's largest element then has a whole octave
    of e4m3 codes above its no-clip code, as every other block has; at ``amax / 2688`` it has
    none, and the codes it lacks are exactly those that halving the global scale takes away.
    Doubling is exact, so the grid of every other block is the same, shifted by one octave."""
    return global_scale(amax).mul_(2.0)


#: Powers of two below the start that :func:`best_octave` tries: they only help blocks in
#: e4m3's subnormal range (below about 1e-4 of the tensor's largest element).
LOWER_OCTAVES = (-1, -2, -3)


def best_octave(
    record: torch.Tensor,
    g: torch.Tensor,
    blocks_of: Callable[[torch.Tensor], torch.Tensor],
    importance_of: Callable[[torch.Tensor], torch.Tensor | None] = lambda index: None,
) -> int:
    """The power of two ``k`` (0 or one of :data:`LOWER_OCTAVES`) for which the global scale
    ``g * 2**k`` gives the least total squared error with every block at its exact optimum,
    ``g`` (float32 scalar) the scale the blocks' ``record`` (int32 (2, B), from
    :func:`exact_block_scales`) was made at; of equal totals, 0.

    Why few blocks need evaluating: at ``g * 2**k`` a block's candidates are those at ``g``
    shifted by ``8k`` codes, with the same errors (halving ``g`` doubles every ``s``: the same
    products ``g * s``, exact), wherever the search at both scales stays among normal codes
    (16 up, where halving is exact) and below the top code. So only blocks whose search
    reached below code 16, and those whose codes would pass 0x7E, can differ; when no block
    reached below 16 (weights within about 1e-4 of their largest element), every lower
    power of two keeps each block's errors or takes codes from the top blocks, and ``g``
    stands without evaluating anything. (Higher powers of two cannot help either: the
    largest block already has an octave above it, and coarser subnormals help no block.)

    ``blocks_of(index)``: the (m, 16) float32 blocks of flat block indices; ``importance_of``:
    their (m, 16) importance, or None. Totals add in one fixed order.
    """
    codes, lowest = record[0].reshape(-1), record[1].reshape(-1)
    nonzero = codes > 0
    bottom = nonzero & (lowest < _FIRST_DOUBLED_CODE)
    if not bool(bottom.any()):
        return 0
    best_k, best_change = 0, 0.0
    for k in LOWER_OCTAVES:
        edge = bottom | (nonzero & (codes + (OCTAVE * -k + _ABOVE) > E4M3_TOP_CODE))
        index = edge.nonzero().squeeze(1)
        change = _total_error(index, g * 2.0**k, blocks_of, importance_of) - _total_error(
            index, g, blocks_of, importance_of
        )
        if change < best_change:
            best_k, best_change = k, change
    return best_k


def _total_error(index, g, blocks_of, importance_of, batch: int = 1 << 16) -> float:
    """Sum of the exact blocks' squared errors (absolute: times g²) of the blocks ``index``."""
    total = 0.0
    for part in index.split(batch):
        blocks = blocks_of(part).float()
        importance = importance_of(part)
        scales = exact_block_scales(blocks.unsqueeze(0), g, importance).reshape(-1)
        magnitudes = blocks.abs().T.contiguous()
        weights = None if importance is None else importance.float().T.contiguous()
        errors = block_errors(magnitudes, g, scales, weights).double().mul_(float(g) ** 2)
        total += float(sum_last(errors))
    return total


def _open(bound: torch.Tensor, best: torch.Tensor, codes: torch.Tensor, nonzero: torch.Tensor, low: int) -> torch.Tensor:
    """Which blocks a code below their no-clip code may still improve: a valid code (``low``:
    the smallest of ``codes``) whose clipping bound is below the best error so far. A bound
    equal to a best of 0 or infinity cannot rule out a tie (a zero-weight column clips;
    float32 overflows for a global scale far too small), which the smaller code would win."""
    open_ = bound < best
    if best.numel() and (float(best.amin()) == 0 or math.isinf(float(best.amax()))):
        open_ |= (bound == best) & ((best == 0) | torch.isinf(best)) & nonzero
    return open_ if low >= 1 else open_.logical_and_(codes >= 1)


def _columns(weights: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """The element-major weights of the blocks ``index`` (shared (16, 1) weights as they are)."""
    return weights if weights is None or weights.shape[1] == 1 else weights.index_select(1, index)


def _update(best, best_code, index, candidate, magnitudes, weights, g) -> None:
    """Evaluate ``candidate`` codes (above every code tried) for the blocks ``index`` and keep
    the strictly better ones."""
    error = _BlockErrors(magnitudes.index_select(1, index), _columns(weights, index))(g, code_values(candidate))
    current = best[index]
    better = error < current
    best[index] = torch.where(better, error, current)
    best_code[index] = torch.where(better, candidate, best_code[index])


class _ClipBound:
    """A lower bound on :func:`block_errors` at a scale that clips a block's largest element:
    that element's term, ``w (a - 6 g s)² / g²``, computed in float32 with margins (``a``
    shrunk by 2**-20, the result by 2**-16) far above the roundings of both it and the
    error's own float32 terms (a few of 2**-24 each), so that the error can only be larger
    (:func:`exact_block_scales`, fact 3). With weights, the largest such term of any element."""

    def __init__(self, amax, magnitudes, weights, g) -> None:
        self.g = g
        if weights is None:
            self.magnitudes, self.weights = (amax * (1.0 - 2.0**-20)).unsqueeze(0), None
        else:  # every element may clip; the largest weighted term bounds the sum
            self.magnitudes, self.weights = magnitudes * (1.0 - 2.0**-20), weights

    def __call__(self, value: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """The bound at e4m3 values ``value`` of every block, or of the blocks ``index``."""
        magnitudes = self.magnitudes if index is None else self.magnitudes.index_select(1, index)
        excess = torch.sub(magnitudes, self.g * value, alpha=6.0).clamp_(min=0.0).div_(self.g).square_()
        if self.weights is None:
            return excess[0].mul_(1.0 - _BOUND_SLACK)
        excess.mul_(self.weights if index is None else _columns(self.weights, index))
        return excess.amax(dim=0).mul_(1.0 - _BOUND_SLACK)


def _every_candidate(magnitudes: torch.Tensor, g: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The best of all 126 positive e4m3 values for each block ((16, B) magnitudes), the
    smallest of equal errors."""
    amax = magnitudes.amax(dim=0)
    values = _VALUES.to(magnitudes.device)
    best = best_value = None
    for value in values[1:]:
        scale = value.expand(amax.shape)
        error = block_errors(magnitudes, g, scale, weights)
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
