"""INT8 / ConvRot / W4A4 quality and speed: the numbers in docs/int8.md.

For each variant of the cq-int8 formats, with and without clipping search:
- weight SQNR on a Gaussian and a Student-t(4) 4096x4096 weight, decoded
  from the file cq wrote;
- output SQNR of ``X W^T`` with activations that have a few large outlier
  channels: weight-only (``X Ŵ^T``) and what ComfyUI computes at run time
  (comfy-kitchen's eager INT8 / W4A4 linear, which also quantizes X);
- conversion speed through ``cq_core.commands.convert`` (bf16 input, no measuring
  pass), in Mparam/s of the whole checkpoint.

Run: ``python bench/int8_quality.py [--size 4096] [--tokens 256] [--threads 1]``.
The SQNRs are deterministic (fixed seeds). Timings are noisy on a shared
machine: on an oversubscribed 2-core box two torch threads were up to 50x
slower than one (thread-pool contention), hence one thread by default.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from comfy_kitchen.tensor import TensorCoreConvRotW4A4Layout, TensorWiseINT8Layout
from comfy_kitchen.tensor.base import QuantizedTensor
from safetensors import safe_open
from safetensors.torch import save_file

from cq_core import convert
from cq_core.numerics.metrics import tensor_sqnr_db, weight_sqnr_db
from cq_core.plugin.manager import get_registry

VARIANTS = [
    ("INT8 per tensor", "int8_tensorwise", {"scaling": "tensor"}),
    ("INT8 per row", "int8_tensorwise", {}),
    ("INT8 per row + ConvRot 256", "int8_tensorwise", {"convrot": "true", "convrot_groupsize": "256"}),
    ("INT8 block 128x128", "int8_blockwise", {"block_size": "128"}),
    ("W4A4 ConvRot 256", "convrot_w4a4", {"convrot_groupsize": "256"}),
]


def weights(size: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    gaussian = torch.randn(size, size)
    torch.manual_seed(1)
    heavy = torch.distributions.StudentT(4.0).sample((size, size))
    return {"gauss.weight": gaussian, "t4.weight": heavy}


def activations(tokens: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, size, generator=g)
    outliers = torch.randperm(size, generator=g)[:8]
    x[:, outliers] *= 30.0  # a few large channels, as in real transformer activations
    return x


def comfy_output(fmt_name: str, config: dict, stored: dict, shape, x: torch.Tensor) -> torch.Tensor | None:
    """What ComfyUI's Linear computes with these stored tensors (eager comfy-kitchen)."""
    if fmt_name == "int8_tensorwise":
        params = TensorWiseINT8Layout.Params(
            scale=stored["weight_scale"], orig_dtype=torch.float32, orig_shape=tuple(shape),
            convrot=bool(config.get("convrot")), convrot_groupsize=int(config.get("convrot_groupsize", 256)),
        )
        return F.linear(x, QuantizedTensor(stored["weight"], "TensorWiseINT8Layout", params))
    if fmt_name == "convrot_w4a4":
        params = TensorCoreConvRotW4A4Layout.Params(
            scale=stored["weight_scale"], orig_dtype=torch.float32, orig_shape=tuple(shape),
            convrot_groupsize=int(config["convrot_groupsize"]),
        )
        return F.linear(x, QuantizedTensor(stored["weight"], "TensorCoreConvRotW4A4Layout", params))
    return None  # int8_blockwise: stock ComfyUI has no loader for it


def run(size: int, tokens: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    source_weights = weights(size)
    x = activations(tokens, size)
    reference = x @ source_weights["gauss.weight"].T
    registry = get_registry()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in source_weights.items()}, str(source))
        exact = {k: v.to(torch.bfloat16).float() for k, v in source_weights.items()}  # what cq reads
        for label, fmt_name, options in VARIANTS:
            for clip in (False, True):
                opts = {**options, "clip_search": str(clip).lower()}
                out = Path(tmp) / "out.safetensors"
                started = time.perf_counter()
                report = convert(source, out, format=fmt_name, format_options=opts, measure=False,
                                 overwrite=True, threads=threads)
                seconds = time.perf_counter() - started
                fmt = registry.format(fmt_name)(**opts)
                row = {"variant": label + (" + clip search" if clip else ""),
                       "mparams_s": report.total_params / seconds / 1e6}
                with safe_open(str(out), framework="pt") as f:
                    for name in ("gauss", "t4"):
                        stored = {s: f.get_tensor(f"{name}.{s}") for s in fmt.stored_specs((size, size))}
                        row[f"sqnr_{name}"] = weight_sqnr_db(fmt, exact[f"{name}.weight"], stored)
                        if name == "gauss":
                            decoded = fmt.decode(stored)
                            row["out_weight_only"] = tensor_sqnr_db(reference, x @ decoded.T)
                            comfy = comfy_output(fmt_name, fmt.layer_config((size, size)), stored, (size, size), x)
                            row["out_comfy"] = None if comfy is None else tensor_sqnr_db(reference, comfy)
                rows.append(row)
                print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    comfy = "n/a (no stock loader)" if row["out_comfy"] is None else f"{row['out_comfy']:.1f}"
    return (f"| {row['variant']} | {row['sqnr_gauss']:.1f} | {row['sqnr_t4']:.1f} | "
            f"{row['out_weight_only']:.1f} | {comfy} | {row['mparams_s']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads and converter workers")
    args = parser.parse_args()
    print("| variant | weight SQNR Gaussian, dB | weight SQNR Student-t(4), dB | output SQNR, weight only, dB "
          "| output SQNR in ComfyUI (W and X quantized), dB | convert Mparam/s |")
    print("|---|---:|---:|---:|---:|---:|")
    run(args.size, args.tokens, args.threads)


if __name__ == "__main__":
    main()
