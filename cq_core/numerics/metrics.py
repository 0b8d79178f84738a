"""Error metrics, measured from the decoded stored tensors, never from an optimizer's log."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Protocol

import torch


class Decoder(Protocol):
    """What the metrics need of a format (:class:`cq_core.plugin.types.Format` is one)."""

    def row_decoder(
        self, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int]
    ) -> Callable[[int, int], torch.Tensor]: ...

#: Elements per chunk when walking a large weight: bounds the float32 temporaries and
#: keeps them in cache (1 MB of float32: about twice as fast per pass as 4 MB here).
CHUNK_ELEMENTS = 1 << 18


def rows_per_chunk(shape: tuple[int, ...]) -> int:
    cols = shape[-1] if shape and shape[-1] else 1
    return max(1, CHUNK_ELEMENTS // cols)


def sqnr_db(signal_energy: float, noise_energy: float) -> float:
    """10 log10(signal / noise): inf for an exact result, -inf for an all-zero signal with error.

    NaN when either energy is not finite (a NaN/Inf weight or decode): callers check
    the energies first (:func:`cq_core.commands.convert.process_item`, :mod:`cq_core.commands.verify`).
    """
    if not (math.isfinite(signal_energy) and math.isfinite(noise_energy)):
        return math.nan
    if noise_energy == 0.0:
        return math.inf
    if signal_energy == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_energy) - 10.0 * math.log10(noise_energy)


def tensor_sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """SQNR of any two tensors of one shape (activations, say), in float64 throughout."""
    reference = reference.double()
    return sqnr_db(float(reference.square().sum()), float((reference - approximation.double()).square().sum()))


def sqnr_json(value: float | None) -> dict[str, float | bool | None]:
    """How the convert report and cq verify write a layer's SQNR: JSON has no infinity.

    ``{"sqnr_db": number, "exact": false}`` normally; an exact layer (infinite SQNR)
    is ``{"sqnr_db": null, "exact": true}``; no measurement (or an all-zero weight
    decoded with error) is ``{"sqnr_db": null, "exact": false}``.
    """
    if value is None or math.isnan(value):
        return {"sqnr_db": None, "exact": False}
    if math.isinf(value):
        return {"sqnr_db": None, "exact": value > 0}
    return {"sqnr_db": value, "exact": False}


def weight_sqnr_db(fmt: Decoder, weight: torch.Tensor, stored: Mapping[str, torch.Tensor]) -> float:
    """Weight SQNR of ``stored`` (as ComfyUI decodes it) against ``weight``, chunk by chunk."""
    return sqnr_db(*weight_error_energy(fmt, weight, stored))


def weight_error_energy(
    fmt: Decoder, weight: torch.Tensor, stored: Mapping[str, torch.Tensor]
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
    decoded_rows = fmt.row_decoder(stored, shape)

    energy = ErrorEnergy()
    step = rows_per_chunk(tuple(weight.shape))
    for start in range(0, weight.shape[0], step):
        stop = min(start + step, weight.shape[0])
        energy.add(weight[start:stop], decoded_rows(start, stop))
    return energy.totals()


#: A chunk's float32 sums are trusted between these (about 1e-18 and 1e30): below, squares
#: of float32 values may have underflowed; above, a sum may overflow. Outside, float64.
FLOAT32_SAFE_LOW = 2.0**-60
FLOAT32_SAFE_HIGH = 2.0**100


class ErrorEnergy:
    """Running ``(sum of weight², sum of (decoded - weight)²)`` over row chunks.

    Per-chunk dot products, totals as Python floats (double): the one
    arithmetic of :func:`weight_error_energy` (so of the convert report and
    of ``cq verify``) and of formats that measure while they encode
    (``Format.encode_measured``), so all give the same bits.

    Float32 where that is exact enough (ordinary weights, the fast path);
    float64 for a chunk whose float32 sums would overflow or underflow
    (weights near 1e30 or FLT_MAX, denormals): float64 holds the square of
    every float32 value, so the totals are finite exactly when the weight
    and its decode are.
    """

    def __init__(self) -> None:
        self.signal = self.noise = 0.0

    def add(self, weight_rows: torch.Tensor, decoded_rows: torch.Tensor) -> None:
        """Add one chunk; ``decoded_rows`` may be overwritten (it becomes the error)."""
        ref = weight_rows.float().reshape(-1)
        decoded = decoded_rows.to(ref.device).reshape(-1)
        signal = float(torch.dot(ref, ref))
        if FLOAT32_SAFE_LOW <= signal <= FLOAT32_SAFE_HIGH:
            error = decoded.sub_(ref)
            noise = float(torch.dot(error, error))
            if not FLOAT32_SAFE_LOW <= noise <= FLOAT32_SAFE_HIGH and noise != 0.0:
                # Tiny errors (squares may underflow) or a decode far off the weight.
                error = error.double()
                noise = float(torch.dot(error, error))
            elif noise == 0.0 and bool(error.any()):
                error = error.double()
                noise = float(torch.dot(error, error))
        else:
            ref = ref.double()
            error = decoded.double().sub_(ref)
            signal = float(torch.dot(ref, ref))
            noise = float(torch.dot(error, error))
        self.signal += signal
        self.noise += noise

    def totals(self) -> tuple[float, float]:
        return self.signal, self.noise
