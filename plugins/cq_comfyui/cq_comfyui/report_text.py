"""The Quantize node's report: what a ComfyUI user reads on the node and gets as a STRING.

Warnings first (the engine's ``Report.warnings`` and the node's own), then
what was written and how well, what the preset and a size budget chose, and
one line per quantized layer. An optimizer's gain in a layer's note is measured
on the statistics it was fitted to, so the report says so: on other prompts the
gain is smaller (docs/comfyui_nodes.md measures it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any


def size_text(n: float) -> str:
    """``1.23 GB``, ``456.70 KB``, ``999 bytes``: decimal units, as file managers show them."""
    if abs(n) < 1000:
        return f"{int(n)} byte" + ("" if int(n) == 1 else "s")
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.2f} {unit}"
    raise AssertionError("unreachable")


def budget_lines(budget: dict[str, Any] | None, gpu: str | None) -> list[str]:
    """What a size budget chose (``Report.budget``): the target, the sizes, the formats and their counts."""
    if not budget:
        return []
    counts = Counter(budget["choices"].values())
    chosen = ", ".join(f"{name} x{n}" for name, n in counts.most_common()) or "none"
    among = ", ".join(budget["formats"]) + (f" (what ComfyUI runs natively on {gpu})" if gpu else "")
    achieved = budget.get("achieved_bytes")
    return [
        f"size budget {size_text(budget['target_bytes'])}: predicted {size_text(budget['predicted_bytes'])}"
        + (f", written {size_text(achieved)}" if achieved is not None else "")
        + f" (smallest reachable {size_text(budget['smallest_bytes'])})",
        f"  chose per layer among {among}: {chosen}; error measure: {budget['error_measure']}",
    ]


def report_text(report, warnings: Sequence[str] = (), gpu: str | None = None, note: str | None = None,
                preset_chosen: bool = False) -> str:
    """The report of a conversion (:class:`cq_core` ``Report``) as lines for the node;
    ``preset_chosen``: the preset came from the node's ``preset`` widget, not detection."""
    quantized = report.quantized
    formats = Counter(t.format for t in quantized)
    lines = [f"warning: {w}" for w in (*report.warnings, *warnings)]
    if note:
        lines.append(note)
    lines += [
        f"wrote {report.output}",
        f"{len(quantized)} layers quantized to "
        + (", ".join(f"{name} ({n})" for name, n in formats.most_common()) or "nothing")
        + f" with {report.optimizer}; {size_text(report.input_bytes)} -> {size_text(report.output_bytes)} "
        f"in {report.seconds:.1f} s",
    ]
    if report.mean_sqnr_db is not None:
        lines.append(f"mean weight SQNR {report.mean_sqnr_db:.2f} dB (as ComfyUI decodes the file)")
    why = "chosen in 'preset'" if preset_chosen else (report.preset_reason or "none detected")
    lines.append(f"preset: {report.preset or 'none'} ({why})")
    lines += budget_lines(report.budget, gpu)
    if any(t.note for t in quantized) and report.optimizer != "rtn":
        lines.append(f"{report.optimizer}'s gains below are measured on the calibration statistics it was fitted "
                     "to (in-sample); on other prompts they are smaller.")
    for t in quantized:
        sqnr = "" if t.sqnr_db is None else f" {t.sqnr_db:.2f} dB"
        detail = f" ({t.note})" if t.note else ""
        lines.append(f"  {t.name}: {t.format}{sqnr}{detail}")
    return "\n".join(lines)
