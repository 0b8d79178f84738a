"""Activation-side tensors from calibration statistics: a calibrated ``input_scale`` and
an AWQ-style ``pre_quant_scale``, chosen by the layer's output error on the compute path.

Both are judged on the layer's own calibration sample (``{layer}.sample`` from
``cq calibrate``, S rows of its input): the reference is ``x @ W.T`` in float32, the
candidate :func:`cq_core.numerics.compute_path.layer_output`, which quantizes the
activations as ComfyUI does on a GPU. Which layers take which tensor follows from the
format alone: its contract must list the tensor (what ComfyUI 0.30's loader reads), and
for ``input_scale`` the format must say what one unit of it covers
(:attr:`Format.activation_max`). No format is named here.

- ``input_scale``: by default (:data:`DEFAULT_RULE`) the calibration maximum (``absmax``,
  of the smoothed input with AWQ) over :attr:`Format.activation_max`. The other rules, kept
  for measurement: ``percentile`` adds two percentiles of ``|x|`` in the sample (99.9 %,
  99.99 %), ``mse`` also that maximum times ``2**(-j/4)``, j = 1..16; among the candidates
  the one with the least output error wins, the largest among those within :data:`TIE` of
  it (a larger scale clips fewer unseen activations).
- ``pre_quant_scale`` (AWQ, Lin et al. 2023, "AWQ: Activation-aware Weight Quantization";
  ModelOpt's form, which ComfyUI reads): ``s = m**-alpha`` from the mean activation
  magnitudes ``m`` (``absmean``), normalized to ``sqrt(max * min) = 1``; the stored weight is
  ``W / s`` per column and ComfyUI multiplies the input by ``s``. alpha in
  :data:`ALPHAS` is chosen with round-to-nearest encodes; the conversion's optimizer then
  encodes ``W / s`` with statistics of the smoothed input ``x * s`` (H becomes
  ``diag(s) H diag(s)``), so ``gptq`` and ``learned`` compose with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import torch

from cq_core.errors import CqError, UsageError
from cq_core.numerics.compute_path import PRE_QUANT_SCALE, layer_output, output_error, stored_weight
from cq_core.numerics.metrics import sqnr_db
from cq_core.numerics.second_moment import DIAG_KEY, EXACT_KEY, LOWRANK_KEY
from cq_core.plugin.types import Format, OptimizeContext, OptimizeResult, Optimizer, TensorSpec

INPUT_SCALE = "input_scale"
#: Values of the recipe field ``input_scale``.
INPUT_SCALE_CHOICES = ("none", "calibrated")
#: Candidate rules for a calibrated input_scale (``mse`` includes the others as candidates).
RULES = ("max", "percentile", "mse")
#: Measured on MiniLM held-out text (docs/compute_path.md): ``max`` beat ``mse`` by 0.10 dB on
#: fp8 and by 0.11 dB on nvfp4 with AWQ (0.05 dB behind without), and it never clips an
#: activation seen in calibration.
DEFAULT_RULE = "max"
PERCENTILES = (0.999, 0.9999)
GRID_STEPS = 16
#: Relative output-error margin within which the larger input_scale is preferred.
TIE = 0.005
#: AWQ exponents searched (0: no smoothing, s = 1).
ALPHAS = tuple(i / 8 for i in range(9))


@dataclass(frozen=True)
class ActivationSettings:
    """The recipe's activation-side settings: ``input_scale`` ``"none"`` (the format's default:
    1.0 for FP8, none stored for NVFP4) or ``"calibrated"``; ``awq`` writes ``pre_quant_scale``."""

    input_scale: str = "none"
    awq: bool = False
    rule: str = DEFAULT_RULE

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"input_scale rule must be one of {', '.join(RULES)}, not {self.rule!r}")

    @property
    def active(self) -> bool:
        return self.input_scale != "none" or self.awq


def extra_specs(fmt: Format, shape: tuple[int, ...], settings: ActivationSettings) -> dict[str, TensorSpec]:
    """The tensors (suffix -> spec) these settings add to a layer of ``fmt`` with weight ``shape``
    (N, K): ``input_scale`` F32 scalar, ``pre_quant_scale`` F32 (K,); empty where the format's
    contract does not list them (ComfyUI would not read them)."""
    takes = fmt.contract.tensors if fmt.contract is not None else {}
    specs: dict[str, TensorSpec] = {}
    if settings.awq and PRE_QUANT_SCALE in takes and len(shape) == 2:
        specs[PRE_QUANT_SCALE] = TensorSpec(torch.float32, (shape[1],))
    if settings.input_scale == "calibrated" and INPUT_SCALE in takes and fmt.activation_max:
        specs[INPUT_SCALE] = TensorSpec(torch.float32, ())
    return specs


def unused_settings(settings: ActivationSettings, formats: Iterable[Format]) -> list[str]:
    """The flags of ``settings`` that no format among ``formats`` (those of the quantized layers)
    stores a tensor for (``--awq``: ``pre_quant_scale``; ``--input-scale calibrated``:
    ``input_scale``), judged by each format's contract as :func:`extra_specs` is."""
    takes: set[str] = set()
    for fmt in formats:
        contract = fmt.contract.tensors if fmt.contract is not None else {}
        if PRE_QUANT_SCALE in contract:
            takes.add(PRE_QUANT_SCALE)
        if INPUT_SCALE in contract and fmt.activation_max:
            takes.add(INPUT_SCALE)
    unused = []
    if settings.awq and PRE_QUANT_SCALE not in takes:
        unused.append("--awq")
    if settings.input_scale == "calibrated" and INPUT_SCALE not in takes:
        unused.append("--input-scale calibrated")
    return unused


def smoothing_scales(absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``pre_quant_scale`` (K,) float32 for AWQ exponent ``alpha``: ``m**-alpha``, with channels
    that never fired at the smallest positive magnitude seen, normalized so that
    ``sqrt(max * min) = 1``."""
    m = absmean.float()
    floor = float(m[m > 0].min()) if bool((m > 0).any()) else 1.0
    s = m.clamp(min=floor).pow(-alpha)
    return s / torch.sqrt(s.max() * s.min())


def smoothed_statistics(stats: Mapping[str, torch.Tensor], s: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistics of the input ``x * s`` from those of ``x``: H scales as ``s_i s_j``, the rest per channel."""
    out = dict(stats)
    if EXACT_KEY in stats:
        out[EXACT_KEY] = stats[EXACT_KEY] * s.reshape(-1, 1) * s.reshape(1, -1)
    if LOWRANK_KEY in stats:  # the bounded form: H ~ Lᵀ L, so L's columns and the diagonal scale
        out[LOWRANK_KEY] = stats[LOWRANK_KEY] * s.to(stats[LOWRANK_KEY].dtype)
    if DIAG_KEY in stats:
        out[DIAG_KEY] = stats[DIAG_KEY] * s.square()
    for name in ("absmax", "absmean"):
        if name in stats:
            out[name] = stats[name] * s
    if "sample" in stats:
        out["sample"] = stats["sample"] * s
    return out


def _error(fmt: Format, x: torch.Tensor, tensors, shape, reference: torch.Tensor, weight=None) -> float:
    return output_error(reference, layer_output(fmt, x, tensors, shape, weight=weight))[1]


def search_smoothing(
    fmt: Format, weight: torch.Tensor, x: torch.Tensor, absmean: torch.Tensor, reference: torch.Tensor
) -> tuple[torch.Tensor, float, float, float]:
    """AWQ's search: ``(s, alpha, error at alpha, error without smoothing)`` over :data:`ALPHAS`,
    each alpha judged with a round-to-nearest encode of ``W / s`` on the compute path."""
    shape = tuple(weight.shape)
    best = None
    baseline = None
    for alpha in ALPHAS:
        s = smoothing_scales(absmean, alpha).to(weight.device)
        tensors = {**fmt.encode(weight / s), PRE_QUANT_SCALE: s}
        error = _error(fmt, x, tensors, shape, reference)
        if alpha == 0:
            baseline = error
        if best is None or error < best[2]:
            best = (s, alpha, error)
    return (*best, baseline)


def input_scale_candidates(x: torch.Tensor, amax: float, rule: str) -> list[tuple[str, float]]:
    """``(label, activation magnitude)`` candidates for ``rule`` from the sample ``x`` and the
    calibration maximum ``amax``."""
    candidates = [("max", amax)]
    if rule in ("percentile", "mse"):
        magnitudes = x.abs().flatten().float()
        if magnitudes.numel() > 1 << 24:  # torch.quantile's limit
            magnitudes = magnitudes[:: magnitudes.numel() // (1 << 24) + 1]
        for q in PERCENTILES:
            candidates.append((f"p{q * 100:g}", float(torch.quantile(magnitudes, q))))
    if rule == "mse":
        candidates += [(f"max*2^-{j / 4:g}", amax * 2.0 ** (-j / 4)) for j in range(1, GRID_STEPS + 1)]
    return [(label, value) for label, value in candidates if value > 0]


def calibrate_input_scale(
    fmt: Format,
    tensors: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    amax: float,
    reference: torch.Tensor,
    rule: str = DEFAULT_RULE,
) -> tuple[torch.Tensor, str]:
    """``(input_scale F32 scalar, the winning candidate's label)`` for the layer ``tensors``.

    ``x`` (S, K): the sample of the layer's input (before any ``pre_quant_scale``); ``amax``: the
    largest ``|x * pre_quant_scale|`` seen in calibration; ``reference``: ``x @ W.T``. A layer whose
    calibration inputs were all zero (``amax`` 0 and no nonzero candidate: a dead channel or layer)
    gets the unit scale 1.0, FP8's default without calibration (any scale gives it the same, zero,
    error on what was seen); so does one whose inputs are so small that every candidate scale is
    below float32's smallest normal number (it would be stored as 0)."""
    smoothing = tensors.get(PRE_QUANT_SCALE)
    seen = x * smoothing if smoothing is not None else x
    n = reference.shape[-1]
    k = x.shape[-1]
    weight = stored_weight(fmt, tensors, (n, k))
    # A scale below float32's smallest normal would be stored as 0 or a subnormal (ComfyUI divides
    # activations by it): inputs that small are a dead layer's too.
    candidates = [(label, magnitude) for label, magnitude in input_scale_candidates(seen, amax, rule)
                  if magnitude / fmt.activation_max >= torch.finfo(torch.float32).tiny]
    if not candidates:  # a dead layer: no input seen in calibration was nonzero, nothing to measure
        return torch.tensor(1.0, dtype=torch.float32), (
            f"no nonzero input in calibration: the unit scale, |x| up to {fmt.activation_max:g} unclipped")
    scored = []
    for label, magnitude in candidates:
        scale = torch.tensor(magnitude / fmt.activation_max, dtype=torch.float32)
        error = _error(fmt, x, {**tensors, INPUT_SCALE: scale}, (n, k), reference, weight)
        scored.append((error, magnitude, label, scale))
    best_error = min(error for error, *_ in scored)
    _, _, label, scale = max((s for s in scored if s[0] <= best_error * (1 + TIE)), key=lambda s: s[1])
    return scale, label


def optimize_for_compute_path(
    optimizer: Optimizer, weight: torch.Tensor, fmt: Format, context: OptimizeContext, settings: ActivationSettings
) -> OptimizeResult:
    """``optimizer.optimize``, plus the activation-side tensors ``settings`` ask for and ``fmt``
    takes (:func:`extra_specs`). Raises :class:`UsageError` when the layer has no calibration
    sample to choose them on."""
    specs = extra_specs(fmt, tuple(weight.shape), settings)
    if not specs:
        return optimizer.optimize_layer(weight, fmt, context)
    stats = context.stats
    if stats is None or "sample" not in stats or (PRE_QUANT_SCALE in specs and "absmean" not in stats):
        raise UsageError(
            f"Layer {context.layer!r}: a calibrated input_scale or AWQ needs its activation sample "
            f"('{context.layer}.sample' with at least one row: statistics from this version of 'cq calibrate', "
            "passed with --calibration)."
        )
    k = weight.shape[-1]
    for name, shape in (("sample", (None, k)), ("absmean", (k,))):
        found = tuple(stats[name].shape) if name in stats else None
        if found is not None and (len(found) != len(shape) or found[-1] != k):
            raise CqError(
                f"Layer {context.layer!r}: its calibration {name!r} has shape {list(found)}, but the weight has "
                f"{k} input features; the statistics were made for another model."
            )
    w = weight.to(context.device, torch.float32)
    x = stats["sample"].to(context.device, torch.float32)
    reference = x @ w.T
    notes = []
    smoothing = None
    if PRE_QUANT_SCALE in specs:
        smoothing, alpha, error, plain = search_smoothing(fmt, w, x, stats["absmean"].to(w.device), reference)
        signal = float(reference.double().square().sum())
        notes.append(f"AWQ alpha {alpha:g} " + (f"({sqnr_db(signal, error) - sqnr_db(signal, plain):+.2f} dB on the sample)"
                                                if signal > 0 else "(the layer's output on the sample is zero)"))
        context = replace(context, stats=smoothed_statistics(stats, smoothing.cpu()), measure=False)
        w = w / smoothing
    result = optimizer.optimize_layer(w, fmt, context)
    tensors = result.tensors
    if smoothing is not None:
        tensors[PRE_QUANT_SCALE] = smoothing.float().cpu()
    if INPUT_SCALE in specs:
        absmax = stats.get("absmax")
        amax = float((absmax.to(x.device) * smoothing if smoothing is not None else absmax.to(x.device)).max()) \
            if absmax is not None else float((x if smoothing is None else x * smoothing).abs().max())
        scale, label = calibrate_input_scale(fmt, tensors, x, amax, reference, settings.rule)
        tensors[INPUT_SCALE] = scale
        notes.append(f"input_scale {float(scale):.4g} ({label})")
    note = "; ".join(n for n in (result.note, *notes) if n)
    # The weight's error energies stand unless the optimizer saw the smoothed weight W / s.
    return OptimizeResult(tensors, note, result.energies if smoothing is None else None)
