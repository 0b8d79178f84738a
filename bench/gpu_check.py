"""GPU check: same bytes as the CPU for round-to-nearest, the optimizers' results on
both devices, and timings, on a FLUX-sized layer set.

Self-contained: generates its own bf16 input (one FLUX.1-dev double block
and one single block, real key names, ~0.5 B params, ~1 GB) and synthetic
calibration statistics for its layers (anisotropic, correlated inputs:
H = S (L Lᵀ / r + εI) S with log-normal channel scales S). Three tables:

1. every round-to-nearest format converted on the CPU and on CUDA, output
   files compared byte for byte;
2. each optimizer on one 12288x3072 layer (``double_blocks.0.img_mlp.0``)
   on the CPU and on CUDA: time, gain over round-to-nearest on the
   optimizer's own objective, and the share of identical stored bytes
   (optimizers may differ by floating-point noise, not by quality);
3. whole-layer-set conversions on CUDA: NVFP4 with scale search and the
   optimizers, weight-only and with the calibration file.

Rows are printed as they finish, so a run cut short still says something.

    python bench/gpu_check.py [--dir /tmp/cq-gpu] [--skip-cpu] [--sections rtn,layer,convert]
    python bench/gpu_check.py --gpu-device cpu --layout demo   # smoke test without a GPU

Exit status 1 when any round-to-nearest format gives different bytes on CUDA,
or an optimizer's CUDA gain is more than 0.1 dB from its CPU gain.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shutil
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, *sorted((ROOT / "plugins").glob("*"))):
    sys.path.insert(0, str(path))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from cq_core.builtin.rounding_objective import (  # noqa: E402
    data_free_objective,
    decoded,
    hessian_from_stats,
    output_objective,
)
from cq_core.io.calibration_file import save_statistics  # noqa: E402
from cq_core.commands.convert import convert  # noqa: E402
from cq_core.numerics.exact import div  # noqa: E402
from cq_core.numerics.metrics import sqnr_db  # noqa: E402
from cq_core.plugin.manager import Registry, make_plugin_manager  # noqa: E402
from cq_core.io.synthetic import DEMO_LAYOUT, Layout, write_synthetic_checkpoint  # noqa: E402
from cq_core.plugin.types import OptimizeContext  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from bench_flux import flux_layout  # noqa: E402

PLUGINS = ("cq_fp8.plugin", "cq_int8.plugin", "cq_nvfp4.plugin", "cq_models.plugin")
#: Table 1's variants besides every installed format with its default options.
RTN_VARIANTS = (
    ("nvfp4", {"scale_search": False}),
    ("int8_tensorwise", {"convrot": True}),
    ("int8_tensorwise", {"clip_search": True}),
)
#: (format, optimizer, with calibration) for the one-layer CPU/CUDA comparison.
LAYER_RUNS = (
    ("float8_e4m3fn", "learned", False),
    ("nvfp4", "learned", False),
    ("float8_e4m3fn", "gptq", True),
    ("nvfp4", "gptq", True),
    ("nvfp4", "learned", True),
)
#: Largest gap between a CPU and a CUDA optimizer gain that counts as floating-point noise.
GAIN_TOLERANCE_DB = 0.1


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(64 << 20):
            h.update(chunk)
    return h.hexdigest()


def failed(where: str, exc: Exception) -> str:
    """The row's cell for a failure; the whole traceback goes to stderr."""
    print(f"--- {where}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    return f"failed: {str(exc)[:80]}"


def compare_files(cpu_out: Path, gpu_out: Path) -> tuple[bool, str]:
    """(same, cell): byte-identical files, or how much and where they differ."""
    if digest(cpu_out) == digest(gpu_out):
        return True, "yes"
    differing, same, total = [], 0, 0
    with safe_open(str(cpu_out), framework="pt") as a, safe_open(str(gpu_out), framework="pt") as b:
        for key in a.keys():
            x = a.get_tensor(key).reshape(-1).contiguous().view(torch.uint8)
            y = b.get_tensor(key).reshape(-1).contiguous().view(torch.uint8)
            equal = int((x == y).sum()) if x.shape == y.shape else 0
            same, total = same + equal, total + x.numel()
            if equal != x.numel():
                differing.append(f"{key} ({x.numel() - equal} B)")
    head = ", ".join(differing[:2])
    return False, f"NO: {100 * same / max(total, 1):.4f}% of bytes same; {len(differing)} tensors differ, e.g. {head}"


def division_check(device: str) -> None:
    """The trap :mod:`cq_core.numerics.exact` closes: CUDA divides by a CPU scalar through its reciprocal."""
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0))
    reference = x / 6.0
    plain = int((((x.to(device) / 6.0).cpu()) != reference).sum())
    exact = int(((div(x.to(device), 6.0).cpu()) != reference).sum())
    print(f"x / 6.0 on {device} vs CPU: {plain} of {x.numel()} values differ; cq_core.numerics.exact.div: {exact}",
          flush=True)


def synchronize(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def timed(registry: Registry, source: Path, output: Path, **kwargs):
    device = kwargs.get("device", "cpu")
    if device != "cpu":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    report = convert(source, output, overwrite=True, model="none", registry=registry, **kwargs)
    seconds = time.perf_counter() - started
    gpu_mb = torch.cuda.max_memory_allocated() / 1e6 if device != "cpu" else 0.0
    return report, seconds, gpu_mb


def row(*cells) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def header(*cells) -> None:
    print(flush=True)
    row(*cells)
    row(*("---" if i == 0 else "---:" for i in range(len(cells))))


def synthetic_statistics(layout: Layout, seed: int = 0, rank: int = 64) -> dict[str, dict[str, torch.Tensor]]:
    """Calibration statistics for every 2-D weight of ``layout``: inputs with log-normal
    channel scales and ``rank`` shared directions, so H is anisotropic and correlated."""
    generator = torch.Generator().manual_seed(seed)
    stats = {}
    for name, shape in layout:
        if len(shape) != 2 or not name.endswith(".weight"):
            continue
        k = shape[1]
        scale = torch.randn(k, generator=generator).exp()
        directions = torch.randn(k, rank, generator=generator)
        h = directions @ directions.T / rank
        h.diagonal().add_(0.05)
        h = scale[:, None] * h * scale[None, :]
        stats[name[: -len(".weight")]] = {"H": h, "absmax": 3 * h.diagonal().sqrt()}
    return stats


def rtn_section(args, registry: Registry, source: Path, params: int) -> int:
    """Table 1: round-to-nearest on both devices, byte for byte. Returns the mismatches."""
    mismatches = 0
    header("format", "CPU s", "CUDA s", "CUDA Mparam/s", "peak GPU MB", "mean SQNR dB", "same bytes")
    chosen = args.formats.split(",") if args.formats else sorted(registry.formats)
    variants = [(fmt, {}) for fmt in chosen] + [(f, o) for f, o in RTN_VARIANTS if f in chosen]
    for fmt, options in variants:
        name = fmt + "".join(f" {k}={v}" for k, v in options.items())
        if fmt not in registry.formats:
            row(name, "-", "-", "-", "-", "-", "format not installed")
            continue
        gpu_out, cpu_out = args.dir / "rtn-cuda.safetensors", args.dir / "rtn-cpu.safetensors"
        try:
            report, gpu_s, gpu_mb = timed(registry, source, gpu_out, format=fmt, format_options=options,
                                          device=args.gpu_device)
        except Exception as exc:  # noqa: BLE001 (a row per failure, the check goes on)
            row(name, "-", "-", "-", "-", "-", "CUDA " + failed(name, exc))
            mismatches += 1
            continue
        cpu_s, same = "-", "not checked"
        if not args.skip_cpu:
            _, seconds, _ = timed(registry, source, cpu_out, format=fmt, format_options=options, device="cpu",
                                  threads=args.threads)
            cpu_s = f"{seconds:.1f}"
            identical, same = compare_files(cpu_out, gpu_out)
            mismatches += not identical
            cpu_out.unlink()
        gpu_out.unlink()
        sqnr = f"{report.mean_sqnr_db:.2f}" if report.mean_sqnr_db is not None else "-"
        row(name, cpu_s, f"{gpu_s:.1f}", f"{params / 1e6 / gpu_s:.0f}", f"{gpu_mb:.0f}", sqnr, same)
    return mismatches


def optimize_on(registry: Registry, fmt_name: str, opt_name: str, weight, stats, layer: str, device: str):
    """One optimizer call: (seconds, stored tensors, gain over rtn in dB on its own objective)."""
    fmt, optimizer = registry.format(fmt_name)(), registry.optimizer(opt_name)()
    context = OptimizeContext(layer=layer, stats=stats, device=torch.device(device), seed=0)
    synchronize(device)
    started = time.perf_counter()
    result = optimizer.optimize(weight, fmt, context)
    synchronize(device)
    seconds = time.perf_counter() - started
    w = weight.float()  # judged on the CPU, the same way for both devices
    h = hessian_from_stats(stats, w.shape[1], layer)
    if h is not None:
        objective = output_objective(h)
    else:
        o = optimizer.opts
        objective = data_free_objective(w, o["rank_fraction"], o["top_weight"], 0, o["max_rank"])
    rtn = objective.measure(decoded(fmt, fmt.encode(w), w.device) - w)
    ours = objective.measure(decoded(fmt, result.tensors, w.device) - w)
    return seconds, result.tensors, sqnr_db(rtn, ours)


def same_share(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Share of identical bytes over all stored tensors."""
    same = total = 0
    for key, tensor in a.items():
        x = tensor.reshape(-1).contiguous().view(torch.uint8)
        y = b[key].reshape(-1).contiguous().view(torch.uint8)
        same += int((x == y).sum())
        total += x.numel()
    return same / max(total, 1)


def layer_section(args, registry: Registry, source: Path, stats, layer: str) -> int:
    """Table 2: each optimizer on one layer, CPU against CUDA. Returns the disagreements."""
    with safe_open(str(source), framework="pt") as f:
        weight = f.get_tensor(f"{layer}.weight")
    disagreements = 0
    header(f"{layer} {tuple(weight.shape)}: format", "optimizer", "CPU s", "CUDA s", "CPU gain dB",
           "CUDA gain dB", "same bytes %")
    for fmt, opt, calibrated in LAYER_RUNS:
        label = opt + (" + calibration" if calibrated else " (weight-only)")
        layer_stats = stats[layer] if calibrated else None
        try:
            gpu_s, gpu_tensors, gpu_gain = optimize_on(registry, fmt, opt, weight, layer_stats, layer,
                                                       args.gpu_device)
            cpu_s, cpu_tensors, cpu_gain = optimize_on(registry, fmt, opt, weight, layer_stats, layer, "cpu")
        except Exception as exc:  # noqa: BLE001
            row(fmt, label, "-", "-", "-", "-", failed(f"{fmt} {label}", exc))
            disagreements += 1
            continue
        close = math.isfinite(cpu_gain) and abs(cpu_gain - gpu_gain) <= GAIN_TOLERANCE_DB
        disagreements += not close
        row(fmt, label, f"{cpu_s:.1f}", f"{gpu_s:.1f}", f"{cpu_gain:+.2f}", f"{gpu_gain:+.2f}"
            + ("" if close else " (DIFFERS)"), f"{100 * same_share(cpu_tensors, gpu_tensors):.2f}")
    return disagreements


def convert_section(args, registry: Registry, source: Path, calibration: Path, params: int) -> None:
    """Table 3: whole-layer-set conversions on CUDA with scale search and the optimizers."""
    header("format", "optimizer", "CUDA s", "CUDA Mparam/s", "peak GPU MB", "mean SQNR dB", "layers won")
    runs = [("nvfp4", "rtn", {"scale_search": True}, None)]
    for opt in ("learned", "gptq"):
        for calib in ((None, calibration) if opt == "learned" else (calibration,)):
            runs += [(fmt, opt, {}, calib) for fmt in ("float8_e4m3fn", "nvfp4")]
    for fmt, opt, options, calib in runs:
        out = args.dir / f"{fmt}-{opt}.safetensors"
        label = fmt + (" (scale search)" if options.get("scale_search") else "")
        opt_label = opt + (" + calibration" if calib else " (weight-only)" if opt != "rtn" else "")
        try:
            report, gpu_s, gpu_mb = timed(registry, source, out, format=fmt, format_options=options,
                                          optimizer=opt, calibration=calib, device=args.gpu_device)
        except Exception as exc:  # noqa: BLE001
            row(label, opt_label, "-", "-", "-", "-", failed(f"{label} {opt_label}", exc))
            continue
        finally:
            out.unlink(missing_ok=True)
        sqnr = f"{report.mean_sqnr_db:.2f}" if report.mean_sqnr_db is not None else "-"
        won = sum(1 for t in report.quantized if t.note and " won" in t.note)
        row(label, opt_label, f"{gpu_s:.1f}", f"{params / 1e6 / gpu_s:.0f}", f"{gpu_mb:.0f}", sqnr,
            f"{won}/{len(report.quantized)}" if opt != "rtn" else "-")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/cq-gpu"))
    parser.add_argument("--skip-cpu", action="store_true", help="table 1 without the CPU runs (no same-bytes check)")
    parser.add_argument("--formats", default="", help="table 1's formats (default: every installed one)")
    parser.add_argument("--sections", default="rtn,layer,convert", help="which tables: rtn, layer, convert")
    parser.add_argument("--layout", choices=("flux", "demo"), default="flux",
                        help="flux: one FLUX.1-dev double and single block; demo: cq's small demo model")
    parser.add_argument("--threads", type=int, default=None, help="CPU workers for the CPU runs")
    parser.add_argument("--gpu-device", default="cuda", help="'cpu' smoke-tests this script without a GPU")
    args = parser.parse_args()
    if args.gpu_device == "cpu":
        torch.cuda.max_memory_allocated = lambda: 0  # the smoke test has no GPU to ask
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    sections = set(args.sections.split(","))

    registry = Registry.from_plugin_manager(make_plugin_manager(load_entry_points=False, extra_plugins=PLUGINS))
    args.dir.mkdir(parents=True, exist_ok=True)
    source = args.dir / "layers-bf16.safetensors"
    calibration = args.dir / "layers-calibration.safetensors"
    layout = flux_layout(double_blocks=1, single_blocks=1) if args.layout == "flux" else list(DEMO_LAYOUT)
    params = sum(torch.Size(shape).numel() for _, shape in layout)
    gpu_name = torch.cuda.get_device_name() if args.gpu_device != "cpu" else "cpu (smoke test)"
    print(f"device: {gpu_name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"input {params / 1e6:.0f} Mparam bf16", flush=True)
    division_check(args.gpu_device)
    failures = 0
    try:
        started = time.perf_counter()
        write_synthetic_checkpoint(source, layout, overwrite=True)
        stats = synthetic_statistics(layout)
        save_statistics(stats, calibration)
        print(f"inputs written in {time.perf_counter() - started:.1f} s", flush=True)
        if "rtn" in sections:
            failures += rtn_section(args, registry, source, params)
        if "layer" in sections:
            weights = [(n[: -len(".weight")], s) for n, s in layout if len(s) == 2 and n.endswith(".weight")]
            layer = "double_blocks.0.img_mlp.0" if args.layout == "flux" else max(
                weights, key=lambda item: torch.Size(item[1]).numel())[0]
            failures += layer_section(args, registry, source, stats, layer)
        del stats
        if "convert" in sections:
            convert_section(args, registry, source, calibration, params)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    if failures:
        print(f"{failures} check(s) failed: different bytes (rtn) or gains (optimizers) on CUDA than on the CPU",
              file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
