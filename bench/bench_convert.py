"""Conversion speed and memory on a generated ~1.4 GB bf16 checkpoint.

32 tensors: 8 blocks of (norm 3072, attn.proj 3072x3072, mlp.fc1 12288x3072,
mlp.fc2 3072x12288). Each conversion runs in a fresh subprocess through the
real `cq convert` command, so peak RSS is the converter's own.

    python bench/bench_convert.py [--formats float8_e4m3fn,float8_e5m2] [--dir /tmp/cq-bench]

Prints a Markdown table: format, Mparam, wall s, Mparam/s, peak RSS MB, output size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runner import run_convert

from cq_core.io.synthetic import write_synthetic_checkpoint

HIDDEN, MLP, BLOCKS = 3072, 12288, 8
LAYOUT = [
    entry
    for i in range(BLOCKS)
    for entry in (
        (f"blocks.{i}.norm.weight", (HIDDEN,)),
        (f"blocks.{i}.attn.proj.weight", (HIDDEN, HIDDEN)),
        (f"blocks.{i}.mlp.fc1.weight", (MLP, HIDDEN)),
        (f"blocks.{i}.mlp.fc2.weight", (HIDDEN, MLP)),
    )
]


def source_checkpoint(folder: Path) -> Path:
    path = folder / "bench-1.4gb-bf16.safetensors"
    if not path.exists():
        print(f"generating {path} ...", file=sys.stderr)
        write_synthetic_checkpoint(path, LAYOUT)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="float8_e4m3fn", help="comma-separated format names")
    parser.add_argument("--dir", default="/tmp/cq-bench", help="where the generated checkpoint lives")
    parser.add_argument("--extra", default="", help="extra arguments for cq convert, space-separated")
    parser.add_argument("--keep-source", action="store_true", help="keep the generated checkpoint")
    args = parser.parse_args()

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    source = source_checkpoint(folder)
    rows = []
    for fmt in args.formats.split(","):
        r = run_convert(source, folder / f"out-{fmt}.safetensors", fmt, args.extra.split())
        rows.append(
            f"| {fmt} | {r['total_params'] / 1e6:.0f} | {r['seconds']:.2f} | {r['mparams_per_second']:.0f} | "
            f"{r['peak_rss_bytes'] / 1e6:.0f} | {r['output_bytes'] / 1e9:.2f} GB | "
            f"{'-' if r['mean_sqnr_db'] is None else format(r['mean_sqnr_db'], '.2f')} |"
        )
    print(f"source: {source.stat().st_size / 1e9:.2f} GB bf16, {len(LAYOUT)} tensors\n")
    print("| format | Mparam | wall s | Mparam/s | peak RSS MB | output | mean SQNR dB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    if not args.keep_source:
        source.unlink()


if __name__ == "__main__":
    main()
