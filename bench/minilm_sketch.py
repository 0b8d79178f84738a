"""Bounded calibration statistics against full H, on a real model, and their size on FLUX.1-dev.

Part 1 (needs the ``bench`` extra, like bench/minilm_optimizers.py): capture
all-MiniLM-L6-v2's statistics on the calibration texts once with full H and
once per sketch rank (a frequent-directions sketch plus the exact diagonal,
:mod:`cq_core.numerics.second_moment`), quantize every encoder Linear with
``gptq`` and ``learned`` through the optimizer API, and compare sentence
embeddings with the unquantized model (embedding SQNR, dB). MiniLM's Linear
inputs have K = 384 and 1536; a rank r keeps r/K of the directions (rank 32
on K = 384 is the ratio rank 256 has on FLUX's K = 3072).

Part 2 (no model needed): the statistics' size for FLUX.1-dev's Linear layers
(shapes from ``flux_dev_linear_inputs``: ComfyUI's ``comfy/ldm/flux`` with
FLUX.1-dev's config, hidden 3072, 19 double and 38 single blocks), on disk and
as running state during capture, per rank (the sketch held in float32 or bfloat16).

Usage: python bench/minilm_sketch.py [--ranks 16,32,64,128] [--formats nvfp4,float8_e4m3fn]
       [--optimizers gptq,learned] [--markdown FILE] [--sizes-only]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cq_core.numerics.second_moment import capture_bytes, stored_bytes  # noqa: E402

GB = 1e9


def flux_dev_linear_inputs() -> list[tuple[str, int]]:
    """``(layer, K)`` of every Linear in FLUX.1-dev's diffusion model (ComfyUI's names).

    Hidden size 3072, MLP ratio 4, 19 double blocks, 38 single blocks, guidance
    embedding, in_channels 64, T5 context 4096, CLIP vector 768
    (black-forest-labs/flux ``FluxParams`` for flux-dev; ComfyUI ``comfy/ldm/flux/model.py``).
    """
    hidden, mlp = 3072, 3072 * 4
    layers = [("img_in", 64), ("txt_in", 4096)]
    for emb, k in (("time_in", 256), ("guidance_in", 256), ("vector_in", 768)):
        layers += [(f"{emb}.in_layer", k), (f"{emb}.out_layer", hidden)]
    for i in range(19):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}_"
            layers += [(p + "mod.lin", hidden), (p + "attn.qkv", hidden), (p + "attn.proj", hidden),
                       (p + "mlp.0", hidden), (p + "mlp.2", mlp)]
    for i in range(38):
        p = f"single_blocks.{i}."
        layers += [(p + "modulation.lin", hidden), (p + "linear1", hidden), (p + "linear2", hidden + mlp)]
    layers += [("final_layer.adaLN_modulation.1", hidden), ("final_layer.linear", hidden)]
    return layers


def size_rows(specs: list[str]) -> list[tuple[str, float, float]]:
    """``(representation, GB on disk, GB of capture state)`` for FLUX.1-dev (absmax included).

    ``specs``: ``"full"``, ``"R"`` (rank R, sketch held in float32) or ``"Rbf16"`` (in bfloat16).
    """
    layers = flux_dev_linear_inputs()
    rows = []
    for spec in specs:
        rank = None if spec == "full" else int(spec.removesuffix("bf16"))
        dtype = torch.bfloat16 if spec.endswith("bf16") else torch.float32
        disk = sum(stored_bytes(k, rank) + 4 * k for _, k in layers)
        state = sum(capture_bytes(k, rank, dtype) + 4 * k for _, k in layers)
        label = "full H" if rank is None else f"rank {rank} + diagonal, {'bfloat16' if spec.endswith('bf16') else 'float32'} sketch"
        rows.append((label, disk / GB, state / GB))
    return rows


def quality_rows(ranks, formats, optimizers, threads: int):
    from minilm_optimizers import calibration_batches, compare, embed, load_model, quantize_model, tokenize
    from minilm_optimizers import EVALUATION_TEXTS

    from cq_core.engine.capture import capture_statistics
    from cq_core.plugin.manager import get_registry

    torch.set_num_threads(threads)
    model, tokenizer = load_model()
    batches = calibration_batches(tokenizer)
    stats = {rank: capture_statistics(model, batches, layers=r"^encoder\.", rank=rank) for rank in [None, *ranks]}
    evaluation = tokenize(tokenizer, EVALUATION_TEXTS)
    reference = embed(model, evaluation)
    registry = get_registry()
    rows = []
    for format_name in formats:
        fmt = registry.format(format_name)()
        rtn, _, _ = quantize_model(model, fmt, registry.optimizer("rtn")(), None, torch.device("cpu"))
        rtn_db = compare(reference, embed(rtn, evaluation))["sqnr_db"]
        for optimizer_name in optimizers:
            full_db = None
            for rank in [None, *ranks]:
                optimizer = registry.optimizer(optimizer_name)()
                quantized, seconds, _ = quantize_model(model, fmt, optimizer, stats[rank], torch.device("cpu"))
                db = compare(reference, embed(quantized, evaluation))["sqnr_db"]
                full_db = db if rank is None else full_db
                label = "full H" if rank is None else f"rank {rank} + diagonal"
                rows.append((format_name, optimizer_name, label, db, db - rtn_db, db - full_db))
                print(f"{format_name:14s} {optimizer_name:8s} {label:22s} {db:6.2f} dB  vs rtn {db - rtn_db:+.2f}  "
                      f"vs full H {db - full_db:+.2f}  ({seconds:.1f}s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="16,32,64,128")
    parser.add_argument("--formats", default="nvfp4,float8_e4m3fn")
    parser.add_argument("--optimizers", default="gptq,learned")
    parser.add_argument("--flux-ranks", default="full,128,256,512,512bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes-only", action="store_true")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    lines = []
    if not args.sizes_only:
        ranks = [int(r) for r in args.ranks.split(",")]
        rows = quality_rows(ranks, args.formats.split(","), args.optimizers.split(","), args.threads)
        lines += ["| format | optimizer | statistics | embedding SQNR dB | vs rtn dB | vs full H dB |",
                  "|---|---|---|---:|---:|---:|"]
        lines += [f"| {f} | {o} | {s} | {db:.2f} | {g:+.2f} | {'' if s == 'full H' else f'{d:+.2f}'} |"
                  for f, o, s, db, g, d in rows]
        lines.append("")
    flux = args.flux_ranks.split(",")
    lines += ["| FLUX.1-dev statistics | on disk GB | capture state GB |", "|---|---:|---:|"]
    lines += [f"| {label} | {disk:.2f} | {state:.2f} |" for label, disk, state in size_rows(flux)]
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
