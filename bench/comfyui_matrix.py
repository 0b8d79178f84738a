"""The whole family matrix: every tiny family x naming x format through cq and ComfyUI's loader, per ComfyUI release.

    python bench/comfyui_matrix.py [--comfyui 0.30.0,0.33.0] [--families flux,wan21_t2v] [--formats nvfp4]
                                   [--lora-families flux,wan21_t2v] [--section "two judges"]
                                   [--out docs/comfyui_matrix.md] [--dir /tmp/cq-matrix]

Families come from ``tests/families`` (``all_families()``: image and video
diffusion transformers, text encoders, UNets, all-in-one files). Each cell is
``tests/matrix.py``'s check: convert with no flags, load with ComfyUI, same
detected config, no key problems, finite forward within the format's bound; a
format the release does not load (``Format.comfyui_since``) must be refused by
its loader. The LoRA cells (``tests/lora.py``, ``--lora-families``, ComfyUI's
naming only) apply a seeded LoRA with ComfyUI's own loader to cq's output and to
the bf16 file, merged and offloaded, and compare the change of the forward.

One ComfyUI per process: each release of ``--comfyui`` runs in a worker process
of its own (this script with ``--worker``, ``CQ_COMFYUI_VERSION`` set), one after
the other, and writes its cells as JSON; this process writes the tables.
Prints Markdown and writes it into ``--out`` under the heading ``## <section>``
(replacing that section if present, keeping the others).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import build_registry  # noqa: E402
from tests.families import all_families  # noqa: E402
from tests.comfyui import TREES, VERSION_VARIABLE  # noqa: E402
from tests.lora import MODES  # noqa: E402
from tests.matrix import BOUNDS, MATRIX_FORMATS, Cell, Matrix, judge_loads  # noqa: E402

DEFAULT_LORA_FAMILIES = ("flux", "sd3", "wan21_t2v", "hunyuan_video")


def _cell_text(cell: Cell) -> str:
    if cell.refused:
        return "refused"
    rel = f" {cell.rel_err:.3f}" if cell.rel_err is not None else ""
    layers = f" ({cell.quantized}q)" if cell.quantized is not None else ""
    return ("pass" if cell.ok else "FAIL") + rel + layers


def _table(rows: list[tuple[str, str, Cell, list[Cell]]], formats: list[str]) -> str:
    head = "| family | naming | preset | " + " | ".join(formats) + " |"
    lines = [head, "|" + "---|" * (3 + len(formats))]
    for family, naming, preset, cells in rows:
        preset_text = "ok" if preset.ok else f"FAIL: {preset.reason}"
        lines.append(f"| {family} | {naming} | {preset_text} | " + " | ".join(_cell_text(c) for c in cells) + " |")
    return "\n".join(lines)


#: Reasons that differ only in the key lists they quote, folded into one line each.
_FOLD = [
    (r"relative error [0-9.]+", "relative error over the bound"),
    (r"keys: unet unexpected: \['(model\.diffusion_model\.|net\.)[^']*\.comfy_quant'.*",
     r"keys: unet unexpected: comfy_quant tensors under the file's prefix \1"),
    (r"keys: left over keys in diffusion model: .*", "keys: left over: cq's tensors under diffusers names"),
    (r"load: RuntimeError: Error\(s\) in loading state_dict for (\w+): size mismatch for ([\w.]+): copying a param "
     r"with shape torch.Size\((\[[\d, ]+\])\) from checkpoint, the shape in current model is "
     r"torch.Size\((\[[\d, ]+\])\).*", r"load: \1: size mismatch for \2: file \3, model \4"),
    (r"load: AttributeError: 'NoneType' object has no attribute 'quant_config'",
     "load: ComfyUI's detection matches no supported model (a width it reads changed)"),
]


def _fold(reason: str) -> str:
    for pattern, replacement in _FOLD:
        reason = re.sub(pattern, replacement, reason)
    return reason


def _reasons(rows) -> str:
    """Each distinct failure reason once, with the cells it covers."""
    seen: dict[str, list[str]] = {}
    for family, naming, _preset, cells in rows:
        for cell in cells:
            if not cell.ok:
                seen.setdefault(_fold(cell.reason), []).append(f"{family}/{naming}/{cell.format}")
    lines = []
    for reason, where in seen.items():
        shown = ", ".join(where[:6]) + (f", ... ({len(where)} cells)" if len(where) > 6 else "")
        lines.append(f"- `{reason}`: {shown}")
    return "\n".join(lines)


def write_section(path: Path, section: str, body: str) -> None:
    text = path.read_text() if path.exists() else "# Family matrix: cq's output through ComfyUI's own loader\n"
    heading = f"## {section}"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    block = f"{heading}\n\n{body.strip()}\n\n"
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    path.write_text(text.rstrip() + "\n")


def run_worker(args, families, formats) -> dict:
    """This process's ComfyUI (``$CQ_COMFYUI_VERSION``): every cell, as plain data."""
    from cq_core.plugin.manager import set_registry
    from tests.comfyui import active_version, import_comfyui

    import_comfyui()
    # ComfyUI logs every load; quiet its console handlers only. (logging.disable would also hide
    # the "unexpected"/"left over" warnings from the LoadLog capture, and every cell would pass them.)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.CRITICAL)
    set_registry(build_registry())
    lora_families = set(args.lora_families.split(",")) if args.lora_families else set()
    started = time.perf_counter()
    rows, loras = [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        matrix = Matrix(Path(tmp))
        for family in families:
            for naming in family.namings:
                preset = matrix.preset_check(family, naming)
                cells = [matrix.run(family, naming, fmt) for fmt in formats]
                rows.append({"family": family.name, "naming": naming, "preset": asdict(preset),
                             "cells": [asdict(c) for c in cells]})
                print(f"[{active_version()}] {family.name:22} {naming:10} preset={'ok' if preset.ok else 'FAIL'} "
                      + " ".join(f"{c.format}={_cell_text(c)}" for c in cells), flush=True)
            if family.name in lora_families:
                for fmt in filter(judge_loads, formats):
                    for cell in matrix.lora_cells(family, "comfyui", fmt):
                        loras.append(asdict(cell))
                        print(f"[{active_version()}] LoRA {family.name} {fmt} {cell.mode}: {_lora_text(cell)}",
                              flush=True)
            matrix._states.pop(family.name, None)  # free each family's tensors once its namings are done
    return {"version": active_version(), "rows": rows, "loras": loras,
            "seconds": time.perf_counter() - started, "machine": _machine()}


def _lora_text(cell) -> str:
    get = (lambda k: cell[k]) if isinstance(cell, dict) else (lambda k: getattr(cell, k))
    if get("delta_error") is None:
        return "FAIL " + get("reason")
    return (("pass" if get("ok") else "FAIL") + f" {get('rel_err'):.3f} ({get('rel_err_without'):.3f}), "
            f"gain {get('gain'):.2f}, Δ {get('delta_error'):.2f}, {get('requantized')}/{get('quantized')} rq")


def _cells(data: dict) -> list[tuple[str, str, Cell, list[Cell]]]:
    return [(r["family"], r["naming"], Cell(**r["preset"]), [Cell(**c) for c in r["cells"]]) for r in data["rows"]]


def _version_body(data: dict, formats: list[str]) -> str:
    rows = _cells(data)
    counts = Counter("refused" if c.refused else c.ok for *_, cells in rows for c in cells)
    presets_ok = sum(p.ok for _, _, p, _ in rows)
    families = len({r[0] for r in rows})
    return "\n\n".join([
        f"### ComfyUI {data['version']}",
        f"{families} families, {len(rows)} family x naming rows, {len(formats)} formats: {counts[True]} cells "
        f"pass, {counts[False]} fail"
        + (f", {counts['refused']} refused as they must be (a format this release does not load)"
           if counts["refused"] else "")
        + f"; the preset is right in {presets_ok} of {len(rows)} rows. Run time {data['seconds']:.0f} s "
        f"on {data['machine']}.",
        _table(rows, formats),
        f"Failure reasons (ComfyUI {data['version']}): " + ("\n\n" + _reasons(rows) if _reasons(rows) else "none."),
    ])


def _lora_body(results: list[dict]) -> str:
    lines = ["| ComfyUI | family | format | " + " | ".join(MODES) + " |", "|---|---|---|" + "---|" * len(MODES)]
    passed = total = 0
    for data in results:
        by = {}
        for c in data["loras"]:
            by.setdefault((c["family"], c["format"]), {})[c["mode"]] = c
        for (family, fmt), cells in by.items():
            texts = []
            for mode in MODES:
                c = cells.get(mode)
                total += c is not None
                passed += bool(c and c["ok"])
                texts.append(_lora_text(c) if c else "-")
            lines.append(f"| {data['version']} | {family} | {fmt} | " + " | ".join(texts) + " |")
    shares = [c["lora_share"] for d in results for c in d["loras"] if c["lora_share"] is not None]
    head = (f"{passed} of {total} LoRA cells pass. The LoRA (tests/lora.py: rank 4 on every 2-D weight, ComfyUI's "
            f"own key format, `comfy.sd.load_lora_for_models`) moves the bf16 forward by "
            f"{min(shares, default=0):.2f}-{max(shares, default=0):.2f} of its norm. Each entry: pass/FAIL, the "
            "relative error of cq's file with the LoRA against the bf16 file with it (bound as the matrix's: "
            + ", ".join(f"{k} {v}" for k, v in BOUNDS.items()) + ") and, in parentheses, the same without the "
            "LoRA; *gain*: the share of the bf16 model's LoRA change that the quantized model carries (1: full "
            "effect, 0: none; must be within 0.15 of 1); *Δ*: |Δq − Δbf16| / |Δbf16|, Δ the LoRA's change of the "
            "forward (not bounded: a merged LoRA re-quantizes the whole layer, whose noise lands in Δ); *rq*: "
            "quantized layers whose stored values or scales ComfyUI changed when applying the LoRA, of all.")
    return head + "\n\n" + "\n".join(lines)


def _differences(results: list[dict]) -> str:
    """Cells whose outcome differs between the releases."""
    if len(results) < 2:
        return ""
    outcome = {}
    for data in results:
        for family, naming, _p, cells in _cells(data):
            for c in cells:
                outcome.setdefault((family, naming, c.format), {})[data["version"]] = (
                    "refused" if c.refused else "pass" if c.ok else "FAIL")
    differ = {k: v for k, v in outcome.items() if len(set(v.values())) > 1}
    by_change = {}
    for (family, naming, fmt), v in differ.items():
        change = " -> ".join(f"{ver} {v[ver]}" for ver in v)
        by_change.setdefault((fmt, change), []).append(f"{family}/{naming}")
    lines = [f"- {fmt}: {change} in {len(cells)} rows" + (f" ({', '.join(cells[:4])}, ...)" if len(cells) > 4
                                                           else f" ({', '.join(cells)})")
             for (fmt, change), cells in by_change.items()]
    return "Cells whose outcome differs between the releases:\n\n" + ("\n".join(lines) or "- none")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=",".join(TREES), help="comma-separated ComfyUI releases (default: all)")
    parser.add_argument("--families", help="comma-separated family names (default: all)")
    parser.add_argument("--formats", help="comma-separated formats (default: every format a ComfyUI release loads)")
    parser.add_argument("--lora-families", default=",".join(DEFAULT_LORA_FAMILIES),
                        help="families that get LoRA cells ('' for none)")
    parser.add_argument("--section", default="two judges", help="heading of the section to write")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "comfyui_matrix.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--json", type=Path, help="also write every cell as JSON here (a worker: its cells)")
    parser.add_argument("--dir", type=Path, help="work directory for the tiny files (default: a temporary one)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    families, impossible = all_families()
    if args.families:
        wanted = set(args.families.split(","))
        families = [f for f in families if f.name in wanted]
    formats = args.formats.split(",") if args.formats else list(MATRIX_FORMATS)
    if args.worker:
        args.json.write_text(json.dumps(run_worker(args, families, formats)))
        return 0

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for version in args.comfyui.split(","):
            out = Path(tmp) / f"{version}.json"
            command = [sys.executable, __file__, "--worker", "--json", str(out), "--formats", ",".join(formats),
                       "--lora-families", args.lora_families]
            if args.families:
                command += ["--families", args.families]
            if args.dir:
                command += ["--dir", str(args.dir)]
            subprocess.run(command, check=True, env={**os.environ, VERSION_VARIABLE: version})
            results.append(json.loads(out.read_text()))

    parts = [_version_body(data, formats) for data in results]
    body = "\n\n".join([
        "Each cell: `cq_core.convert(src, dst, format=fmt)` with no flags, then ComfyUI's loader: same detected "
        "config as the bf16 source, no missing/unexpected/left-over keys, finite forward within the format's "
        "bound of the bf16 forward (relative L2 error, shown after `pass`/`FAIL`; bounds: "
        + ", ".join(f"{k} {v}" for k, v in BOUNDS.items()) + "). `refused`: the release does not load the format "
        "(`Format.comfyui_since`) and its loader refused the file naming it, as it must. `preset`: the preset "
        "cq's auto-detection picks (a dry run) against the family's expected one. `(Nq)`: the number of layers "
        "cq quantized in that cell (the others it kept in high precision: a preset, or the format refusing the "
        "shape).",
        _differences(results),
        *parts,
        "### LoRA cells\n\n" + _lora_body(results),
        "### Families without a tiny instance\n\n" + "\n".join(f"- {i.name}: {i.reason}" for i in impossible),
    ])
    print(body)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not args.no_write:
        write_section(args.out, args.section, body)
        print(f"\nwrote section {args.section!r} of {args.out}")
    return 0


def _machine() -> str:
    import os

    import torch

    return f"{os.cpu_count()} CPU cores, torch {torch.__version__}"


if __name__ == "__main__":
    sys.exit(main())
