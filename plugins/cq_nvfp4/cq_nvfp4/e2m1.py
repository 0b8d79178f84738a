"""FP4 E2M1: rounding onto its eight magnitudes, codes, and two-codes-per-byte packing.

E2M1 magnitudes are 0, 0.5, 1, 1.5, 2, 3, 4, 6 (codes 0..7); code | 8 is the
negative. Stored bytes hold the EVEN element of each pair in the high nibble,
which is what ComfyUI (comfy-kitchen, ``hi_first=True``) and the tensor-core
kernels read.
"""

from __future__ import annotations

import torch

MAX = 6.0
#: Value of each 4-bit code, as decoders see it.
VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], device="cpu"
)
EXPONENT_BITS = 0x7F800000
ONE_BITS = 0x3F800000
#: Adding then subtracting 1.5 * 2**22 * 2**e rounds a float of magnitude below
#: 2**(e+1) to a multiple of 2**(e-1), half to even, for either sign: exactly
#: E2M1's spacing in the binade [2**e, 2**(e+1)). Below 1 the spacing stays
#: 0.5, so the exponent comes from max(|x|, 1). All in a few whole-tensor passes.
MAGIC_FROM_EXPONENT = (22 << 23) | (1 << 22)
#: An E2M1 value times 2**-6 is an e4m3 value whose byte is ``sign << 7 | code << 2``:
#: the two formats share their exponent and mantissa layout up to that shift.
_E4M3_ALIGN = 2.0**-6


def nearest(ratio: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value of each float32, ties to even, saturating at ±6 (zero is always +0)."""
    rounded = ratio.clamp(-MAX, MAX)
    magic = (rounded.view(torch.int32) & EXPONENT_BITS).clamp_(min=ONE_BITS).add_(MAGIC_FROM_EXPONENT)
    magic = magic.view(torch.float32)
    return rounded.add_(magic).sub_(magic)


def distance_squared_(ratio: torch.Tensor, saturates: bool = True) -> torch.Tensor:
    """``(ratio - nearest(ratio))²`` in place of ``ratio`` (same bits as computing it from
    :func:`nearest`). ``saturates=False`` promises ``|ratio| <= 6`` and skips the clamp."""
    rounded = ratio.clamp(-MAX, MAX) if saturates else ratio
    magic = (rounded.view(torch.int32) & EXPONENT_BITS).clamp_(min=ONE_BITS).add_(MAGIC_FROM_EXPONENT)
    magic = magic.view(torch.float32)
    rounded = rounded.add(magic) if rounded is ratio else rounded.add_(magic)
    return ratio.sub_(rounded.sub_(magic)).square_()


def magnitude_below_above(ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The E2M1 magnitudes bracketing each non-negative float32 (equal when it is on the grid or >= 6)."""
    ratio = ratio.clamp(max=MAX)
    step = torch.where(ratio < 2.0, 0.5, torch.where(ratio < 4.0, 1.0, 2.0))
    below = torch.floor(ratio / step) * step
    above = torch.ceil(ratio / step) * step
    return below, above


def codes(values: torch.Tensor) -> torch.Tensor:
    """uint8 codes (0..15) of float32 values already on the E2M1 grid (-0 gives code 8, which decodes to -0)."""
    byte = (values * _E4M3_ALIGN).to(torch.float8_e4m3fn).view(torch.uint8)
    return ((byte >> 2) & 0x07) | ((byte >> 4) & 0x08)


def pack_pairs(code: torch.Tensor) -> torch.Tensor:
    """(n, 2m) codes -> (n, m) bytes, element 2j in the high nibble of byte j."""
    return (code[:, 0::2] << 4) | code[:, 1::2]


def unpack_pairs(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_pairs`: (n, m) bytes -> (n, 2m) codes."""
    return torch.stack((packed >> 4, packed & 0x0F), dim=-1).reshape(packed.shape[0], -1)


def decode_codes(code: torch.Tensor) -> torch.Tensor:
    """float32 value of each code."""
    return VALUES.to(code.device)[code.to(torch.int64)]
