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
    block_amax,
    pad_2d,
    roundup,
    scales_per_column,
    stored_rows,
    swizzle,
    swizzled_shape,
)
from cq_core.numerics.metrics import rows_per_chunk
from cq_fp8.codes import codes_to_float, other_code

BLOCK = 32
E4M3_MAX = 448.0
#: The byte of e4m3's largest finite magnitude (0x7F is NaN).
E4M3_TOP_CODE = 0x7E
E8M0_BIAS = 127
#: The largest finite E8M0 exponent (255 is NaN).
E8M0_TOP = 254
_FLOAT32_MANTISSA_BITS = 23
ROUND_UP, FLOOR = "round_up", "floor"
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
    if rule == ROUND_UP:
        power = exponent - 9 + (mantissa > 0.875).to(torch.int32)
    else:
        power = exponent - 1 - 8
    # A non-zero block keeps at least exponent 1: exponent 0 would decode it to zero.
    biased = (power + E8M0_BIAS).clamp_(1, E8M0_TOP)
    return torch.where(amax > 0, biased, 0)


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
    # ComfyUI 0.30 ``comfy/ops.py`` emulates mxfp8 unless ``supports_mxfp8_compute`` (compute
    # capability >= 10 and torch >= 2.10: Blackwell).
    native_gpus = ("blackwell",)
    options = (
        Option(
            "scale_rule",
            str,
            ROUND_UP,
            "Block exponent rule: round_up (smallest scale that never clips) or floor (OCP MX: "
            "floor(log2 amax) - 8, clips above 448).",
            choices=(ROUND_UP, FLOOR),
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

    def compute_scales(self, weight: torch.Tensor) -> Tensors:
        n = weight.shape[0]
        chunks = []
        step = rows_per_chunk(tuple(weight.shape))
        for start in range(0, n, step):
            amax = block_amax(weight[start : start + step].float(), BLOCK)
            chunks.append(exponent_values(block_exponents(amax, self.opts["scale_rule"])))
        return {"block_scale": torch.cat(chunks)}

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
        for start in range(0, n, step):
            stop = min(start + step, n)
            # Padded to whole blocks, one scale broadcasts over each block: no per-column scales.
            blocks = pad_2d(weight[start:stop].float(), stop - start, padded_cols).reshape(stop - start, -1, BLOCK)
            if scales is None:
                amax = blocks.abs().amax(dim=-1)
                block_scale[start:stop] = exponent_values(block_exponents(amax, self.opts["scale_rule"]))
            codes[start:stop] = self._codes(blocks, block_scale[start:stop].unsqueeze(-1)).reshape(stop - start, -1)
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
