"""asym_w4a8_int8 against the other 4-bit formats, and INT8 token embeddings, on all-MiniLM-L6-v2.

Needs the ``bench`` extra (``pip install -e .[bench]``). Same model, calibration
and held-out texts as ``bench/minilm_optimizers.py``.

Part 1, 4-bit weights: every encoder Linear (36 layers) in ``asym_w4a8_int8``
(uniform INT4, and with the Lloyd-Max ``codebook``, the default), ``convrot_w4a4`` and
``nvfp4``, with rtn and gptq (on the calibration texts; for the ConvRot
formats it rounds in the rotated basis, ``Format.grid_basis``); ``--optimizers``
adds learned (slow on a shared 2-core machine).
Bits per weight are the stored bytes of those 36 layers (scales included) times
8 over their weight count. "weight-only" runs the decoded weights in float32 (what
ComfyUI does on a CPU); "compute path" also passes each layer's input through
the format's ``activation_fake_quant`` (INT8 per token after the rotation, as
comfy-kitchen's eager ``w4a8_int8_linear`` does) where the format has one.

Part 2, token embeddings: ``embeddings.word_embeddings`` (30522 x 384) in
row-wise INT8 (``--embeddings int8``), alone and on top of FP8 / asym W4A8
linears; per-tensor FP8 (the other layout ComfyUI's Embedding takes) for
comparison; bytes saved, here and for the token tables of Qwen2.5-VL-7B
(152064 x 3584) and T5-XXL (32128 x 4096), from their shapes.

Usage: python bench/minilm_asym_embeddings.py [--markdown FILE]
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import torch
from minilm_optimizers import (
    EVALUATION_TEXTS,
    calibration_batches,
    compare,
    embed,
    encoder_linears,
    load_model,
    tokenize,
)

from cq_core.engine.capture import capture_statistics
from cq_core.plugin.manager import get_registry
from cq_core.plugin.types import OptimizeContext

#: (label, format, options)
FORMATS = (
    ("asym_w4a8_int8 uniform", "asym_w4a8_int8", {"codebook": False}),
    ("asym_w4a8_int8 codebook", "asym_w4a8_int8", {"codebook": True}),
    ("convrot_w4a4", "convrot_w4a4", {}),
    ("nvfp4", "nvfp4", {}),
)
OPTIMIZERS = ("rtn", "gptq")
#: (name, vocabulary, hidden) of real token tables, from their configs.
TABLES = (("Qwen2.5-VL-7B", 152064, 3584), ("T5-XXL", 32128, 4096))


def stored_bits(fmt, shapes) -> float:
    total = sum(
        spec.dtype.itemsize * math.prod(spec.shape) for shape in shapes for spec in fmt.stored_specs(shape).values()
    )
    return 8 * total / sum(math.prod(s) for s in shapes)


def quantize(model, fmt, optimizer, stats):
    """``(copy of model with every encoder Linear decoded from fmt, stored tensors by layer)``."""
    quantized, stored = copy.deepcopy(model), {}
    for name, module in encoder_linears(quantized):
        context = OptimizeContext(layer=name, stats=stats.get(name) if stats else None, seed=0)
        stored[name] = optimizer.optimize_layer(module.weight.data, fmt, context).tensors
        module.weight.data = fmt.decode(stored[name], tuple(module.weight.shape)).to(module.weight.dtype)
    return quantized, stored


def simulates_activations(fmt) -> bool:
    """Whether ``fmt`` says how its GEMM quantizes activations (``activation_fake_quant``)."""
    fake = getattr(fmt, "activation_fake_quant", None)
    if fake is None:
        return False
    weight = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    return fake(torch.ones(1, 256), fmt.encode(weight)) is not None


def on_compute_path(quantized, fmt, stored):
    """A copy of ``quantized`` whose Linears see their input as the format's GEMM does."""
    model = copy.deepcopy(quantized)
    for name, module in encoder_linears(model):
        module.register_forward_pre_hook(lambda m, args, t=stored[name]: (fmt.activation_fake_quant(args[0], t),))
    return model


def table_rows(registry, model, evaluation, reference, linears) -> list[str]:
    """``linears``: (label, model with quantized Linears or None for fp32) to put the table under."""
    table = model.embeddings.word_embeddings.weight.data
    rows = []
    int8 = registry.format("int8_tensorwise")(scaling="row")
    fp8 = registry.format("float8_e4m3fn")()
    variants = {
        "int8 per row (--embeddings int8)": int8.decode(int8.encode(table)),
        "fp8 e4m3, per-tensor scale": fp8.decode(fp8.encode(table)),
    }
    weight_db = {k: 10 * math.log10(float(table.square().sum()) / float((v - table).square().sum()))
                 for k, v in variants.items()}
    for setup, base in linears:
        base = base or model
        plain = compare(reference, embed(base, evaluation))
        for label, decoded in variants.items():
            with_table = copy.deepcopy(base)
            with_table.embeddings.word_embeddings.weight.data = decoded
            got = compare(reference, embed(with_table, evaluation))
            rows.append(f"| {setup} | {label} | {weight_db[label]:.2f} | {plain['sqnr_db']:.2f} | {got['sqnr_db']:.2f} "
                        f"| {got['sqnr_db'] - plain['sqnr_db']:+.2f} | {got['cosine']:.5f} |")
    return rows


def size_rows(vocab_hidden) -> list[str]:
    rows = []
    for name, vocab, hidden in vocab_hidden:
        params = vocab * hidden
        bf16, int8 = 2 * params, params + 4 * vocab
        rows.append(f"| {name} | {vocab} x {hidden} | {params / 1e6:.1f} M | {bf16 / 1e6:.1f} MB | {int8 / 1e6:.1f} MB "
                    f"| {(bf16 - int8) / 1e6:.1f} MB |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--formats", default=",".join(label for label, _, _ in FORMATS), help="labels, as in the table")
    parser.add_argument("--no-tables", action="store_true", help="Part 1 only: no token-table rows.")
    parser.add_argument("--markdown", type=Path, help="Also write the tables to this file.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_model()
    stats = capture_statistics(model, calibration_batches(tokenizer), layers=r"^encoder\.")
    evaluation = tokenize(tokenizer, EVALUATION_TEXTS)
    reference = embed(model, evaluation)
    registry = get_registry()
    shapes = [tuple(m.weight.shape) for _, m in encoder_linears(model)]

    linears = [("fp32 linears", None)]
    fp8 = registry.format("float8_e4m3fn")()
    linears.append(("float8_e4m3fn rtn linears", quantize(model, fp8, registry.optimizer("rtn")(), stats)[0]))
    out = ["| format | bits/weight | optimizer | weight-only SQNR dB | cosine | compute path SQNR dB | cosine |",
           "|---|---:|---|---:|---:|---:|---:|"]
    for label, name, options in FORMATS:
        if label not in args.formats.split(","):
            continue
        fmt = registry.format(name)(**options)
        bits = stored_bits(fmt, shapes)
        for optimizer_name in args.optimizers.split(","):
            optimizer = registry.optimizer(optimizer_name)()
            quantized, stored = quantize(model, fmt, optimizer, stats)
            if (label, optimizer_name) == ("asym_w4a8_int8 uniform", "gptq"):
                linears.append(("asym_w4a8_int8 gptq linears", quantized))
            runs = [quantized, on_compute_path(quantized, fmt, stored) if simulates_activations(fmt) else None]
            cells = []
            for run in runs:
                if run is None:
                    cells.append("| n/a | ")
                    continue
                got = compare(reference, embed(run, evaluation))
                cells.append(f"| {got['sqnr_db']:.2f} | {got['cosine']:.5f} ")
            out.append(f"| {label} | {bits:.3f} | {optimizer_name} {''.join(cells)}|")
            print(out[-1], flush=True)

    model_table = model.embeddings.word_embeddings.weight
    out += [] if args.no_tables else ["", "| linears | token table | table weight SQNR dB | embedding SQNR dB, table fp32 | with the table "
            "quantized | cost dB | cosine |", "|---|---|---:|---:|---:|---:|---:|"]
    if not args.no_tables:
        out += table_rows(registry, model, evaluation, reference, linears)
    out += [] if args.no_tables else ["", "| model | token table | parameters | bf16 | int8 per row + F32 scales | saved |",
            "|---|---|---:|---:|---:|---:|"]
    out += [] if args.no_tables else size_rows((("all-MiniLM-L6-v2", *model_table.shape), *TABLES))
    text = "\n".join(out)
    print()
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
