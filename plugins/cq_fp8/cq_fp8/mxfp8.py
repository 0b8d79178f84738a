"""MXFP8: FP8 e4m3 data with one power-of-two (E8M0) scale per 32 elements along K.

Stored, for a weight of shape (N, K) padded to (Np, Kp) = multiples of 32:
- ``weight``: F8_E4M3 (Np, Kp), zero-padded, in its real dtype (ComfyUI value-casts);
- ``weight_scale``: U8 biased exponents ``e`` in the cuBLAS tiled layout,
  (roundup(Np, 128), roundup(Kp/32, 4)). U8 rather than F8_E8M0 because some
  ComfyUI loaders have no entry for that dtype.

ComfyUI decodes ``q.float() * 2**(e - 127)``, with ``e = 0`` decoding to 0,
which is what all-zero blocks get. The scales optimizers see are unswizzled
and unpadded: ``block_scale`` float32 (N, Kp/32) holding those powers of two.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from cq_core import (
    FLOAT_SCALE_DTYPES,
    Contract,
    Format,
    LayerInfo,
    Option,
    TensorRule,
    Tensors,
    TensorSpec,
    one_element,
)
from cq_core.numerics.blockscale import (
    PaddedTensors,
    blocks_at,
    blocks_along_k,
    pad_2d,
    roundup,
    scales_per_column,
    stored_rows,
    swizzle,
    swizzled_shape,
)
from cq_core.numerics.exact import sum_last
from cq_core.numerics.metrics import rows_per_chunk
from cq_fp8.codes import codes_to_float, other_code

BLOCK = 32
E4M3_MAX = 448.0
#: The byte of e4m3's largest finite magnitude (0x7F is NaN).
E4M3_TOP_CODE = 0x7E
E8M0_BIAS = 127
#: The largest finite E8M0 exponent (255 is NaN).
E8M0_TOP = 254
#: e4m3's smallest normal value is 2**-6: a ratio below it lies on the coarser subnormal grid.
E4M3_NORMAL_EXPONENT = 6
_FLOAT32_MANTISSA_BITS = 23
ROUND_UP, FLOOR, EXACT = "round_up", "floor", "exact"
SCALE_RULES = (EXACT, ROUND_UP, FLOOR)
#: Block scales from 2**120 up can decode e4m3 codes beyond FLT_MAX (448 * 2**120 > 2**128).
OVERFLOW_SCALE = 2.0**120
#: The largest e4m3 significand (1.875) at float32's top exponent: the largest value
#: ``code * 2**k`` can reach without Inf, times the scale's reciprocal, is an e4m3 code.
TOP_BELOW_FLT_MAX = 1.875 * 2.0**127


def block_exponents(amax: torch.Tensor, rule: str) -> torch.Tensor:
    """Biased E8M0 exponent (int32) of each block from its largest magnitude.

    ``round_up``: the smallest power of two that keeps the block within ±448,
    so nothing clips. ``floor`` (the OCP MX recipe): 2**(floor(log2 amax) - 8),
    which puts the largest element in [256, 512) and saturates above 448.
    Both are exact: frexp gives amax = m * 2**E with m in [0.5, 1), and
    448 = 0.875 * 2**9.
    """
    mantissa, exponent = torch.frexp(amax.float())
    if rule not in (ROUND_UP, FLOOR):
        raise ValueError(f"block_exponents knows round_up and floor, not {rule!r}")
    if rule == ROUND_UP:
        power = exponent - 9 + (mantissa > 0.875).to(torch.int32)
    else:
        power = exponent - 1 - 8
    # A non-zero block keeps at least exponent 1: exponent 0 would decode it to zero.
    biased = (power + E8M0_BIAS).clamp_(1, E8M0_TOP)
    return torch.where(amax > 0, biased, 0)


def exponent_errors(blocks: torch.Tensor, biased: torch.Tensor, reference: torch.Tensor,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """Each block's squared error at biased exponents ``biased`` (int32, one per block), in
    units of ``2**(2 * (reference - 127))``: the number the exact rule minimizes.

    ``blocks`` (..., 32) float32; ``reference`` (int32, like ``biased``) a per-block unit;
    ``weights`` None or broadcastable to ``blocks`` (each column's cost). Returns float32:
    ``sum_i w_i (r_i - e4m3(r_i))² * 4**(e - reference)`` with ``r_i = |x_i| * 2**(127 - e)``
    (a power of two, as the encoder forms it), ``e4m3`` rounding to nearest, ties to even, saturating at 448,
    summed in :func:`~cq_core.numerics.exact.sum_last`'s order. In exact arithmetic it is the
    block's squared error ``sum_i w_i (x_i - 2**(e-127) q_i)²`` over the unit.
    """
    ratio = _ratios(blocks, biased)
    squares = ratio.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float().sub_(ratio).square_()
    if weights is not None:
        squares.mul_(weights)
    return sum_last(squares).mul_(exponent_values((E8M0_BIAS + 2 * (biased - reference)).clamp_(1, E8M0_TOP)))


def _ratios(blocks: torch.Tensor, biased: torch.Tensor) -> torch.Tensor:
    """``|x| * (1 / 2**(e - 127))``, as :meth:`Mxfp8Format._codes` forms it (a power of two)."""
    return blocks.abs().mul_((1.0 / exponent_values(biased)).unsqueeze(-1))


def may_gain_below(blocks: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """bool (...,): the (..., 32) blocks that a smaller exponent than their ``round_up`` one
    ``up`` may serve better: those with a nonzero element below ``2**-6`` times the scale (in
    e4m3's subnormal range; :func:`exact_exponents`, fact 2), and an exponent left below."""
    # The smallest nonzero magnitude, as float32 bits less one (a zero's -1 masked to the largest).
    smallest = (blocks.abs().view(torch.int32) - 1).bitwise_and_(0x7FFFFFFF).amin(dim=-1)
    threshold = exponent_values((up - E4M3_NORMAL_EXPONENT).clamp_(min=1)).view(torch.int32) - 1
    return (smallest < threshold) & (up > 1)


def exact_exponents(blocks: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Biased E8M0 exponents (int32 (...,)) of least squared error for (..., 32) float32 blocks.

    **What "optimal" means.** Per block, the exponent ``e`` in 1..254 that minimizes
    :func:`exponent_errors` (the block's squared error, each element rounded to nearest e4m3
    under ``2**(e-127)``, saturating at ±448, computed in float32 in one fixed order); of
    equal errors the one nearest the ``round_up`` exponent, so that the bytes are
    comfy-kitchen's ``quantize_mxfp8``'s wherever it is optimal (e4m3 is a floating-point
    grid: most blocks err the same at every exponent that neither clips nor reaches e4m3's
    subnormals); 0 for an all-zero block (it decodes to zero), as in the other rules. The tests in ``plugins/cq_fp8/tests/test_mxfp8_exponents.py`` check it against
    evaluating every exponent.

    **Why few exponents are evaluated.** Let ``u`` be the ``round_up`` exponent, the smallest
    that clips nothing, and ``r_i`` the ratios there.

    1. *Above ``u`` nothing wins*: at twice a scale that does not clip, each ratio halves
       (exactly), its nearest e4m3 value ``q'`` doubled is again an e4m3 value (at most 448),
       so no element gets closer: the error can only grow, and ties go to ``u``.
    2. *Below ``u`` only elements in e4m3's subnormals can gain*: at half the scale a ratio
       ``r >= 2**-6`` (a normal e4m3 value's range) becomes ``2r`` on the same relative grid,
       ``e4m3(2r) = 2 e4m3(r)`` exactly, the same error; one that now clips (``r > 224``)
       errs ``2 (r - 224)``, at least twice its error at ``u`` (224 is an e4m3 value below
       it). So a block without a nonzero element below ``2**-6`` at ``u`` (about 1/30000 of
       its largest) keeps ``u``, proved, without evaluating anything.
    3. *For the others, below ``u`` the largest element clips*: its own term ``(r - 448)²``
       (computed with the same operations as the sum, so never above it) grows as the
       exponent falls; once it reaches the best error found, that exponent and all below
       cannot win.

    So on ordinary weights the rule is ``round_up``, byte for byte, at the cost of one pass
    to find the smallest nonzero magnitude of each block. ``weights``: as in
    :func:`exponent_errors` (non-negative); with them the largest weighted clipped term bounds.
    """
    amax = blocks.abs().amax(dim=-1)
    up = block_exponents(amax, ROUND_UP)
    nonzero = amax > 0
    index = may_gain_below(blocks, up).reshape(-1).nonzero().squeeze(1)
    chosen = up.clone()
    if index.numel() == 0:
        return torch.where(nonzero, chosen, 0)
    flat_blocks = blocks.reshape(-1, blocks.shape[-1])
    flat_weights = None if weights is None else torch.broadcast_to(weights, blocks.shape).reshape(flat_blocks.shape)
    flat_chosen, flat_up = chosen.reshape(-1), up.reshape(-1)
    flat_best = torch.full(flat_up.shape, math.inf, dtype=torch.float32, device=blocks.device)
    flat_best[index] = exponent_errors(
        flat_blocks[index], flat_up[index], flat_up[index], None if flat_weights is None else flat_weights[index]
    )
    step = 1
    while index.numel():
        candidate = flat_up[index] - step
        part = flat_blocks[index]
        part_weights = None if flat_weights is None else flat_weights[index]
        # the clipped terms alone, as the sum computes them
        ratio = _ratios(part, candidate)
        clipped = (ratio - E4M3_MAX).clamp_(min=0.0).square_()
        if part_weights is not None:
            clipped.mul_(part_weights)
        bound = clipped.amax(dim=-1).mul_(4.0**-step)  # the unit of the round_up exponent
        open_ = bound < flat_best[index]
        index, candidate, part = index[open_], candidate[open_], part[open_]
        if index.numel() == 0:
            break
        part_weights = None if part_weights is None else part_weights[open_]
        error = exponent_errors(part, candidate, flat_up[index], part_weights)
        better = error < flat_best[index]  # of equal errors the one nearer round_up
        flat_best[index] = torch.where(better, error, flat_best[index])
        flat_chosen[index] = torch.where(better, candidate, flat_chosen[index])
        index = index[candidate > 1]
        step += 1
    return torch.where(nonzero, chosen, 0)


def stored_exponents(block_scale: torch.Tensor) -> torch.Tensor:
    """uint8 biased exponents of float32 block scales (a non-power of two rounds down; 0 -> 0)."""
    # frexp gives 2**(e-127) = 0.5 * 2**(e-126).
    _, exponent = torch.frexp(block_scale)
    return torch.where(block_scale > 0, (exponent + E8M0_BIAS - 1).clamp_(1, E8M0_TOP), 0).to(torch.uint8)


def exponent_values(biased: torch.Tensor) -> torch.Tensor:
    """float32 2**(e - 127) for biased exponents, 0 for e = 0: the bits ComfyUI builds."""
    return (biased.to(torch.int32) << _FLOAT32_MANTISSA_BITS).view(torch.float32)


def _padded_weight(weight_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    rows, cols = weight_shape if len(weight_shape) == 2 else (1, 1)
    return (tuple(weight_shape),) if len(weight_shape) == 2 and not rows % BLOCK and not cols % BLOCK else ()


def _swizzled_exponents(weight_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    return (swizzled_shape(weight_shape[0], weight_shape[1] // BLOCK),)


#: What ComfyUI 0.30 loads for mxfp8 (``comfy/quant_ops.py`` QUANT_ALGOS["mxfp8"]: parameters
#: ``weight_scale``, ``input_scale``, group size 32; ``comfy/ops.py`` ``_load_quantized_module``
#: views ``weight_scale`` as float8_e8m0fnu and raises without it). The weight is value-cast
#: to e4m3, padded to multiples of 32 (comfy-kitchen's ``get_padded_shape``).
MXFP8_CONTRACT = Contract(
    tensors={
        "weight": TensorRule((torch.float8_e4m3fn,), _padded_weight, describe="F8_E4M3 padded to multiples of 32"),
        "weight_scale": TensorRule(
            (torch.uint8, torch.float8_e8m0fnu), _swizzled_exponents, view=True,
            describe="E8M0 exponent bytes, swizzled",
        ),
        "input_scale": TensorRule(FLOAT_SCALE_DTYPES, one_element, required=False, describe="a float scalar"),
    },
    json={"full_precision_matrix_mult": bool},
)


class Mxfp8Format(Format):
    name = "mxfp8"
    description = "FP8 e4m3 with a power-of-two (E8M0) scale per 32 along K (Blackwell tensor cores)."
    contract = MXFP8_CONTRACT
    comfyui_since = "0.30.0"  # in QUANT_ALGOS since 0.30.0 (where comfy-kitchen has MXFP8: _CK_MXFP8_AVAILABLE)
    comfyui_lora = "merged: re-quantized with new E8M0 block scales"
    # ComfyUI 0.30 ``comfy/ops.py`` emulates mxfp8 unless ``supports_mxfp8_compute`` (compute
    # capability >= 10 and torch >= 2.10: Blackwell).
    native_gpus = ("blackwell",)
    options = (
        Option(
            "scale_rule",
            str,
            EXACT,
            "Block exponent rule: exact (least squared error over every exponent, found exactly; "
            "default; never more error than round_up), round_up (smallest scale that never clips, "
            "comfy-kitchen's quantize_mxfp8) or floor (OCP MX: floor(log2 amax) - 8, clips above 448).",
            choices=SCALE_RULES,
        ),
    )

    def accepts(self, layer: LayerInfo) -> str | None:
        refusal = super().accepts(layer)
        if refusal:
            return refusal
        n = layer.shape[0]
        if layer.bias_shape is not None and n % BLOCK:
            return f"has a bias and N={n} is not a multiple of {BLOCK}: the padded mxfp8 GEMM would break it"
        return None

    def stored_specs(self, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        n, k = roundup(shape[0], BLOCK), roundup(shape[1], BLOCK)
        return {
            "weight": TensorSpec(torch.float8_e4m3fn, (n, k)),
            "weight_scale": TensorSpec(torch.uint8, swizzled_shape(n, k // BLOCK)),
        }

    # -- the grid, for optimizers --------------------------------------------

    def _exponents(self, blocks: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Biased exponents of (..., 32) float32 blocks under this instance's rule."""
        if self.opts["scale_rule"] == EXACT:
            return exact_exponents(blocks, weights)
        return block_exponents(blocks.abs().amax(dim=-1), self.opts["scale_rule"])

    def _first_exponents(self, blocks: torch.Tensor, start_block: int, later: list[torch.Tensor]) -> torch.Tensor:
        """Exponents of a chunk's blocks; with the exact rule the ``round_up`` ones, and the flat
        indices of blocks that a smaller exponent may serve better appended to ``later``
        (searched all at once by :meth:`_search_later`: they are few, about 0.2 % of Gaussian
        blocks, and one search over all of them costs less than one per chunk)."""
        if self.opts["scale_rule"] != EXACT:
            return self._exponents(blocks)
        up = block_exponents(blocks.abs().amax(dim=-1), ROUND_UP)
        later.append(may_gain_below(blocks, up).reshape(-1).nonzero().squeeze(1) + start_block)
        return up

    def _search_later(self, weight: torch.Tensor, block_scale: torch.Tensor, later: list[torch.Tensor]):
        """Search the blocks ``later`` (flat indices) exactly, update ``block_scale`` (N, Kp/32)
        in place; returns the flat indices of the blocks whose scale changed."""
        index = torch.cat(later) if later else torch.empty(0, dtype=torch.long, device=weight.device)
        if index.numel() == 0:
            return index
        blocks = blocks_at(weight, index, BLOCK)
        chosen = exponent_values(exact_exponents(blocks))
        flat = block_scale.view(-1)
        changed = chosen != flat[index]
        flat[index[changed]] = chosen[changed]
        return index[changed]

    def compute_scales(self, weight: torch.Tensor) -> Tensors:
        n = weight.shape[0]
        chunks, later = [], []
        step = rows_per_chunk(tuple(weight.shape))
        for start in range(0, n, step):
            blocks = blocks_along_k(weight[start : start + step].float(), BLOCK)
            chunks.append(exponent_values(self._first_exponents(blocks, start * blocks.shape[1], later)))
        block_scale = torch.cat(chunks)
        self._search_later(weight, block_scale, later)
        return {"block_scale": block_scale}

    scale_block = BLOCK
    #: gptq's refit of these exponents from compensated columns lost on MiniLM (held-out embedding
    #: SQNR 28.24 -> 28.00 dB, docs/scales.md): the exact exponent is round_up's for nearly every
    #: block, so refitting gains little, and taking columns a block at a time costs act_order.
    refit_by_default = False

    def refit_scales(
        self, weight: torch.Tensor, scales: Tensors, cols: slice, importance: torch.Tensor | None = None
    ) -> Tensors:
        # The block's exponent, chosen by this rule for the values given (with exact, weighted
        # by each column's cost).
        start = cols.start or 0
        if start % BLOCK or weight.shape[1] > BLOCK:
            raise ValueError(f"mxfp8 refits one aligned block of {BLOCK} columns at a time")
        block = pad_2d(weight.float(), weight.shape[0], BLOCK)
        weights = None if importance is None else pad_2d(importance.float().reshape(1, -1), 1, BLOCK)
        biased = self._exponents(block.unsqueeze(1), weights)
        scales["block_scale"][:, start // BLOCK] = exponent_values(biased[:, 0]).to(scales["block_scale"].device)
        return scales

    def _codes(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """e4m3 codes of ``weight`` under per-element power-of-two ``scale`` (0 -> 0)."""
        # Powers of two: multiplying by the reciprocal is exact, like a division.
        inverse = torch.where(scale > 0, 1.0 / scale, 0.0)
        ratio = weight.float() * inverse
        if bool((scale >= OVERFLOW_SCALE).any()):
            # A block near FLT_MAX: rounding to e4m3 may round up to a code whose decode,
            # code * scale, is Inf. Clamp to the largest code that still decodes finite.
            limit = torch.clamp(inverse * TOP_BELOW_FLT_MAX, max=E4M3_MAX)
            return torch.maximum(torch.minimum(ratio, limit), -limit).to(torch.float8_e4m3fn)
        return ratio.clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)

    def to_grid(self, weight: torch.Tensor, scales: Tensors, cols: slice = slice(None)) -> torch.Tensor:
        scale = scales_per_column(scales["block_scale"], BLOCK, cols, weight.shape[1])
        return codes_to_float(self._codes(weight, scale)) * scale

    def grid_neighbours(
        self, weight: torch.Tensor, scales: Tensors, cols: slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scale = scales_per_column(scales["block_scale"], BLOCK, cols, weight.shape[1])
        ratio = weight.float() * torch.where(scale > 0, 1.0 / scale, 0.0)
        code = self._codes(weight, scale)
        nearest, other = code.float() * scale, other_code(code, ratio, E4M3_TOP_CODE).float() * scale
        return torch.minimum(nearest, other), torch.maximum(nearest, other)

    def pack(self, weight_on_grid: torch.Tensor, scales: Tensors) -> Tensors:
        return self.encode(weight_on_grid, scales)

    def encode(self, weight: torch.Tensor, scales: Tensors | None = None) -> Tensors:
        # Row chunks keep the float32 temporaries small, whatever the layer size; without
        # given scales each chunk's exponents come from the same pass that codes it.
        n, k = weight.shape
        padded_rows, padded_cols = roundup(n, BLOCK), roundup(k, BLOCK)
        if scales is None:
            block_scale = torch.empty((n, padded_cols // BLOCK), dtype=torch.float32, device=weight.device)
        else:
            # Stored scales are powers of two: code with exactly what decoders will read.
            block_scale = exponent_values(stored_exponents(scales["block_scale"].to(weight.device)))
        codes = torch.zeros((padded_rows, padded_cols), dtype=torch.float8_e4m3fn, device=weight.device)
        step = rows_per_chunk(tuple(weight.shape))
        later: list[torch.Tensor] = []
        for start in range(0, n, step):
            stop = min(start + step, n)
            # Padded to whole blocks, one scale broadcasts over each block: no per-column scales.
            blocks = pad_2d(weight[start:stop].float(), stop - start, padded_cols).reshape(stop - start, -1, BLOCK)
            if scales is None:
                block_scale[start:stop] = exponent_values(self._first_exponents(blocks, start * blocks.shape[1], later))
            codes[start:stop] = self._codes(blocks, block_scale[start:stop].unsqueeze(-1)).reshape(stop - start, -1)
        changed = self._search_later(weight, block_scale, later)
        if changed.numel():  # code those blocks again under their new scales
            per_row = padded_cols // BLOCK
            scale = block_scale.view(-1)[changed].unsqueeze(-1)
            view = codes.view(padded_rows, per_row, BLOCK)
            view[changed // per_row, changed % per_row] = self._codes(blocks_at(weight, changed, BLOCK), scale)
        biased = stored_exponents(block_scale)
        stored = {"weight": codes, "weight_scale": swizzle(pad_2d(biased, padded_rows, biased.shape[1]))}
        return PaddedTensors(stored, (n, k))

    # -- decode ----------------------------------------------------------------

    def decode(self, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int] | None = None) -> torch.Tensor:
        return self.decode_rows(tensors, 0, tensors["weight"].shape[0], shape=shape)

    def activation_fake_quant(self, x: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """MXFP8 of the input per 32 values along K, as comfy-kitchen's eager ``quantize_mxfp8``
        does it (ComfyUI quantizes mxfp8 inputs and ignores ``input_scale`` for them): the
        block's scale is ``2**ceil(log2(amax / 448))``, the values divided by it are clamped to
        ±448 and cast to e4m3; an all-zero block stays zero. Bit-exact."""
        k = x.shape[-1]
        rows = x.reshape(-1, k).float()
        blocks = pad_2d(rows, rows.shape[0], roundup(k, BLOCK)).reshape(rows.shape[0], -1, BLOCK)
        amax = blocks.abs().amax(-1)
        needed = (amax / E4M3_MAX).clamp_(min=2.0**-127)
        exponent = (torch.ceil(torch.log2(needed)).to(torch.int32) + E8M0_BIAS).clamp_(0, E8M0_TOP)
        scale = torch.where(amax == 0, torch.ones_like(amax), torch.exp2((exponent - E8M0_BIAS).float()))
        codes = (blocks / scale.unsqueeze(-1)).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        values = codes.float() * scale.unsqueeze(-1)
        return values.reshape(rows.shape[0], -1)[:, :k].reshape(x.shape)

    def decode_rows(
        self, tensors: Mapping[str, torch.Tensor], start: int, stop: int, shape: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Rows ``start:stop``, sliced to the unpadded width; ``shape`` is the weight's (N, K).

        Without ``shape`` the unpadded shape comes from tensors that :meth:`encode`
        made; tensors read from a file decode at their padded shape.
        """
        codes = tensors["weight"]
        padded_cols = codes.shape[1]
        stop, k, biased = stored_rows(tensors, tuple(codes.shape), BLOCK, start, stop, shape)
        scale = exponent_values(biased)
        values = codes_to_float(codes[start:stop]).reshape(stop - start, -1, BLOCK) * scale.unsqueeze(-1)
        return values.reshape(stop - start, padded_cols)[:, :k]
