"""SHA-256 of the files a set of real `cq` commands writes: run it before and after a change that must
not change the bytes (a refactor), and compare the two tables.

Each command runs in a fresh process through the console entry point, on small generated inputs:
a synthetic transformer with a token table (every format, both calibrated optimizers, a size
budget, calibrated activation tensors, per-layer rules, shards), a diffusers-layout FLUX
transformer (layout conversion, auto-detected preset) and a legacy scaled-fp8 file (`cq migrate`).

    python bench/output_digests.py [--dir /tmp/cq-digests] [--only NAME,...]

Prints a Markdown table: case, command, SHA-256 of every file it wrote (shards in order).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from cq_core.io.synthetic import transformer_layout, write_synthetic_checkpoint

HIDDEN, MLP, BLOCKS, VOCAB = 256, 1024, 2, 512

#: name -> cq arguments; {src}, {out}, {stats}, {flux}, {legacy} are filled in.
CASES: dict[str, list[str]] = {
    "fp8": ["convert", "{src}", "-o", "{out}"],
    "e5m2": ["convert", "{src}", "-o", "{out}", "-f", "float8_e5m2"],
    "mxfp8": ["convert", "{src}", "-o", "{out}", "-f", "mxfp8"],
    "int8": ["convert", "{src}", "-o", "{out}", "-f", "int8_tensorwise"],
    "int8_per_tensor": ["convert", "{src}", "-o", "{out}", "-f", "int8_tensorwise", "-O", "scaling=tensor",
                        "-O", "clip_search=true"],
    "int8_convrot": ["convert", "{src}", "-o", "{out}", "-f", "int8_tensorwise", "-O", "convrot=true"],
    "int8_block": ["convert", "{src}", "-o", "{out}", "-f", "int8_blockwise"],
    "convrot": ["convert", "{src}", "-o", "{out}", "-f", "convrot_w4a4"],
    "asym": ["convert", "{src}", "-o", "{out}", "-f", "asym_w4a8_int8"],
    "nvfp4": ["convert", "{src}", "-o", "{out}", "-f", "nvfp4"],
    "nvfp4_gptq": ["convert", "{src}", "-o", "{out}", "-f", "nvfp4", "--optimizer", "gptq",
                   "--calibration", "{stats}"],
    "fp8_learned": ["convert", "{src}", "-o", "{out}", "--optimizer", "learned", "--calibration", "{stats}"],
    "nvfp4_awq": ["convert", "{src}", "-o", "{out}", "-f", "nvfp4", "--awq", "--input-scale", "calibrated",
                  "--calibration", "{stats}"],
    "fp8_input_scale": ["convert", "{src}", "-o", "{out}", "--input-scale", "calibrated", "--calibration",
                        "{stats}"],
    "budget": ["convert", "{src}", "-o", "{out}", "--bits-per-weight", "6",
               "--formats", "nvfp4,float8_e4m3fn,bf16"],
    "budget_calibrated": ["convert", "{src}", "-o", "{out}", "--bits-per-weight", "7", "--gpu", "blackwell",
                          "--calibration", "{stats}"],
    "rules": ["convert", "{src}", "-o", "{out}", "-f", "nvfp4", "--layer", r"blocks\.1\.mlp=int8_tensorwise",
              "-x", "attn.proj", "--fallback", "float8_e4m3fn", "--full-precision-mm", "--embeddings", "int8"],
    "heur_fp8_input": ["convert", "{src}", "-o", "{out}", "--heur", "-O", "input_scale=0.5"],
    "shards": ["convert", "{src}", "-o", "{out}", "--max-shard-size", "300KB"],
    "flux_diffusers": ["convert", "{flux}", "-o", "{out}", "-f", "nvfp4", "--fallback", "float8_e4m3fn"],
    "migrate_legacy": ["migrate", "{legacy}", "-o", "{out}"],
}


def flux_diffusers(path: Path) -> None:
    """A two-block diffusers-layout FLUX.1 transformer (``transformer_blocks``, ``single_transformer_blocks``)."""
    g = torch.Generator().manual_seed(1)
    d, mlp = 128, 512

    def w(*shape):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(torch.bfloat16)

    t = {"x_embedder.weight": w(d, 64), "x_embedder.bias": w(d), "context_embedder.weight": w(d, 96),
         "context_embedder.bias": w(d), "proj_out.weight": w(64, d), "proj_out.bias": w(64),
         "norm_out.linear.weight": w(2 * d, d), "norm_out.linear.bias": w(2 * d)}
    for name, k in (("timestep_embedder", 256), ("guidance_embedder", 256), ("text_embedder", 48)):
        t[f"time_text_embed.{name}.linear_1.weight"] = w(d, k)
        t[f"time_text_embed.{name}.linear_1.bias"] = w(d)
        t[f"time_text_embed.{name}.linear_2.weight"] = w(d, d)
        t[f"time_text_embed.{name}.linear_2.bias"] = w(d)
    p = "transformer_blocks.0"
    for part in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
        t[f"{p}.attn.{part}.weight"], t[f"{p}.attn.{part}.bias"] = w(d, d), w(d)
    for part in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        t[f"{p}.attn.{part}.weight"] = torch.ones(32, dtype=torch.bfloat16)
    for part in ("norm1.linear", "norm1_context.linear"):
        t[f"{p}.{part}.weight"], t[f"{p}.{part}.bias"] = w(6 * d, d), w(6 * d)
    for ff in ("ff", "ff_context"):
        t[f"{p}.{ff}.net.0.proj.weight"], t[f"{p}.{ff}.net.0.proj.bias"] = w(mlp, d), w(mlp)
        t[f"{p}.{ff}.net.2.weight"], t[f"{p}.{ff}.net.2.bias"] = w(d, mlp), w(d)
    s = "single_transformer_blocks.0"
    for part in ("to_q", "to_k", "to_v"):
        t[f"{s}.attn.{part}.weight"], t[f"{s}.attn.{part}.bias"] = w(d, d), w(d)
    for part in ("norm_q", "norm_k"):
        t[f"{s}.attn.{part}.weight"] = torch.ones(32, dtype=torch.bfloat16)
    t[f"{s}.norm.linear.weight"], t[f"{s}.norm.linear.bias"] = w(3 * d, d), w(3 * d)
    t[f"{s}.proj_mlp.weight"], t[f"{s}.proj_mlp.bias"] = w(mlp, d), w(mlp)
    t[f"{s}.proj_out.weight"], t[f"{s}.proj_out.bias"] = w(d, d + mlp), w(d)
    from safetensors.torch import save_file

    save_file(t, str(path))


def legacy_scaled_fp8(path: Path) -> None:
    """The older scaled-fp8 layout: a ``scaled_fp8`` marker, ``L.scale_weight``, ``L.scale_input``."""
    g = torch.Generator().manual_seed(2)
    tensors = {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}
    for i in range(2):
        weight = torch.randn(64, 32, generator=g)
        scale = weight.abs().amax() / 448
        tensors[f"blocks.{i}.fc.weight"] = (weight / scale).to(torch.float8_e4m3fn)
        tensors[f"blocks.{i}.fc.scale_weight"] = scale.reshape(1)
        tensors[f"blocks.{i}.fc.scale_input"] = torch.tensor([1.0 if i else 0.5])
        tensors[f"blocks.{i}.norm.weight"] = torch.ones(32, dtype=torch.bfloat16)
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def statistics(src: Path, path: Path) -> None:
    """Calibration statistics of every Linear layer of the synthetic transformer, captured by
    ``cq calibrate``'s hooks on stand-in Linear modules with the checkpoint's names and inputs with
    outlier channels."""
    from safetensors.torch import load_file

    from cq_core.engine.capture import StatisticsCapture, run_batches

    weights = load_file(str(src))
    model = torch.nn.Module()
    linears = {}
    for name, w in weights.items():
        if name.endswith(".weight") and w.ndim == 2 and not name.startswith("embed"):
            linears[name.removesuffix(".weight")] = w.shape[1]
            model.add_module(name.removesuffix(".weight").replace(".", "_"),
                             torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
    capture = StatisticsCapture()
    capture.linears = lambda _model: [(layer, model.get_submodule(layer.replace(".", "_"))) for layer in linears]
    g = torch.Generator().manual_seed(3)
    batches = [{layer: torch.randn(32, k, generator=g) * (1 + torch.arange(k) % 7) for layer, k in linears.items()}
               for _ in range(4)]

    def run(module: torch.nn.Module, batch: dict) -> None:
        for layer, x in batch.items():
            module.get_submodule(layer.replace(".", "_"))(x)

    run_batches(capture, model, batches, run)
    capture.save(path)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/cq-digests", help="a scratch folder (emptied)")
    parser.add_argument("--only", default="", help="comma-separated case names")
    args = parser.parse_args()
    folder = Path(args.dir)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    src = folder / "synthetic.safetensors"
    write_synthetic_checkpoint(src, transformer_layout(HIDDEN, MLP, BLOCKS, vocab=VOCAB))
    files = {"src": src, "stats": folder / "stats.safetensors", "flux": folder / "flux-diffusers.safetensors",
             "legacy": folder / "legacy-fp8.safetensors"}
    statistics(src, files["stats"])
    flux_diffusers(files["flux"])
    legacy_scaled_fp8(files["legacy"])
    print("| case | command | sha256 (first 16 hex) |")
    print("|---|---|---|")
    for name, template in CASES.items():
        if args.only and name not in args.only.split(","):
            continue
        out = folder / "out" / name / f"{name}.safetensors"
        out.parent.mkdir(parents=True)
        argv = [part.format(out=out, **files) for part in template]
        done = subprocess.run([sys.executable, "-m", "cq_core", *argv, "-q"] if argv[0] == "convert"
                              else [sys.executable, "-m", "cq_core", *argv], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"| {name} | cq {' '.join(template)} | FAILED: {done.stderr.strip().splitlines()[-1]} |")
            continue
        written = sorted(p for p in out.parent.iterdir())
        print(f"| {name} | cq {' '.join(template)} | {' '.join(f'{p.name}={digest(p)}' for p in written)} |")


if __name__ == "__main__":
    main()
