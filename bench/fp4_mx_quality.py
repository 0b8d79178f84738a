"""Weight SQNR and conversion speed of nvfp4 (with and without scale search) and mxfp8 (both rules).

    python bench/fp4_mx_quality.py [--size 4096] [--repeats 3] [--threads 2]

Weights are float32 Gaussian and Student-t(4) (heavy tails). SQNR is measured
from the decoded stored tensors. Speed is ``Format.encode`` (scales + codes +
packing, what ``cq convert`` runs per tensor with the rtn optimizer), best of
``--repeats`` runs, as wall-clock and as CPU time; on a shared machine wall
time is noisy, so both are printed.
"""

from __future__ import annotations

import argparse
import time

import torch

from cq_core.numerics.metrics import weight_sqnr_db
from cq_fp8.float8 import Float8E4M3Format
from cq_fp8.mxfp8 import Mxfp8Format
from cq_nvfp4.nvfp4 import Nvfp4Format

CONFIGS = (
    ("nvfp4, scale search (default)", lambda: Nvfp4Format()),
    ("nvfp4, amax/6 (scale_search=false)", lambda: Nvfp4Format(scale_search="false")),
    ("mxfp8, round_up (default)", lambda: Mxfp8Format()),
    ("mxfp8, floor (OCP)", lambda: Mxfp8Format(scale_rule="floor")),
    ("float8_e4m3fn (reference)", lambda: Float8E4M3Format()),
)


def weights(size: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "Gaussian": torch.randn(size, size),
        "Student-t(4)": torch.distributions.StudentT(4.0).sample((size, size)),
    }


def timed_encode(fmt, weight: torch.Tensor, repeats: int):
    best_wall = best_cpu = float("inf")
    stored = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        stored = fmt.encode(weight)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return stored, best_wall, best_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = weights(args.size)
    mparams = args.size * args.size / 1e6
    print(f"{args.size}x{args.size} float32, torch threads {args.threads}, best of {args.repeats}\n")
    print("| format | SQNR Gaussian, dB | SQNR Student-t(4), dB | Mparam/s (wall) | Mparam/s (CPU time) |")
    print("|---|---:|---:|---:|---:|")
    for label, make in CONFIGS:
        fmt = make()
        sqnr, wall, cpu = {}, [], []
        for name, weight in data.items():
            stored, w, c = timed_encode(fmt, weight, args.repeats)
            sqnr[name] = weight_sqnr_db(fmt, weight, stored)
            wall.append(w)
            cpu.append(c)
        speed_wall = mparams * len(data) / sum(wall)
        speed_cpu = mparams * len(data) / sum(cpu)
        print(
            f"| {label} | {sqnr['Gaussian']:.2f} | {sqnr['Student-t(4)']:.2f} | "
            f"{speed_wall:.1f} | {speed_cpu:.1f} |"
        )


if __name__ == "__main__":
    main()
