"""GPU check: same bytes as the CPU for round-to-nearest, and timings, on a FLUX-sized layer set.

Self-contained: generates its own bf16 input (one FLUX.1-dev double block
and one single block, real key names, ~0.5 B params, ~1 GB), converts it
with every format on the CPU and on CUDA, compares the output files byte
for byte, then times NVFP4 with scale search and the optimizers on CUDA.
Rows are printed as they finish, so a run cut short still says something.

    python bench/gpu_check.py [--dir /tmp/cq-gpu] [--skip-cpu] [--optimizers learned,gptq]

Exit status 1 when any round-to-nearest format gives different bytes on CUDA.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, *sorted((ROOT / "plugins").glob("*"))):
    sys.path.insert(0, str(path))

import torch  # noqa: E402

from cq_core.convert import convert  # noqa: E402
from cq_core.plugins import Registry, make_plugin_manager  # noqa: E402
from cq_core.synthetic import write_synthetic_checkpoint  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from bench_flux import flux_layout  # noqa: E402

PLUGINS = ("cq_fp8.plugin", "cq_int8.plugin", "cq_nvfp4.plugin", "cq_models.plugin")
RTN_FORMATS = ("float8_e4m3fn", "float8_e5m2", "int8_tensorwise", "mxfp8", "nvfp4")


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(64 << 20):
            h.update(chunk)
    return h.hexdigest()


def timed(registry: Registry, source: Path, output: Path, **kwargs):
    if kwargs.get("device", "cpu") != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    report = convert(source, output, overwrite=True, model="none", registry=registry, **kwargs)
    seconds = time.perf_counter() - started
    gpu_mb = torch.cuda.max_memory_allocated() / 1e6 if kwargs.get("device", "cpu") != "cpu" else 0.0
    return report, seconds, gpu_mb


def row(*cells) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/cq-gpu"))
    parser.add_argument("--skip-cpu", action="store_true", help="only time CUDA (no same-bytes check)")
    parser.add_argument("--formats", default=",".join(RTN_FORMATS))
    parser.add_argument("--optimizers", default="learned,gptq")
    parser.add_argument("--threads", type=int, default=None, help="CPU workers for the CPU runs")
    parser.add_argument("--gpu-device", default="cuda", help="'cpu' smoke-tests this script without a GPU")
    args = parser.parse_args()
    if args.gpu_device == "cpu":
        torch.cuda.max_memory_allocated = lambda: 0  # the smoke test has no GPU to ask
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2

    registry = Registry.from_plugin_manager(make_plugin_manager(load_entry_points=False, extra_plugins=PLUGINS))
    args.dir.mkdir(parents=True, exist_ok=True)
    source = args.dir / "flux-layers-bf16.safetensors"
    layout = flux_layout(double_blocks=1, single_blocks=1)
    params = sum(torch.Size(shape).numel() for _, shape in layout)
    gpu_name = torch.cuda.get_device_name() if args.gpu_device != "cpu" else "cpu (smoke test)"
    print(f"device: {gpu_name}, torch {torch.__version__}; input {params / 1e6:.0f} Mparam bf16",
          flush=True)
    write_synthetic_checkpoint(source, layout, overwrite=True)
    mismatches = 0
    try:
        row("format", "optimizer", "CPU s", "CUDA s", "CUDA Mparam/s", "peak GPU MB", "mean SQNR dB", "same bytes")
        row("---", "---", "---:", "---:", "---:", "---:", "---:", "---")
        for fmt in args.formats.split(","):
            if fmt not in registry.formats:
                row(fmt, "rtn", "-", "-", "-", "-", "-", "format not installed")
                continue
            options = {"scale_search": False} if fmt == "nvfp4" else {}
            gpu_out, cpu_out = args.dir / f"{fmt}-cuda.safetensors", args.dir / f"{fmt}-cpu.safetensors"
            try:
                report, gpu_s, gpu_mb = timed(registry, source, gpu_out, format=fmt, format_options=options,
                                              device=args.gpu_device)
            except Exception as exc:  # noqa: BLE001
                row(fmt, "rtn", "-", "-", "-", "-", "-", f"CUDA failed: {str(exc)[:80]}")
                mismatches += 1
                continue
            cpu_s, same = "-", "not checked"
            if not args.skip_cpu:
                _, seconds, _ = timed(registry, source, cpu_out, format=fmt, format_options=options, device="cpu",
                                      threads=args.threads)
                cpu_s = f"{seconds:.1f}"
                same = "yes" if digest(gpu_out) == digest(cpu_out) else "NO"
                mismatches += same == "NO"
                cpu_out.unlink()
            gpu_out.unlink()
            sqnr = f"{report.mean_sqnr_db:.2f}" if report.mean_sqnr_db is not None else "-"
            name = fmt + (" (no scale search)" if options else "")
            row(name, "rtn", cpu_s, f"{gpu_s:.1f}", f"{params / 1e6 / gpu_s:.0f}", f"{gpu_mb:.0f}", sqnr, same)

        runs = [("nvfp4", "rtn", {"scale_search": True})]
        runs += [(fmt, opt, {}) for opt in args.optimizers.split(",") if opt for fmt in ("float8_e4m3fn", "nvfp4")]
        for fmt, opt, options in runs:
            out = args.dir / f"{fmt}-{opt}.safetensors"
            label = fmt + (" (scale search)" if options.get("scale_search") else "")
            try:
                report, gpu_s, gpu_mb = timed(registry, source, out, format=fmt, format_options=options,
                                              optimizer=opt, device=args.gpu_device)
            except Exception as exc:  # noqa: BLE001 (a row per failure, the check goes on)
                row(label, opt, "-", "-", "-", "-", "-", f"failed: {str(exc)[:80]}")
                continue
            finally:
                out.unlink(missing_ok=True)
            sqnr = f"{report.mean_sqnr_db:.2f}" if report.mean_sqnr_db is not None else "-"
            row(label, opt, "-", f"{gpu_s:.1f}", f"{params / 1e6 / gpu_s:.0f}", f"{gpu_mb:.0f}", sqnr, "n/a")
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    if mismatches:
        print(f"{mismatches} format(s) gave different bytes on CUDA than on the CPU", file=sys.stderr)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
