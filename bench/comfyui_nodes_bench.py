"""What the ComfyUI nodes cost, measured on the CPU with the vendored ComfyUI 0.30.0.

1. Capture overhead on sampling: seconds per step of ComfyUI's own sampler
   (``comfy.sample.sample``, euler, what KSampler calls) through the capture
   node's MODEL, against the same MODEL without it, with a rank-512 sketch (the
   node's default, held in bfloat16) and with exact H (rank 0); plus the
   seconds of the statistics file write that ends each sampling run.
2. The Quantize node's seconds per format (round to nearest), and with gptq
   and learned on the captured statistics.

The model is a FLUX.1-dev built with ComfyUI's own class and seeded random
weights, larger than the test suite's tiny one so that most layers have more
input features than the sketch's rank: hidden 1024 (K = 1024 to 5120),
2 double and 4 single blocks, T5 width 4096 (about 150 M parameters, bf16).
The tiny FLUX of tests/families (hidden 128) is measured too (``--tiny``).

    python bench/comfyui_nodes_bench.py [--steps 4] [--latent 32] [--tiny]

Prints a markdown table per measurement (docs/comfyui_nodes.md).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.comfyui import import_comfyui, load_diffusion_model  # noqa: E402
from tests.conftest import write_checkpoint  # noqa: E402
from tests.families._dit import tiny  # noqa: E402
from tests.families.image import FLUX_CONFIG  # noqa: E402

#: FLUX.1-dev's layout at a width a 2-core CPU samples in about a second per step.
BENCH_FLUX = {**FLUX_CONFIG, "hidden_size": 1024, "num_heads": 8, "depth": 2, "depth_single_blocks": 4,
              "context_in_dim": 4096, "vec_in_dim": 768, "axes_dim": [16, 56, 56]}


def conditioning(config, g, tokens=64):
    return [[torch.randn(1, tokens, config["context_in_dim"], generator=g),
             {"pooled_output": torch.randn(1, config["vec_in_dim"], generator=g), "guidance": 3.5}]]


def sample(comfy, patcher, config, steps, latent_size, seed):
    import comfy.sample

    g = torch.Generator().manual_seed(seed)
    latent = torch.zeros(1, 16, latent_size, latent_size)
    noise = comfy.sample.prepare_noise(latent, seed)
    positive = conditioning(config, g)
    started = time.perf_counter()
    comfy.sample.sample(patcher, noise, steps, 1.0, "euler", "simple", positive, positive, latent,
                        disable_pbar=True, seed=seed)
    return time.perf_counter() - started


def point_comfyui_at(folder: Path):
    import folder_paths

    folder_paths.models_dir = str(folder)
    for name in ("diffusion_models", "checkpoints", "text_encoders"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        folder_paths.folder_names_and_paths[name] = ([str(folder / name)], {".safetensors"})
    folder_paths.folder_names_and_paths.pop("cq_calibration", None)
    folder_paths.filename_list_cache = {}


def bench(name, config, expect, args, comfy, pack, folder):
    from cq_comfyui.capture import SamplingCapture

    point_comfyui_at(folder)
    source = write_checkpoint(folder / "diffusion_models" / f"{name}.safetensors", tiny(comfy, config, expect))
    params = sum(p.numel() for p in load_diffusion_model(source)[0].model.diffusion_model.parameters())
    capture, quantize = pack.NODE_CLASS_MAPPINGS["CqCaptureCalibration"](), pack.NODE_CLASS_MAPPINGS["CqQuantizeModel"]()
    patcher, _ = load_diffusion_model(source)
    sample(comfy, patcher, config, 1, args.latent, 0)  # warm-up
    rows = []
    saves = {}
    original_save = SamplingCapture.save

    def timed_save(self, statistics_capture):
        started = time.perf_counter()
        original_save(self, statistics_capture)
        saves[self.rank] = time.perf_counter() - started

    SamplingCapture.save = timed_save
    try:
        plain = [sample(comfy, patcher, config, args.steps, args.latent, s) / args.steps for s in range(args.repeats)]
        rows.append(("no capture", statistics.median(plain), None))
        for label, rank in (("rank 512, bfloat16 sketch", 512), ("exact H (rank 0)", 0)):
            (model,) = capture.capture(patcher, f"{name}_rank{rank}", rank, "model device")
            times = []
            for s in range(args.repeats):
                times.append(sample(comfy, model, config, args.steps, args.latent, s) / args.steps)
            # the wrapper's own rank: 0 means exact
            rows.append((label, statistics.median(times), saves.get(rank or None)))
    finally:
        SamplingCapture.save = original_save
    tokens = (args.latent // 2) ** 2 + 64
    print(f"\n### {name}: {params / 1e6:.1f} M parameters, {args.steps} euler steps at cfg 1, "
          f"latent {args.latent}x{args.latent} ({tokens} tokens), median of {args.repeats} runs\n")
    print("| capture | s per step | overhead | file write per run s |")
    print("|---|---:|---:|---:|")
    base = rows[0][1]
    for label, per_step, save in rows:
        overhead = "" if label == "no capture" else f"{(per_step / base - 1) * 100:+.0f}%"
        print(f"| {label} | {per_step:.3f} | {overhead} | {'' if save is None else f'{save:.2f}'} |")

    formats = quantize.INPUT_TYPES()["required"]["format"][0]
    print(f"\n| Quantize node ({name}, {source.stat().st_size / 1e6:.0f} MB) | optimizer | seconds |")
    print("|---|---|---:|")
    for fmt in formats:
        started = time.perf_counter()
        quantize.quantize(f"diffusion_models/{name}.safetensors", fmt, "auto", "rtn", "none", True)
        print(f"| {fmt} | rtn | {time.perf_counter() - started:.2f} |")
    for optimizer in ("gptq", "learned"):
        started = time.perf_counter()
        quantize.quantize(f"diffusion_models/{name}.safetensors", "nvfp4", "auto", optimizer,
                          f"{name}_rank512.safetensors", True)
        print(f"| nvfp4 | {optimizer} (rank-512 statistics) | {time.perf_counter() - started:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--latent", type=int, default=32, help="latent height and width (FLUX: image / 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="also the test suite's tiny FLUX")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    comfy = import_comfyui()
    from tests.test_comfyui_nodes import load_node_pack

    pack = load_node_pack()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ComfyUI 0.30.0 on the CPU")
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            bench("tiny_flux", FLUX_CONFIG, "Flux", args, comfy, pack, Path(tmp) / "tiny")
        bench("bench_flux", BENCH_FLUX, "Flux", args, comfy, pack, Path(tmp) / "bench")


if __name__ == "__main__":
    main()
