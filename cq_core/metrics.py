"""Error metrics, measured from the decoded stored tensors, never from an optimizer's log."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from cq_core.types import Format

#: Elements per chunk when walking a large weight: bounds the float32 temporaries and
#: keeps them in cache (1 MB of float32: about twice as fast per pass as 4 MB here).
CHUNK_ELEMENTS = 1 << 18


def rows_per_chunk(shape: tuple[int, ...]) -> int:
    cols = shape[-1] if shape and shape[-1] else 1
    return max(1, CHUNK_ELEMENTS // cols)


def sqnr_db(signal_energy: float, noise_energy: float) -> float:
    """10 log10(signal / noise): inf for an exact result, -inf for an all-zero signal with error."""
    if noise_energy == 0.0:
        return math.inf
    if signal_energy == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_energy / noise_energy)


def tensor_sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    reference = reference.double()
    return sqnr_db(float(reference.square().sum()), float((reference - approximation.double()).square().sum()))


def weight_sqnr_db(fmt: Format, weight: torch.Tensor, stored: Mapping[str, torch.Tensor]) -> float:
    """Weight SQNR of ``stored`` (as ComfyUI decodes it) against ``weight``, chunk by chunk."""
    return sqnr_db(*weight_error_energy(fmt, weight, stored))


def weight_error_energy(
    fmt: Format, weight: torch.Tensor, stored: Mapping[str, torch.Tensor]
) -> tuple[float, float]:
    """``(sum of weight², sum of (decoded - weight)²)``, chunk by chunk, as Python floats.

    The first is finite exactly when every element of ``weight`` is finite
    (a NaN or Inf poisons the sum) or, rarely, when float32 squares overflow:
    callers may read a finiteness check off it for free.
    """
    shape = tuple(weight.shape)
    if any(t.device.type != "cpu" for t in stored.values()):
        # After a GPU run some stored tensors may still be on the device: decode them
        # together on the CPU, where they are about to be written from anyway.
        stored = {suffix: t.cpu() for suffix, t in stored.items()}
    if type(fmt).decode_rows is Format.decode_rows:  # no cheap row path: decode once, then slice
        full = fmt.decode(stored, shape)

        def decoded_rows(start: int, stop: int) -> torch.Tensor:
            return full[start:stop]
    else:

        def decoded_rows(start: int, stop: int) -> torch.Tensor:
            return fmt.decode_rows(stored, start, stop, shape)

    energy = ErrorEnergy()
    step = rows_per_chunk(tuple(weight.shape))
    for start in range(0, weight.shape[0], step):
        stop = min(start + step, weight.shape[0])
        energy.add(weight[start:stop], decoded_rows(start, stop))
    return energy.totals()


class ErrorEnergy:
    """Running ``(sum of weight², sum of (decoded - weight)²)`` over row chunks.

    Per-chunk float32 dot products, totals as Python floats (double): the one
    arithmetic of :func:`weight_error_energy` and of formats that measure while
    they encode (``Format.encode_measured``), so both give the same bits.
    """

    def __init__(self) -> None:
        self.signal = self.noise = 0.0

    def add(self, weight_rows: torch.Tensor, decoded_rows: torch.Tensor) -> None:
        """Add one chunk; ``decoded_rows`` may be overwritten (it becomes the error)."""
        ref = weight_rows.float().reshape(-1)
        error = decoded_rows.to(ref.device).reshape(-1).sub_(ref)
        self.signal += float(torch.dot(ref, ref))
        self.noise += float(torch.dot(error, error))

    def totals(self) -> tuple[float, float]:
        return self.signal, self.noise
