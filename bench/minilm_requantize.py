"""What quantizing an already-quantized release costs: all-MiniLM-L6-v2, FP8 -> X against bf16 -> X.

Every file is made by ``cq convert`` (the FP8 release too, from the bf16 source), the way a user
re-quantizes an FP8-only release; each result is decoded as ComfyUI decodes it and the sentence
embeddings of held-out texts are compared with the bf16 model's (embedding SQNR, mean cosine).
With ``gptq`` the calibration statistics come from the bf16 model (a user of an FP8 release has
only the FP8 model: the second gptq row takes them from the FP8 decode instead).

    python bench/minilm_requantize.py [--formats nvfp4,int8_tensorwise,mxfp8]

Needs the ``bench`` extra (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from minilm_budget import bf16_source, decoded_model  # noqa: E402 (the bench helpers live beside this script)
from minilm_optimizers import (  # noqa: E402
    EVALUATION_TEXTS,
    calibration_batches,
    compare,
    embed,
    load_model,
    tokenize,
)

from cq_core.commands.convert import convert  # noqa: E402
from cq_core.engine.capture import capture_statistics  # noqa: E402
from cq_core.io.calibration_file import save_statistics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", default="nvfp4,int8_tensorwise,mxfp8")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model, tokenizer = load_model()
    evaluation = tokenize(tokenizer, EVALUATION_TEXTS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cq-requantize-") as tmp:
        folder = Path(tmp)
        bf16 = bf16_source(model, folder)  # the model now holds the bf16 weights, computed in fp32
        reference = embed(model, evaluation)
        fp8 = folder / "minilm-fp8.safetensors"
        fp8_report = convert(bf16, fp8, format="float8_e4m3fn", model="none", overwrite=True)
        fp8_model = decoded_model(model, fp8, fp8_report)
        rows.append(("float8_e4m3fn", "rtn", "bf16 (the release itself)", compare(reference, embed(fp8_model, evaluation))))
        stats = {}
        for label, source_model in (("bf16", model), ("fp8 decode", fp8_model)):
            stats[label] = folder / f"stats-{label.replace(' ', '-')}.safetensors"
            save_statistics(capture_statistics(source_model, calibration_batches(tokenizer), layers=r"^encoder\."),
                            stats[label])
        for fmt in args.formats.split(","):
            for optimizer, calibration in (("rtn", None), ("gptq", "bf16"), ("gptq", "fp8 decode")):
                for source_label, source in (("bf16", bf16), ("fp8", fp8)):
                    if calibration == "fp8 decode" and source_label == "bf16":
                        continue
                    out = folder / f"{source_label}-{fmt}-{optimizer}.safetensors"
                    options = {"calibration": stats[calibration]} if calibration else {}
                    report = convert(source, out, format=fmt, optimizer=optimizer, model="none", overwrite=True,
                                     **options)
                    quantized = decoded_model(copy.deepcopy(model), out, report)
                    label = optimizer + (f" (H from {calibration})" if calibration else "")
                    rows.append((fmt, label, source_label, compare(reference, embed(quantized, evaluation))))
                    print(rows[-1][:3], f"{rows[-1][3]['sqnr_db']:.2f} dB", flush=True)
    print()
    print(render(rows))


def render(rows) -> str:
    lines = ["| format | optimizer | quantized from | embedding SQNR dB | mean cosine | cost of the FP8 step dB |",
             "|---|---|---|---:|---:|---:|"]
    direct = {(fmt, label.split(" (")[0]): m["sqnr_db"] for fmt, label, source, m in rows if source == "bf16"}
    for fmt, label, source, metrics in rows:
        base = direct.get((fmt, label.split(" (")[0])) if source == "fp8" else None
        cost = "" if base is None else f"{metrics['sqnr_db'] - base:+.2f}"
        lines.append(f"| {fmt} | {label} | {source} | {metrics['sqnr_db']:.2f} | {metrics['cosine']:.5f} | {cost} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
