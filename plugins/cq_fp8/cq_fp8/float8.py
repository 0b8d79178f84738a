"""Per-tensor scaled FP8: ``L.weight`` in real FP8, ``weight_scale`` and ``input_scale`` F32 scalars.

ComfyUI decodes ``q.float() * weight_scale``. The weight is stored in its
real FP8 dtype (ComfyUI value-casts, it does not reinterpret U8 bytes), and
``input_scale`` is always written: without it FP8 hardware quantizes the
activations with scale 1.0 and clips them at the format's maximum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch

from cq_core import (
    FLOAT_SCALE_DTYPES,
    Contract,
    Format,
    LegacyLayer,
    Option,
    TensorRule,
    Tensors,
    TensorSpec,
    one_element,
    same_as_weight,
)
from cq_core.numerics.exact import div, div_
from cq_core.numerics.metrics import ErrorEnergy, rows_per_chunk
from cq_fp8.codes import codes_to_float, other_code

SCALAR = ()
#: The smallest positive float32 (a denormal).
SMALLEST_SCALE = float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23


def scaled_fp8_contract(dtype: torch.dtype) -> Contract:
    """What ComfyUI 0.30 loads for a per-tensor FP8 layer (``comfy/quant_ops.py`` QUANT_ALGOS:
    parameters ``weight_scale``, ``input_scale``; ``comfy/ops.py`` ``_load_quantized_module``).

    The weight is value-cast to the FP8 dtype, so it must be stored in it. ``weight_scale``
    is required (without it the layer fails when first used); comfy-kitchen casts it to
    float32 and takes any one-element shape. ``input_scale`` is optional: the loader uses
    1.0 when it is absent. The JSON key read besides ``format`` is ``full_precision_matrix_mult``.
    """
    return Contract(
        tensors={
            "weight": TensorRule((dtype,), same_as_weight),
            "weight_scale": TensorRule(FLOAT_SCALE_DTYPES, one_element, describe="one float scale per tensor"),
            "input_scale": TensorRule(FLOAT_SCALE_DTYPES, one_element, required=False, describe="a float scalar"),
        },
        json={"full_precision_matrix_mult": bool},
    )


def static_fp8(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (..., K) float32 quantized to ``dtype`` with one static ``scale`` and dequantized:
    comfy-kitchen's ``quantize_per_tensor_fp8`` (a multiply by the float32 reciprocal, a clamp to
    ±max, a cast) then ``dequantize_per_tensor_fp8``; None means 1.0, as ComfyUI uses then."""
    scale = torch.ones((), dtype=torch.float32) if scale is None else scale.float().reshape(())
    scale = scale.to(x.device)
    limit = float(torch.finfo(dtype).max)
    codes = (x.float() * (1.0 / scale)).clamp_(-limit, limit).to(dtype)
    return codes.float() * scale


class ScaledFloat8Format(Format):
    """Shared logic of the per-tensor FP8 formats; subclasses set the dtype."""

    dtype: ClassVar[torch.dtype]
    options = (
        Option(
            "input_scale",
            float,
            1.0,
            "Static activation scale written as L.input_scale (keep 1.0 unless calibrated).",
            positive=True,
        ),
    )

    @property
    def activation_max(self) -> float:  # static FP8: input_scale maps the format's max
        return self.max_value

    @property
    def max_value(self) -> float:
        return float(torch.finfo(self.dtype).max)

    @property
    def top_code(self) -> int:
        """The byte of the largest finite magnitude; magnitudes 0..top order like their codes."""
        return int(torch.tensor(self.max_value, device="cpu").to(self.dtype).view(torch.uint8))

    @classmethod
    def from_legacy_scale(cls, weight: TensorSpec, scale: TensorSpec) -> LegacyLayer | None:
        # ComfyUI's scaled-fp8 files: one scale per tensor; an absent scale_input meant 1.0.
        if weight.dtype != cls.dtype:
            return None
        if math.prod(scale.shape) == 1:
            return LegacyLayer((), unit_input_scale=True)
        return LegacyLayer(tuple(scale.shape), refusal=(
            f"FP8 weight with a {tuple(scale.shape)} scale: ComfyUI's FP8 formats take one scale per tensor"
        ))

    def stored_specs(self, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        return {
            "weight": TensorSpec(self.dtype, tuple(shape)),
            "weight_scale": TensorSpec(torch.float32, SCALAR),
            "input_scale": TensorSpec(torch.float32, SCALAR),
        }

    def compute_scales(self, weight: torch.Tensor) -> Tensors:
        low, high = torch.aminmax(weight)
        amax = torch.maximum(-low, high).float()
        # Denormal weights: amax / max may underflow to 0 (then 0/0 codes NaN); keep the smallest scale.
        scale = div(amax, self.max_value).clamp_(min=SMALLEST_SCALE) if amax > 0 else \
            torch.ones((), device=amax.device)
        return {"weight_scale": scale.reshape(SCALAR)}

    def _codes(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return div(weight, scale).clamp_(-self.max_value, self.max_value).to(self.dtype)

    def to_grid(self, weight: torch.Tensor, scales: Tensors, cols: slice = slice(None)) -> torch.Tensor:
        scale = scales["weight_scale"]
        return codes_to_float(self._codes(weight, scale), scale)

    def grid_neighbours(
        self, weight: torch.Tensor, scales: Tensors, cols: slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scale = scales["weight_scale"]
        ratio = div(weight.float(), scale)
        code = ratio.clamp(-self.max_value, self.max_value).to(self.dtype)
        nearest = codes_to_float(code, scale)
        other = codes_to_float(other_code(code, ratio, self.top_code), scale)
        return torch.minimum(nearest, other), torch.maximum(nearest, other)

    def _stored(self, codes: torch.Tensor, scale: torch.Tensor) -> Tensors:
        return {
            "weight": codes,
            "weight_scale": scale.float().reshape(SCALAR).cpu(),  # a scalar: to the CPU now, not via a pinned copy
            "input_scale": torch.tensor(self.opts["input_scale"], dtype=torch.float32, device="cpu"),
        }

    def pack(self, weight_on_grid: torch.Tensor, scales: Tensors) -> Tensors:
        scale = scales["weight_scale"]
        return self._stored(self._codes(weight_on_grid, scale), scale)

    def encode(self, weight: torch.Tensor, scales: Tensors | None = None) -> Tensors:
        return self._encode(weight, scales, measure=False)[0]

    def encode_measured(self, weight: torch.Tensor, scales: Tensors | None = None) -> tuple[Tensors, float, float]:
        if weight.device.type != "cpu":  # the measurement's arithmetic is the CPU's: measure apart
            return super().encode_measured(weight, scales)
        return self._encode(weight, scales, measure=True)

    def _encode(self, weight: torch.Tensor, scales: Tensors | None, measure: bool) -> tuple[Tensors, float, float]:
        """Row chunks keep the float32 temporaries small and in cache, whatever the layer size.
        With ``measure``, each chunk's stored codes are decoded while in cache, as
        ``cq_core.numerics.metrics.weight_error_energy`` would decode them (same chunks, same sums)."""
        scale = (scales or self.compute_scales(weight))["weight_scale"]
        stored_scale = scale.float().reshape(SCALAR).cpu()
        codes = torch.empty(weight.shape, dtype=self.dtype, device=weight.device)
        energy = ErrorEnergy()
        step = rows_per_chunk(tuple(weight.shape))
        for start in range(0, weight.shape[0], step):
            chunk = weight[start : start + step].to(torch.float32, copy=True)
            scaled = div(chunk, scale).clamp_(-self.max_value, self.max_value) if measure else \
                div_(chunk, scale).clamp_(-self.max_value, self.max_value)
            codes[start : start + step].copy_(scaled)
            if measure:
                energy.add(chunk, codes_to_float(codes[start : start + step], stored_scale))
        return (self._stored(codes, scale), *energy.totals())

    def decode(self, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int] | None = None) -> torch.Tensor:
        return codes_to_float(tensors["weight"], tensors["weight_scale"])

    def activation_fake_quant(self, x: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Static per-tensor FP8 of the input, as comfy-kitchen's eager ``quantize_per_tensor_fp8``
        does it: ``x * (1 / input_scale)`` clamped to the format's ±max, cast to FP8, times
        ``input_scale`` (1.0 when the layer stores none: ``comfy/quant_ops.py``). Bit-exact."""
        return static_fp8(x, tensors.get("input_scale"), self.dtype)

    def decode_rows(
        self, tensors: Mapping[str, torch.Tensor], start: int, stop: int, shape: tuple[int, int] | None = None
    ) -> torch.Tensor:
        return codes_to_float(tensors["weight"][start:stop], tensors["weight_scale"])


class Float8E4M3Format(ScaledFloat8Format):
    name = "float8_e4m3fn"
    description = "FP8 e4m3 with a per-tensor scale (max 448); the usual choice for weights."
    dtype = torch.float8_e4m3fn
    contract = scaled_fp8_contract(torch.float8_e4m3fn)
    is_default = True
    embedding_alias = "fp8"
    comfyui_since = "0.30.0"  # in QUANT_ALGOS of every ComfyUI the tests read (0.30.0 the oldest)
    comfyui_lora = "merged: re-quantized with a new per-tensor scale"
    # Native on GPUs with FP8 tensor cores: ComfyUI 0.30 ``comfy/ops.py`` ``pick_operations`` uses
    # them where ``supports_fp8_compute`` (compute capability >= 8.9: Ada, Hopper, Blackwell).
    native_gpus = ("blackwell", "hopper", "ada")


class Float8E5M2Format(ScaledFloat8Format):
    name = "float8_e5m2"
    description = "FP8 e5m2 with a per-tensor scale (max 57344): more range, less precision."
    dtype = torch.float8_e5m2
    contract = scaled_fp8_contract(torch.float8_e5m2)
    comfyui_since = "0.30.0"  # in QUANT_ALGOS of every ComfyUI the tests read (0.30.0 the oldest)
    comfyui_lora = "merged: re-quantized with a new per-tensor scale"
    # As native as e4m3 where FP8 runs, but a size budget never gains from it: the same bytes
    # with one mantissa bit less, and weights need no e5m2 range. Offered only with --formats.
    native_gpus = ()
