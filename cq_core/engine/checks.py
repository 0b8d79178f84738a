"""The checks a conversion passes before anything is written, and the warnings it leaves.

Each check raises one sentence naming the tensor, layer, file or flag
(:class:`cq_core.errors.CqError` for bad data, :class:`UsageError` for a request that
cannot work); each warning is a sentence for :attr:`cq_core.engine.report.Report.warnings`,
the one place warnings live (the CLI prints them, the Python API returns them, the ComfyUI
node shows them).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from cq_core.engine.activations import ActivationSettings, unused_settings
from cq_core.engine.plan import QUANTIZE, Plan, TensorPlan
from cq_core.engine.report import Report
from cq_core.engine.rules import LayerRule, UserPattern
from cq_core.errors import CqError, UsageError, quoted
from cq_core.io.calibration_file import CalibrationFile
from cq_core.io.source import Source
from cq_core.plugin.comfyui_versions import not_loaded_reason
from cq_core.plugin.types import Optimizer


NONFINITE_KEEP_REASON = "contains NaN or Inf; kept in high precision (--nonfinite keep)"


def is_finite(weight: torch.Tensor) -> bool:
    low, high = torch.aminmax(weight)  # one pass, no copy; NaN propagates
    return bool(torch.isfinite(low) and torch.isfinite(high))


def check_finite(name: str, weight: torch.Tensor, origin: str | None = None) -> None:
    """NaN or Inf in a weight would poison its scale: refuse, naming the tensor and, when known,
    the file (``origin``) it was read from."""
    if not is_finite(weight):
        where = f"{origin}: tensor" if origin else "Tensor"
        raise CqError(
            f"{where} {name!r} contains NaN or Inf values; fix the source checkpoint, or pass "
            "--nonfinite keep to keep such tensors in high precision."
        )


def check_finite_decode(item: TensorPlan, weight: torch.Tensor) -> None:
    """The core's guarantee, whatever the format: no layer is written that decodes to NaN/Inf.

    Called when the measurement (which decodes every layer) found a non-finite
    decode of a finite weight: a format bug or a weight beyond what the format
    can hold; either way the layer is refused by name, nothing is written.
    """
    amax = float(weight.abs().amax()) if weight.numel() else 0.0
    raise CqError(
        f"Tensor {item.name!r} would decode to NaN or Inf in format {item.format.name!r} (its largest "
        f"magnitude is {amax:.4g}); keep it in high precision with --layer '{_regex_literal(item.name)}=skip' "
        "or choose another format for it."
    )


def _regex_literal(name: str) -> str:
    return "^" + re.escape(name) + "$"


def non_finite_tensors(plan: Plan, source: Source) -> dict[str, str]:
    """Scan every tensor the plan would quantize; those with NaN/Inf, with the reason to keep them."""
    return {
        item.name: NONFINITE_KEEP_REASON
        for item in plan.items
        if item.action == QUANTIZE and not is_finite(source.read(item.name))
    }


def check_calibration_matches(calibration: CalibrationFile, plan: Plan) -> None:
    """A calibration file that names none of the quantized layers was made for another model
    (or with another name prefix): say so instead of silently optimizing without it."""
    layers = [item.layer for item in plan.items if item.action == QUANTIZE]
    if layers and not any(layer in calibration for layer in layers):
        example = sorted(calibration.layers)[0]
        raise UsageError(
            f"--calibration {calibration.path}: none of its layers (e.g. {example!r}) is a quantized layer "
            f"of this checkpoint (e.g. {layers[0]!r}); capture it with the checkpoint's names (prefix)."
        )
    # A calibrated input_scale or AWQ is chosen on each layer's own statistics: one missing is named now.
    missing = next((item for item in plan.items if item.activation is not None and item.layer not in calibration), None)
    if missing is not None:
        flag = "--awq" if missing.activation.awq else "--input-scale calibrated"
        raise UsageError(
            f"--calibration {calibration.path}: has no statistics for layer {missing.layer!r}, which {flag} needs; "
            "capture every Linear layer, or keep this one in high precision with --layer."
        )


def check_activation_settings_used(plan: Plan, activation: ActivationSettings) -> str | None:
    """``--awq`` or ``--input-scale calibrated`` where no quantized layer's format stores the
    tensor it chooses would be recorded and do nothing: refuse, naming the formats. When a size
    budget chose those formats (a recipe reused on another model may choose otherwise), return
    the sentence as a warning instead; None when every setting is used."""
    used = {item.format.name: item.format for item in plan.items if item.action == QUANTIZE and item.format is not None}
    unused = unused_settings(activation, used.values())
    if not unused:
        return None
    tensor = "pre_quant_scale" if unused[0] == "--awq" else "input_scale"
    if any(item.candidates for item in plan.items):
        chosen = ", ".join(sorted(used)) or "high precision only"
        return (f"{unused[0]} does nothing in this file: the size budget chose {chosen}, and none of them stores "
                f"{tensor} for ComfyUI to read.")
    raise UsageError(
        f"{unused[0]} does nothing here: no quantized layer's format ({', '.join(sorted(used)) or 'none'}) stores "
        f"{tensor} for ComfyUI to read; drop the flag or choose a format that takes it ('cq formats')."
    )


def check_calibration_needed(plan: Plan, opt: Optimizer, activation: ActivationSettings | None = None) -> None:
    """An optimizer that needs statistics (``Optimizer.needs_calibration``) run without any
    would only round to nearest, and calibrated activation tensors have nothing to be chosen
    from: refuse, and say how to get them."""
    if activation is not None and activation.active:
        flag = "--input-scale calibrated" if activation.input_scale != "none" else "--awq"
        raise UsageError(
            f"{flag} needs --calibration FILE, which 'cq calibrate' makes "
            "(with no data at hand: 'cq calibrate --random-tokens')."
        )
    needing = sorted({
        (item.optimizer or opt).name
        for item in plan.items
        if item.action == QUANTIZE and (item.optimizer or opt).needs_calibration
    })
    if needing:
        raise UsageError(
            f"--optimizer {needing[0]} needs --calibration FILE, which 'cq calibrate' makes "
            "(with no data at hand: 'cq calibrate --random-tokens')."
        )


def reads_statistics(plan: Plan, opt: Optimizer, activation: ActivationSettings | None, has_budget: bool) -> bool:
    """Whether anything in this conversion reads calibration statistics: a size budget (its
    errors), calibrated activation tensors (``--awq``, ``--input-scale calibrated``), or the
    optimizer of a quantized layer that uses them (:attr:`Optimizer.uses_calibration`)."""
    if has_budget or (activation is not None and activation.active):
        return True
    return any((item.optimizer or opt).uses_calibration for item in plan.items if item.action == QUANTIZE)


# ---------------------------------------------------------------------------
# Warnings: sentences for Report.warnings
# ---------------------------------------------------------------------------


def unloadable_format_warnings(plan: Plan) -> list[str]:
    """One sentence per format the plan quantizes with that stock ComfyUI does not load
    (``Format.comfy_loadable``), naming the loadable one it suggests."""
    warnings = []
    for fmt in dict.fromkeys(type(item.format) for item in plan.items if item.action == QUANTIZE):
        if not fmt.comfy_loadable:
            hint = f"; use {fmt.comfy_alternative!r} for a file it loads" if fmt.comfy_alternative else ""
            warnings.append(f"stock ComfyUI does not load {fmt.name!r}{hint}.")
    return warnings


def check_comfyui_version_loads(plan: Plan, version: str) -> None:
    """Refuse a plan that quantizes a layer in a format ComfyUI ``version`` (``--comfyui-version``)
    does not load (``Format.comfyui_since``: ComfyUI raises ``KeyError`` for it in
    ``comfy/ops.py``); the sentence names the format, a layer and the first release that loads it."""
    layers: dict[type, list[str]] = {}
    for item in plan.items:
        if item.action == QUANTIZE:
            layers.setdefault(type(item.format), []).append(item.name)
    for fmt, names in layers.items():
        reason = not_loaded_reason(fmt, version)
        if reason is not None:
            count = f"{len(names)} layers, e.g." if len(names) > 1 else "layer"
            raise UsageError(f"{reason}, and the plan stores {count} {quoted(names[0])} in it; pick another "
                             "format (--format, --layer, --fallback) or another ComfyUI release "
                             "(--comfyui-version, the recipe's comfyui_version).")


def unmatched_pattern_warnings(plan: Plan, layer_rules: Sequence[LayerRule], excludes: Sequence[UserPattern]) -> list[str]:
    """One sentence per ``--layer`` / layer-config rule and ``--exclude`` pattern that matches no
    tensor name of the input (searched as the plan searches them: a typo, or another model's
    names), with one name of the input for comparison."""
    names = [item.name for item in plan.items]
    example = next((n for n in names if n.endswith(".weight")), names[0] if names else None)
    like = f" (its names look like {quoted(example)})" if example else ""
    warnings = []
    for what, pattern in [*((rule.describe(), rule.pattern) for rule in layer_rules),
                          *((f"--exclude '{p.pattern}'", p) for p in excludes)]:
        if not any(pattern.search(name) for name in names):
            warnings.append(f"{what} matches no tensor of the input{like}; it changes nothing.")
    return warnings


def comfyui_load_check(plan: Plan, version: str | None) -> list[str]:
    """What the ComfyUI that will load the file says of the plan's formats: with ``version``
    (``--comfyui-version``) a refusal of any it does not load
    (:func:`check_comfyui_version_loads`), else a warning per format no release loads
    (:func:`unloadable_format_warnings`)."""
    if version is None:
        return unloadable_format_warnings(plan)
    check_comfyui_version_loads(plan, version)
    return []


def unread_statistics_warning(calibration: object, opt: Optimizer) -> str:
    """The sentence for statistics nothing reads (:func:`reads_statistics` is False): they
    are left out of the recorded recipe, so repeating it needs no statistics file."""
    return (f"nothing in this conversion reads the calibration statistics {quoted(str(calibration))} (optimizer "
            f"{opt.name} uses none; gptq, learned or rtn scales=output do): they are not recorded in the "
            "output's recipe.")


def nothing_quantized_warning(report: Report) -> str | None:
    """A run (or dry run) that quantizes nothing still writes the file: say so, with the first
    reason; None when a layer is quantized."""
    if report.quantized:
        return None
    was, holds = ("would be", "would hold") if report.dry_run else ("was", "holds")
    kept = [t for t in report.tensors if t.action == "keep" and t.name.endswith(".weight") and len(t.shape) == 2]
    why = f"e.g. {kept[0].name}: {kept[0].reason}" if kept else "the file holds no 2-D weight"
    return (f"no layer {was} quantized to {report.format} ({why}); the output {holds} the input's "
            "tensors unchanged.")
