"""Conversion of a generated FLUX.1-dev-shaped bf16 checkpoint (~11 GiB): wall time vs plain I/O, peak RSS.

The checkpoint has FLUX.1-dev's real key names and shapes (hidden 3072, MLP
12288) with 10 double and 19 single blocks instead of 19 and 38, so it is
about 12 GB, more than half of a 23 GB machine's RAM. Each conversion runs
in a fresh subprocess through the real ``cq convert`` command, so peak RSS
is the converter's own. The I/O floor is the time to read the input once
and write (and fsync) as many bytes as the output has, measured right
before the conversions on the same files and disk: once the ordinary
(buffered) way a copy program does it, and once with the direct I/O cq
itself uses (cq_core/io/direct_io.py), which on a CPU-bound machine is faster.

    python bench/bench_flux.py [--formats float8_e4m3fn,nvfp4] [--dir /tmp/cq-flux] [--keep-source]
    python bench/bench_flux.py --double 1 --single 1   # a small smoke run of the same code

Prints a Markdown table. The generated files are deleted afterwards unless
``--keep-source`` is given; they never belong in git.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import sys
import time
from pathlib import Path

from runner import run_convert

from cq_core.io.direct_io import ALIGN, DirectFile, direct_read_fd, read_into
from cq_core.io.synthetic import Layout, write_synthetic_checkpoint

HIDDEN, MLP, HEAD_DIM = 3072, 12288, 128


def linear(layout: Layout, name: str, out_features: int, in_features: int, bias: bool = True) -> None:
    layout.append((f"{name}.weight", (out_features, in_features)))
    if bias:
        layout.append((f"{name}.bias", (out_features,)))


def flux_layout(double_blocks: int = 10, single_blocks: int = 19) -> Layout:
    """FLUX.1-dev's tensor names and shapes, with a chosen number of blocks."""
    h = HIDDEN
    layout: Layout = []
    linear(layout, "img_in", h, 64)
    linear(layout, "txt_in", h, 4096)
    for embedder, width in (("time_in", 256), ("vector_in", 768), ("guidance_in", 256)):
        linear(layout, f"{embedder}.in_layer", h, width)
        linear(layout, f"{embedder}.out_layer", h, h)
    for i in range(double_blocks):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            linear(layout, f"{p}_mod.lin", 6 * h, h)
            linear(layout, f"{p}_attn.qkv", 3 * h, h)
            layout.append((f"{p}_attn.norm.query_norm.scale", (HEAD_DIM,)))
            layout.append((f"{p}_attn.norm.key_norm.scale", (HEAD_DIM,)))
            linear(layout, f"{p}_attn.proj", h, h)
            linear(layout, f"{p}_mlp.0", MLP, h)
            linear(layout, f"{p}_mlp.2", h, MLP)
    for i in range(single_blocks):
        p = f"single_blocks.{i}"
        linear(layout, f"{p}.linear1", 3 * h + MLP, h)
        linear(layout, f"{p}.linear2", h, h + MLP)
        layout.append((f"{p}.norm.query_norm.scale", (HEAD_DIM,)))
        layout.append((f"{p}.norm.key_norm.scale", (HEAD_DIM,)))
        linear(layout, f"{p}.modulation.lin", 3 * h, h)
    linear(layout, "final_layer.adaLN_modulation.1", 2 * h, h)
    linear(layout, "final_layer.linear", 64, h)
    return layout


def io_floor(source: Path, output_bytes: int, folder: Path) -> tuple[float, float]:
    """Seconds to read ``source`` once and to write and fsync ``output_bytes``, the ordinary
    (buffered) way a copy program does it. The read is timed with the file already in the
    page cache (as far as RAM holds it): the fastest a buffered read gets, whatever ran before."""
    chunk = bytearray(64 << 20)
    view = memoryview(chunk)
    with open(source, "rb", buffering=0) as f:  # warm the cache, untimed
        while f.readinto(view):
            pass
    started = time.perf_counter()
    with open(source, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    read_s = time.perf_counter() - started
    target = folder / "io-floor.bin"
    started = time.perf_counter()
    with open(target, "wb", buffering=0) as f:
        left = output_bytes
        while left:
            left -= f.write(view[: min(left, len(view))])
        os.fsync(f.fileno())
    write_s = time.perf_counter() - started
    target.unlink()
    return read_s, write_s


def direct_io_floor(source: Path, output_bytes: int, folder: Path) -> tuple[float, float] | None:
    """The same with the direct I/O cq itself uses (cq_core.io.direct_io); None where the disk refuses it."""
    chunk = 64 << 20
    buffer = mmap.mmap(-1, chunk + ALIGN)
    view, address = memoryview(buffer), ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    fd = direct_read_fd(source)
    if fd is None:
        return None
    started = time.perf_counter()
    try:
        size = source.stat().st_size
        for offset in range(0, size, chunk):
            if read_into(fd, view, address, offset, min(chunk, size - offset)) is None:
                return None
    finally:
        os.close(fd)
    read_s = time.perf_counter() - started
    target = folder / "io-floor.bin"
    target.unlink(missing_ok=True)  # DirectFile creates a new file only
    started = time.perf_counter()
    with DirectFile(target) as f:
        left = output_bytes
        while left:
            left -= f.write(view[: min(left, chunk)])
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - started
    target.unlink()
    del view
    return read_s, write_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="float8_e4m3fn,nvfp4")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/cq-flux"))
    parser.add_argument("--double", type=int, default=10, help="double blocks (FLUX.1-dev has 19)")
    parser.add_argument("--single", type=int, default=19, help="single blocks (FLUX.1-dev has 38)")
    parser.add_argument("--keep-source", action="store_true")
    parser.add_argument("--extra", default="", help="more cq convert arguments, e.g. '--device cuda'")
    args = parser.parse_args()

    args.dir.mkdir(parents=True, exist_ok=True)
    source = args.dir / f"flux-{args.double}d{args.single}s-bf16.safetensors"
    layout = flux_layout(args.double, args.single)
    params = sum(_numel(shape) for _, shape in layout)
    try:
        if not source.exists():
            print(f"generating {source} ({params / 1e9:.2f} B params) ...", file=sys.stderr)
            write_synthetic_checkpoint(source, layout)
        rows = []
        for fmt in args.formats.split(","):
            report = run_convert(source, args.dir / f"out-{fmt}.safetensors", fmt, ["--model", "none", *args.extra.split()])
            read_s, write_s = io_floor(source, report["output_bytes"], args.dir)
            floor = read_s + write_s
            direct = direct_io_floor(source, report["output_bytes"], args.dir)
            direct_cells = ("-", "-") if direct is None else (
                f"{direct[0]:.1f} + {direct[1]:.1f}", f"{report['seconds'] / sum(direct):.2f}x"
            )
            rows.append((
                fmt, f"{params / 1e6:.0f}", f"{report['input_bytes'] / 1e9:.2f}", f"{report['output_bytes'] / 1e9:.2f}",
                f"{report['seconds']:.1f}", f"{params / 1e6 / report['seconds']:.0f}",
                f"{report['peak_rss_bytes'] / 1e6:.0f}", f"{read_s:.1f} + {write_s:.1f}",
                f"{report['seconds'] / floor:.2f}x", *direct_cells,
                f"{report['mean_sqnr_db']:.1f}" if report.get("mean_sqnr_db") is not None else "-",
            ))
    finally:
        if not args.keep_source:
            source.unlink(missing_ok=True)
    header = ("format", "Mparam", "in GB", "out GB", "wall s", "Mparam/s", "peak RSS MB",
              "read + write s", "wall / I/O", "direct read + write s", "wall / direct I/O", "mean SQNR dB")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
