"""The compute path on a real model: all-MiniLM-L6-v2 with its activations quantized as
ComfyUI quantizes them on an Ada/Hopper/Blackwell GPU, simulated on the CPU.

Needs the ``bench`` extra (see bench/minilm_optimizers.py, whose texts and helpers it uses).

1. Capture calibration statistics on CALIBRATION_TEXTS (H, absmax, absmean and a 128-row
   sample of every encoder Linear's input).
2. For each configuration, encode every encoder Linear through the same calls ``cq convert``
   makes (:func:`cq_core.engine.activations.optimize_for_compute_path`), then replace each
   Linear by :func:`cq_core.numerics.compute_path.layer_output`: the activation quantized and
   dequantized as comfy-kitchen's eager backend does, times the stored weight.
3. Embed EVALUATION_TEXTS (held out) and compare with the unquantized model: embedding SQNR
   in dB, mean cosine. "weight-only" rows multiply in high precision (CPU / older GPUs).

4. ``layers``: single layers on held-out inputs (the evaluation texts' own activations), where
   the activation-side tensors matter: fp8 with the layer's input scaled by 100 and by 1/1000
   (a model whose activations run to thousands, or stay tiny), and nvfp4 on the MiniLM layer
   with the most outlying input channel (largest absmax / median absmean).

Usage: python bench/minilm_compute_path.py [--only fp8|nvfp4|layers] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from minilm_optimizers import (
    EVALUATION_TEXTS,
    calibration_batches,
    compare,
    embed,
    encoder_linears,
    load_model,
    tokenize,
)

from cq_core.engine.capture import capture_statistics
from cq_core.engine.activations import ActivationSettings, optimize_for_compute_path
from cq_core.numerics.compute_path import layer_output, output_error, stored_weight
from cq_core.numerics.metrics import sqnr_db
from cq_core.plugin.manager import get_registry
from cq_core.plugin.types import OptimizeContext


class SimulatedLinear(torch.nn.Module):
    """A Linear replaced by its compute-path (or weight-only) output."""

    def __init__(self, fmt, tensors, shape, bias, weight_only: bool):
        super().__init__()
        self.fmt, self.tensors, self.shape, self.bias = fmt, tensors, shape, bias
        self.weight_only = weight_only
        self.weight = fmt.decode(tensors, shape) if weight_only else stored_weight(fmt, tensors, shape)

    def forward(self, x):
        if self.weight_only:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return layer_output(self.fmt, x, self.tensors, self.shape, self.bias, weight=self.weight)


def quantize(model, fmt, optimizer, stats, settings, weight_only=False, static_scale=None):
    """A copy of ``model`` whose encoder Linears run as ComfyUI would run the converted file."""
    quantized = copy.deepcopy(model)
    notes = []
    for name, module in encoder_linears(quantized):
        context = OptimizeContext(layer=name, stats=stats.get(name), seed=0)
        result = optimize_for_compute_path(optimizer, module.weight.data, fmt, context, settings)
        tensors = result.tensors
        if static_scale is not None:
            tensors["input_scale"] = torch.tensor(static_scale)
        notes.append(f"{name}: {result.note}")
        simulated = SimulatedLinear(fmt, tensors, tuple(module.weight.shape), module.bias.data, weight_only)
        parent_name, _, child = name.rpartition(".")
        setattr(quantized.get_submodule(parent_name), child, simulated)
    return quantized, notes


#: (label, format, optimizer, settings, weight_only, static input_scale)
CONFIGS = {
    "fp8": [
        ("fp8 rtn, weight-only", "float8_e4m3fn", "rtn", ActivationSettings(), True, None),
        ("fp8 rtn, input_scale 1.0 (cq before)", "float8_e4m3fn", "rtn", ActivationSettings(), False, None),
        ("fp8 rtn, input_scale calibrated: max", "float8_e4m3fn", "rtn",
         ActivationSettings("calibrated", rule="max"), False, None),
        ("fp8 rtn, input_scale calibrated: percentile", "float8_e4m3fn", "rtn",
         ActivationSettings("calibrated", rule="percentile"), False, None),
        ("fp8 rtn, input_scale calibrated: mse", "float8_e4m3fn", "rtn",
         ActivationSettings("calibrated", rule="mse"), False, None),
    ],
    "nvfp4": [
        ("nvfp4 gptq, weight-only", "nvfp4", "gptq", ActivationSettings(), True, None),
        ("nvfp4 rtn, W4A4", "nvfp4", "rtn", ActivationSettings(), False, None),
        ("nvfp4 gptq, W4A4 (input_scale per call)", "nvfp4", "gptq", ActivationSettings(), False, None),
        ("nvfp4 gptq + input_scale: max", "nvfp4", "gptq", ActivationSettings("calibrated", rule="max"), False, None),
        ("nvfp4 gptq + input_scale: mse", "nvfp4", "gptq", ActivationSettings("calibrated", rule="mse"), False, None),
        ("nvfp4 gptq + AWQ", "nvfp4", "gptq", ActivationSettings(awq=True), False, None),
        ("nvfp4 gptq + input_scale: mse + AWQ", "nvfp4", "gptq",
         ActivationSettings("calibrated", awq=True, rule="mse"), False, None),
        ("nvfp4 gptq + input_scale: max + AWQ (the default rule)", "nvfp4", "gptq",
         ActivationSettings("calibrated", awq=True, rule="max"), False, None),
        ("nvfp4 rtn + input_scale: mse + AWQ", "nvfp4", "rtn",
         ActivationSettings("calibrated", awq=True, rule="mse"), False, None),
    ],
}


def scaled_statistics(stats, factor):
    return {"H": stats["H"] * factor**2, "absmax": stats["absmax"] * factor,
            "absmean": stats["absmean"] * factor, "sample": stats["sample"] * factor}


def layer_sqnr(fmt, optimizer, weight, stats, held_out, settings, static_scale=None):
    """Output SQNR (dB) of one layer on held-out inputs, on the compute path."""
    result = optimize_for_compute_path(optimizer, weight, fmt, OptimizeContext("layer", stats), settings)
    tensors = result.tensors
    if static_scale is not None:
        tensors["input_scale"] = torch.tensor(static_scale)
    reference = held_out @ weight.T
    signal, noise = output_error(reference, layer_output(fmt, held_out, tensors, tuple(weight.shape)))
    return sqnr_db(signal, noise)


def layer_rows(model, stats, held_out_stats, registry) -> list[tuple[str, float, float]]:
    """``(case, baseline dB, with the activation-side tensors dB)`` per single-layer case."""
    rows = []
    fp8 = registry.format("float8_e4m3fn")()
    rtn, gptq = registry.optimizer("rtn")(), registry.optimizer("gptq")()
    modules = dict(encoder_linears(model))
    name = "encoder.layer.0.output.dense"
    weight = modules[name].weight.data
    for factor in (1.0, 100.0, 1e-3):
        cal = scaled_statistics(stats[name], factor)
        x = held_out_stats[name]["sample"] * factor
        before = layer_sqnr(fp8, rtn, weight, cal, x, ActivationSettings())
        for rule in ("max", "mse"):
            after = layer_sqnr(fp8, rtn, weight, cal, x, ActivationSettings("calibrated", rule=rule))
            rows.append((f"fp8 {name}, input x{factor:g}: input_scale 1.0 -> calibrated ({rule})", before, after))
    ratio = {n: float(s["absmax"].max() / s["absmean"].median()) for n, s in stats.items()}
    worst = max(ratio, key=ratio.get)
    nv = registry.format("nvfp4")()
    weight = modules[worst].weight.data
    x = held_out_stats[worst]["sample"]
    base = layer_sqnr(nv, gptq, weight, stats[worst], x, ActivationSettings())
    for label, settings in (("+ input_scale (max)", ActivationSettings("calibrated", rule="max")),
                            ("+ input_scale (mse)", ActivationSettings("calibrated", rule="mse")),
                            ("+ AWQ", ActivationSettings(awq=True)),
                            ("+ input_scale (max) + AWQ", ActivationSettings("calibrated", awq=True, rule="max"))):
        rows.append((f"nvfp4 gptq {worst} (absmax/median {ratio[worst]:.0f}x) {label}", base,
                     layer_sqnr(nv, gptq, weight, stats[worst], x, settings)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=[*sorted(CONFIGS), "layers"], help="One group of configurations.")
    parser.add_argument("--match", default="", help="Only configurations whose label contains this text.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", type=Path, help="Also write the result table to this file.")
    parser.add_argument("--notes", action="store_true", help="Print each layer's note.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_model()
    stats = capture_statistics(model, calibration_batches(tokenizer), layers=r"^encoder\.")
    evaluation = tokenize(tokenizer, EVALUATION_TEXTS)
    reference = embed(model, evaluation)
    registry = get_registry()
    rows = []
    for group, configs in CONFIGS.items():
        if args.only and group != args.only:
            continue
        for label, format_name, optimizer_name, settings, weight_only, static in configs:
            if args.match not in label:
                continue
            fmt = registry.format(format_name)()
            optimizer = registry.optimizer(optimizer_name)()
            quantized, notes = quantize(model, fmt, optimizer, stats, settings, weight_only, static)
            metrics = compare(reference, embed(quantized, evaluation))
            rows.append((label, metrics["sqnr_db"], metrics["cosine"]))
            print(f"{label:48s} SQNR {metrics['sqnr_db']:6.2f} dB  cos {metrics['cosine']:.5f}", flush=True)
            if args.notes:
                print("\n".join("    " + n for n in notes))
    table = ["| configuration | embedding SQNR dB | mean cosine |", "|---|---:|---:|"]
    table += [f"| {label} | {sqnr:.2f} | {cosine:.5f} |" for label, sqnr, cosine in rows]
    if args.only in (None, "layers"):
        held_out = capture_statistics(model, [evaluation], layers=r"^encoder\.")
        table += ["", "| single layer, held-out inputs | before dB | after dB | gain dB |", "|---|---:|---:|---:|"]
        for case, before, after in layer_rows(model, stats, held_out, registry):
            print(f"{case:90s} {before:6.2f} -> {after:6.2f} dB", flush=True)
            table.append(f"| {case} | {before:.2f} | {after:.2f} | {after - before:+.2f} |")
    print("\n" + "\n".join(table))
    if args.markdown:
        args.markdown.write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
