"""The compute path: a quantized layer's output as ComfyUI computes it on a GPU that
quantizes activations (Ada, Hopper, Blackwell), simulated on the CPU.

ComfyUI 0.30 (``comfy/ops.py``, ``mixed_precision_ops`` ``Linear.forward``) first
multiplies the input by ``L.pre_quant_scale`` when the layer stores one, then, for a
format whose QUANT_ALGOS entry quantizes inputs, quantizes the activation with
``L.input_scale`` and multiplies the two quantized operands. Where the hardware kernel
is missing comfy-kitchen dequantizes both and calls ``torch.nn.functional.linear``;
that is the product simulated here, in float32:

    y = activation_fake_quant(x) @ W_stored.T (+ bias)

``W_stored`` is the weight as stored: :meth:`Format.decode` without the
``pre_quant_scale`` it folds in for the weight-only comparison (on the weight-only
path ComfyUI multiplies ``x * pre_quant_scale`` by ``W_stored``, the same thing).
A weight-only layer (``activation_fake_quant`` None) gives ``x @ decode(tensors).T``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

#: ComfyUI multiplies a layer's input by this stored tensor before anything else
#: (``comfy/ops.py``: "ModelOpt AWQ-style smoothing"), whatever the format.
PRE_QUANT_SCALE = "pre_quant_scale"


class ComputeFormat(Protocol):
    """What the compute path needs of a format (:class:`cq_core.plugin.types.Format` is one)."""

    def activation_fake_quant(self, x: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None: ...

    def decode(self, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int] | None = None) -> torch.Tensor: ...


def stored_weight(fmt: ComputeFormat, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """The float32 (N, K) weight the matmul multiplies: :meth:`decode` without ``pre_quant_scale``."""
    return fmt.decode({k: v for k, v in tensors.items() if k != PRE_QUANT_SCALE}, shape)


def layer_output(
    fmt: ComputeFormat,
    x: torch.Tensor,
    tensors: Mapping[str, torch.Tensor],
    shape: tuple[int, int],
    bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The layer's (..., N) float32 output on the compute path for the input ``x`` (..., K).

    ``shape`` is the weight's (N, K); ``weight`` may pass :func:`stored_weight` (or, for a
    weight-only format, ``decode``) already computed, to decode once for many inputs.
    """
    x = x.float()
    seen = fmt.activation_fake_quant(x, tensors)
    if seen is None:
        w = weight if weight is not None else fmt.decode(tensors, shape)
        seen = x
    else:
        w = weight if weight is not None else stored_weight(fmt, tensors, shape)
    out = seen @ w.T
    return out if bias is None else out + bias.float()


def output_error(reference: torch.Tensor, output: torch.Tensor) -> tuple[float, float]:
    """``(sum of reference², sum of (output - reference)²)`` in float64: energies for
    :func:`cq_core.numerics.metrics.sqnr_db`."""
    reference = reference.double()
    return float(reference.square().sum()), float((output.double() - reference).square().sum())
