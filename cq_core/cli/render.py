"""Plain-text tables and lines for the CLI. Every value a table or line shows goes through
:func:`cq_core.errors.printable`: a tensor name or metadata string holding a newline or a bidi
override is printed escaped, so a checkpoint cannot forge cq's output."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import Any

from cq_core.engine.report import Report
from cq_core.errors import LINE_LIMIT, printable
from cq_core.io.sizes import exact_bytes, human_bytes  # noqa: F401 (human_bytes re-exported for the CLI)


#: The most characters one table cell shows (a forged 20 MB name is cut in the middle).
CELL_LIMIT = 500


def lines(*texts: object) -> str:
    """Each of ``texts`` as one printed line (escaped, cut to a sane length), joined by newlines."""
    return "\n".join(printable(t, LINE_LIMIT) for t in texts)


def table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None, width: int | None = None
) -> str:
    """A fixed-width table; ``align`` has one of 'l'/'r' per column. With ``width``,
    the last column wraps onto indented lines so that rows fit in that many characters. Cells are
    escaped and cut to :data:`CELL_LIMIT` characters (:func:`~cq_core.errors.printable`)."""
    cells = [[printable(h) for h in headers]] + [[("" if c is None else printable(c, CELL_LIMIT)) for c in row]
                                                 for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" * len(headers)
    lead = sum(w + 2 for w in widths[:-1])
    if width is not None and lead + widths[-1] > width:
        widths[-1] = max(20, width - lead)
    lines = []
    for n, row in enumerate(cells):
        last = textwrap.wrap(row[-1], widths[-1]) if len(row[-1]) > widths[-1] else [row[-1]]
        row = [*row[:-1], last[0]]
        parts = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, align, strict=True)]
        lines.append("  ".join(parts).rstrip())
        lines.extend(" " * lead + more for more in last[1:])
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def count(n: int, noun: str) -> str:
    """``count(1, "layer")`` -> ``"1 layer"``; ``count(2, "layer")`` -> ``"2 layers"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def db(value: float | None) -> str:
    if value is None:
        return ""
    if math.isinf(value):
        return "exact" if value > 0 else "-inf"
    return f"{value:.2f}"


def shape(s: Sequence[int]) -> str:
    return "x".join(str(d) for d in s) if s else "scalar"


def formats_used(report: Report) -> str:
    """``float8_e4m3fn``, or ``float8_e4m3fn (40), int8_tensorwise (2)`` when rules mix formats."""
    counts: dict[str, int] = {}
    for t in report.quantized:
        counts[t.format or report.format] = counts.get(t.format or report.format, 0) + 1
    if len(counts) <= 1:
        return report.format if not counts else next(iter(counts))
    return ", ".join(f"{name} ({n})" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def rate(value: float) -> str:
    """``291``, or two significant digits below 10 (``0.37``): a tiny model is not ``0`` Mparam/s."""
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def quantized_phrase(report: Report, verb: str = "quantized") -> str:
    """``3 layers quantized to float8_e4m3fn``, or ``no layer quantized`` (``verb``: ``would be quantized``)."""
    if not report.quantized:
        return f"no layer {verb}"
    return f"{count(len(report.quantized), 'layer')} {verb} to {formats_used(report)}"


def mean_sqnr(report: Report) -> str:
    """``mean SQNR 31.52 dB``, or ``mean SQNR n/a`` when nothing was measured."""
    value = db(report.mean_sqnr_db)
    return f"mean SQNR {value} dB" if value not in ("", "exact") else f"mean SQNR {value or 'n/a'}"


def render_plan(report: Report) -> str:
    rows = [(t.name, t.action, t.format or t.dtype, shape(t.shape), t.reason) for t in report.tensors]
    return table(("tensor", "action", "format", "shape", "why"), rows)


def render_report(report: Report, *, all_tensors: bool = False) -> str:
    shown = report.tensors if all_tensors else report.quantized
    rows = [
        (t.name, t.format or t.action, shape(t.shape), db(t.sqnr_db), f"{t.seconds:.2f}", t.note or "")
        for t in shown
    ]
    out = [table(("layer", "format", "shape", "SQNR dB", "time s", "note"), rows, "lllrrl")] if rows else []
    kept = sum(t.action == "keep" for t in report.tensors)
    dropped = sum(t.action == "drop" for t in report.tensors)
    text = [
        f"{quantized_phrase(report)} ({report.optimizer}), "
        f"{count(kept, 'tensor')} kept, {dropped} dropped; {mean_sqnr(report)}",
        f"{human_bytes(report.input_bytes)} -> {human_bytes(report.output_bytes)} in {report.seconds:.1f} s "
        f"({rate(report.mparams_per_second)} Mparam/s), peak RSS {human_bytes(report.peak_rss_bytes)}",
    ]
    if report.layout:
        text.append(f"layout: {report.layout}")
    text.extend(preset_lines(report))
    text.extend(budget_lines(report))
    if report.output:
        text.append(f"wrote {report.output}")
    out.append(lines(*text))
    return "\n".join(out)


def render_summary(report: Report) -> str:
    """The one line ``cq convert -q`` prints: what was written, how well, how fast."""
    where = f"wrote {report.output}: " if report.output else ""
    return lines(
        f"{where}{quantized_phrase(report)}, {mean_sqnr(report)}, "
        f"{human_bytes(report.input_bytes)} -> {human_bytes(report.output_bytes)} in {report.seconds:.1f} s"
    )


def preset_lines(report: Report) -> list[str]:
    """The main preset and why, then one line per component when the file holds more than one."""
    lines = []
    if report.preset or report.preset_reason:
        lines.append(f"preset: {report.preset or 'none'} ({report.preset_reason})")
    if len(report.components) > 1 or any(c["prefix"] for c in report.components):
        lines += [f"  {c['prefix'] or '(whole file)'}: {c['preset']} ({c['reason']})" for c in report.components]
    return lines


def budget_lines(report: Report) -> list[str]:
    """What a size budget chose: the target, the predicted size (and the achieved one once written)."""
    budget = report.budget
    if not budget:
        return []
    counts: dict[str, int] = {}
    for name in budget["choices"].values():
        counts[name] = counts.get(name, 0) + 1
    chosen = ", ".join(f"{name} ({n})" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    line = f"size budget {human_bytes(budget['target_bytes'])}: predicted {exact_bytes(budget['predicted_bytes'])}"
    if budget.get("achieved_bytes") is not None:
        line += f", achieved {exact_bytes(budget['achieved_bytes'])}"
    return [
        line + f"; smallest reachable {human_bytes(budget['smallest_bytes'])}",
        f"  layers chosen: {chosen or 'none'}; error measure: {budget['error_measure']}",
    ]
