"""The whole family matrix: every tiny family x naming x stock format through cq and ComfyUI's loader.

    python bench/comfyui_matrix.py [--families flux,wan21_t2v] [--formats nvfp4] [--section before]
                                   [--out docs/comfyui_matrix.md] [--dir /tmp/cq-matrix]

Families come from ``tests/families`` (``all_families()``: image and video
diffusion transformers, text encoders, UNets, all-in-one files). Each cell is
``tests/matrix.py``'s check: convert with no flags, load with ComfyUI, same
detected config, no key problems, finite forward within the format's bound.
Prints one Markdown table and writes it into ``--out`` under the heading
``## <section>`` (replacing that section if present, keeping the others), so
a later run can add an "after" section beside the "before" one.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
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
from tests.matrix import BOUNDS, STOCK_FORMATS, Cell, Matrix  # noqa: E402


def _cell_text(cell: Cell) -> str:
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
    text = path.read_text() if path.exists() else "# Family matrix: cq's output through ComfyUI 0.30's loader\n"
    heading = f"## {section}"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    block = f"{heading}\n\n{body.strip()}\n\n"
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    path.write_text(text.rstrip() + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", help="comma-separated family names (default: all)")
    parser.add_argument("--formats", help="comma-separated formats (default: the six stock formats)")
    parser.add_argument("--section", default="before", help="heading of the section to write (default: before)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "comfyui_matrix.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--json", type=Path, help="also write every cell (and preset check) as JSON here")
    parser.add_argument("--dir", type=Path, help="work directory for the tiny files (default: a temporary one)")
    args = parser.parse_args()

    from cq_core.plugin.manager import set_registry
    from tests.comfyui import import_comfyui

    import_comfyui()
    # ComfyUI logs every load; quiet its console handlers only. (logging.disable would also hide
    # the "unexpected"/"left over" warnings from the LoadLog capture, and every cell would pass them.)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.CRITICAL)

    set_registry(build_registry())
    families, impossible = all_families()
    if args.families:
        wanted = set(args.families.split(","))
        families = [f for f in families if f.name in wanted]
    formats = args.formats.split(",") if args.formats else list(STOCK_FORMATS)

    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        matrix = Matrix(Path(tmp))
        for family in families:
            for naming in family.namings:
                preset = matrix.preset_check(family, naming)
                cells = [matrix.run(family, naming, fmt) for fmt in formats]
                rows.append((family.name, naming, preset, cells))
                print(f"{family.name:24} {naming:10} preset={'ok' if preset.ok else 'FAIL'} "
                      + " ".join(f"{c.format}={_cell_text(c)}" for c in cells), flush=True)
            for name in list(matrix._states):  # free each family's tensors once its namings are done
                matrix._states.pop(name)
    seconds = time.perf_counter() - started

    counts = Counter(c.ok for *_, cells in rows for c in cells)
    presets_ok = sum(p.ok for _, _, p, _ in rows)
    body = "\n\n".join([
        f"{len(families)} families, {len(rows)} family x naming rows, {len(formats)} formats: "
        f"{counts[True]} cells pass, {counts[False]} fail; the preset is right in {presets_ok} of {len(rows)} rows. "
        f"Run time {seconds:.0f} s on {_machine()}.",
        "Each cell: `cq_core.convert(src, dst, format=fmt)` with no flags, then ComfyUI's loader: same detected "
        "config as the bf16 source, no missing/unexpected/left-over keys, finite forward within the format's "
        "bound of the bf16 forward (relative L2 error, shown after `pass`/`FAIL`; bounds: "
        + ", ".join(f"{k} {v}" for k, v in BOUNDS.items()) + "). `preset`: the preset cq's auto-detection picks "
        "(a dry run) against the family's expected one. `(Nq)`: the number of layers cq quantized in that cell "
        "(the others it kept in high precision: a preset, or the format refusing the shape).",
        _table(rows, formats),
        "### Failure reasons\n\n" + (_reasons(rows) or "none"),
        "### Families without a tiny instance\n\n" + "\n".join(f"- {i.name}: {i.reason}" for i in impossible),
    ])
    print(body)
    if args.json:
        cells = [asdict(c) for _, _, preset, cs in rows for c in (preset, *cs)]
        args.json.write_text(json.dumps(cells, indent=1))
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
