"""The Ray executor against the local one, and what N GPUs would do for a FLUX-sized calibrated run.

Two parts (both by default):

``overhead``: the ~1.4 GB bf16 checkpoint of bench_convert.py, converted on this
machine by the local executor and by ``--executor ray`` on a local Ray instance
with as many CPUs as this machine has. "cold" is a fresh ``cq convert`` process
that starts Ray itself and whose workers import torch and cq first; "warm" is a
process that converts a queue of checkpoints through the Python API, Ray already
up and its workers warm (the conversion before it). Prints a Markdown table.

``model``: per-tensor times measured on this machine's CPU for learned rounding
with calibration statistics on a FLUX.1 double + single block at 1/4 width
(real key names, synthetic statistics), a cost law fitted to them (seconds ~
N^a * K^b), and from it, normalised to the H200 measurement of the full-width
block pair in docs/performance.md, the expected wall time of FLUX.1-dev (19
double + 38 single blocks) on N GPUs: each tensor one task (plus a fixed cost
per task) onto the first free GPU, in plan order (what the executor does) and
longest first (the best a scheduler could do), and never less than the I/O
floor: the one writer's output at --write-gbps, or the workers' reads of the
weights and their statistics (H is K x K float32) at --read-gbps.

    python bench/bench_ray.py [--part overhead|model|both] [--formats float8_e4m3fn,nvfp4] [--dir /tmp/cq-bench]
"""

from __future__ import annotations

import argparse
import heapq
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
from bench_convert import source_checkpoint
from runner import run_convert

import cq_core
from cq_core.io.calibration_file import save_statistics
from cq_core.io.synthetic import write_synthetic_checkpoint

# ---------------------------------------------------------------------------
# Part 1: the executor's overhead on the 1.4 GB file
# ---------------------------------------------------------------------------


def timed(source: Path, output: Path, fmt: str, **options) -> float:
    started = time.perf_counter()
    cq_core.convert(source, output, format=fmt, model="none", overwrite=True, **options)
    seconds = time.perf_counter() - started
    output.unlink()
    return seconds


def overhead(folder: Path, formats: list[str], repeats: int) -> None:
    import ray

    source = source_checkpoint(folder)
    cores = len(os.sched_getaffinity(0))
    rows = []
    for fmt in formats:
        out = folder / f"out-{fmt}.safetensors"
        local = run_convert(source, out, fmt, [])
        cold = run_convert(source, out, fmt, ["--executor", "ray"])
        rows.append((fmt, "local, fresh process", local["seconds"], local["seconds"], local["peak_rss_bytes"]))
        rows.append((fmt, "ray cold (starts Ray), shared-file", cold["seconds"], local["seconds"],
                     cold["peak_rss_bytes"]))
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        for fmt in formats:
            out = folder / f"out-{fmt}.safetensors"
            timed(source, out, fmt, executor="ray")  # warms the workers (torch, cq, the format)
            local = min(timed(source, out, fmt) for _ in range(repeats))
            rows.append((fmt, "local, warm process", local, local, None))
            for transport in ("shared-file", "object-store"):
                warm = min(
                    timed(source, out, fmt, executor="ray", executor_options={"transport": transport})
                    for _ in range(repeats)
                )
                rows.append((fmt, f"ray warm, {transport}", warm, local, None))
    finally:
        ray.shutdown()
    print(f"source: {source.stat().st_size / 1e9:.2f} GB bf16, {cores} cores, Ray {ray.__version__}, "
          f"best of {repeats} for the warm rows\n")
    print("| format | executor | wall s | vs local | peak RSS MB (driver) |")
    print("|---|---|---:|---:|---:|")
    for fmt, what, seconds, base, rss in rows:
        rss_text = "-" if rss is None else f"{rss / 1e6:.0f}"
        print(f"| {fmt} | {what} | {seconds:.2f} | {seconds / base:.2f}x | {rss_text} |")


# ---------------------------------------------------------------------------
# Part 2: per-tensor times -> FLUX.1-dev on N GPUs
# ---------------------------------------------------------------------------

HIDDEN, MLP, DOUBLE, SINGLE = 3072, 12288, 19, 38


def flux_block_layers(hidden: int, mlp: int) -> list[tuple[str, tuple[int, int]]]:
    """The Linear layers of one FLUX.1 double and one single block (comfy/ldm/flux/layers.py)."""
    layers = []
    for stream in ("img", "txt"):
        layers += [
            (f"double_blocks.0.{stream}_mod.lin.weight", (6 * hidden, hidden)),
            (f"double_blocks.0.{stream}_attn.qkv.weight", (3 * hidden, hidden)),
            (f"double_blocks.0.{stream}_attn.proj.weight", (hidden, hidden)),
            (f"double_blocks.0.{stream}_mlp.0.weight", (mlp, hidden)),
            (f"double_blocks.0.{stream}_mlp.2.weight", (hidden, mlp)),
        ]
    layers += [
        ("single_blocks.0.modulation.lin.weight", (3 * hidden, hidden)),
        ("single_blocks.0.linear1.weight", (3 * hidden + mlp, hidden)),
        ("single_blocks.0.linear2.weight", (hidden, hidden + mlp)),
    ]
    return layers


def calibration_for(layers: list[tuple[str, tuple[int, int]]], path: Path) -> Path:
    """Anisotropic, correlated inputs per layer, like bench/gpu_check.py's."""
    g = torch.Generator().manual_seed(0)
    stats = {}
    for name, (_, k) in layers:
        x = torch.randn(512, k, generator=g) * torch.linspace(0.05, 4, k)
        x = x + 0.5 * x.roll(1, dims=1)
        stats[name.removesuffix(".weight")] = {"H": x.T @ x / x.shape[0], "absmax": x.abs().amax(0)}
    return save_statistics(stats, path)


def fit_power_law(samples: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Least squares of log t = log c + a log N + b log K; returns (c, a, b)."""
    rows = torch.tensor([[1.0, math.log(n), math.log(k)] for n, k, _ in samples], dtype=torch.float64)
    times = torch.tensor([math.log(t) for _, _, t in samples], dtype=torch.float64)
    solution = torch.linalg.lstsq(rows, times[:, None]).solution.flatten().tolist()
    return math.exp(solution[0]), solution[1], solution[2]


def makespan(times: list[float], gpus: int) -> float:
    """Each task to the GPU that frees first, in the order given."""
    free = [0.0] * gpus
    for t in times:
        heapq.heappush(free, heapq.heappop(free) + t)
    return max(free)


def model(
    folder: Path, fmt: str, optimizer: str, h200_pair_s: float, write_gbps: float, read_gbps: float,
    task_overhead_s: float,
) -> None:
    scale = 6
    small = flux_block_layers(HIDDEN // scale, MLP // scale)
    source = folder / "flux-pair-quarter.safetensors"
    write_synthetic_checkpoint(source, [(name, shape) for name, shape in small])
    calibration = calibration_for(small, folder / "flux-pair-quarter-calib.safetensors")
    started = time.perf_counter()
    report = cq_core.convert(source, folder / "flux-pair-quarter-out.safetensors", format=fmt, optimizer=optimizer,
                             model="none", calibration=calibration, threads=1, overwrite=True)
    wall = time.perf_counter() - started
    for path in (source, calibration, folder / "flux-pair-quarter-out.safetensors"):
        path.unlink()
    measured = [(t.shape[0], t.shape[1], t.seconds) for t in report.quantized]
    c, a, b = fit_power_law(measured)
    print(f"per-tensor times, {fmt} + {optimizer} + calibration, 1 CPU thread, FLUX.1 block pair at 1/{scale} "
          f"width ({report.total_params / 1e6:.0f} Mparam, {wall:.1f} s):\n")
    print("| tensor | N x K | measured s | fitted s |")
    print("|---|---|---:|---:|")
    for t in report.quantized:
        n, k = t.shape
        print(f"| {t.name} | {n}x{k} | {t.seconds:.2f} | {c * n**a * k**b:.2f} |")
    print(f"\nfit: seconds = {c:.3g} * N^{a:.2f} * K^{b:.2f}\n")

    full = flux_block_layers(HIDDEN, MLP)
    pair = [c * n**a * k**b for _, (n, k) in full]
    to_h200 = h200_pair_s / sum(pair)  # the law's shape, the H200's level
    double = [(shape, t * to_h200 + task_overhead_s) for (name, shape), t in zip(full, pair, strict=True)
              if name.startswith("double")]
    single = [(shape, t * to_h200 + task_overhead_s) for (name, shape), t in zip(full, pair, strict=True)
              if name.startswith("single")]
    layers = double * DOUBLE + single * SINGLE  # plan order
    times = [t for _, t in layers]
    total = sum(times)
    params = sum(n * k for (n, k), _ in layers)
    output_gb = params * (0.5625 if fmt == "nvfp4" else 1.0) / 1e9  # NVFP4: 4 bits + an FP8 scale per 16
    # What the workers read from the shared filesystem: the bf16 weight and the layer's H (float32 K x K).
    read_gb = sum(n * k * 2 + k * k * 4 for (n, k), _ in layers) / 1e9
    floor = max(output_gb / write_gbps, read_gb / read_gbps)
    print(f"FLUX.1-dev: {len(layers)} quantized layers, {params / 1e9:.2f} Bparam; one H200: {total:.0f} s of "
          f"tensor work (the block pair's {h200_pair_s} s x {total / h200_pair_s:.1f}, plus {task_overhead_s} s "
          f"per task); I/O floor {floor:.0f} s: the one writer's {output_gb:.1f} GB at {write_gbps} GB/s, the "
          f"workers' {read_gb:.0f} GB of weights and statistics at {read_gbps} GB/s\n")
    print("| GPUs | expected wall s (plan order) | speedup | longest first s | speedup | bound by |")
    print("|---:|---:|---:|---:|---:|---|")
    longest_first = sorted(times, reverse=True)
    for gpus in (1, 2, 4, 8, 16, 32, 64):
        in_order = max(makespan(times, gpus), floor)
        sorted_run = max(makespan(longest_first, gpus), floor)
        bound = "I/O" if in_order == floor else ("the largest tensor" if in_order < 1.5 * max(times) else "compute")
        print(f"| {gpus} | {in_order:.0f} | {total / in_order:.1f}x | {sorted_run:.0f} | {total / sorted_run:.1f}x "
              f"| {bound} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("overhead", "model", "both"), default="both")
    parser.add_argument("--formats", default="float8_e4m3fn,nvfp4", help="comma-separated, for the overhead part")
    parser.add_argument("--repeats", type=int, default=2, help="warm runs per row (the best is shown)")
    parser.add_argument("--dir", default="/tmp/cq-bench", help="where the generated checkpoints live")
    parser.add_argument("--model-format", default="nvfp4")
    parser.add_argument("--model-optimizer", default="learned")
    parser.add_argument("--h200-pair-seconds", type=float, default=48.3,
                        help="learned + calibration on the full-width FLUX block pair on one H200 "
                        "(docs/performance.md, bench/gpu_check.py)")
    parser.add_argument("--write-gbps", type=float, default=1.5, help="the writer's disk, GB/s")
    parser.add_argument("--read-gbps", type=float, default=5.0, help="the shared filesystem, GB/s in all")
    parser.add_argument("--task-overhead-s", type=float, default=0.05,
                        help="Ray's cost per task beyond the work (scheduling, the result's trip back)")
    args = parser.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    if args.part in ("overhead", "both"):
        overhead(folder, args.formats.split(","), args.repeats)
        print()
    if args.part in ("model", "both"):
        model(folder, args.model_format, args.model_optimizer, args.h200_pair_seconds, args.write_gbps,
              args.read_gbps, args.task_overhead_s)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
