"""How much can rounding gain on MiniLM NVFP4 without calibration data? Bounds, not a product.

``learned`` without calibration (data-free) gains about +0.3 dB embedding
SQNR over round-to-nearest on NVFP4 (bench/minilm_optimizers.py). This
script measures what weight-only information could buy at best, by handing
``gptq`` (the strongest rounding we have for a quadratic objective) stand-in
Hessians built from different amounts of knowledge, on the same model,
texts and metric as bench/minilm_optimizers.py:

- ``I + w V_k V_kᵀ``: the data-free heuristic of QUALITY.md (extra weight on
  the error along W's top-k right singular directions) solved in closed
  form instead of by gradient steps;
- ``diag(γ² + β²)`` of the LayerNorm that feeds the layer (read from the
  checkpoint, no data; only the query/key/value and FFN-in layers have one);
- oracle ``diag(H)``: each input channel's true mean square from the
  calibration texts (the most any per-channel estimate can know);
- oracle ``H``: the calibrated optimizer itself (the ceiling);
- a per-tensor global-scale search (16 steps over one octave, least weight
  error), for the "better scales" route.

Usage: python bench/minilm_data_free_ceiling.py [--markdown FILE]
"""

from __future__ import annotations

import argparse
import copy
import re
from collections.abc import Callable
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

FORMAT = "nvfp4"
Quantizer = Callable[[str, torch.Tensor], torch.Tensor]  # (layer, float32 weight) -> decoded weight


def quantized_sqnr(model, evaluation, reference, quantize: Quantizer) -> float:
    copy_ = copy.deepcopy(model)
    for name, module in encoder_linears(copy_):
        module.weight.data = quantize(name, module.weight.data.float()).to(module.weight.dtype)
    return compare(reference, embed(copy_, evaluation))["sqnr_db"]


def feeding_layer_norm(state: dict[str, torch.Tensor], layer: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(γ, β) of the LayerNorm whose output is this Linear's input (BERT post-norm layout), or None."""
    block, rest = re.match(r"encoder\.layer\.(\d+)\.(.*)", layer).groups()
    block = int(block)
    if rest.startswith("attention.self."):
        norm = "embeddings.LayerNorm" if block == 0 else f"encoder.layer.{block - 1}.output.LayerNorm"
    elif rest == "intermediate.dense":
        norm = f"encoder.layer.{block}.attention.output.LayerNorm"
    else:
        return None
    return state[f"{norm}.weight"].float(), state[f"{norm}.bias"].float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", type=Path, help="Also write the result table to this file.")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)

    model, tokenizer = load_model()
    stats = capture_statistics(model, calibration_batches(tokenizer), layers=r"^encoder\.")
    evaluation = tokenize(tokenizer, EVALUATION_TEXTS)
    reference = embed(model, evaluation)
    state = model.state_dict()
    registry = get_registry()
    fmt = registry.format(FORMAT)()
    gptq, learned = registry.optimizer("gptq")(), registry.optimizer("learned")()

    def rtn(layer, w):
        return fmt.decode(fmt.encode(w))

    def with_optimizer(optimizer, hessian: Callable[[str, torch.Tensor], torch.Tensor | None]) -> Quantizer:
        def quantize(layer, w):
            h = hessian(layer, w)
            if h is None and optimizer is gptq:  # nothing known about this layer's inputs
                return rtn(layer, w)
            context = OptimizeContext(layer=layer, stats=None if h is None else {"H": h}, seed=0)
            return fmt.decode(optimizer.optimize(w, fmt, context).tensors)

        return quantize

    def top_singular(rank: int, weight_of_top: float):
        def hessian(layer, w):
            torch.manual_seed(0)
            _, _, v = torch.svd_lowrank(w, q=min(rank + 8, min(w.shape)), niter=2)
            return torch.eye(w.shape[1]) + weight_of_top * v[:, :rank] @ v[:, :rank].T

        return hessian

    def layer_norm_diagonal(layer, w):
        norm = feeding_layer_norm(state, layer)
        return None if norm is None else torch.diag(norm[0].square() + norm[1].square())

    def oracle_diagonal(layer, w):
        return torch.diag(torch.diagonal(stats[layer]["H"].float()))

    def global_scale_search(layer, w):
        from cq_nvfp4 import nvfp4

        plain, best = nvfp4.global_scale, None
        try:
            for step in range(16):
                nvfp4.global_scale = lambda amax, f=2 ** (-step / 16): plain(amax) * f
                decoded = fmt.decode(fmt.encode(w))
                error = float((decoded - w).square().sum())
                if best is None or error < best[0]:
                    best = (error, decoded)
        finally:
            nvfp4.global_scale = plain
        return best[1]

    rows: list[tuple[str, str, float]] = []
    baseline = quantized_sqnr(model, evaluation, reference, rtn)
    rows.append(("round-to-nearest", "nothing", baseline))
    candidates: list[tuple[str, str, Quantizer]] = [
        ("learned, data-free (shipped)", "the weight", with_optimizer(learned, lambda layer, w: None)),
        ("global-scale search", "the weight", global_scale_search),
    ]
    for rank, weight_of_top in ((8, 1.0), (64, 1.0), (64, 4.0)):
        candidates.append((
            f"gptq, H = I + {weight_of_top:g} V_k V_kᵀ, k={rank}", "the weight",
            with_optimizer(gptq, top_singular(rank, weight_of_top)),
        ))
    candidates += [
        ("gptq, H = diag(γ² + β²) of the feeding LayerNorm", "the checkpoint's norms", with_optimizer(gptq, layer_norm_diagonal)),
        ("gptq, H = true diag(H) (oracle)", "calibration data", with_optimizer(gptq, oracle_diagonal)),
        ("gptq, H = true H (calibrated)", "calibration data", with_optimizer(gptq, lambda layer, w: stats[layer]["H"])),
    ]
    for label, knows, quantize in candidates:
        rows.append((label, knows, quantized_sqnr(model, evaluation, reference, quantize)))
        print(f"{label:52s} {rows[-1][2]:6.2f} dB ({rows[-1][2] - baseline:+.2f})", flush=True)

    lines = [
        f"| {FORMAT}: rounding with | knows | embedding SQNR dB | vs rtn dB |",
        "|---|---|---:|---:|",
        *(f"| {label} | {knows} | {sqnr:.2f} | {'' if i == 0 else f'{sqnr - baseline:+.2f}'} |"
          for i, (label, knows, sqnr) in enumerate(rows)),
    ]
    print()
    print("\n".join(lines))
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
