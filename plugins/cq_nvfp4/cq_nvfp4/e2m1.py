"""FP4 E2M1: rounding onto its eight magnitudes, codes, and two-codes-per-byte packing.

E2M1 magnitudes are 0, 0.5, 1, 1.5, 2, 3, 4, 6 (codes 0..7); code | 8 is the
negative. Stored bytes hold the EVEN element of each pair in the high nibble,
which is what ComfyUI (comfy-kitchen, ``hi_first=True``) and the tensor-core
kernels read.
"""

from __future__ import annotations

import torch

MAX = 6.0
SIGN_BIT = 8
#: Value of each 4-bit code, as decoders see it.
VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
#: Code of each magnitude, indexed by ``2 * magnitude`` (0..12); unused slots are 0.
_CODE_OF_TWICE = torch.tensor([0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7], dtype=torch.uint8)
_EXPONENT_BITS = 0x7F800000
#: Adding then subtracting 2**22 * 2**e rounds a float in [2**e, 2**(e+1)) to a
#: multiple of 2**(e-1) (half-to-even): exactly E2M1's spacing there. Below 1
#: the spacing stays 0.5, so the exponent is taken from max(x, 1).
_MAGIC_SHIFT = 22 << 23


def round_magnitude_(ratio: torch.Tensor) -> torch.Tensor:
    """In place: nearest E2M1 magnitude of each non-negative float32, ties to even, saturating at 6."""
    ratio.clamp_(max=MAX)
    magic = (ratio.clamp(min=1.0).view(torch.int32) & _EXPONENT_BITS).add_(_MAGIC_SHIFT).view(torch.float32)
    return ratio.add_(magic).sub_(magic)


def magnitude_below_above(ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The E2M1 magnitudes bracketing each non-negative float32 (equal when it is on the grid or >= 6)."""
    ratio = ratio.clamp(max=MAX)
    step = torch.where(ratio < 2.0, 0.5, torch.where(ratio < 4.0, 1.0, 2.0))
    below = torch.floor(ratio / step) * step
    above = torch.ceil(ratio / step) * step
    return below, above


def codes(magnitude: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """uint8 codes (0..15) of E2M1 magnitudes, with the sign bit set where ``negative`` and non-zero."""
    code = _CODE_OF_TWICE.to(magnitude.device)[(magnitude * 2.0).to(torch.int64)]
    return code | ((negative & (code != 0)).to(torch.uint8) << 3)


def pack_pairs(code: torch.Tensor) -> torch.Tensor:
    """(n, 2m) codes -> (n, m) bytes, element 2j in the high nibble of byte j."""
    return (code[:, 0::2] << 4) | code[:, 1::2]


def unpack_pairs(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_pairs`: (n, m) bytes -> (n, 2m) codes."""
    return torch.stack((packed >> 4, packed & 0x0F), dim=-1).reshape(packed.shape[0], -1)


def decode_codes(code: torch.Tensor) -> torch.Tensor:
    """float32 value of each code."""
    return VALUES.to(code.device)[code.to(torch.int64)]
